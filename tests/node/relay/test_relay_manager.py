"""mesh/relay.py signalling between two relay managers in this process, each on its own real
Serf agent (gossip encrypted, RPC auth on), with the real redis-server: glare, a dropped
offer, repeats, unknown links, a restarted peer, the Redis-pointer carrier, the linger."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from mesh import relay_signal as signal
from mesh.relay_signal import Message
from node.config import MediaSettings, RelaySettings
from node.media import adapter
from node.media.session import MediaHub
from node.relay.manager import RelayManager
from node.runtime.services import BackingServices
from node.state.lock import DistributedLock
from node.state.sessions import SessionStore
from tests.mesh.test_serf_rpc import serf_agents

pytestmark = pytest.mark.slow

WAIT_S = 30.0


async def eventually(check: Callable[[], bool], what: str, within_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@asynccontextmanager
async def managers(
    tmp_path: Path, backing: BackingServices, **relay: Any
) -> AsyncIterator[tuple[RelayManager, RelayManager]]:
    """node-a and node-b, each a RelayManager on its own agent; `relay` sets both managers'
    RelaySettings, `b_<field>` only node-b's."""
    adapter.set_host_addresses(["127.0.0.1"])
    redis = Redis.from_url(backing.redis_url)
    try:
        async with serf_agents(tmp_path, ["node-a", "node-b"]) as agents, AsyncExitStack() as stack:
            made: list[RelayManager] = []
            for agent in agents:
                name = agent.config.node_name
                mine = {
                    k.removeprefix("b_"): v
                    for k, v in relay.items()
                    if not k.startswith("b_") or name == "node-b"
                }
                client = await stack.enter_async_context(agent.client())
                lock = DistributedLock([redis], redis)
                media = MediaHub(MediaSettings())
                stack.push_async_callback(media.close)
                manager = RelayManager(
                    name,
                    RelaySettings(**{"linger_s": 60, "attempt_timeout_s": 0.5, **mine}),
                    client,
                    redis,
                    media,
                    SessionStore(redis, lock, name, "test"),
                )
                await manager.start()
                stack.push_async_callback(manager.stop)
                made.append(manager)
            yield made[0], made[1]
    finally:
        await redis.aclose()
        adapter.set_host_addresses(None)


def up(manager: RelayManager, peer: str) -> bool:
    relay = manager.relays.get(peer)
    return relay is not None and relay.state == "up"


def same_link(a: RelayManager, b: RelayManager) -> bool:
    return (
        up(a, "node-b")
        and up(b, "node-a")
        and a.relays["node-b"].link_id == b.relays["node-a"].link_id
    )


async def test_glare_both_offer_at_once_one_link_wins(
    tmp_path: Path, backing: BackingServices
) -> None:
    async with managers(tmp_path, backing) as (a, b):
        a._opening.add("node-b")
        b._opening.add("node-a")
        # both offer before either has heard from the other
        await asyncio.gather(a._open("node-b", {}), b._open("node-a", {}))
        await eventually(lambda: same_link(a, b), "one shared link")
        # node-a sorts first: its offer won; node-b's was refused as glare
        assert a.relays["node-b"].offered_by_me and not b.relays["node-a"].offered_by_me
        assert b.totals.glare_refused == 1 and a.totals.glare_refused == 0
        assert len(a.relays) == 1 and len(b.relays) == 1


def drop_first_offers(manager: RelayManager, count: int) -> list[Message]:
    """Fault injection: `manager` ignores the first `count` offers it receives, as if they
    were lost on the way; the offers it ignored."""
    dropped: list[Message] = []
    answer = manager._on_offer

    async def on_offer(offer: Message) -> Message | None:
        if len(dropped) < count:
            dropped.append(offer)
            return None
        return await answer(offer)

    manager._on_offer = on_offer  # type: ignore[method-assign]
    return dropped


async def test_a_dropped_first_offer_is_retried(tmp_path: Path, backing: BackingServices) -> None:
    async with managers(tmp_path, backing) as (a, b):
        dropped = drop_first_offers(b, 1)
        await a.open("node-b")
        await eventually(lambda: same_link(a, b), "the relay after a retry")
        assert len(dropped) == 1
        assert a.totals.attempts_retried >= 1
        assert a.totals.message_bytes_max <= signal.MAX_MESSAGE_BYTES
        assert b.totals.message_bytes_max <= signal.MAX_MESSAGE_BYTES


async def test_repeats_unknown_links_and_a_restarted_peer(
    tmp_path: Path, backing: BackingServices
) -> None:
    async with managers(tmp_path, backing) as (a, b):
        await a.open("node-b")
        await eventually(lambda: same_link(a, b), "the relay")
        relay = b.relays["node-a"]
        description = await a.relays["node-b"].link.local_description()
        repeat = Message("offer", "again", "node-a", a.boot, relay.link_id, description)
        # a repeated offer (its answer lost) gets the same answer and changes nothing
        assert await b.handle(repeat) is relay.answer
        assert b.relays["node-a"] is relay
        # tracks for a link that does not exist are refused
        stray = Message("tracks", "t1", "node-a", a.boot, "no-such-link", seq=1)
        refused = await b.handle(stray)
        assert refused is not None and refused.reason == "unknown-link"
        # a repeated tracks update is acknowledged once applied, not applied twice
        update = Message("tracks", "t2", "node-a", a.boot, relay.link_id, seq=1)
        assert (await b.handle(update) or update).kind == "ok"
        assert (await b.handle(update) or update).kind == "ok"
        assert relay.in_seq == 1
        gap = Message("tracks", "t3", "node-a", a.boot, relay.link_id, seq=5)
        assert (await b.handle(gap) or gap).reason == "gap"
        # node-a restarted (a new boot id): its new offer replaces the old link at once
        reborn = Message("offer", "r2", "node-a", "newboot", "fresh-link", description)
        answer = await b.handle(reborn)
        assert answer is not None and answer.kind == "answer"
        assert b.relays["node-a"].link_id == "fresh-link"
        assert relay.state == "closed"


async def test_redis_pointer_carrier(tmp_path: Path, backing: BackingServices) -> None:
    async with managers(tmp_path, backing, carrier="redis") as (a, b):
        await a.open("node-b")
        await eventually(lambda: same_link(a, b), "the relay over pointers")
        # the Serf messages are only pointers
        assert a.totals.message_bytes_max < 100 and b.totals.message_bytes_max < 100


async def test_an_idle_relay_closes_on_both_sides_after_the_linger(
    tmp_path: Path, backing: BackingServices
) -> None:
    async with managers(tmp_path, backing, linger_s=0.5) as (a, b):
        await a.open("node-b")
        await eventually(lambda: "node-b" not in a.relays and "node-a" not in b.relays, "close")
        assert a.totals.closed + b.totals.closed == 2
