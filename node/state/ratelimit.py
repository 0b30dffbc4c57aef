"""Login and sign-up limits in Redis, atomic across nodes.

An attempt reserves one slot in every counter that applies to it in one Lua call, or is
refused if any of them is full; so concurrent attempts cannot slip past a limit between a
check and an increment. A successful login gives back its failed-login slots (the attempt
slots stay: they bound bcrypt work, right password or not).

Failed logins count per account *from one address*: an attacker elsewhere who guesses wrong
five times uses up his own counter, never the owner's. Unknown logins count under their
normalised name, so they behave exactly like accounts and tell nobody which exist.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from redis.asyncio import Redis

from node.config import LoginLimitSettings, SignupLimitSettings
from node.errors import RateLimited
from node.state import keys

# KEYS: counters; ARGV: limit and window (ms) of each counter in turn. Returns 0 when a slot
# was taken in every counter, else the milliseconds until the fullest one frees up.
_RESERVE = """
local wait = 0
for i, key in ipairs(KEYS) do
  local used = tonumber(redis.call('GET', key) or '0')
  if used >= tonumber(ARGV[2 * i - 1]) then
    local ttl = redis.call('PTTL', key)
    if ttl < 0 then
      ttl = tonumber(ARGV[2 * i])
      redis.call('PEXPIRE', key, ttl)
    end
    wait = math.max(wait, ttl, 1)
  end
end
if wait > 0 then return wait end
for i, key in ipairs(KEYS) do
  if redis.call('INCR', key) == 1 then redis.call('PEXPIRE', key, ARGV[2 * i]) end
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
class Limit:
    key: str
    limit: int
    window_s: float


@dataclass(frozen=True)
class Reservation:
    """What a success gives back: the failed-login counters."""

    refundable: tuple[str, ...]


class WindowCounters:
    """Fixed-window counters reserved all at once or not at all."""

    def __init__(self, redis: Redis) -> None:
        self._reserve = redis.register_script(_RESERVE)
        self._refund = redis.register_script(_REFUND)

    async def reserve(self, limits: Sequence[Limit]) -> float:
        """0 when every counter had room (one slot taken in each), else seconds to wait."""
        args: list[int] = []
        for limit in limits:
            args += [limit.limit, max(1, int(limit.window_s * 1000))]
        wait_ms = int(await self._reserve(keys=[limit.key for limit in limits], args=args))
        return wait_ms / 1000

    async def refund(self, counter_keys: Sequence[str]) -> None:
        if counter_keys:
            await self._refund(keys=list(counter_keys))


def _refusal(what: str, wait_s: float) -> RateLimited:
    wait = max(1, round(wait_s))
    message = f"too many {what}, try again in {wait} s"
    return RateLimited("rate_limited", message, retry_after_s=wait)


def account_address_hash(account: str, address: str) -> str:
    return hashlib.sha256(f"{account}\n{address}".encode()).hexdigest()[:32]


class LoginLimiter:
    def __init__(self, redis: Redis, settings: LoginLimitSettings) -> None:
        self._counters = WindowCounters(redis)
        self._settings = settings

    async def reserve(self, account: str, address: str) -> Reservation:
        """A slot for one login of `account` (`user:<id>`, or `login:<name>` for a login no
        account has) from `address`; RateLimited when a counter is full."""
        s = self._settings
        failures = (
            Limit(
                keys.login_failures_of_account(account_address_hash(account, address)),
                s.per_login,
                s.window_s,
            ),
            Limit(keys.login_failures_from(address), s.per_address, s.window_s),
        )
        attempts = (
            Limit(keys.login_attempts_from(address), s.attempts_per_address, s.attempts_window_s),
            Limit(keys.login_attempts_total(), s.attempts_total, s.attempts_window_s),
        )
        wait_s = await self._counters.reserve((*failures, *attempts))
        if wait_s > 0:
            raise _refusal("login attempts", wait_s)
        return Reservation(tuple(limit.key for limit in failures))

    async def refund(self, reservation: Reservation) -> None:
        await self._counters.refund(reservation.refundable)


class SignupLimiter:
    def __init__(self, redis: Redis, settings: SignupLimitSettings) -> None:
        self._counters = WindowCounters(redis)
        self._settings = settings

    async def reserve(self, address: str) -> None:
        """One sign-up from `address`, or RateLimited when its or the mesh's limit is full."""
        s = self._settings
        wait_s = await self._counters.reserve(
            (
                Limit(keys.signups_from(address), s.per_address, s.per_address_window_s),
                Limit(keys.signups_total(), s.total, s.total_window_s),
            )
        )
        if wait_s > 0:
            raise _refusal("sign-ups", wait_s)
