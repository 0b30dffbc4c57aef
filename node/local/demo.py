"""`sfumesh demo`: embedded services and local nodes, the URL printed; `--smoke` checks it."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shlex
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import websockets
from aioice import stun, turn

from mesh.process import PRIVATE_UMASK, ServiceError, free_port, private_dir, private_file
from node.config import new_key
from node.local.coturn import LocalCoturn, start_coturn
from node.local.launch import LocalNode, start_nodes
from node.log import setup_logging
from node.runtime.services import BackingServices

SMOKE_STEPS = 9


class SmokeFailure(Exception):
    pass


def _expect(response: httpx.Response, status: int, step: str) -> httpx.Response:
    if response.status_code != status:
        raise SmokeFailure(
            f"{step}: HTTP {response.status_code} (wanted {status}): {response.text[:300]}"
        )
    return response


async def _live_room(urls: list[str], slug: str, user_tokens: list[str]) -> str:
    """Two people on the first and last node, joining through another node, chatting."""
    sockets = []
    try:
        async with httpx.AsyncClient(timeout=30.0) as http:
            hellos = []
            for index, user_token in enumerate(user_tokens):
                ws_node = urls[0] if index == 0 else urls[-1]
                auth = {"Authorization": f"Bearer {user_token}"}
                grant = _expect(await http.post(f"{ws_node}/api/sessions", headers=auth), 201, "s")
                session_token = grant.json()["session_token"]
                ws_url = ws_node.replace("http", "ws", 1) + f"/ws?session_token={session_token}"
                sock = await websockets.connect(ws_url)
                sockets.append(sock)
                hellos.append(await _receive(sock, "hello"))
                join_node = urls[(index + 1) % len(urls)]
                reply = await http.post(
                    f"{join_node}/api/rooms/{slug}/join",
                    headers={"Authorization": f"Bearer {session_token}"},
                )
                room_token = _expect(reply, 200, "join").json()["room_token"]
                await sock.send(json.dumps({"type": "join", "room_token": room_token}))
                await _receive(sock, "joined")
            arrival = await _receive(sockets[0], "participant-joined")
            await sockets[1].send(json.dumps({"type": "chat", "text": "hello across nodes"}))
            chat = await _receive(sockets[0], "chat")
            if chat["text"] != "hello across nodes":
                raise SmokeFailure(f"live room: unexpected chat {chat}")
            nodes = sorted({hello["node"] for hello in hellos})
            return (
                f"{arrival['participant']['display_name']} joined and chatted "
                f"across {', '.join(nodes)}"
            )
    finally:
        for sock in sockets:
            await sock.close()


async def _receive(sock: Any, type_: str) -> dict[str, Any]:
    while True:
        message: dict[str, Any] = json.loads(await asyncio.wait_for(sock.recv(), 10))
        if message["type"] == type_:
            return message
        if message["type"] == "error":
            raise SmokeFailure(f"live room: {message}")


async def _turn_allocation(url: str, session_token: str, server: tuple[str, int]) -> str:
    """The TURN credentials a node hands a session in its `hello` buy an allocation."""
    ws_url = url.replace("http", "ws", 1) + f"/ws?session_token={session_token}"
    async with websockets.connect(ws_url) as sock:
        hello = await _receive(sock, "hello")
    if not hello.get("ice_servers"):
        raise SmokeFailure("turn: the node handed no TURN server")
    given = hello["ice_servers"][0]
    try:
        endpoint, _ = await turn.create_turn_endpoint(
            asyncio.DatagramProtocol,
            server_addr=server,
            username=given["username"],
            password=given["credential"],
        )
    except stun.TransactionFailed as error:
        raise SmokeFailure(f"turn: allocation refused: {error}") from None
    host, port = endpoint.get_extra_info("sockname")
    endpoint.close()
    return f"relayed address {host}:{port} for {given['username']}"


async def smoke(
    urls: list[str], turn_server: tuple[str, int] | None = None
) -> list[tuple[str, bool, str]]:
    """signup -> login -> session -> create room -> QR -> chat history over HTTP, then a live
    room over WebSockets spanning the nodes; with `turn_server`, a TURN allocation with the
    credentials the node handed the session."""
    base_url = urls[0]
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

        async def live_room() -> str:
            body = {
                "username": f"smoke2_{suffix}",
                "email": f"smoke2_{suffix}@example.org",
                "password": state["password"],
                "display_name": "Second Smoker",
            }
            _expect(await http.post("/api/users", json=body), 201, "second signup")
            login = {"login": body["username"], "password": state["password"]}
            reply = _expect(await http.post("/api/auth/login", json=login), 200, "second login")
            tokens = [state["user_token"], reply.json()["user_token"]]
            return await _live_room(urls, state["slug"], tokens)

        async def mesh() -> str:
            # Every node sees every node alive in Serf, with a coordinate, and ranks them.
            deadline = time.monotonic() + 30
            while True:
                nodes = _expect(await http.get("/api/nodes"), 200, "nodes").json()["nodes"]
                ready = [n for n in nodes if n["serf_status"] == "alive" and n["coordinate"]]
                if len(ready) == len(urls):
                    break
                if time.monotonic() > deadline:
                    raise SmokeFailure(f"mesh: {len(ready)} of {len(urls)} nodes seen in Serf")
                await asyncio.sleep(0.5)
            samples = [{"node": n["name"], "rtt_ms": 1.0 + i} for i, n in enumerate(nodes[:3])]
            ranked = _expect(
                await http.post("/api/nodes/rank", json={"samples": samples}), 200, "rank"
            ).json()["nodes"]
            regions = ", ".join(sorted(n["region"] for n in nodes))
            return f"{len(ready)} nodes alive in Serf ({regions}); nearest {ranked[0]['name']}"

        async def web_client() -> str:
            # The page and files from each folder of it: an installed wheel must carry them all.
            page = _expect(await http.get("/"), 200, "web client").text
            if "<html" not in page.lower():
                raise SmokeFailure("web client: / is not the page")
            for path in ("/static/app.js", "/static/views/room.js", "/static/i18n/en.json"):
                _expect(await http.get(path), 200, f"web client {path}")
            return "page, scripts and translations served"

        steps: list[tuple[str, Callable[[], Awaitable[str]]]] = [
            ("web client", web_client),
            ("mesh", mesh),
            ("signup", signup),
            ("login", login),
            ("session", session),
            ("create room", create_room),
            ("qr code", qr),
            ("chat history", chat_history),
            ("live room", live_room),
        ]
        if turn_server is not None:
            server = turn_server

            async def turn_step() -> str:
                return await _turn_allocation(base_url, state["session_token"], server)

            steps.append(("turn", turn_step))
        for name, step in steps:
            try:
                results.append((name, True, await step()))
            except (
                SmokeFailure,
                httpx.HTTPError,
                KeyError,
                ValueError,
                TimeoutError,
                OSError,
                websockets.exceptions.WebSocketException,
            ) as error:
                results.append((name, False, str(error) or type(error).__name__))
                break
    return results


def run_demo(
    *, nodes: int, smoke: bool, port: int, data_dir: Path, turn_server: bool = False
) -> int:
    setup_logging(os.environ.get("SFUMESH_LOG_LEVEL", "WARNING"))
    if not 1 <= nodes <= 16:
        print("sfumesh demo: --nodes must be 1..16", file=sys.stderr)
        return 2
    # Everything the demo and its children write (databases, logs, secrets) is the user's
    # alone, whatever umask the shell had.
    os.umask(PRIVATE_UMASK)
    data_dir = private_dir(data_dir.resolve(), tighten=False)
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
    coturn: LocalCoturn | None = None
    media_hosts = os.environ.get("SFUMESH_MEDIA_HOST_ADDRESSES", '["127.0.0.1"]')
    try:
        turn_env: dict[str, str] = {}
        if turn_server:
            # Relaying to the nodes' media addresses only (loopback here).
            coturn = start_coturn(data_dir, allowed_peers=json.loads(media_hosts))
            turn_env = coturn.node_env()
        token_keys = {"demo": new_key()}
        ports = None if smoke else _ports_or_free(port, nodes)
        started.extend(
            start_nodes(
                services,
                token_keys,
                count=nodes,
                data_dir=data_dir,
                ports=ports,
                # Browsers on this machine reach the nodes on loopback (aioice skips it unless
                # told); unless the operator chose addresses.
                extra_env={"SFUMESH_MEDIA_HOST_ADDRESSES": media_hosts, **turn_env},
            )
        )
        if smoke:
            return _report_smoke(started, coturn)
        print(f"sfumesh demo is running: {started[0].url}/")
        for node in started:
            print(f"  {node.name}: {node.url}/  (logs: {data_dir}/{node.name}.log)")
        print(f"  API docs: {started[0].url}/docs")
        if coturn is not None:
            print(f"  TURN: coturn {', '.join(coturn.urls)} (pid {coturn.process.pid})")
        cluster_env = _write_cluster_env(data_dir, started[0], services)
        if cluster_env is not None:
            print(f"  the mesh: . {cluster_env} && sfumesh cluster members  (rtt, rooms, ...)")
        print("  Ctrl-C stops it.")
        return _wait_until_stopped(services, started, coturn)
    except ServiceError as error:
        print(f"sfumesh demo: {error}", file=sys.stderr)
        return 1
    finally:
        for node in started:
            node.stop()
        if coturn is not None:
            coturn.stop()
        services.stop()


def _write_cluster_env(data_dir: Path, node: LocalNode, services: BackingServices) -> Path | None:
    """A 0600 file with what `sfumesh cluster` needs to reach this demo (its secrets are
    the demo's own, made for this run; they are not printed)."""
    if node.serf is None:
        return None
    path = data_dir / "cluster.env"
    lines = [
        f"export SFUMESH_SERF_RPC_ADDR={shlex.quote(node.serf.rpc_addr)}",
        f"export SFUMESH_SERF_RPC_AUTH={shlex.quote(node.serf.rpc_auth)}",
        f"export REDIS_URL={shlex.quote(services.redis_url)}",
    ]
    return private_file(path, "\n".join(lines) + "\n")


def _ports_or_free(first: int, count: int) -> list[int]:
    """first, first+1, ... where nothing listens, else free ones (said on stderr)."""
    ports = []
    for port in range(first, first + count):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
                ports.append(port)
                continue
            except OSError:
                pass
        other = free_port()
        print(f"sfumesh demo: port {port} is taken, using {other}", file=sys.stderr)
        ports.append(other)
    return ports


def _report_smoke(nodes: list[LocalNode], coturn: LocalCoturn | None = None) -> int:
    server = None if coturn is None else (coturn.host, coturn.port)
    results = asyncio.run(smoke([node.url for node in nodes], server))
    for name, ok, detail in results:
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
    steps = SMOKE_STEPS + (coturn is not None)
    passed = len(results) == steps and all(ok for _, ok, _ in results)
    print("smoke: passed" if passed else "smoke: FAILED")
    return 0 if passed else 1


def _wait_until_stopped(
    services: BackingServices, nodes: list[LocalNode], coturn: LocalCoturn | None = None
) -> int:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(0.5):
        exited = [n.process for n in nodes if n.process.exit_code() is not None]
        if coturn is not None and coturn.process.exit_code() is not None:
            exited.append(coturn.process)
        for child in services.dead() + exited:
            print(f"sfumesh demo: {child.death_report()}", file=sys.stderr)
            return 1
    print("sfumesh demo: stopping")
    return 0
