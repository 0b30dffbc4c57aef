"""Real node processes over real HTTP: concurrency, restarts, dying children, shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from mesh.process import ServiceError
from node.local.launch import LocalNode
from node.runtime.services import BackingServices

pytestmark = pytest.mark.slow

SignupBody = dict[str, str]


def signup_body(username: str, email: str | None = None) -> SignupBody:
    return {
        "username": username,
        "email": email or f"{username}@example.org",
        "password": "correct horse battery",
        "display_name": username,
    }


async def test_50_concurrent_signups_one_username(
    node_processes: Callable[..., LocalNode], backing: BackingServices
) -> None:
    node = node_processes()
    async with httpx.AsyncClient(base_url=node.url, timeout=60) as http:
        for attempt in range(3):  # three rounds: different interleavings each time
            name = f"racer{attempt}"
            responses = await asyncio.gather(
                *(
                    http.post("/api/users", json=signup_body(name, f"{name}.{i}@example.org"))
                    for i in range(50)
                )
            )
            assert Counter(r.status_code for r in responses) == Counter({201: 1, 409: 49})
            assert all(
                r.json()["error"]["code"] == "user_exists"
                for r in responses
                if r.status_code == 409
            )
            winner = next(r.json() for r in responses if r.status_code == 201)
            login = await http.post(
                "/api/auth/login", json={"login": name, "password": "correct horse battery"}
            )
            assert login.status_code == 200
            me = await http.get(
                "/api/users/me", headers={"Authorization": f"Bearer {login.json()['user_token']}"}
            )
            assert me.json()["id"] == winner["id"]
    from pymongo import AsyncMongoClient

    mongo: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(backing.mongodb_uri)
    database = node.process.env["SFUMESH_DATABASE"] if node.process.env else ""
    for attempt in range(3):
        assert (
            await mongo[database]["users"].count_documents({"username_key": f"racer{attempt}"}) == 1
        )
    await mongo.drop_database(database)
    await mongo.close()


async def test_restart_node_and_store_keeps_users_rooms_messages(
    node_processes: Callable[..., LocalNode], tmp_path: Path
) -> None:
    data_dir = tmp_path / "own-services"
    services = BackingServices.start("", "", data_dir)
    try:
        node = node_processes("node-a", services=services)
        async with httpx.AsyncClient(base_url=node.url, timeout=30) as http:
            assert (await http.post("/api/users", json=signup_body("keeper"))).status_code == 201
            token = (
                await http.post(
                    "/api/auth/login", json={"login": "keeper", "password": "correct horse battery"}
                )
            ).json()["user_token"]
            auth = {"Authorization": f"Bearer {token}"}
            assert (
                await http.post("/api/rooms", json={"slug": "kept-🏠"}, headers=auth)
            ).status_code == 201
            session = (await http.post("/api/sessions", headers=auth)).json()["session_token"]
            sauth = {"Authorization": f"Bearer {session}"}
            posted = await http.post(
                "/api/rooms/kept-🏠/messages", json={"text": "still here"}, headers=sauth
            )
            assert posted.status_code == 201
        node.stop()
        services.stop()
    finally:
        services.stop()

    services = BackingServices.start("", "", data_dir)  # same data dirs, new ports
    try:
        node = node_processes("node-b", services=services)
        async with httpx.AsyncClient(base_url=node.url, timeout=30) as http:
            login = await http.post(
                "/api/auth/login",
                json={"login": "keeper@example.org", "password": "correct horse battery"},
            )
            assert login.status_code == 200
            # The old user token still verifies too: same keys, and the user is still there.
            assert (await http.get("/api/users/me", headers=auth)).json()["username"] == "keeper"
            assert (await http.get("/api/rooms/kept-🏠")).status_code == 200
            history = await http.get("/api/rooms/kept-🏠/messages", headers=sauth)
            assert [m["text"] for m in history.json()["messages"]] == ["still here"]
            again = await http.post("/api/users", json=signup_body("keeper"))
            assert again.status_code == 409  # the unique index survived the restart too
    finally:
        services.stop()


def test_embedded_child_that_dies_is_reported(tmp_path: Path) -> None:
    services = BackingServices.start("", "", tmp_path)
    try:
        redis_child = next(c for c in services.children if c.name == "redis")
        assert redis_child.pid is not None
        os.kill(redis_child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not services.dead() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert services.dead() == [redis_child]
        with pytest.raises(ServiceError, match=r"redis .* died with code"):
            services.check()

        reported: list[str] = []

        async def on_death(child: object) -> None:
            reported.append(getattr(child, "name", ""))

        asyncio.run(asyncio.wait_for(services.watch(on_death, interval=0.05), 5))
        assert reported == ["redis"]
    finally:
        services.stop()


def test_given_urls_start_nothing(backing: BackingServices, tmp_path: Path) -> None:
    services = BackingServices.start(backing.redis_url, backing.mongodb_uri, tmp_path)
    assert services.children == []
    assert (services.redis_url, services.mongodb_uri) == (backing.redis_url, backing.mongodb_uri)
    assert not (tmp_path / "redis").exists() and not (tmp_path / "store").exists()


def test_node_with_embedded_services_exits_when_one_dies(
    node_processes: Callable[..., LocalNode], tmp_path: Path
) -> None:
    # No URLs: this node starts its own redis-server and store, the same way the demo does.
    empty = BackingServices(redis_url="", mongodb_uri="")
    node = node_processes(
        "solo", services=empty, extra_env={"SFUMESH_DATA_DIR": str(tmp_path / "solo")}
    )
    events = [
        json.loads(line)
        for line in node.process.log_path.read_text().splitlines()
        if line.startswith("{")
    ]
    pids = {e["service"]: e["pid"] for e in events if e["event"] == "service.started"}
    assert set(pids) == {"redis", "store"}
    os.kill(pids["store"], signal.SIGKILL)
    assert node.process.popen is not None
    assert node.process.popen.wait(30) == 3
    log_text = node.process.log_path.read_text()
    assert '"event": "service.died"' in log_text and '"service": "store"' in log_text
    # The node stopped its other child on the way out.
    with pytest.raises(ProcessLookupError):
        os.kill(pids["redis"], 0)


def test_sigterm_shuts_down_gracefully(node_processes: Callable[..., LocalNode]) -> None:
    node = node_processes("graceful")
    assert node.process.popen is not None
    node.process.popen.send_signal(signal.SIGTERM)
    assert node.process.popen.wait(20) == 0
    log_text = node.process.log_path.read_text()
    assert '"event": "node.stopped"' in log_text and '"event": "node.exit"' in log_text
