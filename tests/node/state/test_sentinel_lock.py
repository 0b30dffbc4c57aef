"""The room lock's fencing across a Sentinel failover: a fence is only handed out once a
replica holds it, so the promoted replica never hands the same fence out again and a stale
holder's write is still refused on the new primary."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from node.state.connect import open_redis_with
from node.state.lock import DistributedLock, FencedScript, LockUnavailable, StaleFence
from tests.conftest import sentinel_settings
from tests.redis_topologies import SentinelGroup

pytestmark = pytest.mark.slow

LOCK = "sfumesh:{room:ha}:lock"
FENCE = "sfumesh:{room:ha}:fence"
APPLIED = "sfumesh:{room:ha}:fence-applied"
DATA = "sfumesh:{room:ha}:topic"
SET_BODY = "redis.call('SET', KEYS[2], ARGV[2])\nreturn ARGV[1]"


async def test_a_stale_holder_is_refused_after_a_failover(sentinel_group: SentinelGroup) -> None:
    redis = open_redis_with(sentinel_settings(sentinel_group), "")
    try:
        write = FencedScript(redis, SET_BODY)
        lock = DistributedLock([redis], redis, ttl_s=0.5, wait_s=20, fence_replicas=1)
        a = await lock.acquire(LOCK, FENCE)
        await write(APPLIED, a.fence, [DATA], ["from A"])
        await asyncio.sleep(0.6)  # A stalls past its lease

        old = sentinel_group.primary()
        sentinel_group.kill(old)
        new = await asyncio.to_thread(sentinel_group.wait_new_primary, old)
        assert new != old

        # The same client follows the failover; B's fence is newer than A's, as A's fence
        # reached a replica before A got it.
        b = await lock.acquire(LOCK, FENCE)
        assert b.fence > a.fence
        await write(APPLIED, b.fence, [DATA], ["from B"])
        with pytest.raises(StaleFence):
            await write(APPLIED, a.fence, [DATA], ["from A, stale"])
        assert await redis.get(DATA) == b"from B"
        await lock.release(b)
    finally:
        await redis.aclose()


async def test_no_fence_is_handed_out_that_no_replica_holds(
    sentinel_group: SentinelGroup,
) -> None:
    """With every replica stalled, the fence INCR cannot be acknowledged: no lease (a
    failover could otherwise forget the fence and hand it out a second time)."""
    redis = open_redis_with(sentinel_settings(sentinel_group), "")
    replicas = [sentinel_group.servers[port].pid for port in sentinel_group.server_ports[1:]]
    try:
        lock = DistributedLock(
            [redis], redis, ttl_s=2.0, wait_s=1.0, fence_replicas=1, fence_wait_ms=200
        )
        before = int(await redis.get(FENCE) or 0)
        for pid in replicas:
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(LockUnavailable):
                await lock.acquire(LOCK, FENCE)
        finally:
            for pid in replicas:
                assert pid is not None
                os.kill(pid, signal.SIGCONT)
        # Nothing of the refused attempts is left holding the lock, and it works again.
        assert await redis.get(LOCK) is None
        lease = await lock.acquire(LOCK, FENCE)
        assert lease.fence > before
        await lock.release(lease)
    finally:
        await redis.aclose()
