"""A room's capacity holds even for a lock holder whose view of the room is stale.

The room lock serialises joins, but a holder stalled past the lock's TTL (a loaded machine,
a GC pause) may still write before the next holder does: its fence is then the newest
applied, and the next holder's count, read before that write, is one short. A helper saw 12
people in a room of 8 under heavy load. The join script counts people in its own atomic
step, so a stale count read under the lock can never admit one person too many.
"""

from __future__ import annotations

from typing import Any

import pytest

from node.errors import Conflict
from node.state import keys
from node.state.lock import DistributedLock
from node.state.sessions import Membership, SessionStore
from tests.node.state.test_pending_seats import Clock

pytestmark = pytest.mark.redis_paths


async def test_a_stale_view_of_a_full_room_admits_nobody(redis: Any) -> None:
    lock = DistributedLock([redis], redis, retries=200, retry_delay_s=(0.001, 0.01))
    sessions = SessionStore(redis, lock, "node-1", "local", clock=Clock())
    slug = "stale-view"
    for user in ("u-alice", "u-bob"):
        await sessions.connect(f"s-{user}", user)
        await sessions.join(slug, f"s-{user}", user, user, 2, "replace")

    # Carol's join reads the room as a stalled holder would have: empty (the other
    # holders' admissions landed after its read).
    async def stale_members(room: str) -> list[Membership]:
        return []

    sessions.members = stale_members  # type: ignore[method-assign, assignment]
    await sessions.connect("s-carol", "u-carol")
    with pytest.raises(Conflict) as refused:
        await sessions.join(slug, "s-carol", "u-carol", "u-carol", 2, "replace")
    assert refused.value.code == "room_full"
    members = await redis.hkeys(keys.room_members(slug))
    assert sorted(m.decode() if isinstance(m, bytes) else m for m in members) == [
        "s-u-alice",
        "s-u-bob",
    ]

    # A person already inside (another device of Bob's) still takes no new seat.
    await sessions.connect("s-bob-2", "u-bob")
    await sessions.join(slug, "s-bob-2", "u-bob", "u-bob", 2, "allow")
