"""Sessions and room membership in Redis (S1-S6, R6): the correctness core.

A session is one WebSocket's identity. Each (re)connection of a session bumps its
**generation**; every cleanup names the generation it belongs to, and a cleanup whose
generation is no longer current touches nothing. That is what makes the page-refresh race
harmless: the old connection's close can never end the new one.

Room membership changes run under the room's distributed lock, and each write is a fenced
Lua script that also appends the matching event to the room's stream in the same atomic
step: a membership change and its announcement can never be split, and an event can never
be sent twice.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from redis.asyncio import Redis

from node.errors import Conflict, Forbidden, RateLimited, Unavailable
from node.state import keys
from node.state.lock import DistributedLock, FencedScript

log = logging.getLogger(__name__)

DuplicatePolicy = Literal["replace", "reject", "allow"]
STREAM_MAXLEN = 2000

# KEYS[1] session, KEYS[2] its generation counter (same slot). ARGV: user, node, region,
# now, counter TTL ms. Returns {generation, previous node}.
_CONNECT = """
local previous = redis.call('HGET', KEYS[1], 'node') or ''
local generation = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('HSET', KEYS[1], 'generation', generation, 'user_id', ARGV[1], 'node', ARGV[2],
           'region', ARGV[3], 'connected_at', ARGV[4])
if redis.call('HEXISTS', KEYS[1], 'room') == 0 then redis.call('HSET', KEYS[1], 'room', '') end
redis.call('HDEL', KEYS[1], 'pending_since')
return {generation, previous}
"""

# KEYS[1] session. ARGV: generation, time. The connection's first join not yet completed on
# its WebSocket started then (kept by later joins, cleared by the WebSocket join).
_MARK_PENDING = """
if redis.call('HGET', KEYS[1], 'generation') ~= ARGV[1] then return 0 end
redis.call('HSETNX', KEYS[1], 'pending_since', ARGV[2])
return 1
"""

# KEYS[1] session. ARGV[1] generation. Its join completed: nothing pending any more.
_CLEAR_PENDING = """
if redis.call('HGET', KEYS[1], 'generation') ~= ARGV[1] then return 0 end
redis.call('HDEL', KEYS[1], 'pending_since')
return 1
"""

# KEYS[1] session. ARGV[1] generation. Deletes the record only if that generation is current.
_DROP_SESSION = """
if redis.call('HGET', KEYS[1], 'generation') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

# KEYS[1] session. ARGV: generation, room, expected room (''= any). Conditional room update.
_SET_SESSION_ROOM = """
if redis.call('HGET', KEYS[1], 'generation') ~= ARGV[1] then return 0 end
if ARGV[3] ~= '' and redis.call('HGET', KEYS[1], 'room') ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], 'room', ARGV[2])
return 1
"""

# Fenced bodies: KEYS[2] members, KEYS[3] events; ARGV[2..] as noted.
# KEYS[4] the user's removed-by-owner mark, KEYS[5] the room's seat holds. ARGV[2]
# session, ARGV[3] membership JSON, ARGV[4] maxlen, ARGV[5] capacity (people), ARGV[6] now
# (ms, the holds' clock), ARGV[7..] replaced sessions. Returns 0 (and changes nothing) when
# the room's creator removed this user a short while ago, -1 (nothing changed) when the room
# is full. The session's own seat hold, if any, is used up.
#
# Capacity is counted here, in the write, and not only by the caller under the room lock: a
# lock holder stalled past the lock's TTL may still write before the next holder does (its
# fence is then the newest applied), so a count read under the lock could be stale by one
# admission per expired lease (seen under heavy load: 12 people in a room of 8).
_JOIN = """
if redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
local new = cjson.decode(ARGV[3])
local skip = {[ARGV[2]] = true}
for i = 7, #ARGV - 1 do skip[ARGV[i]] = true end
local people, count, present = {}, 0, {}
local all = redis.call('HGETALL', KEYS[2])
for i = 1, #all, 2 do
  present[all[i]] = true
  if not skip[all[i]] then
    local uid = cjson.decode(all[i + 1]).user_id
    if not people[uid] then people[uid] = true; count = count + 1 end
  end
end
local holds = redis.call('HGETALL', KEYS[5])
for i = 1, #holds, 2 do
  if holds[i] ~= ARGV[2] and not present[holds[i]] then
    local hold = cjson.decode(holds[i + 1])
    if tonumber(hold.until_ms) > tonumber(ARGV[6]) and not people[hold.user_id] then
      people[hold.user_id] = true; count = count + 1
    end
  end
end
if not people[new.user_id] and count >= tonumber(ARGV[5]) then return -1 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('HDEL', KEYS[5], ARGV[2])
for i = 7, #ARGV - 1 do
  local old = redis.call('HGET', KEYS[2], ARGV[i])
  if old then
    redis.call('HDEL', KEYS[2], ARGV[i])
    local gone = cjson.decode(old)
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'type', 'participant-replaced',
      'data', cjson.encode({session_id = ARGV[i], user_id = gone.user_id,
                            by_session_id = ARGV[2]}))
  end
end
return 1
"""

# ARGV[2] session, ARGV[3] generation, ARGV[4] maxlen, ARGV[5] oldest pending seat still
# good (joined_at). Returns {event id, membership} or nil; a pending seat older than that is
# dropped (another person may hold it by now).
_ACTIVATE = """
local raw = redis.call('HGET', KEYS[2], ARGV[2])
if not raw then return nil end
local member = cjson.decode(raw)
if tonumber(member.generation) ~= tonumber(ARGV[3]) then return nil end
if member.state == 'pending' and tonumber(member.joined_at) < tonumber(ARGV[5]) then
  redis.call('HDEL', KEYS[2], ARGV[2])
  return nil
end
member.state = 'active'
local encoded = cjson.encode(member)
redis.call('HSET', KEYS[2], ARGV[2], encoded)
local id = redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'type', 'participant-joined',
  'data', encoded)
return {id, encoded}
"""

# KEYS[4] the room's seat holds. ARGV[2] session, ARGV[3] generation (removes memberships of
# that generation or older), ARGV[4] maxlen, ARGV[5] reason, ARGV[6] until when (ms) and
# ARGV[7] how long (ms, 0: no hold) an active member's seat stays kept for the same session.
# Returns the removed membership JSON or nil.
_LEAVE = """
local raw = redis.call('HGET', KEYS[2], ARGV[2])
if not raw then return nil end
local member = cjson.decode(raw)
if tonumber(member.generation) > tonumber(ARGV[3]) then return nil end
redis.call('HDEL', KEYS[2], ARGV[2])
if member.state == 'active' and tonumber(ARGV[7]) > 0 then
  redis.call('HSET', KEYS[4], ARGV[2],
    cjson.encode({user_id = member.user_id, until_ms = ARGV[6]}))
  redis.call('PEXPIRE', KEYS[4], ARGV[7])
end
if member.state == 'active' then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'type', 'participant-left',
    'data', cjson.encode({session_id = ARGV[2], user_id = member.user_id, reason = ARGV[5]}))
end
return raw
"""

# KEYS[4] the user's removed-by-owner mark. ARGV[2] user, ARGV[3] maxlen, ARGV[4] how long
# the mark keeps them out (ms). Every membership of the user goes (announced if active).
# Returns the removed sessions' ids.
_KICK = """
local removed = {}
local members = redis.call('HGETALL', KEYS[2])
for i = 1, #members, 2 do
  local member = cjson.decode(members[i + 1])
  if member.user_id == ARGV[2] then
    redis.call('HDEL', KEYS[2], members[i])
    table.insert(removed, members[i])
    if member.state == 'active' then
      redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'type', 'participant-left',
        'data', cjson.encode({session_id = members[i], user_id = member.user_id,
                              reason = 'removed-by-owner'}))
    end
  end
end
redis.call('SET', KEYS[4], '1', 'PX', ARGV[4])
return removed
"""

# KEYS[1] generation counter. ARGV: generation, TTL ms. Never lets the counter go back.
_RAISE_GENERATION = """
if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 1
"""

# ARGV[2..] sessions whose pending memberships expired: dropped without an event (the room
# never heard of them).
_DROP_PENDING = """
for i = 2, #ARGV - 1 do redis.call('HDEL', KEYS[2], ARGV[i]) end
return 1
"""

# KEYS[1] members, KEYS[2] events. ARGV: session, generation, changes JSON, maxlen. Merges
# the changes into the active membership of that generation and announces the whole new
# state, in one step; nil (nothing changed) when there is no such membership.
_SET_STATE = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return nil end
local member = cjson.decode(raw)
if tonumber(member.generation) ~= tonumber(ARGV[2]) or member.state ~= 'active' then
  return nil
end
local flags = member.flags
if type(flags) ~= 'table' then flags = {} end
for name, value in pairs(cjson.decode(ARGV[3])) do flags[name] = value end
member.flags = flags
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(member))
local data = cjson.encode({session_id = ARGV[1], user_id = member.user_id, state = flags})
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'type', 'participant-state',
  'data', data)
return data
"""

# ARGV[2] session, ARGV[3] membership JSON (active), ARGV[4] maxlen: put back a membership
# lost with Redis's data (gone, or still pending: the activation was lost), and announce it
# in the same step: the nodes that had heard it join may have read the room's stream from
# the server that lost it, the others never heard of it. A newer connection's is kept.
_REASSERT = """
local raw = redis.call('HGET', KEYS[2], ARGV[2])
if raw then
  local member = cjson.decode(raw)
  if member.state == 'active' then return 0 end
  if tonumber(member.generation) > tonumber(cjson.decode(ARGV[3]).generation) then return 0 end
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'type', 'participant-joined',
  'data', ARGV[3])
return 1
"""


def _room_script(body: str) -> str:
    """`body` (a fenced room script) followed by the room's expiry, in the same atomic step:
    once the room has no members, its keys (events, fence, applied fence) expire after the
    TTL in the last ARGV; while it has any, they are kept. The fence key is the last KEYS."""
    return f"""
local function body()
{body}
end
local result = body()
local kept = {{KEYS[1], KEYS[3], KEYS[#KEYS]}}
if redis.call('EXISTS', KEYS[2]) == 1 then
  for _, key in ipairs(kept) do redis.call('PERSIST', key) end
else
  for _, key in ipairs(kept) do redis.call('PEXPIRE', key, ARGV[#ARGV]) end
end
return result
"""


@dataclass(frozen=True)
class SessionRecord:
    session_id: str
    user_id: str
    node: str
    region: str
    connected_at: float
    generation: int
    room: str
    # When this connection's first join not yet completed on the WebSocket began (0: none).
    pending_since: float = 0.0


#: A participant's state (W5) as everyone sees it; a membership stores what was set.
PARTICIPANT_STATE_DEFAULTS: dict[str, bool | str | None] = {
    "mic_muted": False,
    "camera_off": False,
    "hand_raised": False,
    "screen_sharing": False,
    # the publisher's m-line (mid) of the screen share, so subscribers tell it from the camera
    "screen_mid": None,
    # every track this participant sends is end-to-end encrypted
    "e2ee": False,
}


def participant_state(flags: Any) -> dict[str, bool | str | None]:
    """The full state from what a membership or event holds (defaults for the rest)."""
    state = dict(PARTICIPANT_STATE_DEFAULTS)
    if isinstance(flags, dict):
        state.update({k: v for k, v in flags.items() if k in PARTICIPANT_STATE_DEFAULTS})
    return state


@dataclass(frozen=True)
class Membership:
    session_id: str
    user_id: str
    display_name: str
    node: str
    generation: int
    state: Literal["pending", "active"]
    joined_at: float
    #: the participant's state as set (`participant_state` fills in the rest)
    flags: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def decode(cls, raw: str | bytes) -> Membership:
        data: dict[str, Any] = json.loads(raw)
        return cls(
            session_id=str(data["session_id"]),
            user_id=str(data["user_id"]),
            display_name=str(data["display_name"]),
            node=str(data["node"]),
            generation=int(data["generation"]),
            state="active" if data["state"] == "active" else "pending",
            joined_at=float(data["joined_at"]),
            flags=data["flags"] if isinstance(data.get("flags"), dict) else {},
        )

    def public(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "user_id": self.user_id,
            "display_name": self.display_name,
            "node": self.node,
            "state": participant_state(self.flags),
        }


@dataclass(frozen=True)
class Connected:
    record: SessionRecord
    previous_node: str


class SessionStore:
    def __init__(
        self,
        redis: Redis,
        lock: DistributedLock,
        node: str,
        region: str,
        pending_ttl_s: float = 15.0,
        session_ttl_s: float = 24 * 3600.0,
        kick_ttl_s: float = 600.0,
        empty_ttl_s: float = 24 * 3600.0,
        seat_grace_s: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        # The generation counter lives as long as a session token could still connect.
        self._generation_ttl_ms = int(session_ttl_s * 1000) + 60_000
        # A pending membership (an HTTP join not yet completed on the WebSocket) holds a
        # seat this long from the connection's first join, then never again: joining again
        # on the same connection does not renew it, and the WebSocket join is refused.
        self._pending_ttl_s = pending_ttl_s
        # Wall-clock seconds; pending seats are timed by it (tests give their own).
        self._clock = clock
        # Someone the room's creator removed stays out this long.
        self._kick_ttl_ms = int(kick_ttl_s * 1000)
        # An empty room's keys expire this long after its last member went (`_room_script`).
        self._empty_ttl_ms = int(empty_ttl_s * 1000)
        # A session whose socket closed (not one that left) keeps its seat this long, for
        # itself or its user only: a refresh or a failover to another node finds it free.
        self._seat_grace_ms = int(seat_grace_s * 1000)
        self._lock = lock
        self.node = node
        self.region = region
        self._connect = redis.register_script(_CONNECT)
        self._raise_generation = redis.register_script(_RAISE_GENERATION)
        self._drop = redis.register_script(_DROP_SESSION)
        self._set_room = redis.register_script(_SET_SESSION_ROOM)
        self._mark_pending = redis.register_script(_MARK_PENDING)
        self._clear_pending = redis.register_script(_CLEAR_PENDING)
        self._join = FencedScript(redis, _room_script(_JOIN))
        self._activate = FencedScript(redis, _room_script(_ACTIVATE))
        self._leave = FencedScript(redis, _room_script(_LEAVE))
        self._kick = FencedScript(redis, _room_script(_KICK))
        self._reassert = FencedScript(redis, _room_script(_REASSERT))
        self._drop_pending = FencedScript(redis, _room_script(_DROP_PENDING))
        self._set_state = redis.register_script(_SET_STATE)

    @staticmethod
    def _room_keys(slug: str, *extra: str) -> list[str]:
        """The KEYS of a room script (after the applied fence): members, events, the
        script's own, and the fence last (see `_room_script`)."""
        return [keys.room_members(slug), keys.room_events(slug), *extra, keys.room_fence(slug)]

    # -- sessions -------------------------------------------------------------------------

    async def connect(self, session_id: str, user_id: str) -> Connected:
        now = time.time()
        generation, previous = await self._connect(
            keys=[keys.session(session_id), keys.session_generation(session_id)],
            args=[user_id, self.node, self.region, now, self._generation_ttl_ms],
        )
        await self._redis.sadd(keys.node_sessions(self.node), session_id)
        record = SessionRecord(
            session_id, user_id, self.node, self.region, now, int(generation), ""
        )
        current = await self.get(session_id)
        return Connected(current or record, _text(previous))

    async def get(self, session_id: str) -> SessionRecord | None:
        return await read_session(self._redis, session_id)

    async def end_session(self, session_id: str, generation: int, reason: str) -> bool:
        """The one way a session ends (close, timeout, node gone). False if superseded."""
        record = await self.get(session_id)
        if record is None or record.generation != generation:
            return False
        if record.room:
            await self.leave(record.room, session_id, generation, reason, hold_seat=True)
        dropped = await self._drop(keys=[keys.session(session_id)], args=[generation])
        await self._redis.srem(keys.node_sessions(record.node), session_id)
        if dropped:
            log.info("session.ended", extra={"session_id": session_id, "reason": reason})
        return bool(dropped)

    # -- rooms ----------------------------------------------------------------------------

    async def admit_chat(
        self, slug: str, session_id: str, per_s: int, *, in_room_now: bool
    ) -> None:
        """Count one chat message of `session_id` against its limit (`per_s` a second), in
        one transaction with the checks: raises when over it, or, for `in_room_now` (a
        connection that joined the room), when its membership has ended."""
        limit_key = keys.chat_limit(session_id)
        # The counter and the session share the session's slot: one transaction on a
        # cluster too. The membership is a read in the room's slot.
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incr(limit_key)
            pipe.expire(limit_key, 1, nx=True)
            pipe.exists(keys.session(session_id))
            count, _, session = await pipe.execute()
        member = await self._redis.hexists(keys.room_members(slug), session_id)
        if in_room_now and not member:
            if not session:
                # Redis lost its data; the node puts this session back when it answers again.
                raise Unavailable(
                    "unavailable", "room state is unavailable; try again", retry_after_s=1
                )
            # The membership ended behind this connection's back (an HTTP join elsewhere).
            raise Forbidden("not_in_room", "this session is no longer in the room")
        if int(count) > per_s:
            raise RateLimited(
                "rate_limited", "too many chat messages; wait a moment", retry_after_s=1
            )

    async def members(self, slug: str) -> list[Membership]:
        raw = await self._redis.hgetall(keys.room_members(slug))
        return [Membership.decode(value) for value in raw.values()]

    async def join(
        self,
        slug: str,
        session_id: str,
        user_id: str,
        display_name: str,
        capacity: int,
        policy: DuplicatePolicy,
    ) -> tuple[SessionRecord, list[Membership]]:
        """Step 2 of joining (S2): admit the session into the room as a pending member."""
        record = await self.get(session_id)
        if record is None or record.user_id != user_id:
            raise Conflict("not_connected", "connect the WebSocket first, then join")
        if record.room and record.room != slug:
            await self.leave(record.room, session_id, record.generation, "moved")
        async with self._lock.hold(keys.room_lock(slug), keys.room_fence(slug)) as lease:
            members = await self.members(slug)
            current = next((m for m in members if m.session_id == session_id), None)
            if (
                current is not None
                and current.state == "active"
                and current.generation == record.generation
            ):
                # Already in, on this very connection: joining again changes nothing.
                return record, []
            now = self._clock()
            oldest_good = now - self._pending_ttl_s
            # A connection's pending seat dates from its first join not yet completed: joining
            # again does not renew it, and once it is over the connection must reconnect.
            joined_at = record.pending_since or now
            if joined_at < oldest_good:
                raise Conflict(
                    "join_expired",
                    "this connection's join was not completed in time; reconnect the"
                    " WebSocket and join again",
                )
            expired = [
                m.session_id
                for m in members
                if m.state == "pending" and m.session_id != session_id and m.joined_at < oldest_good
            ]
            if expired:
                await self._drop_pending(
                    keys.room_fence_applied(slug),
                    lease.fence,
                    keys=self._room_keys(slug),
                    args=[*expired, self._empty_ttl_ms],
                )
            others = [
                m for m in members if m.session_id != session_id and m.session_id not in expired
            ]
            same_user = [m for m in others if m.user_id == user_id]
            if same_user and policy == "reject":
                raise Conflict("already_joined", "this user is already in the room")
            replaced = same_user if policy == "replace" else []
            replaced_ids = {m.session_id for m in replaced}
            membership = Membership(
                session_id,
                user_id,
                display_name,
                record.node,
                record.generation,
                "pending",
                joined_at,
            )
            admitted = await self._join(
                keys.room_fence_applied(slug),
                lease.fence,
                keys=self._room_keys(
                    slug, keys.room_removed(slug, user_id), keys.room_seat_holds(slug)
                ),
                args=[
                    session_id,
                    membership.encode(),
                    STREAM_MAXLEN,
                    capacity,
                    int(self._clock() * 1000),
                    *sorted(replaced_ids),
                    self._empty_ttl_ms,
                ],
            )
            # Capacity counts people, not sessions (R6): a user already inside takes no
            # seat. Counted by `_JOIN` alone, in the write (see there why).
            if admitted == -1:
                raise Conflict("room_full", f"the room is full ({capacity} people)")
            if not admitted:
                raise Forbidden("removed_by_owner", "the room's creator removed you from this room")
        await self._redis.sadd(keys.ROOMS_LIVE, slug)
        await self._set_room(keys=[keys.session(session_id)], args=[record.generation, slug, ""])
        await self._mark_pending(
            keys=[keys.session(session_id)], args=[record.generation, membership.joined_at]
        )
        log.info(
            "room.join",
            extra={"room": slug, "session_id": session_id, "replaced": len(replaced)},
        )
        return record, replaced

    async def activate(
        self, slug: str, session_id: str, generation: int
    ) -> tuple[Membership, str, list[Membership]] | None:
        """Step 3 (the WebSocket `join`): the membership goes live and is announced.

        Returns the membership, the id of its `participant-joined` event and the room's
        active members, or None when there is no pending membership of this generation.
        """
        async with self._lock.hold(keys.room_lock(slug), keys.room_fence(slug)) as lease:
            result = await self._activate(
                keys.room_fence_applied(slug),
                lease.fence,
                keys=self._room_keys(slug),
                args=[
                    session_id,
                    generation,
                    STREAM_MAXLEN,
                    self._clock() - self._pending_ttl_s,
                    self._empty_ttl_ms,
                ],
            )
            if result is None:
                return None
            event_id, encoded = result
            members = await self.members(slug)
        await self._clear_pending(keys=[keys.session(session_id)], args=[generation])
        active = [m for m in members if m.state == "active"]
        return Membership.decode(encoded), _text(event_id), active

    async def leave(
        self,
        slug: str,
        session_id: str,
        generation: int,
        reason: str,
        *,
        hold_seat: bool = False,
    ) -> Membership | None:
        """Remove the session's membership if it is of this generation or older.

        Idempotent: only the call that removes it gets it back (and appends
        `participant-left`); every other call, before or after, gets None. With
        `hold_seat` (the socket closed; the person did not leave) an active member's seat
        stays kept for the session's user for the seat grace, in the same step.
        """
        hold_ms = self._seat_grace_ms if hold_seat else 0
        until_ms = int(self._clock() * 1000) + hold_ms
        async with self._lock.hold(keys.room_lock(slug), keys.room_fence(slug)) as lease:
            removed = await self._leave(
                keys.room_fence_applied(slug),
                lease.fence,
                keys=self._room_keys(slug, keys.room_seat_holds(slug)),
                args=[
                    session_id,
                    generation,
                    STREAM_MAXLEN,
                    reason,
                    until_ms,
                    hold_ms,
                    self._empty_ttl_ms,
                ],
            )
            empty = removed is not None and not await self._redis.hlen(keys.room_members(slug))
        if removed is None:
            return None
        if empty:
            await self._redis.srem(keys.ROOMS_LIVE, slug)
        await self._set_room(keys=[keys.session(session_id)], args=[generation, "", slug])
        membership = Membership.decode(removed)
        log.info("room.leave", extra={"room": slug, "session_id": session_id, "reason": reason})
        return membership

    async def set_state(
        self, slug: str, session_id: str, generation: int, changes: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Merge `changes` (validated by the caller) into the participant's state and
        announce it to the room (`participant-state`), in one Lua step; None when this
        connection has no active membership there (nothing changed).

        Not under the room's lock: the script reads and writes the membership itself, so
        no lock-held read can be overwritten with stale data, and every room script that
        rewrites a membership (join, activate) names its generation: a state set for an
        older connection never lands on a newer one."""
        raw = await self._set_state(
            keys=[keys.room_members(slug), keys.room_events(slug)],
            args=[
                session_id,
                generation,
                json.dumps(changes, separators=(",", ":")),
                STREAM_MAXLEN,
            ],
        )
        if raw is None:
            return None
        return participant_state(json.loads(raw).get("state"))

    async def kick(self, slug: str, user_id: str) -> list[str]:
        """The room's creator removes `user_id`: every membership of theirs ends now (the
        active ones announced as `participant-left`, reason `removed-by-owner`) and they
        cannot join again for a while. Returns the sessions removed."""
        async with self._lock.hold(keys.room_lock(slug), keys.room_fence(slug)) as lease:
            raw = await self._kick(
                keys.room_fence_applied(slug),
                lease.fence,
                keys=self._room_keys(slug, keys.room_removed(slug, user_id)),
                args=[user_id, STREAM_MAXLEN, self._kick_ttl_ms, self._empty_ttl_ms],
            )
            empty = not await self._redis.hlen(keys.room_members(slug))
        removed = [_text(session_id) for session_id in raw or []]
        if empty:
            await self._redis.srem(keys.ROOMS_LIVE, slug)
        for session_id in removed:
            record = await self.get(session_id)
            if record is not None:
                await self._set_room(
                    keys=[keys.session(session_id)], args=[record.generation, "", slug]
                )
        log.info("room.kick", extra={"room": slug, "removed": len(removed)})
        return removed

    async def reassert(
        self,
        record: SessionRecord,
        membership: Membership | None,
        live: Callable[[], bool] = lambda: True,
    ) -> None:
        """Put a live local session back after Redis lost it (a restart without data, a
        failover that lost the last writes). `live` says whether the connection is still
        there and in the room; asked first and again under the room's lock, so that a
        connection ending meanwhile (its leave waits for the same lock) is not put back."""
        if not live():
            return
        session_key = keys.session(record.session_id)
        # After a data loss the counter restarts: lift it above the live generation first.
        await self._raise_generation(
            keys=[keys.session_generation(record.session_id)],
            args=[record.generation, self._generation_ttl_ms],
        )
        if not await self._redis.exists(session_key):
            await self._redis.hset(
                session_key,
                mapping={
                    "user_id": record.user_id,
                    "node": record.node,
                    "region": record.region,
                    "connected_at": record.connected_at,
                    "generation": record.generation,
                    "room": record.room if membership else "",
                },
            )
        await self._redis.sadd(keys.node_sessions(self.node), record.session_id)
        if membership is None:
            return
        slug = record.room
        held = await self._redis.hget(keys.room_members(slug), record.session_id)
        if held is not None and Membership.decode(held).state == "active":
            return  # nothing lost: no need of the room's lock
        async with self._lock.hold(keys.room_lock(slug), keys.room_fence(slug)) as lease:
            if not live():
                return
            await self._reassert(
                keys.room_fence_applied(slug),
                lease.fence,
                keys=self._room_keys(slug),
                args=[record.session_id, membership.encode(), STREAM_MAXLEN, self._empty_ttl_ms],
            )
        await self._redis.sadd(keys.ROOMS_LIVE, slug)

    async def reap_node(self, node: str) -> int:
        """End every session of a node that is gone. Idempotent; safe on many nodes at once."""
        ended = 0
        session_ids = await self._redis.smembers(keys.node_sessions(node))
        for raw_id in session_ids:
            session_id = _text(raw_id)
            record = await self.get(session_id)
            if record is not None and record.node == node:
                ended += await self.end_session(session_id, record.generation, "node-gone")
            else:
                await self._redis.srem(keys.node_sessions(node), session_id)
        return ended


async def read_session(redis: Redis, session_id: str) -> SessionRecord | None:
    """A session's record as Redis holds it (None if there is none)."""
    raw = await redis.hgetall(keys.session(session_id))
    field = {_text(k): _text(v) for k, v in raw.items()}
    if "generation" not in field or "user_id" not in field:
        return None
    return SessionRecord(
        session_id=session_id,
        user_id=field["user_id"],
        node=field.get("node", ""),
        region=field.get("region", ""),
        connected_at=float(field.get("connected_at", "0")),
        generation=int(field["generation"]),
        room=field.get("room", ""),
        pending_since=float(field.get("pending_since", "0")),
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
