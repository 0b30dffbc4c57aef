"""`sfumesh bench happenings`: reminder delivery across a mesh that restarts, and RSVPs/s.

Embedded services and `--nodes` real node processes (default 3) start in a temporary data
dir, sharing one Redis and one store. This process drives them over HTTP with httpx:

1. Reminders: `--reminders` happenings (default 240) are planned, spread over the nodes,
   starting over a window of `--reminders / 20` seconds a few seconds ahead; each has one
   reminder, at its start. Halfway through the window one node (node-2) is restarted
   (SIGTERM, then started again). The room's event stream is then read back: each reminder
   event carries its due time, and its stream id the Redis time it was published, so
   `reminder_delay_ms` is publish minus due; `reminder_duplicates` counts events past the
   first per reminder, `reminder_missed` the reminders never sent. Both must be 0.
2. RSVPs under contention: 50 people answer one happening with 10 places, going / maybe in
   turn, through every node at once, for `--duration` seconds: `rsvp_per_s`.

A run with a duplicate, a miss or a failed request exits 1.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import secrets
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from redis.asyncio import Redis

from mesh.process import ServiceError
from node.bench.harness import BenchFailure, http_client, load, no_interrupts, timed
from node.bench.report import Phase, ms, percentile, print_errors, rounded, write_report
from node.config import new_key
from node.local.launch import LocalNode, start_node
from node.log import setup_logging
from node.runtime.services import BackingServices
from node.state import keys

PASSWORD = "correct horse battery"  # noqa: S105  # bench users, thrown away
ROOM = "bench-happenings"
RSVP_PEOPLE = 50
RSVP_PLACES = 10
PLAN_CONCURRENCY = 8
#: reminders due per second of the window
DUE_PER_S = 20
LEAD_S = 4.0
#: after the last due time: the restarted node's leases (if it died holding some) run out
SETTLE_S = 12.0
LIMITS = 1_000_000


@dataclass
class Mesh:
    """What restarting a node needs again."""

    services: BackingServices
    token_keys: dict[str, str]
    env: dict[str, str]
    data_dir: Path
    nodes: list[LocalNode] = field(default_factory=list)

    def start(self, name: str) -> LocalNode:
        return start_node(
            self.services, self.token_keys, name=name, data_dir=self.data_dir, extra_env=self.env
        )


@dataclass
class BenchRun:
    reminders: int
    nodes: int
    duration_s: float
    delays_ms: list[float] = field(default_factory=list)
    duplicates: int = 0
    missed: int = 0
    planned: int = 0
    plan_phase: Phase = field(default_factory=lambda: Phase("plan", "plan happenings"))
    rsvp_phase: Phase = field(default_factory=lambda: Phase("rsvp", "RSVP under contention"))

    @property
    def errors(self) -> int:
        return self.plan_phase.errors + self.rsvp_phase.errors


async def _person(http: httpx.AsyncClient, name: str) -> tuple[str, str]:
    body = {"username": name, "email": f"{name}@example.org", "password": PASSWORD}
    reply = await http.post("/api/users", json={**body, "display_name": name})
    if reply.status_code != 201:
        raise BenchFailure(f"sign-up failed: {reply.status_code} {reply.text[:200]}")
    login = await http.post("/api/auth/login", json={"login": name, "password": PASSWORD})
    user_token = login.json()["user_token"]
    session = await http.post("/api/sessions", headers={"Authorization": f"Bearer {user_token}"})
    return user_token, session.json()["session_token"]


async def _drive(mesh: Mesh, run: BenchRun) -> None:
    redis = Redis.from_url(mesh.services.redis_url)
    clients = [http_client(node.url, 64) for node in mesh.nodes]
    try:
        first = clients[0]
        owner_user, owner = await _person(first, f"planner{secrets.token_hex(3)}")
        reply = await first.post(
            "/api/rooms",
            json={"slug": ROOM, "capacity": RSVP_PEOPLE + 10},
            headers={"Authorization": f"Bearer {owner_user}"},
        )
        if reply.status_code != 201:
            raise BenchFailure(f"room creation failed: {reply.status_code} {reply.text[:200]}")
        await _reminders(mesh, clients, owner, redis, run)
        await _rsvps(clients, owner, run)
    finally:
        for client in clients:
            await client.aclose()
        await redis.aclose()


async def _reminders(
    mesh: Mesh, clients: list[httpx.AsyncClient], owner: str, redis: Redis, run: BenchRun
) -> None:
    window_s = run.reminders / DUE_PER_S
    first_due = datetime.now(UTC) + timedelta(seconds=LEAD_S + run.reminders / 100)
    auth = {"Authorization": f"Bearer {owner}"}
    gate = asyncio.Semaphore(PLAN_CONCURRENCY)
    started = time.perf_counter()

    async def plan(index: int) -> None:
        start = first_due + timedelta(seconds=window_s * index / run.reminders)
        body = {"title": f"h{index}", "start": start.isoformat(), "zone": "UTC"}
        async with gate:
            client = clients[index % len(clients)]
            reply = await timed(
                run.plan_phase, client, "POST", f"/api/rooms/{ROOM}/happenings", body, auth
            )
        if reply is not None:
            run.planned += 1

    await asyncio.gather(*(plan(i) for i in range(run.reminders)))
    run.plan_phase.elapsed_s = time.perf_counter() - started
    if datetime.now(UTC) > first_due:
        raise BenchFailure("planning took longer than the lead: use fewer --reminders")
    # Restart node-2 (index 1; the only node when there is one) halfway through the window.
    victim = 1 if len(mesh.nodes) > 1 else 0
    halfway = first_due + timedelta(seconds=window_s / 2)
    await asyncio.sleep(max(0.0, (halfway - datetime.now(UTC)).total_seconds()))
    await asyncio.to_thread(mesh.nodes[victim].stop)
    mesh.nodes[victim] = await asyncio.to_thread(mesh.start, mesh.nodes[victim].name)
    await clients[victim].aclose()
    clients[victim] = http_client(mesh.nodes[victim].url, 64)
    last_due = first_due + timedelta(seconds=window_s)
    deadline = time.monotonic() + max(0.0, (last_due - datetime.now(UTC)).total_seconds())
    deadline += SETTLE_S
    while time.monotonic() < deadline:
        pending = await redis.zcard(keys.REMINDERS_DUE) + await redis.zcard(keys.REMINDERS_CLAIMED)
        if pending == 0 and datetime.now(UTC) > last_due:
            break
        await asyncio.sleep(0.25)
    await asyncio.sleep(1.0)  # anything late or doubled shows by now
    sent: Counter[str] = Counter()
    entries: Any = await redis.xrange(keys.room_events(ROOM))
    for raw_id, fields in entries:
        if fields.get(b"type") != b"chat":
            continue
        data = json.loads(fields[b"data"])
        reminder = data.get("reminder")
        if not reminder:
            continue
        sent[reminder["id"]] += 1
        if sent[reminder["id"]] == 1:
            published_ms = int(raw_id.decode().split("-")[0])
            run.delays_ms.append(float(published_ms - int(reminder["due"])))
    run.duplicates = sum(count - 1 for count in sent.values())
    run.missed = run.planned - len(sent)


async def _rsvps(clients: list[httpx.AsyncClient], owner: str, run: BenchRun) -> None:
    auth = {"Authorization": f"Bearer {owner}"}
    start = (datetime.now(UTC) + timedelta(days=2)).isoformat()
    body = {"title": "contended", "start": start, "zone": "UTC", "capacity": RSVP_PLACES}
    reply = await clients[0].post(f"/api/rooms/{ROOM}/happenings", json=body, headers=auth)
    if reply.status_code != 201:
        raise BenchFailure(f"planning failed: {reply.status_code} {reply.text[:200]}")
    happening = reply.json()["id"]
    people: list[str] = []
    for index in range(RSVP_PEOPLE):
        _, session = await _person(clients[index % len(clients)], f"rsvp{secrets.token_hex(4)}")
        people.append(session)
    await _make_people(clients[0], people)
    turn = iter(range(1_000_000_000))
    abort = asyncio.Event()

    async def one() -> None:
        index = next(turn)
        session = people[index % len(people)]
        answer = "going" if (index // len(people)) % 2 == 0 else "maybe"
        await timed(
            run.rsvp_phase,
            clients[index % len(clients)],
            "PUT",
            f"/api/happenings/{happening}/rsvp",
            {"answer": answer},
            {"Authorization": f"Bearer {session}"},
        )

    await load(run.rsvp_phase, RSVP_PEOPLE, time.perf_counter() + run.duration_s, abort, one)


async def _make_people(client: httpx.AsyncClient, sessions: list[str]) -> None:
    """Make each one of the room's people the way a client does: a WebSocket, then join."""
    import websockets

    ws_base = str(client.base_url).replace("http", "ws", 1)
    for session in sessions:
        async with websockets.connect(f"{ws_base}/ws?session_token={session}") as socket:
            await socket.recv()  # hello
            reply = await client.post(
                f"/api/rooms/{ROOM}/join", headers={"Authorization": f"Bearer {session}"}
            )
            if reply.status_code != 200:
                raise BenchFailure(f"join failed: {reply.status_code} {reply.text[:200]}")


def _bench(data_dir: Path, run: BenchRun) -> None:
    services = BackingServices.start("", "", data_dir / "services")
    env = {
        "SFUMESH_BCRYPT_COST": "4",
        "SFUMESH_DATABASE": f"bench_{secrets.token_hex(4)}",
        # every bench user signs up from this one address
        "SFUMESH_SIGNUP_LIMIT_PER_ADDRESS": str(LIMITS),
        "SFUMESH_SIGNUP_LIMIT_TOTAL": str(LIMITS),
        "SFUMESH_LOGIN_ATTEMPTS_PER_ADDRESS": str(LIMITS),
        "SFUMESH_LOGIN_ATTEMPTS_TOTAL": str(LIMITS),
    }
    mesh = Mesh(services, {"bench": new_key()}, env, data_dir)
    try:
        for index in range(run.nodes):
            mesh.nodes.append(mesh.start(f"node-{index + 1}"))
        asyncio.run(_drive(mesh, run))
    finally:
        with no_interrupts():
            for node in mesh.nodes:
                node.stop()
            services.stop()


def report(run: BenchRun) -> dict[str, Any]:
    delays = sorted(run.delays_ms)
    return {
        "bench": "happenings",
        "nodes": run.nodes,
        "reminders": run.planned,
        "reminder_delay_ms_p50": rounded(percentile(delays, 0.50)),
        "reminder_delay_ms_p99": rounded(percentile(delays, 0.99)),
        "reminder_delay_ms_max": rounded(max(delays, default=None)),
        "reminder_duplicates": run.duplicates,
        "reminder_missed": run.missed,
        "rsvp_per_s": round(run.rsvp_phase.per_s, 2),
        "rsvp_p50_ms": rounded(run.rsvp_phase.percentile_ms(0.50)),
        "rsvp_p99_ms": rounded(run.rsvp_phase.percentile_ms(0.99)),
        "duration_s": run.duration_s,
        "errors": run.errors,
        "phases": {p.key: p.summary() for p in (run.plan_phase, run.rsvp_phase)},
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def run_happenings_bench(
    *, json_path: Path | None, reminders: int, nodes: int, duration_s: float
) -> int:
    """Run `bench happenings`; 0 when clean, 1 on a duplicate, miss or error, 2 on bad input."""
    if reminders < 1 or nodes < 1 or not duration_s > 0:
        print("sfumesh bench: --reminders and --nodes >= 1, --duration > 0", file=sys.stderr)
        return 2
    setup_logging(os.environ.get("SFUMESH_LOG_LEVEL", "WARNING"))
    run = BenchRun(reminders=reminders, nodes=nodes, duration_s=duration_s)
    try:
        with tempfile.TemporaryDirectory(prefix="sfumesh-bench-") as tmp:
            _bench(Path(tmp), run)
    except KeyboardInterrupt:
        print("sfumesh bench: interrupted; nodes and services stopped", file=sys.stderr)
        return 130
    except (ServiceError, BenchFailure) as error:
        print(f"sfumesh bench: {error}", file=sys.stderr)
        return 1
    delays = sorted(run.delays_ms)
    print(
        f"sfumesh bench happenings: {run.nodes} nodes (node-2 restarted midway), "
        f"{run.planned} reminders"
    )
    print(
        f"reminder delay after due: p50 {ms(percentile(delays, 0.5))} ms, "
        f"p99 {ms(percentile(delays, 0.99))} ms; duplicates {run.duplicates}, "
        f"missed {run.missed}"
    )
    print(f"RSVPs under contention: {run.rsvp_phase.per_s:.1f}/s")
    print_errors([run.plan_phase, run.rsvp_phase])
    if json_path is not None and not write_report(json_path, report(run)):
        return 1
    return 1 if run.errors or run.duplicates or run.missed else 0
