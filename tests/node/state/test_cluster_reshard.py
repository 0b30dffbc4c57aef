"""A room's hash slot moves to another primary of a Redis Cluster (CLUSTER SETSLOT
IMPORTING/MIGRATING, MIGRATE key by key, SETSLOT NODE: what `redis-cli --cluster reshard`
does) while people join it: every join lands once, every `participant-joined` event is in
the stream once, and a node's stream reader delivers each exactly once."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.crc import key_slot

from node.config import RedisSettings
from node.state import keys
from node.state.connect import open_redis_with
from node.state.events import EventPump
from node.state.lock import DistributedLock
from node.state.sessions import SessionStore
from tests.redis_topologies import RedisCluster, cli, start_cluster

pytestmark = pytest.mark.slow

ROOM = "moving"
PEOPLE = 40


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    started = start_cluster(tmp_path / "cluster")
    try:
        yield started
    finally:
        started.stop()


def _owners(cluster: RedisCluster) -> dict[int, tuple[str, int]]:
    """port -> (node id, first slot) of each primary, from CLUSTER NODES."""
    owners = {}
    for line in cli(cluster.ports[0], cluster.password, "cluster", "nodes").splitlines():
        node_id, address, *_ = line.split()
        owners[int(address.split(":")[1].split("@")[0])] = (node_id, 0)
    return owners


def _slot_owner(cluster: RedisCluster, slot: int) -> int:
    for line in cli(cluster.ports[0], cluster.password, "cluster", "nodes").splitlines():
        fields = line.split()
        port = int(fields[1].split(":")[1].split("@")[0])
        for part in fields[8:]:
            low, _, high = part.partition("-")
            if low.isdigit() and int(low) <= slot <= int(high or low):
                return port
    raise AssertionError(f"no owner of slot {slot}")


async def _migrate(cluster: RedisCluster, slot: int, source: int, target: int) -> int:
    """Move `slot` from the primary on port `source` to the one on `target`, one key at a
    time with pauses, so the joins run into every stage of it. The keys moved."""
    ids = {port: node_id for port, (node_id, _) in _owners(cluster).items()}
    password = cluster.password

    def run(port: int, *args: str) -> str:
        return cli(port, password, *args)

    await asyncio.to_thread(run, target, "cluster", "setslot", str(slot), "importing", ids[source])
    await asyncio.to_thread(run, source, "cluster", "setslot", str(slot), "migrating", ids[target])
    moved = 0
    while True:
        names = (
            await asyncio.to_thread(run, source, "cluster", "getkeysinslot", str(slot), "1")
        ).split()
        if not names:
            break
        await asyncio.to_thread(
            run,
            source,
            "migrate", "127.0.0.1", str(target), "", "0", "5000",
            "auth", password, "keys", *names,
        )  # fmt: skip
        moved += len(names)
        await asyncio.sleep(0.05)
    for port in cluster.ports:
        await asyncio.to_thread(run, port, "cluster", "setslot", str(slot), "node", ids[target])
    return moved


async def test_moving_a_rooms_slot_during_joins_loses_nothing(cluster: RedisCluster) -> None:
    redis = open_redis_with(RedisSettings(mode="cluster"), cluster.url)
    delivered: list[tuple[str, str, dict[str, Any]]] = []

    async def deliver(slug: str | None, event_id: str, kind: str, data: dict[str, Any]) -> None:
        if slug == ROOM:
            delivered.append((event_id, kind, data))

    pump = EventPump(redis, "node-1", deliver)
    reader = asyncio.create_task(pump.run())
    try:
        lock = DistributedLock([redis], redis, ttl_s=5.0, wait_s=30)
        sessions = SessionStore(redis, lock, "node-1", "local")
        await pump.watch(ROOM, "0-0")
        slot = key_slot(keys.room_members(ROOM).encode())
        source = _slot_owner(cluster, slot)
        target = next(port for port in cluster.ports if port != source)

        async def person(index: int) -> None:
            await asyncio.sleep(random.uniform(0, 0.8))
            session_id, user_id = f"s-{index}", f"u-{index}"
            generation = (await sessions.connect(session_id, user_id)).record.generation
            await sessions.join(ROOM, session_id, user_id, user_id, PEOPLE + 1, "replace")
            assert await sessions.activate(ROOM, session_id, generation) is not None

        # Some keys exist before the move starts: the room is live.
        await person(-1)
        people = asyncio.gather(*(person(i) for i in range(PEOPLE)))
        await asyncio.sleep(0.1)
        moved = await _migrate(cluster, slot, source, target)
        await people
        assert moved >= 3  # members, events, fence (at least) went across
        assert _slot_owner(cluster, slot) == target

        everyone = {f"s-{i}" for i in range(-1, PEOPLE)}
        members = await sessions.members(ROOM)
        assert sorted(m.session_id for m in members) == sorted(everyone)
        assert all(m.state == "active" for m in members)
        stream: Any = await redis.xrange(keys.room_events(ROOM))
        joined = [f[b"data"] for _, f in stream if f[b"type"] == b"participant-joined"]
        assert len(joined) == len(everyone)
        for _ in range(100):
            if len([d for d in delivered if d[1] == "participant-joined"]) >= len(everyone):
                break
            await asyncio.sleep(0.1)
        seen = [d[2]["session_id"] for d in delivered if d[1] == "participant-joined"]
        assert sorted(seen) == sorted(everyone)  # each once, none lost
        ids = [d[0] for d in delivered]
        assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await redis.aclose()
