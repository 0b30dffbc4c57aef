"""How the HTTP benches (api, join) drive real node processes: a pooled client, closed-loop
load until a deadline, a watch that aborts when a process dies, clean-up that a second Ctrl-C
cannot cut short; and what several benches share: signing a user up, waiting for a relay
between two nodes to close, bounding a step that could hang (and saying where it hung)."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
from redis.asyncio import Redis

from mesh.closest import RankedNode
from node.bench.report import Phase
from node.local.launch import LocalNode
from node.relay.manager import read_relays
from node.runtime.services import BackingServices

log = logging.getLogger(__name__)

T = TypeVar("T")

REQUEST_TIMEOUT_S = 120.0


# Below Hypercorn's 5 s keep-alive timeout, so that a pooled connection left idle during a
# phase is never reused just as the server closes it (a spurious "server disconnected").
KEEPALIVE_EXPIRY_S = 1.0


WATCH_INTERVAL_S = 0.2


class BenchFailure(Exception):
    """The bench could not run to the end (setup failed, a process died)."""


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


async def timed(
    phase: Phase,
    client: httpx.AsyncClient,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response | None:
    """One request; its latency on success, an error otherwise."""
    started = time.perf_counter()
    try:
        response = await client.request(method, path, json=body, headers=headers)
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


#: the password of every throwaway user a bench signs up (in a throwaway store)
BENCH_PASSWORD = "bench throwaway password"  # noqa: S105


async def sign_up(http: httpx.AsyncClient, url: str, name: str) -> str:
    """A new user `name` signed up and logged in at `url`: its user token."""
    body = {"username": name, "email": f"{name}@example.org", "password": BENCH_PASSWORD}
    reply = await http.post(f"{url}/api/users", json={**body, "display_name": name})
    if reply.status_code != 201:
        raise BenchFailure(f"sign-up of {name}: HTTP {reply.status_code} {reply.text[:200]}")
    login = await http.post(
        f"{url}/api/auth/login", json={"login": name, "password": BENCH_PASSWORD}
    )
    if login.status_code != 200:
        raise BenchFailure(f"login of {name}: HTTP {login.status_code}")
    token: str = login.json()["user_token"]
    return token


def ranked_first(ranking: list[RankedNode], first: str) -> list[RankedNode]:
    """The measured ranking with the node named `first` in front: where a bench puts a client."""
    return sorted(ranking, key=lambda node: node.name != first)


async def no_relay(redis: Redis, within_s: float, one: str = "node-1", two: str = "node-2") -> None:
    """Until neither node reports a relay to the other (the previous one has closed);
    RuntimeError after `within_s`."""
    deadline = time.monotonic() + within_s
    while True:
        relays_one, relays_two = await read_relays(redis, one), await read_relays(redis, two)
        if two not in relays_one and one not in relays_two:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the relay between {one} and {two} did not close")
        await asyncio.sleep(0.1)


def awaiting(task: asyncio.Task[Any]) -> str:
    """Where a task is suspended: its chain of awaits, outermost first. (Task.get_stack
    gives a suspended coroutine's own frame only, not what it awaits.)"""
    where: list[str] = []
    step: Any = task.get_coro()
    while step is not None:
        frame = getattr(step, "cr_frame", None) or getattr(step, "ag_frame", None)
        frame = frame or getattr(step, "gi_frame", None)
        if frame is None:
            break
        where.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        step = (
            getattr(step, "cr_await", None)
            or getattr(step, "ag_await", None)
            or getattr(step, "gi_yieldfrom", None)
        )
    return f"{task.get_name()}: " + " > ".join(where)


async def within(step: Coroutine[Any, Any, T], limit_s: float, what: str) -> T:
    """`step`'s result, or TimeoutError after `limit_s`; then, before it is cancelled,
    where every task waits is logged (event bench.stuck), so that a step that hangs in a
    run nobody watches (CI) says where it hung."""
    task = asyncio.ensure_future(step)
    done, _ = await asyncio.wait({task}, timeout=limit_s)
    if done:
        return task.result()
    tasks = [awaiting(t) for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    log.error("bench.stuck", extra={"step": what, "limit_s": limit_s, "tasks": tasks})
    task.cancel()
    await asyncio.wait({task}, timeout=5.0)  # a cancel that hangs too is left behind
    raise TimeoutError(f"{what}: not done within {limit_s:.0f} s")
