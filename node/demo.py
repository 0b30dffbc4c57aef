"""`sfumesh demo`: embedded services and local nodes, the URL printed; `--smoke` checks it."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from node.launch import LocalNode, start_node
from node.log import setup_logging
from node.services import BackingServices, ServiceError, free_port
from node.tokens import new_key


class SmokeFailure(Exception):
    pass


def _expect(response: httpx.Response, status: int, step: str) -> httpx.Response:
    if response.status_code != status:
        raise SmokeFailure(
            f"{step}: HTTP {response.status_code} (wanted {status}): {response.text[:300]}"
        )
    return response


async def smoke(base_url: str) -> list[tuple[str, bool, str]]:
    """signup -> login -> session -> create room -> QR -> chat history, over HTTP."""
    results: list[tuple[str, bool, str]] = []
    suffix = secrets.token_hex(4)
    state: dict[str, str] = {}
    async with httpx.AsyncClient(base_url=base_url, timeout=30.0) as http:

        async def signup() -> str:
            body = {
                "username": f"smoke_{suffix}",
                "email": f"smoke_{suffix}@example.org",
                "password": secrets.token_urlsafe(16),
                "display_name": "Smoke Test",
            }
            state["password"] = body["password"]
            user = _expect(await http.post("/api/users", json=body), 201, "signup").json()
            return f"user {user['id']}"

        async def login() -> str:
            body = {"login": f"smoke_{suffix}@example.org", "password": state["password"]}
            reply = _expect(await http.post("/api/auth/login", json=body), 200, "login").json()
            state["user_token"] = reply["user_token"]
            return f"user token until {reply['expires_at']}"

        async def session() -> str:
            headers = {"Authorization": f"Bearer {state['user_token']}"}
            reply = _expect(await http.post("/api/sessions", headers=headers), 201, "session")
            grant = reply.json()
            state["session_token"] = grant["session_token"]
            return f"session {grant['session_id']}"

        async def create_room() -> str:
            headers = {"Authorization": f"Bearer {state['user_token']}"}
            body = {"slug": f"smoke-{suffix}-🎉", "name": "Smoke room"}
            room = _expect(await http.post("/api/rooms", json=body, headers=headers), 201, "room")
            state["slug"] = room.json()["slug"]
            _expect(await http.get(f"/api/rooms/{state['slug']}"), 200, "room lookup")
            return str(room.json()["url"])

        async def qr() -> str:
            reply = _expect(await http.get(f"/api/rooms/{state['slug']}/qr.svg"), 200, "qr")
            if (
                not reply.headers["content-type"].startswith("image/svg+xml")
                or b"<svg" not in reply.content
            ):
                raise SmokeFailure("qr: not an SVG")
            return f"{len(reply.content)} bytes of SVG"

        async def chat_history() -> str:
            headers = {"Authorization": f"Bearer {state['session_token']}"}
            path = f"/api/rooms/{state['slug']}/messages"
            _expect(await http.post(path, json={"text": "hello"}, headers=headers), 201, "post")
            page = _expect(await http.get(path, headers=headers), 200, "history").json()
            if [m["text"] for m in page["messages"]] != ["hello"]:
                raise SmokeFailure(f"history: unexpected {page}")
            return "1 message read back"

        steps: list[tuple[str, Callable[[], Awaitable[str]]]] = [
            ("signup", signup),
            ("login", login),
            ("session", session),
            ("create room", create_room),
            ("qr code", qr),
            ("chat history", chat_history),
        ]
        for name, step in steps:
            try:
                results.append((name, True, await step()))
            except (SmokeFailure, httpx.HTTPError, KeyError, ValueError) as error:
                results.append((name, False, str(error) or type(error).__name__))
                break
    return results


def run_demo(*, nodes: int, smoke: bool, port: int, data_dir: Path) -> int:
    setup_logging(os.environ.get("SFUMESH_LOG_LEVEL", "WARNING"))
    if nodes != 1:
        print(
            "sfumesh demo: one node for now; --nodes > 1 arrives with the Mesh issue",
            file=sys.stderr,
        )
        return 2
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        services = BackingServices.start(
            os.environ.get("REDIS_URL", ""),
            os.environ.get("MONGODB_URI", ""),
            data_dir / "services",
        )
    except ServiceError as error:
        print(f"sfumesh demo: {error}", file=sys.stderr)
        return 1
    started: list[LocalNode] = []
    try:
        token_keys = {"demo": new_key()}
        node = start_node(
            services,
            token_keys,
            name="node-1",
            data_dir=data_dir,
            port=0 if smoke else _port_or_free(port),
        )
        started.append(node)
        if smoke:
            return _report_smoke(node)
        print(f"sfumesh demo is running: {node.url}/")
        print(f"  API docs: {node.url}/docs    logs: {data_dir}/node-1.log")
        print("  Ctrl-C stops it.")
        return _wait_until_stopped(services, started)
    except ServiceError as error:
        print(f"sfumesh demo: {error}", file=sys.stderr)
        return 1
    finally:
        for node in started:
            node.stop()
        services.stop()


def _port_or_free(port: int) -> int:
    """The wanted port if nothing listens there, else a free one (said on stderr)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return port
        except OSError:
            pass
    other = free_port()
    print(f"sfumesh demo: port {port} is taken, using {other}", file=sys.stderr)
    return other


def _report_smoke(node: LocalNode) -> int:
    results = asyncio.run(smoke(node.url))
    for name, ok, detail in results:
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
    passed = len(results) == 6 and all(ok for _, ok, _ in results)
    print("smoke: passed" if passed else "smoke: FAILED")
    return 0 if passed else 1


def _wait_until_stopped(services: BackingServices, nodes: list[LocalNode]) -> int:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(0.5):
        exited = [n.process for n in nodes if n.process.exit_code() is not None]
        for child in services.dead() + exited:
            print(f"sfumesh demo: {child.death_report()}", file=sys.stderr)
            return 1
    print("sfumesh demo: stopping")
    return 0
