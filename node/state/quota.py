"""File quotas (issue 15): bytes per room and per user, reserved before they are kept.

An upload reserves its bytes as they arrive, in its room's and its uploader's counter at
once (one Lua call), or is refused if either would pass its quota; so two uploads racing
on two nodes cannot both slip under a limit between a check and an increment. A failed,
cut or duplicate upload gives its reservation back; a deleted file gives its size back.

The counters are a cache of what the store keeps: when one is missing (a fresh Redis),
the caller seeds it from the store's files with SET NX, so the first seed wins and
concurrent seeds agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from redis.asyncio import Redis

from node.state import keys

# KEYS: room counter, user counter; ARGV: bytes, room quota, user quota.
# Returns 0 (reserved), 1 (room quota), 2 (user quota), -1 (a counter is not seeded).
_RESERVE = """
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('EXISTS', KEYS[2]) == 0 then
  return -1
end
local n = tonumber(ARGV[1])
if tonumber(redis.call('GET', KEYS[1])) + n > tonumber(ARGV[2]) then return 1 end
if tonumber(redis.call('GET', KEYS[2])) + n > tonumber(ARGV[3]) then return 2 end
redis.call('INCRBY', KEYS[1], n)
redis.call('INCRBY', KEYS[2], n)
return 0
"""

# Never below zero: a release after a Redis restart (and a reseed) must not go negative.
_RELEASE = """
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    local left = tonumber(redis.call('GET', key)) - tonumber(ARGV[1])
    if left < 0 then left = 0 end
    redis.call('SET', key, left)
  end
end
return 0
"""


class QuotaExceeded(Exception):
    def __init__(self, which: str) -> None:
        super().__init__(which)
        #: "room" or "user"
        self.which = which


class NotSeeded(Exception):
    """A counter is missing: seed it from the store, then try again."""


@dataclass(frozen=True)
class FileQuota:
    redis: Redis
    room_quota_bytes: int
    user_quota_bytes: int

    async def seed(self, slug: str, user_id: str, room_bytes: int, user_bytes: int) -> None:
        await self.redis.set(keys.files_room_bytes(slug), room_bytes, nx=True)
        await self.redis.set(keys.files_user_bytes(user_id), user_bytes, nx=True)

    async def reserve(self, slug: str, user_id: str, n: int) -> None:
        result = await self.redis.eval(
            _RESERVE,
            2,
            keys.files_room_bytes(slug),
            keys.files_user_bytes(user_id),
            n,
            self.room_quota_bytes,
            self.user_quota_bytes,
        )
        if result == -1:
            raise NotSeeded()
        if result == 1:
            raise QuotaExceeded("room")
        if result == 2:
            raise QuotaExceeded("user")

    async def release(self, slug: str, user_id: str, n: int) -> None:
        if n <= 0:
            return
        await self.redis.eval(
            _RELEASE, 2, keys.files_room_bytes(slug), keys.files_user_bytes(user_id), n
        )

    async def used(self, slug: str, user_id: str) -> tuple[int, int]:
        room, user = await self.redis.mget(
            [keys.files_room_bytes(slug), keys.files_user_bytes(user_id)]
        )
        return int(room or 0), int(user or 0)


#: room counters read per SCAN step (COUNT hint) and per MGET
_SCAN_BATCH = 500


async def bytes_by_room(redis: Redis) -> Mapping[str, int]:
    """Bytes kept (or being uploaded) per room, from the quota counters: SCAN, never KEYS,
    so a large keyspace is walked in steps without blocking Redis. A room whose counter is
    not seeded (a fresh Redis, no upload since) is absent until its next upload."""
    found: dict[str, int] = {}
    batch: list[str] = []

    async def flush() -> None:
        values = await redis.mget(batch)
        for key, value in zip(batch, values, strict=True):
            if value is not None and int(value) > 0:
                found[keys.files_room_slug(key)] = int(value)
        batch.clear()

    async for raw in redis.scan_iter(match=keys.files_room_bytes_pattern(), count=_SCAN_BATCH):
        batch.append(raw.decode() if isinstance(raw, bytes) else raw)
        if len(batch) >= _SCAN_BATCH:
            await flush()
    if batch:
        await flush()
    return found
