"""How the node connects to Redis: one place for the client's options.

redis-py opens each connection with `HELLO` (credentials, RESP3), then, by default, one
more round trip: the maintenance-notifications handshake (`CLIENT MAINT_NOTIFICATIONS`,
sent on RESP3; a managed-Redis feature plain Redis refuses) together with `CLIENT SETINFO`
(the library's name and version). 300 ms from Redis that is 0.3 s more per connection, and
a node opens several at start-up and one per pool growth after (README "WAN lab", issue 13
item 6). The node needs neither, so it sends neither: a connection is TCP plus `HELLO`.
"""

from __future__ import annotations

from redis.asyncio import Redis
from redis.maint_notifications import MaintNotificationsConfig


def redis_client(url: str) -> Redis:
    """A client for `url` whose connections cost one round trip after TCP (`HELLO`)."""
    client: Redis = Redis.from_url(
        url,
        driver_info=None,
        maint_notifications_config=MaintNotificationsConfig(enabled=False),
    )
    return client
