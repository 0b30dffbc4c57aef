"""Generations never repeat for a session id, even after its record was deleted."""

from __future__ import annotations

from typing import Any

import pytest

from node.state import keys
from node.state.lock import DistributedLock
from node.state.sessions import SessionRecord, SessionStore

# Redis paths: ./scripts/test runs these on a Redis Cluster too (SFUMESH_TEST_REDIS=cluster).
pytestmark = pytest.mark.redis_paths


def store(redis: Any) -> SessionStore:
    return SessionStore(redis, DistributedLock([redis], redis), "node-1", "local")


async def test_a_stale_cleanup_cannot_end_a_later_connection(redis: Any) -> None:
    sessions = store(redis)
    first = await sessions.connect("s1", "u1")
    assert await sessions.end_session("s1", first.record.generation, "closed")
    assert not await redis.exists(keys.session("s1"))
    # The same session token connects again (a refresh): a new, higher generation...
    again = await sessions.connect("s1", "u1")
    assert again.record.generation > first.record.generation
    # ...so the first connection's cleanup, arriving late, touches nothing.
    assert not await sessions.end_session("s1", first.record.generation, "closed")
    assert await sessions.get("s1") == again.record


async def test_reassert_lifts_the_counter_over_live_generations(redis: Any) -> None:
    sessions = store(redis)
    for _ in range(3):
        live = await sessions.connect("s2", "u2")
    assert live.record.generation == 3
    await redis.flushdb()  # Redis comes back empty
    record = SessionRecord("s2", "u2", "node-1", "local", 0.0, 3, "")
    await sessions.reassert(record, None)
    newer = await sessions.connect("s2", "u2")
    assert newer.record.generation == 4
