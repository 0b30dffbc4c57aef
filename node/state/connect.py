"""How the node connects to Redis: one place for the client's options.

Round trips matter to a node far from Redis (300 ms RTT: README "WAN lab", issue 13 item 6):

* redis-py opens each connection with `HELLO` (credentials, RESP3), then, by default, one
  more round trip: the maintenance-notifications handshake (`CLIENT MAINT_NOTIFICATIONS`,
  sent on RESP3; a managed-Redis feature plain Redis refuses) with `CLIENT SETINFO` (the
  library's name and version). The node needs neither, so a connection is TCP plus `HELLO`.
* A Lua script runs as `EVALSHA`; the first time on a server it fails (`NOSCRIPT`) and
  redis-py sends `SCRIPT LOAD`, then `EVALSHA` again: two more round trips, five times
  over in a node's first room join. `NodeRedis` remembers the scripts registered on it, and
  `load_scripts` loads them all in one round trip at start-up.
"""

from __future__ import annotations

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.maint_notifications import MaintNotificationsConfig
from redis.typing import ScriptTextT


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


def redis_client(url: str) -> NodeRedis:
    """A client for `url` whose connections cost one round trip after TCP (`HELLO`)."""
    client = NodeRedis.from_url(
        url,
        driver_info=None,
        maint_notifications_config=MaintNotificationsConfig(enabled=False),
    )
    assert isinstance(client, NodeRedis)  # from_url builds the class it is called on
    return client
