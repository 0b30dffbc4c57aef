"""`sfumesh bench api`: signups/s, logins/s, room look-up and ping latency on one node, and
`/api/ping` under the attacks of issue 21.

Embedded services and one real node process start as in `sfumesh demo`, in a temporary data
dir; this process drives the node over HTTP with httpx. Six phases of `duration_s` each:

1. signups (`POST /api/users`) at full concurrency,
2. logins (`POST /api/auth/login`) of the users from phase 1, right passwords,
3. `GET /api/rooms/{slug}` in one sequential loop, nothing else running (the baseline),
4. the same GET loop while logins run at full concurrency: if bcrypt blocked the node's event
   loop, the GET latency here would grow by whole hash times, not by a few milliseconds,
5. `GET /api/ping` in one sequential loop, nothing else running (the baseline),
6. the same ping loop while attackers flood the node: (a) item 1, chat text of "a" and 15,999
   combining marks to `POST /api/rooms/{slug}/messages` without a token, and (b) item 5,
   sign-ups from one address as fast as they are answered. A node that does such work on its
   event loop, or lets the flood reach bcrypt unbounded, shows it in the ping's p50/p99.

The node believes X-Forwarded-For from this process (trusted proxy 127.0.0.1): the ordinary
clients of phases 1-4 each come from an address of their own, as real users do, so they meet
no per-address limit; the sign-up flood comes from one address and meets the node's default
per-address limits (the mesh-wide ones are lifted so that phase 1 can measure bcrypt).

Any non-2xx answer or transport error counts as an error, except in the attack: attackers'
requests are expected to be refused (4xx, 503 `busy`, or a connection cut: counted as
"dropped"); only other 5xx count there. A run with errors exits 1.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import platform
import secrets
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from mesh.process import ServiceError
from node.bench.harness import (
    BenchFailure,
    Watch,
    drop_external_database,
    http_client,
    load,
    no_interrupts,
    timed,
)
from node.bench.report import Phase, ms, print_errors, print_phases, rounded, write_report
from node.config import HashingSettings, LoginLimitSettings, SignupLimitSettings, new_key
from node.local.launch import LocalNode, start_node
from node.log import setup_logging
from node.runtime.services import BackingServices

DEFAULT_CONCURRENCY = 8
DEFAULT_BCRYPT_COST = 12
# Failed-login limits far above anything a bench run can reach (only failures count, and a
# successful login gives its slot back, but requests in flight hold one each).
LOGIN_LIMIT = 1_000_000_000
# Item 1's attack with as many clients as issue 21's measurement used; the sign-up flood
# with more, since each of its clients waits for its answer (a whole bcrypt hash, or more).
UNICODE_ATTACK_CLIENTS = 4
FLOOD_CLIENTS = 16
# Item 1: NFC is quadratic on a long run of combining marks.
UNICODE_ATTACK_TEXT = "a" + "\u0301" * 15_999
# Item 5: the one address the sign-up flood comes from (TEST-NET-3).
FLOOD_ADDRESS = "203.0.113.66"


def _client_address(number: int) -> str:
    """A distinct address per ordinary client request (10.0.0.0/8)."""
    return f"10.{(number >> 16) & 255}.{(number >> 8) & 255}.{number & 255}"


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
    if await timed(setup, client, "POST", "/api/users", signup) is not None:
        login = {"login": owner, "password": password}
        reply = await timed(setup, client, "POST", "/api/auth/login", login)
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
    check = await timed(setup, client, "GET", path)
    if check is None:
        raise BenchFailure("setup failed: " + "; ".join(setup.error_samples))
    return path


async def _attack_request(
    phase: Phase,
    statuses: Counter[str],
    client: httpx.AsyncClient,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> None:
    """One attacker's request: any answer but a 5xx other than 503 is the node defending
    itself (the answer's latency is kept), and so is a connection it cuts ("dropped"); a
    500 is an error. (The node dying is the watch's to see.)"""
    started = time.perf_counter()
    # As a browser would send it: UTF-8, not \u escapes that would triple its size.
    content = json.dumps(body, ensure_ascii=False).encode()
    try:
        response = await client.post(path, content=content, headers=headers)
    except httpx.TransportError:
        statuses["dropped"] += 1
        return
    statuses[str(response.status_code)] += 1
    if response.status_code >= 500 and response.status_code != 503:
        phase.record_error(f"POST {path}: HTTP {response.status_code}: {response.text[:200]}")
        return
    phase.latencies_ms.append((time.perf_counter() - started) * 1000)


@dataclass
class BenchRun:
    duration_s: float
    concurrency: int
    bcrypt_cost: int
    phases: list[Phase] = field(default_factory=list)
    # HTTP status (or "dropped") -> answers, per attack ("unicode", "signup").
    attack_statuses: dict[str, Counter[str]] = field(default_factory=dict)

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
    idle_pings = Phase("ping_idle", "ping     GET /api/ping, idle")
    attacked_pings = Phase("ping_under_attack", "ping     GET /api/ping, attacks running")
    unicode_attack = Phase("attack_unicode", "attack   chat text of 16k marks, no token")
    signup_attack = Phase("attack_signup", "attack   sign-ups from one address")
    run.phases = [
        signups,
        logins,
        idle_gets,
        loaded_gets,
        loaded_logins,
        idle_pings,
        attacked_pings,
        unicode_attack,
        signup_attack,
    ]
    run.attack_statuses = {"unicode": Counter(), "signup": Counter()}
    addresses = itertools.count(1)

    def from_own_address() -> dict[str, str]:
        return {"X-Forwarded-For": _client_address(next(addresses))}

    try:
        async with (
            http_client(node.url, run.concurrency) as client,
            http_client(node.url, 1) as get_client,
            http_client(node.url, UNICODE_ATTACK_CLIENTS + FLOOD_CLIENTS) as attack_client,
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
                reply = await timed(
                    signups, client, "POST", "/api/users", body, headers=from_own_address()
                )
                if reply is not None:
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
                    await timed(
                        phase, client, "POST", "/api/auth/login", body, headers=from_own_address()
                    )

                return login

            def get_into(phase: Phase) -> Callable[[], Awaitable[None]]:
                async def get() -> None:
                    await timed(phase, get_client, "GET", room_path)

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

            def ping_into(phase: Phase) -> Callable[[], Awaitable[None]]:
                async def ping() -> None:
                    await timed(phase, get_client, "GET", "/api/ping")

                return ping

            deadline = time.perf_counter() + run.duration_s
            await load(idle_pings, 1, deadline, watch.abort, ping_into(idle_pings))
            watch.check()

            flood = itertools.count()

            async def unicode_chat() -> None:
                await _attack_request(
                    unicode_attack,
                    run.attack_statuses["unicode"],
                    attack_client,
                    f"{room_path}/messages",
                    {"text": UNICODE_ATTACK_TEXT},
                    {"Content-Type": "application/json"},
                )

            async def flood_signup() -> None:
                username = f"{prefix}x{next(flood)}"
                body = {
                    "username": username,
                    "email": f"{username}@example.org",
                    "password": password,
                    "display_name": "Flood",
                }
                await _attack_request(
                    signup_attack,
                    run.attack_statuses["signup"],
                    attack_client,
                    "/api/users",
                    body,
                    {"Content-Type": "application/json", "X-Forwarded-For": FLOOD_ADDRESS},
                )

            deadline = time.perf_counter() + run.duration_s
            await asyncio.gather(
                load(attacked_pings, 1, deadline, watch.abort, ping_into(attacked_pings)),
                load(unicode_attack, UNICODE_ATTACK_CLIENTS, deadline, watch.abort, unicode_chat),
                load(signup_attack, FLOOD_CLIENTS, deadline, watch.abort, flood_signup),
            )
            watch.check()
    finally:
        watcher.cancel()


def _bench_api(data_dir: Path, run: BenchRun) -> None:
    external_store = os.environ.get("MONGODB_URI", "")
    services = BackingServices.start(
        os.environ.get("REDIS_URL", ""), external_store, data_dir / "services"
    )
    database = f"bench_{secrets.token_hex(4)}"
    node: LocalNode | None = None
    signup_defaults, login_defaults = SignupLimitSettings(), LoginLimitSettings()
    try:
        extra_env = {
            "SFUMESH_BCRYPT_COST": str(run.bcrypt_cost),
            "SFUMESH_DATABASE": database,
            "SFUMESH_LOGIN_LIMIT_PER_LOGIN": str(LOGIN_LIMIT),
            "SFUMESH_LOGIN_LIMIT_PER_ADDRESS": str(LOGIN_LIMIT),
            "SFUMESH_TRUSTED_PROXIES": json.dumps(["127.0.0.1"]),
            # Per address: the node's defaults, which the sign-up flood meets (set here, so
            # that nothing in this process's environment changes them).
            "SFUMESH_SIGNUP_LIMIT_PER_ADDRESS": str(signup_defaults.per_address),
            "SFUMESH_SIGNUP_LIMIT_PER_ADDRESS_WINDOW_S": str(signup_defaults.per_address_window_s),
            "SFUMESH_LOGIN_ATTEMPTS_PER_ADDRESS": str(login_defaults.attempts_per_address),
            # Mesh-wide: lifted, so that phases 1-4 measure bcrypt, not the limits.
            "SFUMESH_SIGNUP_LIMIT_TOTAL": str(LOGIN_LIMIT),
            "SFUMESH_LOGIN_ATTEMPTS_TOTAL": str(LOGIN_LIMIT),
            # Room for every ordinary client and attacker in the hashing queue.
            "SFUMESH_HASHING_MAX_WAITING": str(
                max(HashingSettings().max_waiting, run.concurrency + FLOOD_CLIENTS)
            ),
            # The GET phases measure look-ups, all from this one address: not their limit.
            "SFUMESH_ROOM_LOOKUPS_PER_WINDOW": str(LOGIN_LIMIT),
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


def print_table(run: BenchRun) -> None:
    cpus = os.cpu_count() or "?"
    print(
        f"sfumesh bench api: 1 node, bcrypt cost {run.bcrypt_cost}, concurrency "
        f"{run.concurrency}, {run.duration_s:g} s per phase, {cpus} CPUs"
    )
    print_phases(list(zip((1, 2, 3, 4, 4, 5, 6, 6, 6), run.phases, strict=True)))
    idle, loaded = run.phase("get_room_idle"), run.phase("get_room_under_login")
    print()
    print(
        f"GET /api/rooms/{{slug}} while logins run: p50 {ms(loaded.percentile_ms(0.50))} ms, "
        f"p99 {ms(loaded.percentile_ms(0.99))} ms "
        f"(idle: p50 {ms(idle.percentile_ms(0.50))} ms, p99 {ms(idle.percentile_ms(0.99))} ms)"
    )
    pings, attacked = run.phase("ping_idle"), run.phase("ping_under_attack")
    print(
        f"GET /api/ping under attack: p50 {ms(attacked.percentile_ms(0.50))} ms, "
        f"p99 {ms(attacked.percentile_ms(0.99))} ms "
        f"(no attack: p50 {ms(pings.percentile_ms(0.50))} ms, "
        f"p99 {ms(pings.percentile_ms(0.99))} ms)"
    )
    for attack, statuses in run.attack_statuses.items():
        answers = ", ".join(f"{status}: {n}" for status, n in sorted(statuses.items()))
        print(f"attack {attack}: answers {answers or 'none'}")
    print_errors(run.phases)


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
        "ping_p50_ms": rounded(phases["ping_idle"].percentile_ms(0.50)),
        "ping_p99_ms": rounded(phases["ping_idle"].percentile_ms(0.99)),
        "attack_ping_p50_ms": rounded(phases["ping_under_attack"].percentile_ms(0.50)),
        "attack_ping_p99_ms": rounded(phases["ping_under_attack"].percentile_ms(0.99)),
        "attack_signups_accepted": run.attack_statuses["signup"]["201"],
        "attack_statuses": {
            attack: dict(sorted(answers.items())) for attack, answers in run.attack_statuses.items()
        },
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


def run_api_bench(
    *,
    json_path: Path | None,
    duration_s: float,
    concurrency: int = DEFAULT_CONCURRENCY,
    bcrypt_cost: int | None = None,
) -> int:
    """Run `bench api`; 0 when it ran without errors, 1 when not, 2 on bad arguments."""
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
