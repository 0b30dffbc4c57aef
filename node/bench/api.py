"""`sfumesh bench api`: signups/s, logins/s and room look-up latency on one node.

Embedded services and one real node process start as in `sfumesh demo`, in a temporary data
dir; this process drives the node over HTTP with httpx. Four phases of `duration_s` each:

1. signups (`POST /api/users`) at full concurrency,
2. logins (`POST /api/auth/login`) of the users from phase 1, right passwords,
3. `GET /api/rooms/{slug}` in one sequential loop, nothing else running (the baseline),
4. the same GET loop while logins run at full concurrency: if bcrypt blocked the node's event
   loop, the GET latency here would grow by whole hash times, not by a few milliseconds.

Any non-2xx answer or transport error counts as an error; a run with errors exits 1.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import platform
import re
import secrets
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from mesh.process import ServiceError
from node.config import new_key
from node.local.launch import LocalNode, start_node
from node.log import setup_logging
from node.runtime.services import BackingServices

DEFAULT_CONCURRENCY = 8
DEFAULT_BCRYPT_COST = 12
# Failed-login limits far above anything a bench run can reach (only failures count, and a
# successful login gives its slot back, but requests in flight hold one each).
LOGIN_LIMIT = 1_000_000_000
REQUEST_TIMEOUT_S = 120.0
# Below Hypercorn's 5 s keep-alive timeout, so that a pooled connection left idle during a
# phase is never reused just as the server closes it (a spurious "server disconnected").
KEEPALIVE_EXPIRY_S = 1.0
WATCH_INTERVAL_S = 0.2
MAX_ERROR_SAMPLES = 5


class BenchFailure(Exception):
    """The bench could not run to the end (setup failed, a process died)."""


@dataclass
class Phase:
    """Outcome of one kind of request in one phase."""

    key: str
    label: str
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def ok(self) -> int:
        return len(self.latencies_ms)

    @property
    def per_s(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def percentile_ms(self, q: float) -> float | None:
        return percentile(sorted(self.latencies_ms), q)

    def record_error(self, detail: str) -> None:
        self.errors += 1
        if len(self.error_samples) < MAX_ERROR_SAMPLES:
            self.error_samples.append(detail)

    def summary(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "ok": self.ok,
            "errors": self.errors,
            "elapsed_s": round(self.elapsed_s, 3),
            "per_s": round(self.per_s, 2),
            "p50_ms": rounded(self.percentile_ms(0.50)),
            "p99_ms": rounded(self.percentile_ms(0.99)),
            "max_ms": rounded(max(self.latencies_ms, default=None)),
            "error_samples": self.error_samples,
        }


def percentile(sorted_values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) with linear interpolation between ranks; None without values."""
    if not sorted_values:
        return None
    rank = (len(sorted_values) - 1) * q
    low = int(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


def rounded(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


@dataclass
class Watch:
    """Set `abort` as soon as the node or an embedded service dies, and say which."""

    node: LocalNode
    services: BackingServices
    abort: asyncio.Event = field(default_factory=asyncio.Event)
    deaths: list[str] = field(default_factory=list)

    async def run(self) -> None:
        while True:
            dead = self.services.dead()
            if self.node.process.exit_code() is not None:
                dead.append(self.node.process)
            if dead:
                self.deaths.extend(child.death_report() for child in dead)
                self.abort.set()
                return
            await asyncio.sleep(WATCH_INTERVAL_S)

    def check(self) -> None:
        if self.deaths:
            raise BenchFailure("a process died during the bench:\n" + "\n".join(self.deaths))


async def _timed(
    phase: Phase,
    client: httpx.AsyncClient,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
) -> httpx.Response | None:
    """One request; its latency on success, an error otherwise."""
    started = time.perf_counter()
    try:
        response = await client.request(method, path, json=body)
    except httpx.HTTPError as error:
        phase.record_error(f"{method} {path}: {type(error).__name__}: {error}")
        return None
    elapsed_ms = (time.perf_counter() - started) * 1000
    if not response.is_success:
        phase.record_error(f"{method} {path}: HTTP {response.status_code}: {response.text[:200]}")
        return None
    phase.latencies_ms.append(elapsed_ms)
    return response


async def load(
    phase: Phase,
    workers: int,
    deadline: float,
    abort: asyncio.Event,
    one_request: Callable[[], Awaitable[None]],
) -> None:
    """`workers` loops that each start requests back to back until the deadline.

    The phase's time runs until the last request in flight has finished, so that the rate
    counts every completed request against the time it really took.
    """
    started = time.perf_counter()

    async def worker() -> None:
        while time.perf_counter() < deadline and not abort.is_set():
            await one_request()

    await asyncio.gather(*(worker() for _ in range(workers)))
    phase.elapsed_s = time.perf_counter() - started


def http_client(base_url: str, connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(
        max_connections=connections,
        max_keepalive_connections=connections,
        keepalive_expiry=KEEPALIVE_EXPIRY_S,
    )
    return httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S, limits=limits)


async def _setup_room(client: httpx.AsyncClient, prefix: str, password: str) -> str:
    """A user who creates the room the GET phases look up; its path."""
    setup = Phase("setup", "setup")
    owner = f"{prefix}owner"
    signup = {
        "username": owner,
        "email": f"{owner}@example.org",
        "password": password,
        "display_name": "Bench owner",
    }
    slug = f"bench-{prefix.rstrip('_')}"
    if await _timed(setup, client, "POST", "/api/users", signup) is not None:
        login = {"login": owner, "password": password}
        reply = await _timed(setup, client, "POST", "/api/auth/login", login)
        if reply is not None:
            headers = {"Authorization": f"Bearer {reply.json()['user_token']}"}
            try:
                created = await client.post(
                    "/api/rooms", json={"slug": slug, "name": "Bench room"}, headers=headers
                )
            except httpx.HTTPError as error:
                setup.record_error(f"POST /api/rooms: {type(error).__name__}: {error}")
            else:
                if created.status_code != 201:
                    setup.record_error(
                        f"POST /api/rooms: HTTP {created.status_code}: {created.text[:200]}"
                    )
    if setup.errors:
        raise BenchFailure("setup failed: " + "; ".join(setup.error_samples))
    path = f"/api/rooms/{slug}"
    check = await _timed(setup, client, "GET", path)
    if check is None:
        raise BenchFailure("setup failed: " + "; ".join(setup.error_samples))
    return path


@dataclass
class BenchRun:
    duration_s: float
    concurrency: int
    bcrypt_cost: int
    phases: list[Phase] = field(default_factory=list)

    def phase(self, key: str) -> Phase:
        return next(p for p in self.phases if p.key == key)

    @property
    def errors(self) -> int:
        return sum(p.errors for p in self.phases)


async def _drive(node: LocalNode, services: BackingServices, run: BenchRun) -> None:
    watch = Watch(node, services)
    watcher = asyncio.create_task(watch.run())
    prefix = f"b{secrets.token_hex(3)}_"
    password = secrets.token_urlsafe(16)
    signups = Phase("signup", "signup   POST /api/users")
    logins = Phase("login", "login    POST /api/auth/login")
    idle_gets = Phase("get_room_idle", "room     GET /api/rooms/{slug}, idle")
    loaded_gets = Phase("get_room_under_login", "room     GET /api/rooms/{slug}, logins running")
    loaded_logins = Phase("login_with_gets", "login    POST /api/auth/login, GETs running")
    run.phases = [signups, logins, idle_gets, loaded_gets, loaded_logins]
    try:
        async with (
            http_client(node.url, run.concurrency) as client,
            http_client(node.url, 1) as get_client,
        ):
            room_path = await _setup_room(get_client, prefix, password)

            counter = itertools.count()
            users: list[str] = []

            async def signup() -> None:
                username = f"{prefix}{next(counter)}"
                body = {
                    "username": username,
                    "email": f"{username}@example.org",
                    "password": password,
                    "display_name": f"Bench user {username}",
                }
                if await _timed(signups, client, "POST", "/api/users", body) is not None:
                    users.append(username)

            deadline = time.perf_counter() + run.duration_s
            await load(signups, run.concurrency, deadline, watch.abort, signup)
            watch.check()
            if not users:
                raise BenchFailure(
                    "no user was created in the signup phase: " + "; ".join(signups.error_samples)
                )

            turn = itertools.count()

            def login_into(phase: Phase) -> Callable[[], Awaitable[None]]:
                async def login() -> None:
                    body = {"login": users[next(turn) % len(users)], "password": password}
                    await _timed(phase, client, "POST", "/api/auth/login", body)

                return login

            def get_into(phase: Phase) -> Callable[[], Awaitable[None]]:
                async def get() -> None:
                    await _timed(phase, get_client, "GET", room_path)

                return get

            deadline = time.perf_counter() + run.duration_s
            await load(logins, run.concurrency, deadline, watch.abort, login_into(logins))
            watch.check()

            deadline = time.perf_counter() + run.duration_s
            await load(idle_gets, 1, deadline, watch.abort, get_into(idle_gets))
            watch.check()

            deadline = time.perf_counter() + run.duration_s
            await asyncio.gather(
                load(
                    loaded_logins,
                    run.concurrency,
                    deadline,
                    watch.abort,
                    login_into(loaded_logins),
                ),
                load(loaded_gets, 1, deadline, watch.abort, get_into(loaded_gets)),
            )
            watch.check()
    finally:
        watcher.cancel()


@contextmanager
def no_interrupts() -> Iterator[None]:
    """A second Ctrl-C must not cut the clean-up short and leave children running."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def drop_external_database(mongodb_uri: str, database: str) -> None:
    """Bench users written to a store we did not start are removed again."""
    from pymongo import MongoClient

    mongo: MongoClient[dict[str, Any]] = MongoClient(mongodb_uri, serverSelectionTimeoutMS=5000)
    try:
        mongo.drop_database(database)
    finally:
        mongo.close()


def _bench_api(data_dir: Path, run: BenchRun) -> None:
    external_store = os.environ.get("MONGODB_URI", "")
    services = BackingServices.start(
        os.environ.get("REDIS_URL", ""), external_store, data_dir / "services"
    )
    database = f"bench_{secrets.token_hex(4)}"
    node: LocalNode | None = None
    try:
        extra_env = {
            "SFUMESH_BCRYPT_COST": str(run.bcrypt_cost),
            "SFUMESH_DATABASE": database,
            "SFUMESH_LOGIN_LIMIT_PER_LOGIN": str(LOGIN_LIMIT),
            "SFUMESH_LOGIN_LIMIT_PER_ADDRESS": str(LOGIN_LIMIT),
        }
        node = start_node(
            services, {"bench": new_key()}, name="node-1", data_dir=data_dir, extra_env=extra_env
        )
        asyncio.run(_drive(node, services, run))
    finally:
        with no_interrupts():
            if node is not None:
                node.stop()
            services.stop()
            if external_store:
                try:
                    drop_external_database(external_store, database)
                except Exception as error:
                    print(f"sfumesh bench: could not drop {database}: {error}", file=sys.stderr)


_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """user + sys CPU seconds of process `pid`, all its threads (not its children)."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def metric_sum(text: str, name: str, label: str = "") -> float:
    """The sum of a metric's samples in Prometheus text (those whose labels contain
    `label`, e.g. 'direction="out"')."""
    pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", re.MULTILINE)
    return sum(float(value) for labels, value in pattern.findall(text) if label in labels)


def say(text: str = "", *, err: bool = False) -> None:
    """One line of a bench's output (stdout is its report; errors go to stderr)."""
    print(text, file=sys.stderr if err else sys.stdout, flush=True)


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def write_report(path: Path, figures: dict[str, Any]) -> bool:
    """The figures as JSON at `path`; False (said on stderr) when it cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(figures, indent=2) + "\n")
    except OSError as error:
        print(f"sfumesh bench: cannot write {path}: {error}", file=sys.stderr)
        return False
    print(f"written: {path}")
    return True


def print_phases(rows: list[tuple[int, Phase]]) -> None:
    """The table every bench prints: one line per (phase number, phase)."""
    header = f"{'phase':<48} {'ok':>7} {'errors':>7} {'per s':>9} {'p50 ms':>9} {'p99 ms':>9}"
    print(header)
    print("-" * len(header))
    for number, phase in rows:
        print(
            f"{number} {phase.label:<46} {phase.ok:>7} {phase.errors:>7} {phase.per_s:>9.1f} "
            f"{ms(phase.percentile_ms(0.50)):>9} {ms(phase.percentile_ms(0.99)):>9}"
        )


def print_table(run: BenchRun) -> None:
    cpus = os.cpu_count() or "?"
    print(
        f"sfumesh bench api: 1 node, bcrypt cost {run.bcrypt_cost}, concurrency "
        f"{run.concurrency}, {run.duration_s:g} s per phase, {cpus} CPUs"
    )
    print_phases(list(zip((1, 2, 3, 4, 4), run.phases, strict=True)))
    idle, loaded = run.phase("get_room_idle"), run.phase("get_room_under_login")
    print()
    print(
        f"GET /api/rooms/{{slug}} while logins run: p50 {ms(loaded.percentile_ms(0.50))} ms, "
        f"p99 {ms(loaded.percentile_ms(0.99))} ms "
        f"(idle: p50 {ms(idle.percentile_ms(0.50))} ms, p99 {ms(idle.percentile_ms(0.99))} ms)"
    )
    print_errors(run.phases)


def print_errors(phases: list[Phase]) -> None:
    errors = sum(phase.errors for phase in phases)
    if not errors:
        print("errors: none")
        return
    print(f"ERRORS: {errors} failed requests")
    for phase in phases:
        for sample in phase.error_samples:
            print(f"  {phase.key}: {sample}")


def report(run: BenchRun) -> dict[str, Any]:
    phases = {phase.key: phase for phase in run.phases}
    return {
        "bench": "api",
        "nodes": 1,
        "signups_per_s": round(phases["signup"].per_s, 2),
        "logins_per_s": round(phases["login"].per_s, 2),
        "get_room_p50_ms": rounded(phases["get_room_under_login"].percentile_ms(0.50)),
        "get_room_p99_ms": rounded(phases["get_room_under_login"].percentile_ms(0.99)),
        "get_room_idle_p50_ms": rounded(phases["get_room_idle"].percentile_ms(0.50)),
        "get_room_idle_p99_ms": rounded(phases["get_room_idle"].percentile_ms(0.99)),
        "logins_with_gets_per_s": round(phases["login_with_gets"].per_s, 2),
        "bcrypt_cost": run.bcrypt_cost,
        "concurrency": run.concurrency,
        "duration_s": run.duration_s,
        "errors": run.errors,
        "errors_by_phase": {key: phase.errors for key, phase in phases.items()},
        "phases": {key: phase.summary() for key, phase in phases.items()},
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def run_bench(
    name: str,
    *,
    json_path: Path | None,
    duration_s: float,
    concurrency: int = DEFAULT_CONCURRENCY,
    bcrypt_cost: int | None = None,
    nodes: int | None = None,
    clients: int | None = None,
) -> int:
    """Run the named bench; 0 when it ran without errors, 1 when not, 2 on bad arguments.

    `bcrypt_cost`, `nodes` and `clients` left at None take the named bench's defaults.
    """
    if name == "join":
        from node.bench.join import run_join_bench

        return run_join_bench(
            json_path=json_path,
            duration_s=duration_s,
            nodes=nodes,
            clients=clients,
            bcrypt_cost=bcrypt_cost,
        )
    if name == "codecs":
        from node.bench.codecs import run_codecs_bench

        return run_codecs_bench(json_path=json_path, duration_s=duration_s)
    if name != "api":
        print(f"sfumesh bench: unknown bench {name!r} (known: api, join, codecs)", file=sys.stderr)
        return 2
    if bcrypt_cost is None:
        bcrypt_cost = DEFAULT_BCRYPT_COST
    if not duration_s > 0 or concurrency < 1 or not 4 <= bcrypt_cost <= 31:
        print(
            "sfumesh bench: --duration must be > 0, --concurrency >= 1, --bcrypt-cost 4..31",
            file=sys.stderr,
        )
        return 2
    setup_logging(os.environ.get("SFUMESH_LOG_LEVEL", "WARNING"))
    run = BenchRun(duration_s=duration_s, concurrency=concurrency, bcrypt_cost=bcrypt_cost)
    try:
        with tempfile.TemporaryDirectory(prefix="sfumesh-bench-") as tmp:
            _bench_api(Path(tmp), run)
    except KeyboardInterrupt:
        print("sfumesh bench: interrupted; node and services stopped", file=sys.stderr)
        return 130
    except (ServiceError, BenchFailure) as error:
        print(f"sfumesh bench: {error}", file=sys.stderr)
        return 1
    print_table(run)
    if json_path is not None and not write_report(json_path, report(run)):
        return 1
    return 1 if run.errors else 0
