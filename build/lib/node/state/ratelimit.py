"""Failed-login limits in Redis, atomic across nodes.

An attempt reserves one slot in every counter (per login, per client address) in one Lua
call, or is refused if any counter is full; a successful login gives its slots back. So
concurrent guesses cannot slip past the limit between a check and an increment.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from redis.asyncio import Redis

from node.config import LoginLimitSettings

_RESERVE = """
local wait = 0
for i, key in ipairs(KEYS) do
  local used = tonumber(redis.call('GET', key) or '0')
  if used >= tonumber(ARGV[i + 1]) then
    wait = math.max(wait, redis.call('PTTL', key), 1)
  end
end
if wait > 0 then return wait end
for _, key in ipairs(KEYS) do
  if redis.call('INCR', key) == 1 then redis.call('PEXPIRE', key, ARGV[1]) end
end
return 0
"""

_REFUND = """
for _, key in ipairs(KEYS) do
  if tonumber(redis.call('GET', key) or '0') > 0 then redis.call('DECR', key) end
end
return 0
"""


@dataclass(frozen=True)
class Reservation:
    keys: tuple[str, ...]


class LoginLimiter:
    def __init__(self, redis: Redis, settings: LoginLimitSettings, prefix: str = "sfumesh") -> None:
        self._redis = redis
        self._settings = settings
        self._prefix = prefix
        self._reserve = redis.register_script(_RESERVE)
        self._refund = redis.register_script(_REFUND)

    def _keys(self, login_key: str, address: str) -> tuple[str, ...]:
        # Hashed so that Redis key listings do not show who tried to log in.
        login_hash = hashlib.sha256(login_key.encode()).hexdigest()[:32]
        return (
            f"{self._prefix}:loginlimit:login:{login_hash}",
            f"{self._prefix}:loginlimit:addr:{address}",
        )

    async def reserve(self, login_key: str, address: str) -> Reservation | float:
        """A reservation, or the seconds to wait when a limit is reached."""
        keys = self._keys(login_key, address)
        window_ms = int(self._settings.window_s * 1000)
        limits = (self._settings.per_login, self._settings.per_address)
        wait_ms = int(await self._reserve(keys=list(keys), args=[window_ms, *limits]))
        if wait_ms > 0:
            return wait_ms / 1000
        return Reservation(keys)

    async def refund(self, reservation: Reservation) -> None:
        await self._refund(keys=list(reservation.keys))
