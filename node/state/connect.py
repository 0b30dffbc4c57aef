"""The one place a node's Redis client is made, for each deployment `redis.mode` names.

`single` is one server at `redis_url`. `sentinel` asks Redis Sentinel for the primary of
`redis.sentinel_service` and asks again whenever a connection fails, so after a failover the
same client object (and every stream reader on it) talks to the promoted replica. `cluster`
is a Redis Cluster: every key of a room carries the room's hash tag (node/state/keys.py),
so each script and transaction stays in one slot, and the event reader runs one blocking
read per slot (node/state/events.py).

The cluster client (`RedisCluster`) is not a subclass of `Redis` but serves the same command
methods; the node uses only commands both route alike, and the suite runs its Redis paths
on a real cluster (tests/conftest.py, `SFUMESH_TEST_REDIS=cluster`), which is what checks it.
"""

from __future__ import annotations

from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelManagedConnection
from redis.backoff import ExponentialBackoff
from redis.crc import key_slot
from redis.exceptions import ClusterError, ConnectionError, ReadOnlyError, TimeoutError

from node.config import RedisSettings, Settings

# A failover takes the sentinels' down-after time plus an election (seconds): commands retry
# across it rather than fail, ~8 s in all.
_FAILOVER_RETRIES = 12
_FAILOVER_BACKOFF = ExponentialBackoff(cap=1.0, base=0.05)


class _Cluster(RedisCluster):
    """A cluster client that rides out a slot migration (resharding).

    While a slot's keys are split between two primaries, a script or command naming several
    of them is answered TRYAGAIN; redis-py retries that for ~0.4 s, then gives up with a bare
    `ClusterError` ("TTL exhausted"). Nothing ran, so the whole command is tried again here,
    with backoff (~8 s in all): a room's slot can take longer than 0.4 s to move."""

    # (redis-py types the tuple as exactly its four classes)
    ERRORS_ALLOW_RETRY = (*RedisCluster.ERRORS_ALLOW_RETRY, ClusterError)  # type: ignore[assignment]


class _FollowingConnection(SentinelManagedConnection):
    """A connection to the primary that asks the sentinels where it is on every (re)connect.

    redis-py's own reconnects a dropped connection through `connect_check_health`, which
    skips the sentinel lookup of `SentinelManagedConnection.connect`: its command retries
    kept dialling the dead primary's address until they ran out (seen with redis-py 8.2)."""

    async def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        if not self.is_connected and self.connection_pool.is_master:
            self.host, self.port = await self.connection_pool.get_master_address()
        await super().connect_check_health(
            check_health=check_health, retry_socket_connect=retry_socket_connect
        )


_RESHARD_RETRIES = 20
_RESHARD_BACKOFF = ExponentialBackoff(cap=0.5, base=0.05)


def open_redis(settings: Settings) -> Redis:
    return open_redis_with(settings.redis, settings.redis_url.get_secret_value())


def open_redis_with(redis: RedisSettings, url: str) -> Redis:
    if redis.mode == "cluster":
        cluster = _Cluster.from_url(url, retry=Retry(_RESHARD_BACKOFF, _RESHARD_RETRIES))
        return cast(Redis, cluster)
    if redis.mode == "sentinel":
        sentinel = Sentinel(
            redis.sentinel_addresses(),
            sentinel_kwargs=_password(redis.sentinel_password.get_secret_value()),
            **_password(redis.password.get_secret_value()),
        )
        primary: Redis = sentinel.master_for(
            redis.sentinel_service,
            connection_class=_FollowingConnection,
            retry=Retry(_FAILOVER_BACKOFF, _FAILOVER_RETRIES),
            retry_on_error=[ConnectionError, TimeoutError, ReadOnlyError],
        )
        return primary
    return Redis.from_url(url)


def _password(password: str) -> dict[str, Any]:
    return {"password": password} if password else {}


def is_cluster(redis: Redis) -> bool:
    return isinstance(redis, RedisCluster)


def slot_of(redis: Redis, key: str) -> int:
    """The key's hash slot on a cluster; 0 for every key elsewhere (one server holds all)."""
    return key_slot(key.encode()) if is_cluster(redis) else 0
