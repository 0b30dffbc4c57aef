"""A node far from Redis and the store (300 ms RTT) starting in the WAN lab (issue 13
item 6): its start-up's round trips are bounded, counted where they land, not timed.

* Redis: `INFO commandstats` before the node starts and once it is ready. No connection
  handshake beyond `HELLO` (no `CLIENT SETINFO`, no `CLIENT MAINT_NOTIFICATIONS`: one round
  trip each on every new connection), and few commands in all.
* The store: the node's own count (`store.opened` in its log: commands sent, and the
  rounds they took, commands in flight together counting once). Beanie alone made two
  sequential round trips per model for the indexes.

Then a client beside the far node creates a room and joins it there: the room lock's calls
each take a round trip to Redis, and its per-call timeout was shorter than that (every
join "busy"). The join's Redis commands are counted and printed; none is a `SCRIPT LOAD`
(the node loads its Lua scripts at start-up, in one round trip).

The phases' times (`node.ready`'s `startup`, the join's) are printed, not asserted.

Runs inside the private namespace ./scripts/test makes (SFUMESH_PRIVATE_NETNS=1).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from node.lab.cluster import LabCluster
from node.lab.namespaces import namespace_problem
from node.runtime.services import BackingServices
from tests.node.live_client import create_room, sign_up

pytestmark = pytest.mark.skipif(
    namespace_problem() is not None, reason=f"no lab here: {namespace_problem()}"
)

TOPOLOGY = """\
[lab]
seed = 2

[regions.core]
[regions.far]

[hosts.redis]
region = "core"
role = "redis"

[hosts.store]
region = "core"
role = "store"

[hosts.far-node]
region = "far"
role = "node"

[hosts.far-client]
region = "far"
role = "client"

[core.core.far]
delay_ms = 150
"""


class CountingCluster(LabCluster):
    """Reads Redis' command counters just before the node starts."""

    before: dict[str, int]

    def _start_nodes(self, services: BackingServices) -> None:
        self.before = self.commandstats(services.redis_url)
        super()._start_nodes(services)

    def commandstats(self, url: str) -> dict[str, int]:
        assert self._redis_host is not None

        def read() -> dict[str, int]:
            with redis.Redis.from_url(url) as client:
                stats: dict[str, Any] = client.info("commandstats")
            return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}

        return self.call(self._redis_host.name, read)


def log_event(path: Path, event: str) -> dict[str, Any]:
    for line in path.read_text().splitlines():
        if line.startswith("{") and json.loads(line).get("event") == event:
            record: dict[str, Any] = json.loads(line)
            return record
    raise AssertionError(f"no {event} in {path}")


@pytest.mark.slow
def test_a_far_node_starts_in_few_round_trips(
    tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    cluster = CountingCluster(TOPOLOGY, "startup-lab.toml", tmp_path)
    with cluster:
        assert cluster.services is not None
        redis_url = cluster.services.redis_url
        after = cluster.commandstats(redis_url)
        ready_s = cluster.nodes["far-node"].ready_s
        url = cluster.urls["far-node"]
        join: dict[str, Any] = {}

        async def join_far() -> None:
            async with httpx.AsyncClient(timeout=30) as http:
                user = await sign_up(http, url)
                await create_room(user, url, "far-room")
                sock = await user.connect(url)
                before = cluster.commandstats(redis_url)
                started = time.monotonic()
                joined = await user.join(sock, "far-room", url)
                join["s"] = round(time.monotonic() - started, 3)
                done = cluster.commandstats(redis_url)
                join["redis_calls"] = {
                    name: count - before.get(name, 0)
                    for name, count in done.items()
                    if name != "info" and count != before.get(name, 0)
                }
                assert joined["type"] == "joined"
                await sock.close()

        cluster.run("far-client", join_far)
    # the counters' own INFO calls are not the node's
    calls = {
        name: count - cluster.before.get(name, 0)
        for name, count in after.items()
        if name != "info" and count != cluster.before.get(name, 0)
    }
    log = tmp_path / "nodes" / "far-node.log"
    store = log_event(log, "store.opened")
    ready = log_event(log, "node.ready")
    report = {
        "ready_s": ready_s,
        "startup": ready["startup"],
        "redis_calls": calls,
        "store": {k: store[k] for k in ("models", "commands", "rounds", "s")},
        "join": join,
    }
    print(f"\nfar node start-up: {json.dumps(report)}")
    for key, value in report.items():
        record_property(key, value)
    # Redis: connections open with HELLO alone.
    assert "client|setinfo" not in calls and "client|maint_notifications" not in calls, calls
    assert calls.get("hello", 0) >= 1
    # Registration, the first beats and locks, the relay report, Serf's first events: a few
    # dozen commands, never one per model, session or room. The scripts' SCRIPT LOADs go in
    # one pipeline (one round trip, one per script: their number grows with features), so
    # they are counted apart.
    loads = calls.get("script|load", 0)
    assert sum(calls.values()) - loads <= 60, calls
    assert loads <= 40, calls
    # The store: buildInfo, listCollections, then every model's listIndexes and
    # createIndexes side by side: a handful of rounds, however many models.
    assert store["commands"] <= 2 + 2 * store["models"] + 2, store
    assert store["rounds"] <= 5, store
    # The join: its Lua scripts were loaded at start-up (one pipeline), so none is loaded
    # on first use (NOSCRIPT, SCRIPT LOAD, EVALSHA again: two more round trips each).
    assert "script|load" not in join["redis_calls"], join
