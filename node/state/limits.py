"""Fixed-window request counters in Redis, atomic across nodes.

One Lua call counts the request and reads its window in the same step, so requests that
arrive together on many nodes cannot slip past the limit between a check and an increment.
Room look-ups (per client address) and room creation (per user) use it; the keys are in
`node.state.keys`.
"""

from __future__ import annotations

import math

from redis.asyncio import Redis

from node.errors import RateLimited

# KEYS[1] counter. ARGV: limit, window ms. Returns 0 when counted within the limit, else the
# milliseconds until the window ends (the refused request still counts: no retry storm gets
# a free pass, and the window is never extended).
_HIT = """
local used = redis.call('INCR', KEYS[1])
if used == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if used <= tonumber(ARGV[1]) then return 0 end
local wait = redis.call('PTTL', KEYS[1])
if wait < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  wait = tonumber(ARGV[2])
end
return math.max(wait, 1)
"""


# KEYS[1] counter: one request given back (the window unchanged; gone at 0).
_GIVE_BACK = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if used > 1 then redis.call('DECR', KEYS[1]) elseif used == 1 then redis.call('DEL', KEYS[1]) end
return 0
"""


class WindowLimiter:
    def __init__(self, redis: Redis) -> None:
        self._hit = redis.register_script(_HIT)
        self._give_back = redis.register_script(_GIVE_BACK)

    async def give_back(self, key: str) -> None:
        """Un-count one request that did nothing (it failed for another reason)."""
        await self._give_back(keys=[key])

    async def hit(self, key: str, limit: int, window_s: float, what: str) -> None:
        """Count one request against `key`; raises `RateLimited` (with the seconds until the
        window ends) when it is over `limit` in the current window. `what` is for the
        message ("room look-ups")."""
        wait_ms = int(await self._hit(keys=[key], args=[limit, int(window_s * 1000)]))
        if wait_ms > 0:
            raise RateLimited(
                "rate_limited",
                f"too many {what}; try again later",
                retry_after_s=max(1, math.ceil(wait_ms / 1000)),
            )
