"""`sfumesh bench join`: joins/s and p50/p99 of the full join across a local mesh.

Embedded services and `nodes` real node processes start as in `sfumesh demo`, in a temporary
data dir. Before any timing, `clients` users sign up, log in, create a room each, take a
session and open their WebSocket, round-robin over the nodes (client i on node i mod N).

One *full join* is what a person waits for: `POST /api/rooms/{slug}/join` sent to another
node than the one holding the client's WebSocket (the other nodes in turn), then the `join`
frame with the room token on the WebSocket, until its `ack` (after the `joined` snapshot).
Each client then leaves (`leave` frame, until its ack) and joins again, back to back, all
clients at once, for `duration_s` per phase:

1. spread: every client joins a room of its own, so room locks are never contended;
2. one room: every client joins the same room, so every join (HTTP admit and WebSocket
   activate) and every leave queues on that room's lock, and each join is announced to
   everyone inside.

Clients keep their frame rate below the nodes' per-socket allowance (`live.ws_frames_per_s`)
by waiting before a join, never inside the timed span. Any non-2xx answer, transport error,
`error` frame, missing ack or unexpected close counts as an error; a run with errors exits 1.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import platform
import secrets
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import websockets
from websockets.asyncio.client import ClientConnection, connect

from mesh.process import ServiceError
from node.bench.harness import (
    WATCH_INTERVAL_S,
    BenchFailure,
    Watch,
    drop_external_database,
    http_client,
    load,
    no_interrupts,
)
from node.bench.report import Phase, ms, print_errors, print_phases, rounded, say, write_report
from node.config import LiveSettings, RoomSettings, new_key
from node.local.launch import LocalNode, start_nodes
from node.log import setup_logging
from node.runtime.services import BackingServices

DEFAULT_NODES = 3
DEFAULT_CLIENTS = 60
# The join path never hashes a password; a low cost only makes the set-up quick.
DEFAULT_BCRYPT_COST = 4
MAX_NODES = 16
MAX_CLIENTS = 5000
SETUP_CONCURRENCY = 16
ACK_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 30.0
CLOSE_TIMEOUT_S = 10.0
# A client whose socket is gone idles this long per turn instead of spinning on errors.
CLOSED_CLIENT_NAP_S = 0.05
# Frames a client sends per second at most: under the node's allowance (whose bucket also
# holds one second of frames), with room for frames bunched up on the way.
FRAME_RATE_PER_S = 0.8 * LiveSettings().ws_frames_per_s
# Frames of one turn: `join` and `leave`.
FRAMES_PER_TURN = 2
# Messages a client may get that need no answer.
QUIET_TYPES = frozenset(
    {"hello", "participant-joined", "participant-left", "participant-replaced", "chat", "pong"}
)


@dataclass
class MeshWatch(Watch):
    """`Watch` over every node of the mesh, not just the first."""

    others: Sequence[LocalNode] = ()

    async def run(self) -> None:
        nodes = [self.node, *self.others]
        while True:
            dead = self.services.dead()
            dead.extend(n.process for n in nodes if n.process.exit_code() is not None)
            if dead:
                self.deaths.extend(child.death_report() for child in dead)
                self.abort.set()
                return
            await asyncio.sleep(WATCH_INTERVAL_S)


@dataclass
class ScenarioPhases:
    """The phases one scenario records: the full join, its HTTP part, and the leave."""

    join: Phase
    http: Phase
    leave: Phase

    def all(self) -> list[Phase]:
        return [self.join, self.http, self.leave]


@dataclass
class JoinClient:
    """One person: a user with a session whose WebSocket stays open on `node`."""

    index: int
    node: LocalNode
    session_token: str
    own_room: str
    ws: ClientConnection
    # Errors nobody asked for (an `error` frame without id, a close) land here.
    socket_phase: Phase
    pending: dict[str, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    joined_room: str | None = None
    room: str | None = None
    turns: int = 0
    closed: bool = False
    closing: bool = False
    paced_s: float = 0.0
    reader: asyncio.Task[None] | None = None
    _ids: itertools.count[int] = field(default_factory=itertools.count, init=False)
    _allowance: float = field(default=FRAME_RATE_PER_S, init=False)
    _allowance_at: float = field(default_factory=time.monotonic, init=False)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.session_token}"}

    def start_reading(self) -> None:
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        where = f"client {self.index} on {self.node.name}"
        try:
            async for raw in self.ws:
                try:
                    message = json.loads(raw)
                except ValueError:
                    self.socket_phase.record_error(f"{where}: not JSON: {str(raw)[:200]}")
                    continue
                if not isinstance(message, dict):
                    self.socket_phase.record_error(f"{where}: not an object: {str(raw)[:200]}")
                    continue
                frame_id = message.get("id")
                waiter = self.pending.pop(str(frame_id), None) if frame_id is not None else None
                if waiter is not None:
                    if not waiter.done():
                        waiter.set_result(message)
                    continue
                kind = message.get("type")
                if kind == "joined":
                    self.joined_room = message.get("room")
                elif kind not in QUIET_TYPES:
                    self.socket_phase.record_error(f"{where}: unexpected {str(raw)[:200]}")
        except websockets.exceptions.ConnectionClosed as error:
            if not self.closing:
                self.socket_phase.record_error(f"{where}: WebSocket closed: {error}")
        finally:
            self.closed = True
            for waiter in self.pending.values():
                if not waiter.done():
                    waiter.set_exception(ConnectionError("the WebSocket closed"))
            self.pending.clear()

    async def request(self, frame_type: str, **fields: Any) -> dict[str, Any]:
        """Send a frame with an id; its `ack` or `error`. TimeoutError, ConnectionError."""
        if self.closed:
            raise ConnectionError("the WebSocket is closed")
        frame_id = f"{frame_type[0]}{next(self._ids)}"
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[frame_id] = waiter
        try:
            await self.ws.send(json.dumps({"type": frame_type, "id": frame_id, **fields}))
            return await asyncio.wait_for(waiter, ACK_TIMEOUT_S)
        except websockets.exceptions.ConnectionClosed as error:
            raise ConnectionError(f"the WebSocket closed: {error}") from error
        finally:
            self.pending.pop(frame_id, None)

    async def pace(self, frames: int) -> None:
        """Wait until `frames` more frames fit under FRAME_RATE_PER_S."""
        while True:
            now = time.monotonic()
            self._allowance = min(
                FRAME_RATE_PER_S, self._allowance + (now - self._allowance_at) * FRAME_RATE_PER_S
            )
            self._allowance_at = now
            if self._allowance >= frames:
                self._allowance -= frames
                return
            wait = (frames - self._allowance) / FRAME_RATE_PER_S
            self.paced_s += wait
            await asyncio.sleep(wait)

    async def close(self) -> None:
        self.closing = True
        try:
            await self.ws.close()
        finally:
            if self.reader is not None:
                await self.reader


async def _leave(client: JoinClient, phase: Phase) -> None:
    where = f"client {client.index} leave on {client.node.name}"
    started = time.perf_counter()
    try:
        reply = await client.request("leave")
    except (ConnectionError, TimeoutError) as error:
        phase.record_error(f"{where}: {type(error).__name__}: {error}")
        return
    if reply.get("type") != "ack" or reply.get("room") != client.room:
        phase.record_error(f"{where}: {json.dumps(reply)[:200]}")
        return
    phase.latencies_ms.append((time.perf_counter() - started) * 1000)
    client.room = None


async def _turn(
    client: JoinClient,
    slug: str,
    nodes: Sequence[LocalNode],
    http: dict[str, httpx.AsyncClient],
    phases: ScenarioPhases,
) -> None:
    """One full join of `slug` (timed), then the leave."""
    if client.closed:
        await asyncio.sleep(CLOSED_CLIENT_NAP_S)
        return
    if client.room is not None:
        # A leave that failed before: try it again rather than pile up errors after it.
        await _leave(client, phases.leave)
        return
    home = nodes.index(client.node)
    others = len(nodes) - 1
    join_node = nodes[(home + 1 + client.turns % others) % len(nodes)] if others else client.node
    client.turns += 1
    path = f"/api/rooms/{slug}/join"
    where = f"client {client.index} ({client.node.name}) POST {join_node.name}{path}"
    await client.pace(FRAMES_PER_TURN)
    client.joined_room = None
    started = time.perf_counter()
    try:
        response = await http[join_node.name].post(path, headers=client.auth)
    except httpx.HTTPError as error:
        phases.join.record_error(f"{where}: {type(error).__name__}: {error}")
        return
    http_ms = (time.perf_counter() - started) * 1000
    if not response.is_success:
        phases.join.record_error(
            f"{where}: HTTP {response.status_code}: {response.text.strip()[:200]}"
        )
        return
    try:
        grant = response.json()
        room_token = str(grant["room_token"])
        granted_node = grant["node"]
    except (ValueError, KeyError, TypeError):
        phases.join.record_error(f"{where}: unexpected reply {response.text.strip()[:200]}")
        return
    if granted_node != client.node.name:
        phases.join.record_error(f"{where}: token for {granted_node}, WebSocket on another node")
        return
    phases.http.latencies_ms.append(http_ms)
    where = f"client {client.index} WebSocket join on {client.node.name}"
    try:
        reply = await client.request("join", room_token=room_token)
    except (ConnectionError, TimeoutError) as error:
        phases.join.record_error(f"{where}: {type(error).__name__}: {error}")
        return
    elapsed_ms = (time.perf_counter() - started) * 1000
    if reply.get("type") != "ack" or reply.get("room") != slug:
        phases.join.record_error(f"{where}: {json.dumps(reply)[:200]}")
        return
    client.room = slug
    if client.joined_room != slug:
        phases.join.record_error(f"{where}: ack without a `joined` for {slug} before it")
    else:
        phases.join.latencies_ms.append(elapsed_ms)
    await _leave(client, phases.leave)


@dataclass
class JoinRun:
    duration_s: float
    nodes: int
    clients: int
    bcrypt_cost: int
    spread: ScenarioPhases
    one_room: ScenarioPhases
    socket: Phase = field(default_factory=lambda: Phase("socket", "WebSocket events"))
    paced_s: float = 0.0
    # CPU this process used per second of each scenario (1.0 = one core busy): the clients
    # compete with the nodes for the same machine.
    bench_cpu: dict[str, float] = field(default_factory=dict)

    @property
    def phases(self) -> list[Phase]:
        return [*self.spread.all(), *self.one_room.all(), self.socket]

    @property
    def errors(self) -> int:
        return sum(p.errors for p in self.phases)


def new_run(duration_s: float, nodes: int, clients: int, bcrypt_cost: int) -> JoinRun:
    return JoinRun(
        duration_s=duration_s,
        nodes=nodes,
        clients=clients,
        bcrypt_cost=bcrypt_cost,
        spread=ScenarioPhases(
            Phase("spread", "spread   full join (HTTP join + WS ack)"),
            Phase("spread_http", "spread   POST /api/rooms/{slug}/join"),
            Phase("spread_leave", "spread   WS leave ack"),
        ),
        one_room=ScenarioPhases(
            Phase("one_room", "one room full join (HTTP join + WS ack)"),
            Phase("one_room_http", "one room POST /api/rooms/{slug}/join"),
            Phase("one_room_leave", "one room WS leave ack"),
        ),
    )


async def _expect(
    setup: Phase,
    http: httpx.AsyncClient,
    status: int,
    path: str,
    body: dict[str, Any] | None = None,
    token: str | None = None,
) -> dict[str, Any] | None:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        response = await http.post(path, json=body, headers=headers)
    except httpx.HTTPError as error:
        setup.record_error(f"POST {path}: {type(error).__name__}: {error}")
        return None
    if response.status_code != status:
        setup.record_error(
            f"POST {path}: HTTP {response.status_code}: {response.text.strip()[:200]}"
        )
        return None
    reply: dict[str, Any] = response.json()
    return reply


async def _connect(node: LocalNode, session_token: str) -> tuple[ClientConnection, str]:
    """An open WebSocket on `node` and the node its `hello` names."""
    url = node.url.replace("http", "ws", 1) + f"/ws?session_token={session_token}"
    ws = await connect(url, open_timeout=CONNECT_TIMEOUT_S)
    try:
        hello = json.loads(await asyncio.wait_for(ws.recv(), CONNECT_TIMEOUT_S))
        if not isinstance(hello, dict) or hello.get("type") != "hello":
            raise BenchFailure(f"{node.name}: the first message was not hello: {hello}")
    except BaseException:
        await ws.close()
        raise
    return ws, str(hello.get("node"))


async def _set_up_client(
    index: int,
    node: LocalNode,
    http: httpx.AsyncClient,
    prefix: str,
    password: str,
    shared_room: tuple[str, int] | None,
    setup: Phase,
    socket_phase: Phase,
) -> JoinClient | None:
    """Sign up, log in, create the own room (and the shared one), open the WebSocket."""
    username = f"{prefix}{index}"
    body = {
        "username": username,
        "email": f"{username}@example.org",
        "password": password,
        "display_name": f"Bench {index}",
    }
    if await _expect(setup, http, 201, "/api/users", body) is None:
        return None
    login = await _expect(
        setup, http, 200, "/api/auth/login", {"login": username, "password": password}
    )
    if login is None:
        return None
    user_token = str(login["user_token"])
    own_room = f"{prefix.rstrip('_')}-r{index}"
    rooms: list[dict[str, Any]] = [{"slug": own_room, "name": f"Bench room {index}"}]
    if shared_room is not None:
        rooms.append(
            {"slug": shared_room[0], "name": "Bench: everyone", "capacity": shared_room[1]}
        )
    for room in rooms:
        if await _expect(setup, http, 201, "/api/rooms", room, user_token) is None:
            return None
    grant = await _expect(setup, http, 201, "/api/sessions", token=user_token)
    if grant is None:
        return None
    session_token = str(grant["session_token"])
    try:
        ws, hello_node = await _connect(node, session_token)
    except (OSError, TimeoutError, ValueError, websockets.exceptions.WebSocketException) as error:
        setup.record_error(f"WebSocket to {node.name}: {type(error).__name__}: {error}")
        return None
    client = JoinClient(index, node, session_token, own_room, ws, socket_phase)
    client.start_reading()
    if hello_node != node.name:
        setup.record_error(f"WebSocket to {node.name}: hello names {hello_node}")
    return client


async def _set_up(
    nodes: Sequence[LocalNode],
    http: dict[str, httpx.AsyncClient],
    run: JoinRun,
    shared_slug: str,
    clients: list[JoinClient],
) -> None:
    """All clients, their rooms and open WebSockets (appended to `clients` as they come)."""
    setup = Phase("setup", "setup")
    prefix = f"j{secrets.token_hex(3)}_"
    password = secrets.token_urlsafe(16)
    gate = asyncio.Semaphore(SETUP_CONCURRENCY)

    async def one(index: int) -> None:
        node = nodes[index % len(nodes)]
        shared = (shared_slug, run.clients) if index == 0 else None
        async with gate:
            client = await _set_up_client(
                index, node, http[node.name], prefix, password, shared, setup, run.socket
            )
        if client is not None:
            clients.append(client)

    await asyncio.gather(*(one(index) for index in range(run.clients)))
    clients.sort(key=lambda c: c.index)
    if setup.errors or run.socket.errors:
        raise BenchFailure(
            "setup failed: " + "; ".join([*setup.error_samples, *run.socket.error_samples])
        )


async def _scenario(
    phases: ScenarioPhases,
    clients: list[JoinClient],
    room_of: Callable[[JoinClient], str],
    nodes: Sequence[LocalNode],
    http: dict[str, httpx.AsyncClient],
    run: JoinRun,
    watch: MeshWatch,
) -> None:
    """Every client joins and leaves `room_of(client)` back to back until the deadline."""
    idle: asyncio.Queue[JoinClient] = asyncio.Queue()
    for client in clients:
        idle.put_nowait(client)

    async def one_turn() -> None:
        # As many workers as clients: one is always idle when a worker asks.
        client = idle.get_nowait()
        try:
            await _turn(client, room_of(client), nodes, http, phases)
        finally:
            idle.put_nowait(client)

    cpu_started = time.process_time()
    deadline = time.perf_counter() + run.duration_s
    await load(phases.join, len(clients), deadline, watch.abort, one_turn)
    phases.http.elapsed_s = phases.leave.elapsed_s = phases.join.elapsed_s
    if phases.join.elapsed_s > 0:
        run.bench_cpu[phases.join.key] = (time.process_time() - cpu_started) / phases.join.elapsed_s
    watch.check()


async def _drive(nodes: list[LocalNode], services: BackingServices, run: JoinRun) -> None:
    watch = MeshWatch(nodes[0], services, others=nodes[1:])
    watcher = asyncio.create_task(watch.run())
    shared_slug = f"j{secrets.token_hex(3)}-everyone"
    clients: list[JoinClient] = []
    http = {node.name: http_client(node.url, run.clients) for node in nodes}
    try:
        await _set_up(nodes, http, run, shared_slug, clients)
        watch.check()
        await _scenario(run.spread, clients, lambda c: c.own_room, nodes, http, run, watch)
        await _scenario(run.one_room, clients, lambda _: shared_slug, nodes, http, run, watch)
    finally:
        run.paced_s = sum(c.paced_s for c in clients)
        watcher.cancel()
        closing = asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        try:
            await asyncio.wait_for(closing, CLOSE_TIMEOUT_S)
        except TimeoutError:
            say("sfumesh bench: some WebSockets did not close in time", err=True)
        for client in http.values():
            await client.aclose()


def _bench_join(data_dir: Path, run: JoinRun) -> None:
    external_store = os.environ.get("MONGODB_URI", "")
    services = BackingServices.start(
        os.environ.get("REDIS_URL", ""), external_store, data_dir / "services"
    )
    database = f"bench_{secrets.token_hex(4)}"
    nodes: list[LocalNode] = []
    try:
        extra_env = {
            "SFUMESH_BCRYPT_COST": str(run.bcrypt_cost),
            "SFUMESH_DATABASE": database,
            "SFUMESH_ROOM_MAX_CAPACITY": str(max(run.clients, RoomSettings().max_capacity)),
            # Every client connects from this machine's address.
            "SFUMESH_WS_MAX_PER_ADDRESS": str(max(run.clients, LiveSettings().ws_max_per_address)),
        }
        nodes = start_nodes(
            services, {"bench": new_key()}, count=run.nodes, data_dir=data_dir, extra_env=extra_env
        )
        asyncio.run(_drive(nodes, services, run))
    finally:
        with no_interrupts():
            for node in nodes:
                node.stop()
            services.stop()
            if external_store:
                try:
                    drop_external_database(external_store, database)
                except Exception as error:
                    say(f"sfumesh bench: could not drop {database}: {error}", err=True)


def print_table(run: JoinRun) -> None:
    cpus = os.cpu_count() or "?"
    say(
        f"sfumesh bench join: {run.nodes} nodes, {run.clients} clients (WebSockets round-robin, "
        f"HTTP join on another node), {run.duration_s:g} s per phase, {cpus} CPUs"
    )
    print_phases(
        [
            (number, phase)
            for number, group in ((1, run.spread), (2, run.one_room))
            for phase in group.all()
        ]
    )
    say("")
    for name, phases in (("spread rooms", run.spread), ("one room    ", run.one_room)):
        say(
            f"full join, {name}: {phases.join.per_s:.1f} joins/s, "
            f"p50 {ms(phases.join.percentile_ms(0.50))} ms, "
            f"p99 {ms(phases.join.percentile_ms(0.99))} ms"
        )
    if run.bench_cpu:
        shares = ", ".join(f"{key} {share:.2f}" for key, share in run.bench_cpu.items())
        say(f"this process's CPU, in cores: {shares}")
    if run.paced_s:
        say(f"clients waited {run.paced_s:.1f} s in all to stay under the frame rate limit")
    print_errors(run.phases)


def report(run: JoinRun) -> dict[str, Any]:
    figures: dict[str, Any] = {"bench": "join"}
    for key, phases in (("spread", run.spread), ("one_room", run.one_room)):
        figures[f"{key}_joins_per_s"] = round(phases.join.per_s, 2)
        figures[f"{key}_join_p50_ms"] = rounded(phases.join.percentile_ms(0.50))
        figures[f"{key}_join_p99_ms"] = rounded(phases.join.percentile_ms(0.99))
        figures[f"{key}_http_join_p50_ms"] = rounded(phases.http.percentile_ms(0.50))
        figures[f"{key}_http_join_p99_ms"] = rounded(phases.http.percentile_ms(0.99))
        figures[f"{key}_leave_p50_ms"] = rounded(phases.leave.percentile_ms(0.50))
        figures[f"{key}_leave_p99_ms"] = rounded(phases.leave.percentile_ms(0.99))
    figures.update(
        {
            "nodes": run.nodes,
            "clients": run.clients,
            "duration_s": run.duration_s,
            "bcrypt_cost": run.bcrypt_cost,
            "errors": run.errors,
            "errors_by_phase": {phase.key: phase.errors for phase in run.phases},
            "phases": {phase.key: phase.summary() for phase in run.phases},
            "paced_s": round(run.paced_s, 3),
            "bench_cpu_cores": {key: round(share, 2) for key, share in run.bench_cpu.items()},
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    )
    return figures


def run_join_bench(
    *,
    json_path: Path | None,
    duration_s: float,
    nodes: int | None = None,
    clients: int | None = None,
    bcrypt_cost: int | None = None,
) -> int:
    """`sfumesh bench join`: 0 without errors, 1 with, 2 on bad arguments."""
    nodes = DEFAULT_NODES if nodes is None else nodes
    clients = DEFAULT_CLIENTS if clients is None else clients
    bcrypt_cost = DEFAULT_BCRYPT_COST if bcrypt_cost is None else bcrypt_cost
    if (
        not duration_s > 0
        or not 1 <= nodes <= MAX_NODES
        or not 1 <= clients <= MAX_CLIENTS
        or not 4 <= bcrypt_cost <= 31
    ):
        say(
            f"sfumesh bench: --duration must be > 0, --nodes 1..{MAX_NODES}, "
            f"--clients 1..{MAX_CLIENTS}, --bcrypt-cost 4..31",
            err=True,
        )
        return 2
    setup_logging(os.environ.get("SFUMESH_LOG_LEVEL", "WARNING"))
    run = new_run(duration_s, nodes, clients, bcrypt_cost)
    try:
        with tempfile.TemporaryDirectory(prefix="sfumesh-bench-") as tmp:
            _bench_join(Path(tmp), run)
    except KeyboardInterrupt:
        say("sfumesh bench: interrupted; nodes and services stopped", err=True)
        return 130
    except (ServiceError, BenchFailure) as error:
        say(f"sfumesh bench: {error}", err=True)
        return 1
    print_table(run)
    if json_path is not None and not write_report(json_path, report(run)):
        return 1
    return 1 if run.errors else 0
