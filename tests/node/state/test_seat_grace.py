"""The refresh seat gap (issue 17): a member whose socket closed keeps the seat for a short
grace, for the same session (or user) only. A refresh races a stranger's join into a full
room against a real redis-server: the refreshed session always gets back in, the stranger
never takes the seat. An explicit leave frees it at once; after the grace it is free.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from node.errors import Conflict
from node.state import keys
from node.state.lock import DistributedLock
from node.state.sessions import SessionStore
from tests.node.state.test_pending_seats import Clock

pytestmark = pytest.mark.redis_paths

GRACE_S = 10.0
RACES = 50


def store(redis: Any, clock: Clock, grace_s: float = GRACE_S) -> SessionStore:
    lock = DistributedLock([redis], redis, retries=2000, retry_delay_s=(0.001, 0.01))
    return SessionStore(redis, lock, "node-1", "local", seat_grace_s=grace_s, clock=clock)


async def enter(sessions: SessionStore, slug: str, session_id: str, user_id: str) -> int:
    """Connect, join and activate: an active member. Returns its generation."""
    generation = (await sessions.connect(session_id, user_id)).record.generation
    await sessions.join(slug, session_id, user_id, user_id, 2, "replace")
    assert await sessions.activate(slug, session_id, generation) is not None
    return generation


async def refresh(sessions: SessionStore, slug: str, session_id: str, generation: int) -> None:
    """The page reloads: its old socket's close ends that connection, the new socket joins."""
    await asyncio.sleep(random.uniform(0, 0.004))
    await sessions.end_session(session_id, generation, "closed")
    await asyncio.sleep(random.uniform(0, 0.004))
    await enter(sessions, slug, session_id, "u-alice")


async def stranger(sessions: SessionStore, slug: str, session_id: str) -> bool:
    """Carol tries to take a seat; True if she got one."""
    await sessions.connect(session_id, "u-carol")
    await asyncio.sleep(random.uniform(0, 0.008))
    try:
        await sessions.join(slug, session_id, "u-carol", "u-carol", 2, "replace")
    except Conflict as error:
        assert error.code == "room_full"
        return False
    return True


async def test_a_refresh_racing_a_stranger_always_gets_its_seat_back(redis: Any) -> None:
    random.seed(17)
    sessions = store(redis, Clock())
    for race in range(RACES):
        slug = f"full-{race}"
        alice = await enter(sessions, slug, "s-alice", "u-alice")
        await enter(sessions, slug, f"s-bob-{race}", "u-bob")
        refreshed, carol_in = await asyncio.gather(
            refresh(sessions, slug, "s-alice", alice),
            stranger(sessions, slug, f"s-carol-{race}"),
            return_exceptions=True,
        )
        assert refreshed is None, f"race {race}: the refreshed session was refused: {refreshed}"
        assert carol_in is False, f"race {race}: the stranger took the seat"
        members = {m.session_id for m in await sessions.members(slug)}
        assert members == {"s-alice", f"s-bob-{race}"}
        # The refreshed session used its hold up: nothing is left kept for it.
        assert not await redis.hexists(keys.room_seat_holds(slug), "s-alice")


async def test_the_seat_is_free_after_the_grace_or_an_explicit_leave(redis: Any) -> None:
    clock = Clock()
    sessions = store(redis, clock)
    alice = await enter(sessions, "room", "s-alice", "u-alice")
    await enter(sessions, "room", "s-bob", "u-bob")
    await sessions.end_session("s-alice", alice, "closed")
    await sessions.connect("s-carol", "u-carol")
    with pytest.raises(Conflict) as full:
        await sessions.join("room", "s-carol", "u-carol", "u-carol", 2, "replace")
    assert full.value.code == "room_full"
    # The same user on another session (another tab) may use the held seat.
    await sessions.connect("s-alice-2", "u-alice")
    await sessions.join("room", "s-alice-2", "u-alice", "u-alice", 2, "replace")
    await sessions.leave("room", "s-alice-2", 1, "left")
    # After the grace a stranger gets it.
    clock.advance(GRACE_S + 0.1)
    await sessions.join("room", "s-carol", "u-carol", "u-carol", 2, "replace")

    # Leaving on purpose (the `leave` frame) keeps nothing.
    bob = await sessions.get("s-bob")
    assert bob is not None
    await sessions.leave("room", "s-bob", bob.generation, "left")
    await sessions.connect("s-dave", "u-dave")
    await sessions.join("room", "s-dave", "u-dave", "u-dave", 2, "replace")


async def test_no_grace_frees_the_seat_at_once(redis: Any) -> None:
    sessions = store(redis, Clock(), grace_s=0)
    alice = await enter(sessions, "room", "s-alice", "u-alice")
    await enter(sessions, "room", "s-bob", "u-bob")
    await sessions.end_session("s-alice", alice, "closed")
    await sessions.connect("s-carol", "u-carol")
    await sessions.join("room", "s-carol", "u-carol", "u-carol", 2, "replace")
    assert not await redis.exists(keys.room_seat_holds("room"))
