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

Round trips matter to a node far from Redis (300 ms RTT: README "WAN lab", issue 13 item 6):

* redis-py opens each connection with `HELLO` (credentials, RESP3), then, by default, one
  more round trip: the maintenance-notifications handshake (`CLIENT MAINT_NOTIFICATIONS`,
  sent on RESP3; a managed-Redis feature plain Redis refuses) with `CLIENT SETINFO` (the
  library's name and version). The node needs neither, so a connection is TCP plus `HELLO`.
* A Lua script runs as `EVALSHA`; the first time on a server it fails (`NOSCRIPT`) and
  redis-py sends `SCRIPT LOAD`, then `EVALSHA` again: two more round trips, five times
  over in a node's first room join. `NodeRedis` remembers the scripts registered on it, and
  `load_scripts` loads them all in one round trip at start-up (single and sentinel modes; a
  cluster loads a script on each primary the first time it runs there).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.crc import key_slot
from redis.exceptions import (
    ClusterError,
    ConnectionError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TimeoutError,
)
from redis.maint_notifications import MaintNotificationsConfig
from redis.typing import ScriptTextT

from node.config import RedisSettings, Settings

log = logging.getLogger(__name__)

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
    kept dialling the dead primary's address until they ran out (seen with redis-py 8.2).

    A connection that finds the primary at another address than the pool's last one calls
    the pool's `primary_moved` listeners (`on_primary_moved`): a failover, whose promoted
    replica may lack the last writes of the old primary."""

    async def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        if not self.is_connected and self.connection_pool.is_master:
            self.host, self.port = await self.connection_pool.get_master_address()
            pool: Any = self.connection_pool
            address = (self.host, self.port)
            last = getattr(pool, "sfumesh_primary", None)
            pool.sfumesh_primary = address
            if last is not None and last != address:
                for listener in list(getattr(pool, "sfumesh_listeners", ())):
                    listener()
        await super().connect_check_health(
            check_health=check_health, retry_socket_connect=retry_socket_connect
        )


def on_primary_moved(redis: Redis, listener: Callable[[], None]) -> None:
    """Call `listener` (at once, from the connecting task) whenever a Sentinel client finds
    its primary at a new address; nothing for the other modes."""
    if is_cluster(redis) or not isinstance(redis.connection_pool, SentinelConnectionPool):
        return
    pool: Any = redis.connection_pool
    listeners = getattr(pool, "sfumesh_listeners", None)
    if listeners is None:
        listeners = pool.sfumesh_listeners = []
    listeners.append(listener)


_info_refused: list[str] = []  # said once per process


async def server_id(redis: Redis) -> str | None:
    """Which server process answers as the primary now (its `run_id`): another one than
    before means a failover or a restart, and the writes of the last moments before it may
    be gone. None on a cluster (many primaries; its own failovers are not followed)."""
    if is_cluster(redis):
        return None
    try:
        info = await redis.info("server")
    except ResponseError as error:
        # A managed Redis may refuse INFO: then only a lost node record shows a data loss.
        if not _info_refused:
            _info_refused.append(str(error))
            log.warning("redis.info_refused", extra={"error": str(error)})
        return None
    run_id = info.get("run_id")
    return str(run_id) if run_id else None


class NodeRedis(Redis):
    """redis-py's client, remembering the Lua scripts registered on it (by SHA1)."""

    # redis-py's asyncio client inherits two `register_script` declarations (sync `Script`
    # and `AsyncScript`) that mypy finds incompatible; at run time it is `AsyncScript`.
    def register_script(self, script: ScriptTextT) -> AsyncScript:  # type: ignore[override]
        registered = super().register_script(script)
        self._scripts()[registered.sha] = registered.script
        return registered

    def _scripts(self) -> dict[str, ScriptTextT]:
        known: dict[str, ScriptTextT] | None = self.__dict__.get("_node_scripts")
        if known is None:
            known = self.__dict__["_node_scripts"] = {}
        return known

    async def load_scripts(self) -> int:
        """`SCRIPT LOAD` every script registered so far, in one pipeline; how many."""
        scripts = list(self._scripts().values())
        if scripts:
            async with self.pipeline(transaction=False) as pipe:
                for source in scripts:
                    pipe.script_load(source)
                await pipe.execute()
        return len(scripts)


async def load_scripts(redis: Redis) -> int:
    """Load the scripts registered on a node's client in one round trip (0 on a cluster).

    Only saves round trips: when Redis cannot be reached at start-up the node still starts
    (not ready: /readyz says why) and each script is loaded on its first use instead."""
    if not isinstance(redis, NodeRedis):
        return 0
    try:
        return await redis.load_scripts()
    except (RedisError, OSError) as error:
        log.warning("redis.scripts_not_loaded", extra={"error": str(error)})
        return 0


def redis_client(url: str) -> NodeRedis:
    """A client for one server at `url` whose connections cost one round trip after TCP
    (`HELLO`)."""
    client = NodeRedis.from_url(
        url,
        driver_info=None,
        maint_notifications_config=MaintNotificationsConfig(enabled=False),
    )
    assert isinstance(client, NodeRedis)  # from_url builds the class it is called on
    return client


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
            redis_class=NodeRedis,
            connection_class=_FollowingConnection,
            retry=Retry(_FAILOVER_BACKOFF, _FAILOVER_RETRIES),
            retry_on_error=[ConnectionError, TimeoutError, ReadOnlyError],
        )
        return primary
    return redis_client(url)


def _password(password: str) -> dict[str, Any]:
    return {"password": password} if password else {}


def is_cluster(redis: Redis) -> bool:
    return isinstance(redis, RedisCluster)


def slot_of(redis: Redis, key: str) -> int:
    """The key's hash slot on a cluster; 0 for every key elsewhere (one server holds all)."""
    return key_slot(key.encode()) if is_cluster(redis) else 0
