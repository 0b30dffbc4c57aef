"""Seats held by HTTP joins never completed on a WebSocket (issue 21, item 6).

A pending membership holds a seat for `pending_ttl_s` from the connection's first join, is
not renewed by joining again, and cannot be activated after; the room's creator can remove a
user (all their memberships, announced, and kept out for a while). All under the room lock,
checked with joins running at once against a real redis-server.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from node.errors import Conflict, Forbidden
from node.state import keys
from node.state.lock import DistributedLock
from node.state.sessions import SessionStore

# Redis paths: ./scripts/test runs these on a Redis Cluster too (SFUMESH_TEST_REDIS=cluster).
pytestmark = pytest.mark.redis_paths

TTL_S = 15.0


class Clock:
    """The store's wall clock, moved by the test: expiry without waiting for it."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def store(redis: Any, clock: Clock | None = None, pending_ttl_s: float = TTL_S) -> SessionStore:
    lock = DistributedLock([redis], redis, retries=2000, retry_delay_s=(0.001, 0.01))
    return SessionStore(
        redis, lock, "node-1", "local", pending_ttl_s=pending_ttl_s, clock=clock or Clock()
    )


async def connected(sessions: SessionStore, session_id: str, user_id: str) -> int:
    return (await sessions.connect(session_id, user_id)).record.generation


async def join(sessions: SessionStore, session_id: str, user_id: str, capacity: int) -> Any:
    return await sessions.join("lobby", session_id, user_id, user_id, capacity, "replace")


async def test_an_uncompleted_join_frees_its_seat_and_cannot_be_renewed(redis: Any) -> None:
    clock = Clock()
    sessions = store(redis, clock)
    squatter = await connected(sessions, "s-squat", "u-squat")
    await connected(sessions, "s-real", "u-real")
    await join(sessions, "s-squat", "u-squat", 1)
    with pytest.raises(Conflict) as full:
        await join(sessions, "s-real", "u-real", 1)
    assert full.value.code == "room_full"
    # Joining again on the same connection halfway through keeps the first time...
    clock.advance(TTL_S * 0.6)
    await join(sessions, "s-squat", "u-squat", 1)
    clock.advance(TTL_S * 0.6)
    # ...so the seat is free now, and the next person gets it.
    await join(sessions, "s-real", "u-real", 1)
    members = {m.session_id for m in await sessions.members("lobby")}
    assert members == {"s-real"}
    # The squatter can neither complete its old join nor renew it on that connection.
    assert await sessions.activate("lobby", "s-squat", squatter) is None
    with pytest.raises(Conflict) as expired:
        await join(sessions, "s-squat", "u-squat", 2)
    assert expired.value.code == "join_expired"


async def test_a_late_websocket_join_is_refused_and_drops_the_seat(redis: Any) -> None:
    clock = Clock()
    sessions = store(redis, clock)
    generation = await connected(sessions, "s1", "u1")
    await join(sessions, "s1", "u1", 2)
    clock.advance(TTL_S * 1.2)
    assert await sessions.activate("lobby", "s1", generation) is None
    assert not await redis.hexists(keys.room_members("lobby"), "s1")


async def test_concurrent_joins_after_expiry_fill_exactly_the_capacity(redis: Any) -> None:
    clock = Clock()
    sessions = store(redis, clock)
    for i in range(2):
        await connected(sessions, f"s-squat{i}", f"u-squat{i}")
        await join(sessions, f"s-squat{i}", f"u-squat{i}", 2)
    for i in range(8):
        await connected(sessions, f"s{i}", f"u{i}")
    clock.advance(TTL_S * 1.2)

    async def attempt(i: int) -> bool:
        try:
            await join(sessions, f"s{i}", f"u{i}", 2)
        except Conflict as error:
            assert error.code == "room_full"
            return False
        return True

    admitted = await asyncio.gather(*(attempt(i) for i in range(8)))
    assert sum(admitted) == 2
    members = await sessions.members("lobby")
    assert len(members) == 2 and not any(m.user_id.startswith("u-squat") for m in members)


async def test_kick_removes_every_session_of_the_user_and_keeps_them_out(redis: Any) -> None:
    sessions = store(redis)
    tab1 = await connected(sessions, "t1", "bob")
    await connected(sessions, "t2", "bob")
    await connected(sessions, "a1", "alice")
    await sessions.join("lobby", "t1", "bob", "Bob", 8, "allow")
    await sessions.join("lobby", "t2", "bob", "Bob", 8, "allow")
    await join(sessions, "a1", "alice", 8)
    assert await sessions.activate("lobby", "t1", tab1) is not None

    # The kick runs while others join: each join lands wholly before or after it.
    async def joiner(i: int) -> None:
        await connected(sessions, f"x{i}", f"x{i}")
        await join(sessions, f"x{i}", f"x{i}", 16)

    results = await asyncio.gather(sessions.kick("lobby", "bob"), *(joiner(i) for i in range(5)))
    removed = results[0]
    assert isinstance(removed, list) and sorted(removed) == ["t1", "t2"]
    members = {m.session_id for m in await sessions.members("lobby")}
    assert members == {"a1", *(f"x{i}" for i in range(5))}
    # Only the active session was announced.
    events = await redis.xrange(keys.room_events("lobby"))
    left = [fields for _, fields in events if fields[b"type"] == b"participant-left"]
    assert len(left) == 1 and b"removed-by-owner" in left[0][b"data"]
    assert (await sessions.get("t1")).room == ""  # type: ignore[union-attr]
    with pytest.raises(Forbidden) as refused:
        await sessions.join("lobby", "t1", "bob", "Bob", 8, "allow")
    assert refused.value.code == "removed_by_owner"
    assert await redis.pttl(keys.room_removed("lobby", "bob")) > 0
