"""`sfumesh bench idle`: what a node costs when nothing happens (issue 19).

A node that carries no media still runs timers: its registry heartbeat, the reaper, the
room event readers, metrics, its Serf agent's supervision and load tag, and one task set
per WebSocket (the idle watchdog, the event stream of its room). Those set the floor under
every other figure, and the cost of people who sit in a room with their camera off.

Embedded services and one node with its own Serf agent start as in `sfumesh demo`. Then two
windows of `--duration` seconds (60 by default), each after `--warmup` seconds of settling:

1. the node with no session at all (`idle_cpu_pct`);
2. the node with `--sessions` (100) idle sessions: real sign-ups, logins, session tokens,
   WebSockets and joins of one room, no media, each socket pinging every 20 s as the web
   client does (`idle_cpu_pct_100_sessions`).

CPU is the node process's user + sys time (all threads, `/proc/<pid>/stat`) over the
window, in per cent of one core; its children (the Serf agent) are reported apart
(`*_children`), and so are the machine's load averages: the machine is shared, and the
figure of a quiet process is small beside the noise of a busy one.
"""

from __future__ import annotations

import asyncio
import os
import platform
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import httpx

from mesh.process import ServiceError
from node.bench.harness import no_interrupts
from node.bench.report import process_cpu_s, rounded, say, write_report
from node.config import new_key
from node.local.launch import LocalNode, start_nodes
from node.local.participant import Socket, open_socket
from node.log import setup_logging
from node.runtime.services import BackingServices

DEFAULT_DURATION_S: Final = 60.0
DEFAULT_SESSIONS: Final = 100
#: issue 19's targets, per cent of one core
TARGET_IDLE_PCT: Final = 1.0
TARGET_SESSIONS_PCT: Final = 3.0
#: the web client's ping period (webapp/room.js), so that the node keeps the sockets
PING_INTERVAL_S: Final = 20.0
#: sign-ups, logins and joins in flight at once
SETUP_CONCURRENCY: Final = 8
PASSWORD: Final = "bench idle password"  # noqa: S105 (throwaway users in a throwaway store)
ROOM_PREFIX: Final = "idle-bench"


@dataclass
class Window:
    """CPU of the node (and of its children) over one window."""

    seconds: float = 0.0
    cpu_s: float = 0.0
    children_cpu_s: float = 0.0

    @property
    def cpu_pct(self) -> float:
        return 100 * self.cpu_s / self.seconds if self.seconds else 0.0

    @property
    def children_cpu_pct(self) -> float:
        return 100 * self.children_cpu_s / self.seconds if self.seconds else 0.0


@dataclass
class IdleRun:
    duration_s: float
    warmup_s: float
    sessions: int
    empty: Window | None = None
    busy: Window | None = None
    #: sessions still open at the end of the second window
    sessions_open: int = 0
    setup_s: float = 0.0
    load: dict[str, list[float]] = field(default_factory=dict)


def child_pids(pid: int) -> list[int]:
    """The direct children of `pid` (every thread's), from /proc."""
    children: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return children
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as listed:
                children.extend(int(p) for p in listed.read().split())
        except OSError:
            continue
    return children


def _children_cpu_s(pid: int) -> float:
    total = 0.0
    for child in child_pids(pid):
        try:
            total += process_cpu_s(child)
        except OSError:
            continue  # gone meanwhile
    return total


async def measure(pid: int, seconds: float) -> Window:
    """The node's CPU over `seconds` (its children apart)."""
    cpu, children, began = process_cpu_s(pid), _children_cpu_s(pid), time.monotonic()
    await asyncio.sleep(seconds)
    return Window(
        seconds=time.monotonic() - began,
        cpu_s=process_cpu_s(pid) - cpu,
        children_cpu_s=max(0.0, _children_cpu_s(pid) - children),
    )


async def _expect(response: httpx.Response, status: int) -> dict[str, Any]:
    if response.status_code != status:
        raise RuntimeError(
            f"{response.request.method} {response.request.url.path}: HTTP "
            f"{response.status_code}: {response.text[:200]}"
        )
    body: dict[str, Any] = response.json()
    return body


async def join_idle(http: httpx.AsyncClient, url: str, index: int, stamp: str, room: str) -> Socket:
    """One person: signs up, logs in, opens a session and its WebSocket, joins `room`."""
    name = f"idle{stamp}{index}"
    signup = {
        "username": name,
        "email": f"{name}@example.org",
        "password": PASSWORD,
        "display_name": f"Idle {index}",
    }
    await _expect(await http.post(f"{url}/api/users", json=signup), 201)
    login = await _expect(
        await http.post(f"{url}/api/auth/login", json={"login": name, "password": PASSWORD}), 200
    )
    user = {"Authorization": f"Bearer {login['user_token']}"}
    session = await _expect(await http.post(f"{url}/api/sessions", headers=user), 201)
    sock = await open_socket(url, str(session["session_token"]), PING_INTERVAL_S)
    try:
        joined = await _expect(
            await http.post(
                f"{url}/api/rooms/{room}/join",
                headers={"Authorization": f"Bearer {sock.session_token}"},
            ),
            200,
        )
        ack = await sock.request("join", room_token=joined["room_token"])
        if ack.get("type") != "ack":
            raise RuntimeError(f"join refused: {ack}")
    except BaseException:
        await sock.close()
        raise
    return sock


async def _drive(node: LocalNode, run: IdleRun) -> None:
    pid = node.process.pid
    assert pid is not None
    await asyncio.sleep(run.warmup_s)
    run.load["no_session"] = list(os.getloadavg())
    run.empty = await measure(pid, run.duration_s)
    say(f"[no session] node {run.empty.cpu_pct:.2f} % of a core", err=True)

    stamp = secrets.token_hex(3)
    room = f"{ROOM_PREFIX}-{stamp}"
    sockets: list[Socket] = []
    began = time.monotonic()
    async with httpx.AsyncClient(timeout=60) as http:
        await create_room(http, node.url, stamp, room, run.sessions)
        gate = asyncio.Semaphore(SETUP_CONCURRENCY)

        async def one(index: int) -> None:
            async with gate:
                sockets.append(await join_idle(http, node.url, index, stamp, room))

        try:
            await asyncio.gather(*(one(n) for n in range(run.sessions)))
            run.setup_s = time.monotonic() - began
            await asyncio.sleep(run.warmup_s)
            run.load["sessions"] = list(os.getloadavg())
            run.busy = await measure(pid, run.duration_s)
            run.sessions_open = sum(1 for s in sockets if not s.closed)
            say(
                f"[{run.sessions} sessions] node {run.busy.cpu_pct:.2f} % of a core",
                err=True,
            )
        finally:
            await asyncio.gather(*(s.close() for s in sockets), return_exceptions=True)


async def create_room(
    http: httpx.AsyncClient, url: str, stamp: str, room: str, capacity: int
) -> None:
    """`room`, created by a user of its own (who does not join it)."""
    name = f"idleowner{stamp}"
    signup = {
        "username": name,
        "email": f"{name}@example.org",
        "password": PASSWORD,
        "display_name": "Idle owner",
    }
    await _expect(await http.post(f"{url}/api/users", json=signup), 201)
    login = await _expect(
        await http.post(f"{url}/api/auth/login", json={"login": name, "password": PASSWORD}), 200
    )
    token = str(login["user_token"])
    body = {"slug": room, "name": "Idle bench", "capacity": max(1, capacity)}
    await _expect(
        await http.post(
            f"{url}/api/rooms", json=body, headers={"Authorization": f"Bearer {token}"}
        ),
        201,
    )


def node_env(sessions: int) -> dict[str, str]:
    """The node's settings: production defaults, but every person signs up and connects
    from this machine's one address, and the room holds them all."""
    many = str(max(1000, 4 * sessions))
    return {
        "SFUMESH_DATABASE": f"bench_idle_{secrets.token_hex(4)}",
        "SFUMESH_BCRYPT_COST": "4",
        "SFUMESH_LOG_LEVEL": "WARNING",
        "SFUMESH_ROOM_MAX_CAPACITY": str(max(100, sessions)),
        "SFUMESH_WS_MAX_PER_ADDRESS": many,
        "SFUMESH_SIGNUP_LIMIT_PER_ADDRESS": many,
        "SFUMESH_SIGNUP_LIMIT_TOTAL": many,
        "SFUMESH_LOGIN_LIMIT_PER_ADDRESS": many,
        "SFUMESH_LOGIN_ATTEMPTS_PER_ADDRESS": many,
        "SFUMESH_LOGIN_ATTEMPTS_TOTAL": many,
    }


def report(run: IdleRun) -> dict[str, Any]:
    empty, busy = run.empty or Window(), run.busy or Window()
    return {
        "bench": "idle",
        "idle_cpu_pct": rounded(empty.cpu_pct, 3),
        "idle_cpu_pct_100_sessions": rounded(busy.cpu_pct, 3),
        "idle_cpu_pct_children": rounded(empty.children_cpu_pct, 3),
        "idle_cpu_pct_100_sessions_children": rounded(busy.children_cpu_pct, 3),
        "sessions": run.sessions,
        "sessions_open": run.sessions_open,
        "setup_s": rounded(run.setup_s, 1),
        "duration_s": run.duration_s,
        "warmup_s": run.warmup_s,
        "targets": {
            "idle_cpu_pct_max": TARGET_IDLE_PCT,
            "idle_met": empty.cpu_pct <= TARGET_IDLE_PCT,
            "idle_cpu_pct_100_sessions_max": TARGET_SESSIONS_PCT,
            "sessions_met": busy.cpu_pct <= TARGET_SESSIONS_PCT,
        },
        "load_average": {k: [round(v, 2) for v in values] for k, values in run.load.items()},
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def print_table(run: IdleRun) -> None:
    empty, busy = run.empty or Window(), run.busy or Window()
    say(
        f"sfumesh bench idle: one node with its Serf agent, {run.duration_s:g} s windows after "
        f"{run.warmup_s:g} s of settling, {os.cpu_count()} CPUs"
    )
    say(f"{'state':<24} {'node % core':>12} {'agent % core':>13}")
    say(f"{'no session':<24} {empty.cpu_pct:>12.2f} {empty.children_cpu_pct:>13.2f}")
    label = f"{run.sessions} idle sessions"
    say(f"{label:<24} {busy.cpu_pct:>12.2f} {busy.children_cpu_pct:>13.2f}")
    say(
        f"(sessions: sign-up, login, WebSocket and join of one room, no media, a ping every "
        f"{PING_INTERVAL_S:g} s; {run.sessions_open} still open at the end; set up in "
        f"{run.setup_s:.1f} s)"
    )
    for phase, values in run.load.items():
        window = "with no session" if phase == "no_session" else "with the sessions"
        say(f"load average before the window {window}: " + " ".join(f"{v:.2f}" for v in values))
    say(
        f"target: idle node <= {TARGET_IDLE_PCT:g} % of a core: "
        f"{'met' if empty.cpu_pct <= TARGET_IDLE_PCT else 'NOT met'}; "
        f"with 100 idle sessions <= {TARGET_SESSIONS_PCT:g} %: "
        f"{'met' if busy.cpu_pct <= TARGET_SESSIONS_PCT else 'NOT met'}"
    )


def run_idle_bench(
    *,
    json_path: Path | None = None,
    duration_s: float = DEFAULT_DURATION_S,
    warmup_s: float = 3.0,
    sessions: int = DEFAULT_SESSIONS,
) -> int:
    """`sfumesh bench idle`: 0 when both windows were measured with every session open."""
    if duration_s <= 0 or warmup_s < 0 or sessions < 1:
        say("sfumesh bench idle: --duration > 0, --warmup >= 0, --sessions >= 1", err=True)
        return 2
    setup_logging("WARNING")
    run = IdleRun(duration_s=duration_s, warmup_s=warmup_s, sessions=sessions)
    with tempfile.TemporaryDirectory(prefix="sfumesh-bench-idle-") as tmp:
        data_dir = Path(tmp)
        try:
            services = BackingServices.start(
                os.environ.get("REDIS_URL", ""), "", data_dir / "services"
            )
        except ServiceError as error:
            say(f"sfumesh bench idle: {error}", err=True)
            return 1
        nodes: list[LocalNode] = []
        try:
            nodes = start_nodes(
                services,
                {"bench": new_key()},
                count=1,
                data_dir=data_dir,
                extra_env=node_env(sessions),
            )
            asyncio.run(_drive(nodes[0], run))
        except (RuntimeError, OSError, httpx.HTTPError, TimeoutError) as error:
            say(f"sfumesh bench idle: {type(error).__name__}: {error}", err=True)
            return 1
        finally:
            with no_interrupts():
                for node in nodes:
                    node.stop()
                services.stop()
    print_table(run)
    if json_path is not None and not write_report(json_path, report(run)):
        return 1
    return 0 if run.busy is not None and run.sessions_open == sessions else 1
