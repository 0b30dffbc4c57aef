"""A redsync-style distributed lock over 1..N independent Redis servers, with fencing tokens.

Acquiring sets `name` to a random value with `SET NX PX` on every server at once and wins when
a majority (N//2+1) answered OK and some validity is left (redlock: ttl - elapsed - drift). A
lost attempt deletes what it set (compare-and-delete, so never someone else's key), sleeps a
random jitter and tries again. Extending and releasing compare the value first, in Lua.

A lock by itself cannot stop a holder that stalled (GC pause, overloaded event loop, a slow
network) past its expiry from writing after a newer holder did. So each acquisition also takes
a fencing token, `INCR fence_key` on the Redis that holds the guarded state, and the guarded
writes go through `FencedScript`, which refuses a fence older than the newest one applied.

Keys are used as given: callers pass hash-tagged keys (`sfumesh:{room:lobby}:lock`), so the
lock, its fence counter and the guarded data can live in one Redis Cluster slot.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

log = logging.getLogger(__name__)

# Delete / re-expire the lock only while it still holds our value.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_FENCE_PRELUDE = """
local applied = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) < applied then return redis.error_reply('STALE_FENCE') end
redis.call('SET', KEYS[1], ARGV[1])
"""

_STALE_FENCE = "STALE_FENCE"
_DRIFT_FLOOR_S = 0.002  # redlock's allowance for the Redis expiry resolution
_SERVER_ERRORS = (RedisError, OSError, TimeoutError)

_jitter = random.SystemRandom()


class LockError(Exception):
    """Base of the lock's errors (also raised when no fencing token could be had)."""


class LockUnavailable(LockError):
    """No quorum of servers could be had within the retries."""


class LockLost(LockError):
    """Extend found the lock no longer ours on a quorum of servers (expired or taken)."""


class StaleFence(LockError):
    """A guarded write carried a fence older than one already applied."""


@dataclass(frozen=True)
class Lease:
    """A held lock. `validity_s` is what was left of it at `acquired_at` (time.monotonic() when
    the acquire or the last extend completed), so it is ours until `valid_until` at best."""

    name: str
    value: str
    fence: int
    validity_s: float
    acquired_at: float

    @property
    def valid_until(self) -> float:
        return self.acquired_at + self.validity_s

    def remaining_s(self) -> float:
        return self.valid_until - time.monotonic()


class DistributedLock:
    """Locks over `clients` (independent Redis servers; one is fine), fenced on `fence_client`.

    `fence_client` is the Redis holding the state the lock guards; it may be one of `clients`.
    Each call to a lock server is cut off after `call_timeout_s` (default min(0.25*ttl, 2 s))
    and then counts as a "no" from that server, so a dead server costs time, not the lock.
    """

    def __init__(
        self,
        clients: Sequence[Redis],
        fence_client: Redis,
        *,
        ttl_s: float = 5.0,
        retries: int = 64,
        retry_delay_s: tuple[float, float] = (0.005, 0.05),
        drift_factor: float = 0.01,
        call_timeout_s: float | None = None,
        wait_s: float | None = None,
        fence_replicas: int = 0,
        fence_wait_ms: int = 500,
    ) -> None:
        if not clients:
            raise ValueError("a lock needs at least one Redis server")
        if ttl_s <= 0 or retries < 1 or drift_factor < 0:
            raise ValueError("ttl_s must be > 0, retries >= 1 and drift_factor >= 0")
        low, high = retry_delay_s
        if not 0 <= low <= high:
            raise ValueError("retry_delay_s must be (low, high) with 0 <= low <= high")
        self._clients = tuple(clients)
        self._fence_client = fence_client
        self.ttl_s = ttl_s
        self.retries = retries
        self.retry_delay_s = (low, high)
        self.drift_factor = drift_factor
        self._call_timeout_s = call_timeout_s
        # With wait_s, a busy lock is retried until that deadline, however many attempts it
        # takes: under contention a fixed count runs out long before the queue does.
        self.wait_s = wait_s
        # Under Sentinel the fence counter must be on a replica before the lock counts:
        # a failover that lost the INCR would hand the same fence to the next holder, and a
        # stale holder's writes would pass the fence check beside the new holder's.
        self.fence_replicas = fence_replicas
        self.fence_wait_ms = fence_wait_ms
        self.quorum = len(self._clients) // 2 + 1
        self._release_scripts = [client.register_script(_RELEASE) for client in self._clients]
        self._extend_scripts = [client.register_script(_EXTEND) for client in self._clients]

    def _timeout_for(self, ttl_s: float) -> float:
        if self._call_timeout_s is not None:
            return self._call_timeout_s
        # A quarter of the TTL (1.25 s at the default 5 s): room for a node far from Redis
        # (300 ms RTT and some queueing) while a dead server still costs only part of the
        # lease. It was min(0.05*ttl, 0.5): 0.25 s, shorter than the round trip itself, so
        # a node 300 ms from Redis never got a lock (every room join "busy"; issue 13).
        return min(0.25 * ttl_s, 2.0)

    def _validity(self, ttl_s: float, started: float, now: float) -> float:
        return ttl_s - (now - started) - (ttl_s * self.drift_factor + _DRIFT_FLOOR_S)

    async def _on_all(
        self, op: str, name: str, ttl_s: float, call: Callable[[int], Awaitable[Any]]
    ) -> list[Any]:
        """`call(i)` on every server at once; a server that fails or is too slow gives None."""
        timeout = self._timeout_for(ttl_s)

        async def one(index: int) -> Any:
            try:
                async with asyncio.timeout(timeout):
                    return await call(index)
            except _SERVER_ERRORS as exc:
                # Lost acquire attempts are routine while a server is down; the rest is news.
                level = logging.DEBUG if op == "acquire" else logging.WARNING
                log.log(
                    level,
                    "lock.server_error",
                    extra={"op": op, "lock": name, "server": index, "error": repr(exc)},
                )
                return None

        return await asyncio.gather(*(one(i) for i in range(len(self._clients))))

    async def _release_all(self, name: str, value: str) -> int:
        results = await self._on_all(
            "release",
            name,
            self.ttl_s,
            lambda i: self._release_scripts[i](keys=[name], args=[value]),
        )
        return sum(1 for result in results if result is not None and int(result) == 1)

    async def _attempt(self, name: str, value: str, fence_key: str) -> Lease | None:
        ttl_ms = max(1, int(self.ttl_s * 1000))
        started = time.monotonic()
        results = await self._on_all(
            "acquire",
            name,
            self.ttl_s,
            lambda i: self._clients[i].set(name, value, nx=True, px=ttl_ms),
        )
        granted = sum(1 for result in results if result)
        validity = self._validity(self.ttl_s, started, time.monotonic())
        if granted < self.quorum or validity <= 0:
            return None
        # The fence is taken while the lock is surely ours, and only counts if the lock still
        # is once we have it: a holder that stalled here must not get a fence newer than its
        # successor's.
        try:
            async with asyncio.timeout(validity):
                fence = await self._new_fence(fence_key)
        except TimeoutError:
            return None
        except (RedisError, OSError) as exc:
            await self._release_all(name, value)
            raise LockError(f"no fencing token for lock {name!r}: {exc!r}") from exc
        if fence is None:
            return None
        now = time.monotonic()
        validity = self._validity(self.ttl_s, started, now)
        if validity <= 0:
            return None
        return Lease(name=name, value=value, fence=fence, validity_s=validity, acquired_at=now)

    async def _new_fence(self, fence_key: str) -> int | None:
        """INCR the fence; with `fence_replicas`, None unless that many replicas have it
        (WAIT on the same connection, in one pipeline, as WAIT counts that client's writes)."""
        if not self.fence_replicas:
            return int(await self._fence_client.incr(fence_key))
        async with self._fence_client.pipeline(transaction=False) as pipe:
            pipe.incr(fence_key)
            pipe.wait(self.fence_replicas, self.fence_wait_ms)
            fence, acked = await pipe.execute()
        if int(acked) < self.fence_replicas:
            log.warning(
                "lock.fence_not_replicated",
                extra={"fence_key": fence_key, "replicas": int(acked)},
            )
            return None
        return int(fence)

    async def acquire(self, name: str, fence_key: str) -> Lease:
        """The lock `name` with a fresh fence from `INCR fence_key`, or LockUnavailable."""
        value = secrets.token_hex(16)
        deadline = None if self.wait_s is None else time.monotonic() + self.wait_s
        attempt = 0
        while True:
            attempt += 1
            try:
                lease = await self._attempt(name, value, fence_key)
            except BaseException:
                # Cancelled or failed halfway: do not leave our value behind on any server.
                await asyncio.shield(self._release_all(name, value))
                raise
            if lease is not None:
                log.debug(
                    "lock.acquired",
                    extra={
                        "lock": name,
                        "fence": lease.fence,
                        "attempts": attempt,
                        "validity_s": round(lease.validity_s, 4),
                    },
                )
                return lease
            await self._release_all(name, value)
            delay = _jitter.uniform(*self.retry_delay_s)
            if deadline is None:
                if attempt >= self.retries:
                    break
            elif time.monotonic() + delay >= deadline:
                break
            await asyncio.sleep(delay)
        log.warning(
            "lock.unavailable",
            extra={"lock": name, "attempts": attempt, "servers": len(self._clients)},
        )
        raise LockUnavailable(
            f"lock {name!r}: no quorum of {self.quorum}/{len(self._clients)} in {attempt} attempts"
        )

    async def extend(self, lease: Lease, ttl_s: float | None = None) -> Lease:
        """Reset the lock's expiry to `ttl_s` (default: the lock's ttl) from now, on a quorum;
        LockLost when the lock is no longer ours. The fence stays the same."""
        ttl = self.ttl_s if ttl_s is None else ttl_s
        if ttl <= 0:
            raise ValueError("ttl_s must be > 0")
        ttl_ms = max(1, int(ttl * 1000))
        started = time.monotonic()
        results = await self._on_all(
            "extend",
            lease.name,
            ttl,
            lambda i: self._extend_scripts[i](keys=[lease.name], args=[lease.value, ttl_ms]),
        )
        extended = sum(1 for result in results if result is not None and int(result) == 1)
        now = time.monotonic()
        validity = self._validity(ttl, started, now)
        if extended < self.quorum or validity <= 0:
            log.info(
                "lock.lost",
                extra={"lock": lease.name, "fence": lease.fence, "extended_on": extended},
            )
            raise LockLost(
                f"lock {lease.name!r} (fence {lease.fence}) extended on {extended} of "
                f"{len(self._clients)} servers, quorum {self.quorum}"
            )
        return replace(lease, validity_s=validity, acquired_at=now)

    async def release(self, lease: Lease) -> None:
        """Delete the lock where it still holds our value. Never raises for a lock that
        expired or was taken, nor for a server that is down (that is logged)."""
        released = await self._release_all(lease.name, lease.value)
        if released == 0:
            log.debug("lock.release.not_held", extra={"lock": lease.name, "fence": lease.fence})
        else:
            log.debug(
                "lock.released",
                extra={"lock": lease.name, "fence": lease.fence, "released_on": released},
            )

    @asynccontextmanager
    async def hold(self, name: str, fence_key: str) -> AsyncIterator[Lease]:
        """`async with lock.hold(name, fence_key) as lease:` acquire, and release at the end."""
        lease = await self.acquire(name, fence_key)
        try:
            yield lease
        finally:
            await asyncio.shield(self.release(lease))


class FencedScript:
    """A Lua script whose writes only apply if its fence is not older than the newest applied.

    The body runs after a prelude that owns KEYS[1] (the applied-fence key) and ARGV[1] (the
    fence): it refuses a fence older than the one stored there, otherwise stores this one (so
    the same holder may write again with the same fence). The body's own keys therefore begin
    at KEYS[2] and its args at ARGV[2]; whatever it returns is returned. Under Redis Cluster
    the applied-fence key and the body's keys must share a hash slot (use one hash tag).
    The fence is recorded before the body runs, and Redis does not roll a script back, so a
    body that fails halfway still leaves its fence applied.
    """

    def __init__(self, redis: Redis, body: str) -> None:
        self.body = body
        self._script = redis.register_script(f"{_FENCE_PRELUDE}\n{body}\n")

    async def __call__(
        self,
        applied_fence_key: str,
        fence: int,
        keys: Sequence[str] = (),
        args: Sequence[Any] = (),
    ) -> Any:
        try:
            return await self._script(keys=[applied_fence_key, *keys], args=[fence, *args])
        except ResponseError as exc:
            if str(exc).startswith(_STALE_FENCE):
                log.info(
                    "lock.stale_fence", extra={"fence": fence, "applied_on": applied_fence_key}
                )
                raise StaleFence(
                    f"fence {fence} is older than the one applied at {applied_fence_key!r}"
                ) from exc
            raise
