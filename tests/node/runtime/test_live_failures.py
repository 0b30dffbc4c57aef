"""Nodes that stop, nodes that die, and a Redis that comes back empty (S5, N2, item 9)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from node.local.launch import LocalNode
from node.runtime.services import BackingServices
from node.state import keys
from tests.conftest import suite_redis
from tests.node.live_client import create_room, sign_up
from tests.node.runtime.test_live_mesh import members_of, mesh_of

pytestmark = pytest.mark.slow


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


async def _ready(http: httpx.AsyncClient, url: str, want: int, within_s: float = 30) -> None:
    async def poll() -> None:
        while True:
            try:
                if (await http.get(f"{url}/readyz")).status_code == want:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)

    await asyncio.wait_for(poll(), within_s)


async def _until_gone(state: Redis, key: str, within_s: float = 5) -> None:
    async def poll() -> None:
        while await state.exists(key):  # noqa: ASYNC110 - another process clears it
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), within_s)


async def test_sigterm_drains_and_kill_9_is_reaped(
    backing: BackingServices, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    nodes = mesh_of(backing, tmp_path)
    state = suite_redis(backing)
    try:
        urls = [node.url for node in nodes]
        users = [await sign_up(http, urls[0]) for _ in range(3)]
        await create_room(users[0], urls[0], "fragile")
        socks = []
        for index, user in enumerate(users):
            sock = await user.connect(urls[index])
            await user.join(sock, "fragile", urls[(index + 1) % 3])
            socks.append(sock)
        watcher, drained, killed = socks

        # SIGTERM: the client is told where to go, the room hears it left, the node exits 0.
        popen = nodes[1].process.popen
        assert popen is not None
        popen.send_signal(signal.SIGTERM)
        notice = await drained.wait_for("reconnect")
        assert notice["node"] in {"node-1", "node-3"} and notice["url"] in {urls[0], urls[2]}
        left = await watcher.wait_for("participant-left", session_id=drained.session_id)
        assert left["reason"] == "node-draining"
        # drain, then a graceful Serf leave (up to 10 s) and the agent's exit (up to 10 s more)
        assert await asyncio.to_thread(popen.wait, 45) == 0
        assert not await state.exists(keys.node("node-2"))
        assert b"node-2" not in await state.smembers(keys.NODES)

        # kill -9: nobody deregisters; the others reap its sessions after the TTL.
        killed_pid = nodes[2].process.pid
        assert killed_pid is not None
        os.kill(killed_pid, signal.SIGKILL)
        left = await watcher.wait_for("participant-left", within_s=20, session_id=killed.session_id)
        assert left["reason"] == "node-gone"
        assert [m.session_id for m in await members_of(state, "fragile")] == [watcher.session_id]
        # The room hears of it first; the session record goes right after (membership first,
        # so that a reaper dying in between leaves nothing it cannot find again).
        await _until_gone(state, keys.session(killed.session_id))
        await watcher.close()
    finally:
        await state.aclose()
        for node in nodes:
            node.stop()


async def test_redis_restarted_empty_gets_live_state_back(
    backing: BackingServices, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    services = BackingServices.start("", backing.mongodb_uri, tmp_path / "own-redis")
    nodes: list[LocalNode] = []
    state = Redis.from_url(services.redis_url)
    try:
        # its own single redis-server, whichever Redis the rest of the suite runs on
        nodes = mesh_of(services, tmp_path, count=2, extra_env={"SFUMESH_REDIS_MODE": "single"})
        urls = [node.url for node in nodes]
        alice, bob = [await sign_up(http, url) for url in urls]
        await create_room(alice, urls[0], "survivor")
        a = await alice.connect(urls[0])
        await alice.join(a, "survivor", urls[1])
        b = await bob.connect(urls[1])
        await bob.join(b, "survivor", urls[0])
        await a.wait_for("participant-joined", session_id=b.session_id)

        redis_child = services.children[0]
        assert redis_child.name == "redis"
        await asyncio.to_thread(redis_child.stop)
        for url in urls:
            await _ready(http, url, 503)
        # Restart it with nothing: every key of the live state is gone.
        data_dir = tmp_path / "own-redis" / "redis"
        for entry in data_dir.iterdir():
            if entry.name not in ("redis.conf", "redis.log"):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        redis_child.start()
        for url in urls:
            await _ready(http, url, 200)

        members = await members_of(state, "survivor")
        assert sorted(m.session_id for m in members) == sorted([a.session_id, b.session_id])
        for sock in (a, b):
            assert await state.exists(keys.session(sock.session_id))
        # Events flow again, and leaving still works exactly once.
        await a.request("chat", text="still here?")
        await b.wait_for("chat", text="still here?")
        assert (await b.request("leave"))["type"] == "ack"
        left = await a.wait_for("participant-left", session_id=b.session_id)
        assert left["reason"] == "leave"
        assert [m.session_id for m in await members_of(state, "survivor")] == [a.session_id]
        await a.close()
        await b.close()
    finally:
        await state.aclose()
        for node in nodes:
            node.stop()
        services.stop()
