"""A room's live keys expire once it is empty and are kept again when someone joins (issue 21,
item 15), set in the same Lua step as the membership change, under the room lock."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from node.state import keys
from node.state.events import EventPump
from node.state.lock import DistributedLock
from node.state.sessions import SessionStore

# Redis paths: ./scripts/test runs these on a Redis Cluster too (SFUMESH_TEST_REDIS=cluster).
pytestmark = pytest.mark.redis_paths

EMPTY_TTL_S = 600.0


def store(redis: Any) -> SessionStore:
    lock = DistributedLock([redis], redis, retries=2000, retry_delay_s=(0.001, 0.01))
    return SessionStore(redis, lock, "node-1", "local", empty_ttl_s=EMPTY_TTL_S)


def room_keys(slug: str) -> list[str]:
    return [keys.room_events(slug), keys.room_fence(slug), keys.room_fence_applied(slug)]


async def ttls(redis: Any, slug: str) -> list[int]:
    return [await redis.pttl(key) for key in room_keys(slug)]


async def enter(sessions: SessionStore, session_id: str, user_id: str) -> int:
    generation = (await sessions.connect(session_id, user_id)).record.generation
    await sessions.join("lobby", session_id, user_id, user_id, 8, "replace")
    assert await sessions.activate("lobby", session_id, generation) is not None
    return generation


async def test_keys_expire_after_the_last_leave_and_are_kept_on_the_next_join(
    redis: Any,
) -> None:
    sessions = store(redis)
    a = await enter(sessions, "a", "ua")
    b = await enter(sessions, "b", "ub")
    assert await ttls(redis, "lobby") == [-1, -1, -1]
    await sessions.leave("lobby", "a", a, "leave")
    assert await ttls(redis, "lobby") == [-1, -1, -1]  # someone is still in
    await sessions.leave("lobby", "b", b, "leave")
    assert not await redis.exists(keys.room_members("lobby"))
    for ttl in await ttls(redis, "lobby"):
        assert 0 < ttl <= EMPTY_TTL_S * 1000
    # A chat posted to the empty room (by one of its people, over HTTP) keeps it expiring.
    pump = EventPump(redis, "node-1", lambda *args: asyncio.sleep(0), empty_ttl_s=EMPTY_TTL_S)
    await pump.publish("lobby", "chat", {"text": "anyone?"})
    assert 0 < await redis.pttl(keys.room_events("lobby")) <= EMPTY_TTL_S * 1000
    # Someone joins (even before the WebSocket join completes): nothing expires any more.
    await sessions.connect("c", "uc")
    await sessions.join("lobby", "c", "uc", "uc", 8, "replace")
    assert await ttls(redis, "lobby") == [-1, -1, -1]


async def test_a_kick_that_empties_the_room_starts_its_expiry(redis: Any) -> None:
    sessions = store(redis)
    await enter(sessions, "a", "ua")
    await sessions.kick("lobby", "ua")
    assert all(ttl > 0 for ttl in await ttls(redis, "lobby"))


async def test_joins_and_leaves_at_once_leave_expiry_matching_the_members(redis: Any) -> None:
    sessions = store(redis)
    for round_ in range(6):
        first = await enter(sessions, f"a{round_}", "ua")
        await sessions.connect(f"b{round_}", "ub")
        # The last member leaves while another joins: whichever lands last decides.
        await asyncio.gather(
            sessions.leave("lobby", f"a{round_}", first, "leave"),
            sessions.join("lobby", f"b{round_}", "ub", "ub", 8, "allow"),
        )
        assert await redis.exists(keys.room_members("lobby"))
        assert await ttls(redis, "lobby") == [-1, -1, -1]
        record = await sessions.get(f"b{round_}")
        assert record is not None
        await sessions.leave("lobby", f"b{round_}", record.generation, "leave")
        assert all(ttl > 0 for ttl in await ttls(redis, "lobby"))
