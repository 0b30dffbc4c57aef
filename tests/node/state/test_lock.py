"""The distributed lock against real redis-server processes: mutual exclusion, expiry, extend,
fencing of a stalled holder, and a quorum over three independent servers that loses some."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from mesh.process import ManagedProcess, free_port
from node.runtime.services import redis_process
from node.state.lock import (
    DistributedLock,
    FencedScript,
    LockLost,
    LockUnavailable,
    StaleFence,
)

# Redis paths: ./scripts/test runs these on a Redis Cluster too (SFUMESH_TEST_REDIS=cluster).
pytestmark = pytest.mark.redis_paths

LOCK = "sfumesh:{room:lobby}:lock"
FENCE = "sfumesh:{room:lobby}:fence"
APPLIED = "sfumesh:{room:lobby}:applied-fence"
DATA = "sfumesh:{room:lobby}:topic"

# Sets the body's own key (KEYS[2]) to its own arg (ARGV[2]); the prelude owns KEYS[1]/ARGV[1].
SET_BODY = "redis.call('SET', KEYS[2], ARGV[2])\nreturn ARGV[1]"


async def _text(client: Redis, key: str) -> str | None:
    raw = await client.get(key)
    return raw.decode() if isinstance(raw, bytes) else raw


async def _number(client: Redis, key: str) -> int:
    return int(await _text(client, key) or "0")


async def test_mutual_exclusion_and_fences_in_acquisition_order(redis: Redis) -> None:
    lock = DistributedLock([redis], redis, ttl_s=5.0, retries=2000, retry_delay_s=(0.001, 0.01))
    counter = "sfumesh:{room:lobby}:counter"
    await redis.set(counter, 0)
    fences: list[int] = []
    inside = 0

    async def worker() -> None:
        nonlocal inside
        async with lock.hold(LOCK, FENCE) as lease:
            inside += 1
            assert inside == 1
            fences.append(lease.fence)
            value = await _number(redis, counter)
            await asyncio.sleep(random.uniform(0, 0.004))
            await redis.set(counter, value + 1)
            inside -= 1

    await asyncio.gather(*(worker() for _ in range(50)))
    assert await _number(redis, counter) == 50
    assert len(fences) == 50
    assert all(a < b for a, b in itertools.pairwise(fences))
    assert await redis.exists(LOCK) == 0


async def test_lock_held_by_another_is_unavailable_after_retries(redis: Redis) -> None:
    holder = DistributedLock([redis], redis, ttl_s=5.0)
    other = DistributedLock([redis], redis, ttl_s=5.0, retries=3, retry_delay_s=(0.001, 0.005))
    lease = await holder.acquire(LOCK, FENCE)
    started = time.monotonic()
    with pytest.raises(LockUnavailable):
        await other.acquire(LOCK, FENCE)
    assert time.monotonic() - started < 1.0
    # The failed attempts did not delete the holder's key.
    assert await _text(redis, LOCK) == lease.value
    await holder.release(lease)
    assert await redis.exists(LOCK) == 0
    await other.release(await other.acquire(LOCK, FENCE))


async def test_expired_lease_lets_another_in_and_its_release_spares_the_new_key(
    redis: Redis,
) -> None:
    short = DistributedLock([redis], redis, ttl_s=0.2)
    waiting = DistributedLock([redis], redis, ttl_s=5.0, retries=200, retry_delay_s=(0.005, 0.01))
    old = await short.acquire(LOCK, FENCE)
    assert 0 < old.validity_s < 0.2
    assert old.remaining_s() <= old.validity_s
    started = time.monotonic()
    new = await waiting.acquire(LOCK, FENCE)
    waited = time.monotonic() - started
    assert 0.1 < waited < 1.0
    assert new.fence > old.fence
    await short.release(old)  # too late: must not delete the new holder's key
    assert await _text(redis, LOCK) == new.value
    await short.release(old)  # idempotent
    await waiting.release(new)
    assert await redis.exists(LOCK) == 0
    await waiting.release(new)


async def test_extend_while_held_then_lost_after_expiry(redis: Redis) -> None:
    lock = DistributedLock([redis], redis, ttl_s=0.3)
    lease = await lock.acquire(LOCK, FENCE)
    extended = await lock.extend(lease, ttl_s=2.0)
    assert extended.fence == lease.fence and extended.value == lease.value
    assert 1.9 < extended.validity_s < 2.0
    assert 1500 < await redis.pttl(LOCK) <= 2000
    again = await lock.extend(extended)  # back to the lock's own ttl
    assert 0 < again.validity_s < 0.3
    await asyncio.sleep(0.35)
    with pytest.raises(LockLost):  # expired, nobody else has it
        await lock.extend(again)
    other = DistributedLock([redis], redis, ttl_s=5.0, retries=1)
    taken = await other.acquire(LOCK, FENCE)
    with pytest.raises(LockLost):  # expired and taken
        await lock.extend(again)
    assert await _text(redis, LOCK) == taken.value
    await other.release(taken)


async def test_stalled_holder_write_is_refused_by_the_fence(redis: Redis) -> None:
    write = FencedScript(redis, SET_BODY)
    lock_a = DistributedLock([redis], redis, ttl_s=0.2)
    lock_b = DistributedLock([redis], redis, ttl_s=5.0, retries=200, retry_delay_s=(0.005, 0.01))
    a = await lock_a.acquire(LOCK, FENCE)
    assert await write(APPLIED, a.fence, [DATA], ["from A, in time"]) is not None
    await asyncio.sleep(0.3)  # A stalls past its expiry
    b = await lock_b.acquire(LOCK, FENCE)
    assert b.fence > a.fence
    assert (await write(APPLIED, b.fence, [DATA], ["from B"])).decode() == str(b.fence)
    assert await write(APPLIED, b.fence, [DATA], ["from B again"]) is not None  # same fence ok
    with pytest.raises(StaleFence):
        await write(APPLIED, a.fence, [DATA], ["from A, stale"])
    assert await _text(redis, DATA) == "from B again"
    assert await _number(redis, APPLIED) == b.fence
    await lock_a.release(a)
    assert await _text(redis, LOCK) == b.value
    await lock_b.release(b)
    async with lock_b.hold(LOCK, FENCE) as c:
        await write(APPLIED, c.fence, [DATA], ["from C"])
    assert await _text(redis, DATA) == "from C"


async def test_fenced_script_passes_other_errors_through(redis: Redis) -> None:
    broken = FencedScript(redis, "return redis.error_reply('BOOM')")
    with pytest.raises(Exception, match="BOOM") as raised:
        await broken(APPLIED, 1)
    assert not isinstance(raised.value, StaleFence)


@pytest.fixture
def extra_redis(tmp_path: Path) -> Iterator[list[tuple[ManagedProcess, str]]]:
    """Two more independent redis-server processes; stopped by PID at the end."""
    started: list[tuple[ManagedProcess, str]] = []
    try:
        for i in range(2):
            port = free_port()
            password = secrets.token_urlsafe(16)
            child = redis_process(tmp_path / f"redis-{i}", port, password)
            child.start()
            started.append((child, f"redis://:{password}@127.0.0.1:{port}/0"))
            child.wait_port("127.0.0.1", port)
        yield started
    finally:
        for child, _ in started:
            child.stop()


def _kill(child: ManagedProcess) -> None:
    assert child.popen is not None and child.pid is not None
    os.kill(child.pid, signal.SIGKILL)
    child.popen.wait(5)


async def test_quorum_of_three_servers(
    redis: Redis, extra_redis: list[tuple[ManagedProcess, str]]
) -> None:
    (first, first_url), (second, second_url) = extra_redis
    clients = [Redis.from_url(first_url), Redis.from_url(second_url), redis]
    try:
        lock = DistributedLock(clients, redis, ttl_s=1.0, retries=3, retry_delay_s=(0.001, 0.005))
        assert lock.quorum == 2

        # All three up: the key is on every server, and gone from every one after release.
        async with lock.hold(LOCK, FENCE) as lease:
            for client in clients:
                assert await _text(client, LOCK) == lease.value
        for client in clients:
            assert await client.exists(LOCK) == 0

        # Held on two servers by someone else: no quorum for us.
        await clients[0].set(LOCK, "someone-else", px=5000)
        await clients[2].set(LOCK, "someone-else", px=5000)
        with pytest.raises(LockUnavailable):
            await lock.acquire(LOCK, FENCE)
        assert await clients[1].exists(LOCK) == 0  # our lost attempt cleaned up after itself
        for client in clients:
            await client.delete(LOCK)

        # A server dies while we hold the lock: release still works on the others.
        lease = await lock.acquire(LOCK, FENCE)
        _kill(first)
        await lock.release(lease)
        for client in clients[1:]:
            assert await client.exists(LOCK) == 0

        # One of three down: 2/3 is a quorum, for acquire and extend.
        lease = await lock.acquire(LOCK, FENCE)
        assert lease.validity_s > 0.5
        for client in clients[1:]:
            assert await _text(client, LOCK) == lease.value
        lease = await lock.extend(lease, ttl_s=2.0)
        assert await clients[1].pttl(LOCK) > 1500
        await lock.release(lease)
        assert await clients[2].exists(LOCK) == 0
        # ...and 2/3 still excludes: a second holder cannot get in.
        async with lock.hold(LOCK, FENCE) as held:
            with pytest.raises(LockUnavailable):
                await lock.acquire(LOCK, FENCE)
            assert await _text(clients[2], LOCK) == held.value

        # Two of three down: no quorum, promptly.
        _kill(second)
        started = time.monotonic()
        with pytest.raises(LockUnavailable):
            await lock.acquire(LOCK, FENCE)
        assert time.monotonic() - started < 2.0
        assert await redis.exists(LOCK) == 0
    finally:
        for client in clients[:2]:
            await client.aclose()
