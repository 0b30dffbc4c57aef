"""Happening reminders due across the mesh: claimed by one node, published to the room once.

Every node runs the same loop (node/runtime/happenings.py). A reminder is a member of the
`due` sorted set, scored by when it is due. Claiming is one Lua script: it moves the due
members (and those whose earlier claim's lease ran out) to the `claimed` set, scored by when
this claim's lease ends, so two nodes never claim a reminder at the same time. The claimer
writes the chat message under an id derived from the reminder (a second write hits the
unique _id), publishes it with `publish_once` (one script: set the room's "sent" marker NX,
and only if it was not there add the event to the room's stream), then acknowledges
(`ZREM claimed`). A node dying anywhere in between leaves the claim to run out; the next
claimer repeats the same idempotent steps, so nothing is lost and nothing doubles.

Time is Redis's (`TIME` in the scripts): nodes whose clocks disagree still agree on what is due.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from redis.asyncio import Redis

from node.state import keys
from node.state.events import ROOM_MAXLEN

# KEYS: due, claimed. ARGV: lease ms, most to claim. Returns [now ms, member, due ms, ...];
# the due time of a taken-over claim is unknown (0).
_CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local out = {now}
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, limit)
for _, member in ipairs(expired) do
  redis.call('ZADD', KEYS[2], now + lease, member)
  table.insert(out, member)
  table.insert(out, 0)
end
limit = limit - #expired
if limit > 0 then
  local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', 0, limit)
  for i = 1, #due, 2 do
    redis.call('ZREM', KEYS[1], due[i])
    redis.call('ZADD', KEYS[2], now + lease, due[i])
    table.insert(out, due[i])
    table.insert(out, due[i + 1])
  end
end
return out
"""

# KEYS: the room's sent marker, the room's event stream. ARGV: marker ttl s, event type,
# event data, stream max length. 1 if published now, 0 if it had been already.
_PUBLISH_ONCE = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'type', ARGV[2], 'data', ARGV[3])
return 1
"""

# KEYS: due, claimed. ARGV: [member, due ms]... Schedules each (and ends any claim of it).
_SCHEDULE = """
for i = 1, #ARGV, 2 do
  redis.call('ZREM', KEYS[2], ARGV[i])
  redis.call('ZADD', KEYS[1], ARGV[i + 1], ARGV[i])
end
return 1
"""

# KEYS: due, claimed. ARGV: members. A stopping node hands back what it holds: due now.
_RELEASE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, member in ipairs(ARGV) do
  if redis.call('ZREM', KEYS[2], member) == 1 then redis.call('ZADD', KEYS[1], now, member) end
end
return 1
"""

# KEYS: due, claimed. ARGV: [member, due ms]... Only those in neither set.
_RESTORE = """
local added = 0
for i = 1, #ARGV, 2 do
  if not redis.call('ZSCORE', KEYS[1], ARGV[i]) and not redis.call('ZSCORE', KEYS[2], ARGV[i]) then
    redis.call('ZADD', KEYS[1], ARGV[i + 1], ARGV[i])
    added = added + 1
  end
end
return added
"""

#: the sent marker outlives any claim lease by far
SENT_TTL_S = 14 * 24 * 3600


class Reminders:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._claim = redis.register_script(_CLAIM)
        self._publish = redis.register_script(_PUBLISH_ONCE)
        self._schedule = redis.register_script(_SCHEDULE)
        self._release = redis.register_script(_RELEASE)
        self._restore = redis.register_script(_RESTORE)

    async def schedule(self, due: Iterable[tuple[str, int]]) -> None:
        """Make each (reminder, due ms) due then, replacing an earlier time or claim."""
        args: list[Any] = []
        for member, due_ms in due:
            args += [member, due_ms]
        if args:
            await self._schedule(keys=[keys.REMINDERS_DUE, keys.REMINDERS_CLAIMED], args=args)

    async def restore(self, due: Iterable[tuple[str, int]]) -> int:
        """Schedule each (reminder, due ms) that is neither due nor claimed: reminders Redis
        lost (a restart without persistence) or a node died before scheduling; how many."""
        args: list[Any] = []
        for member, due_ms in due:
            args += [member, due_ms]
        if not args:
            return 0
        added = await self._restore(keys=[keys.REMINDERS_DUE, keys.REMINDERS_CLAIMED], args=args)
        return int(added)

    async def unschedule(self, members: Iterable[str]) -> None:
        members = list(members)
        if members:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.zrem(keys.REMINDERS_DUE, *members)
                pipe.zrem(keys.REMINDERS_CLAIMED, *members)
                await pipe.execute()

    async def claim(self, lease_ms: int, limit: int = 50) -> tuple[int, list[tuple[str, int]]]:
        """Redis's time now (ms) and the reminders this caller now holds, each with its due
        time (0 when taken over from a claim that ran out)."""
        raw: Any = await self._claim(
            keys=[keys.REMINDERS_DUE, keys.REMINDERS_CLAIMED], args=[lease_ms, limit]
        )
        now = int(raw[0])
        rest = raw[1:]
        claimed = [(_text(rest[i]), int(float(_text(rest[i + 1])))) for i in range(0, len(rest), 2)]
        return now, claimed

    async def publish_once(
        self, slug: str, reminder: str, event_type: str, data: dict[str, Any]
    ) -> bool:
        """Add the event to the room's stream unless this reminder's event already was."""
        result = await self._publish(
            keys=[keys.reminder_sent(slug, reminder), keys.room_events(slug)],
            args=[SENT_TTL_S, event_type, json.dumps(data, separators=(",", ":")), ROOM_MAXLEN],
        )
        return bool(int(result))

    async def release(self, members: Iterable[str]) -> None:
        """Hand claims back (a node stopping): due at once for the others, no lease to wait
        out. Sending stays idempotent should one of them have been half sent."""
        members = list(members)
        if members:
            await self._release(keys=[keys.REMINDERS_DUE, keys.REMINDERS_CLAIMED], args=members)

    async def done(self, reminder: str) -> None:
        await self._redis.zrem(keys.REMINDERS_CLAIMED, reminder)

    async def pending(self) -> int:
        """Reminders not yet sent (due or claimed): for tests and benches."""
        due = await self._redis.zcard(keys.REMINDERS_DUE)
        claimed = await self._redis.zcard(keys.REMINDERS_CLAIMED)
        return int(due) + int(claimed)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
