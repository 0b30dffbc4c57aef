"""What a Redis failover can lose, made good (the events' and sessions' halves): a
membership put back is announced, and a resync delivers the room's members as Redis holds
them, after every event before them and in the reader's order."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from node.state import keys
from node.state.events import PRESENCE, EventPump
from node.state.lock import DistributedLock
from node.state.sessions import Membership, SessionStore, participant_state

# Redis paths: ./scripts/test runs these on a Redis Cluster too (SFUMESH_TEST_REDIS=cluster).
pytestmark = pytest.mark.redis_paths


async def test_a_membership_put_back_is_announced_and_a_resync_delivers_the_members(
    redis: Any,
) -> None:
    lock = DistributedLock([redis], redis, retries=2000, retry_delay_s=(0.001, 0.01))
    sessions = SessionStore(redis, lock, "node-1", "local")
    delivered: list[tuple[str, str, dict[str, Any]]] = []
    arrived = asyncio.Event()

    async def deliver(slug: str | None, event_id: str, kind: str, data: dict[str, Any]) -> None:
        if slug is not None:
            delivered.append((event_id, kind, data))
            arrived.set()

    async def until(count: int) -> None:
        while len(delivered) < count:
            arrived.clear()
            await asyncio.wait_for(arrived.wait(), 10)

    pump = EventPump(redis, "node-1", deliver)
    await pump.watch("lobby", "0-0")
    reader = asyncio.create_task(pump.run())
    try:
        records = {}
        for sid in ("a", "b"):
            records[sid] = (await sessions.connect(sid, f"u{sid}")).record
            await sessions.join("lobby", sid, f"u{sid}", sid, 8, "replace")
            assert await sessions.activate("lobby", sid, records[sid].generation) is not None
        await until(2)
        # A failover lost b's membership (the write, not its event, reached this node).
        await redis.hdel(keys.room_members("lobby"), "b")
        await pump.resync()
        await until(3)
        assert delivered[2][1:] == (PRESENCE, {"participants": [_public("a")]})
        assert delivered[2][0] == delivered[1][0]  # as of the last event read
        # The node puts b back (its connection is live): announced in the same step.
        b = records["b"]
        member = Membership("b", "ub", "b", "node-1", b.generation, "active", 0.0)
        await sessions.reassert(b.__class__(**{**b.__dict__, "room": "lobby"}), member)
        await until(4)
        assert delivered[3][1] == "participant-joined" and delivered[3][2]["session_id"] == "b"
        # Put back again: nothing changes, nothing is announced.
        await sessions.reassert(b.__class__(**{**b.__dict__, "room": "lobby"}), member)
        await pump.resync()
        await until(5)
        assert delivered[4][1] == PRESENCE
        assert sorted(p["session_id"] for p in delivered[4][2]["participants"]) == ["a", "b"]
    finally:
        # (a cancel that lands in redis-py's blocking read can be taken for a dropped
        # connection and retried: cancel again until it ends)
        while not reader.done():
            reader.cancel()
            await asyncio.wait({reader}, timeout=0.5)


def _public(sid: str) -> dict[str, Any]:
    return {
        "session_id": sid,
        "user_id": f"u{sid}",
        "display_name": sid,
        "node": "node-1",
        "state": participant_state(None),
    }
