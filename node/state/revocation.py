"""Token state that must be shared by every node: logged-out token families and the
single-use WebSocket tickets.

Tokens are stateless JWTs (node/web/tokens.py); what makes one stop working before it
expires lives here, in Redis, so that a logout on one node holds on all of them. A request
pays one GET for it (`family_revoked`). A ticket is taken with GETDEL, so of two
connections racing with the same ticket exactly one gets it.
"""

from __future__ import annotations

import hashlib
import math

from redis.asyncio import Redis

from node.state import keys


def _ticket_hash(ticket: str) -> str:
    return hashlib.sha256(ticket.encode("utf-8", "surrogatepass")).hexdigest()


class TokenState:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def revoke_family(self, family: str, ttl_s: float) -> None:
        """Refuse every token of `family` for `ttl_s` (as long as the longest may live)."""
        await self._redis.set(keys.token_revoked(family), b"1", ex=max(1, math.ceil(ttl_s)))

    async def family_revoked(self, family: str) -> bool:
        return bool(await self._redis.exists(keys.token_revoked(family)))

    async def put_ticket(self, ticket: str, payload: str, ttl_s: float) -> None:
        """Store what the ticket stands for; NX: a (vanishingly unlikely) clash never
        overwrites someone else's ticket, it fails instead."""
        stored = await self._redis.set(
            keys.ws_ticket(_ticket_hash(ticket)), payload, px=max(1, round(ttl_s * 1000)), nx=True
        )
        if not stored:
            raise RuntimeError("ticket collision")

    async def take_ticket(self, ticket: str) -> str | None:
        """The ticket's payload, once: the read deletes it (atomic GETDEL)."""
        raw = await self._redis.getdel(keys.ws_ticket(_ticket_hash(ticket)))
        if raw is None:
            return None
        return raw.decode() if isinstance(raw, bytes) else str(raw)
