"""The node registry in Redis (N2): a record with a TTL per live node.

A node writes its record at start, refreshes it well inside the TTL, and deletes it when it
stops. A record that expired means the node is dead, whatever Serf says, and its sessions
are reaped.

Each registration also stamps the node's URL in a sorted set (`keys.node_urls`) that outlives
the record by `url_memory_s`: a page keeps the origin of the node that served it after that
node died, and the other nodes must still answer it cross-origin (node/web/cors.py). Seen: a
frozen node's record expired (and was reaped) in the 8 s its page took to notice, and every
API call of the failover was then refused by the browser, for good.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from redis.asyncio import Redis

from node.state import keys


@dataclass(frozen=True)
class NodeInfo:
    name: str
    region: str
    url: str
    started_at: float

    @property
    def ws_url(self) -> str:
        return self.url.replace("http", "ws", 1) + "/ws"


#: how long a node's URL is remembered after its last registration, unless told (s)
URL_MEMORY_S = 24 * 3600.0


class Registry:
    def __init__(
        self,
        redis: Redis,
        me: NodeInfo,
        ttl_s: float,
        url_memory_s: float = URL_MEMORY_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self.me = me
        self._ttl_ms = int(ttl_s * 1000)
        self._url_memory_s = url_memory_s
        # wall clock: the stamps are compared across nodes
        self._clock = clock

    async def register(self) -> None:
        record = json.dumps(asdict(self.me))
        now = self._clock()
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(keys.node(self.me.name), record, px=self._ttl_ms)
            pipe.sadd(keys.NODES, self.me.name)
            pipe.zadd(keys.node_urls(), {self.me.url: now})
            pipe.zremrangebyscore(keys.node_urls(), "-inf", f"({now - self._url_memory_s}")
            await pipe.execute()

    async def recent_urls(self) -> list[str]:
        """The URL of every node registered within `url_memory_s`, alive or not (a dead or
        drained node's pages still call the others)."""
        since = self._clock() - self._url_memory_s
        urls = await self._redis.zrangebyscore(keys.node_urls(), since, "+inf")
        return [_text(url) for url in urls if isinstance(url, bytes | str)]

    async def is_registered(self) -> bool:
        return bool(await self._redis.exists(keys.node(self.me.name)))

    async def deregister(self) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.node(self.me.name))
            pipe.srem(keys.NODES, self.me.name)
            await pipe.execute()

    async def live(self) -> list[NodeInfo]:
        names = sorted(_text(n) for n in await self._redis.smembers(keys.NODES))
        if not names:
            return []
        records = await self._redis.mget([keys.node(name) for name in names])
        return [NodeInfo(**json.loads(raw)) for raw in records if raw is not None]

    async def expired(self) -> list[str]:
        names = sorted(_text(n) for n in await self._redis.smembers(keys.NODES))
        if not names:
            return []
        records = await self._redis.mget([keys.node(name) for name in names])
        return [name for name, raw in zip(names, records, strict=True) if raw is None]

    async def remove(self, name: str) -> bool:
        """Drop another node's record now (Serf says it failed). True if there was one. A
        node that is in fact alive finds its record gone and re-asserts its state."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.node(name))
            pipe.srem(keys.NODES, name)
            deleted, _ = await pipe.execute()
        return bool(deleted)

    async def forget(self, name: str) -> None:
        """Drop a dead node from the set, unless it came back meanwhile."""
        if not await self._redis.exists(keys.node(name)):
            await self._redis.srem(keys.NODES, name)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
