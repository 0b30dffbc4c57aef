"""Rooms that span nodes: three node processes with their Serf agents, one redis-server, the
store, and aiortc participants. Media crosses between nodes over relays, decoded by nobody
but the participants."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from node.bench.report import metric_sum
from node.config import new_key
from node.local.launch import LocalNode, start_node, start_nodes
from node.local.participant import MediaPeer, until
from node.media import adapter
from node.relay.manager import read_relays
from node.runtime.services import BackingServices
from tests.conftest import suite_redis
from tests.node.live_client import User, create_room, sign_up
from tests.node.runtime.test_live_mesh import FAST_LIVENESS
from tests.node.runtime.test_node_mesh import _cluster

pytestmark = pytest.mark.slow

LINGER_S = 2.0
RELAY_ENV = {
    **FAST_LIVENESS,
    "SFUMESH_NODE_TTL_S": "60",  # a dead node's sessions go through Serf, not Redis expiry
    "SFUMESH_MEDIA_HOST_ADDRESSES": '["127.0.0.1"]',
    "SFUMESH_RELAY_LINGER_S": str(LINGER_S),
    "SFUMESH_RELAY_REPORT_PERIOD_S": "0.5",
}


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


@pytest.fixture(autouse=True)
def loopback_candidates() -> Iterator[None]:
    """The participants (aiortc in this process) gather on loopback, like the nodes."""
    adapter.set_host_addresses(["127.0.0.1"])
    yield
    adapter.set_host_addresses(None)


@pytest.fixture
async def redis(backing: BackingServices) -> AsyncIterator[Redis]:
    client = suite_redis(backing)
    yield client
    await client.aclose()


TOKEN_KEYS = {"k1": new_key()}


def _env() -> dict[str, str]:
    return {**RELAY_ENV, "SFUMESH_DATABASE": f"relay_{secrets.token_hex(4)}"}


async def metric(http: httpx.AsyncClient, node: LocalNode, name: str) -> float:
    """The sum of a metric's samples on one node."""
    return metric_sum((await http.get(f"{node.url}/metrics")).text, name)


#: the series every subscription has, local or relayed (`node.media.stats`); loss, jitter,
#: RTT and REMB follow the subscriber's first RTCP report
SUBSCRIBER_FAMILIES = (
    "sfumesh_media_packets_total",
    "sfumesh_media_bytes_total",
    "sfumesh_media_bitrate_bps",
    "sfumesh_media_nacks_total",
    "sfumesh_media_retransmissions_total",
    "sfumesh_media_keyframe_requests_total",
)


def _subscriber_series(text: str, subscriber: str, publishers: set[str]) -> None:
    """/metrics (per session) lists each of `subscriber`'s subscriptions, to the audio and
    video of every one of `publishers` (all relayed here), in every subscriber family."""
    for family in SUBSCRIBER_FAMILIES:
        tracks = set()
        for labels in re.findall(rf"^{family}\{{([^}}]*)\}} ", text, re.MULTILINE):
            label = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            if label.get("session") == subscriber and label.get("direction") == "out":
                tracks.add((label["kind"], label["track"]))
        owners = {track.split(":", 1)[0] for _, track in tracks}
        kinds = sorted(kind for kind, _ in tracks)
        assert kinds == ["audio", "audio", "video", "video"], (family, subscriber, tracks)
        assert owners == publishers, (family, subscriber, tracks)


async def join_and_publish(
    stack: AsyncExitStack, user: User, node: LocalNode, slug: str, name: str
) -> tuple[MediaPeer, str]:
    sock = await user.connect(node.url)
    stack.push_async_callback(sock.close)
    await user.join(sock, slug, node.url)
    client = MediaPeer(sock, name)
    stack.push_async_callback(client.close)
    await client.start_publishing()
    return client, sock.session_id


async def test_a_room_across_three_nodes(
    backing: BackingServices, tmp_path: Path, http: httpx.AsyncClient, redis: Redis
) -> None:
    # per-session series: each subscriber of a relayed track listed on its own (issue 22)
    env = {**_env(), "SFUMESH_METRICS_PER_SESSION": "true"}
    nodes = start_nodes(backing, TOKEN_KEYS, count=3, data_dir=tmp_path, extra_env=env)
    node1, node2, node3 = nodes
    try:
        async with AsyncExitStack() as stack:
            users = [await sign_up(http, node1.url, p) for p in ("a", "b", "c")]
            slug = f"span-{secrets.token_hex(3)}"
            await create_room(users[0], node1.url, slug)

            # A on node 1 and B on node 2 decode each other
            a, a_id = await join_and_publish(stack, users[0], node1, slug, "A")
            b, b_id = await join_and_publish(stack, users[1], node2, slug, "B")
            await until(lambda: a.decodes(b_id) and b.decodes(a_id), "A and B to decode")

            # C joins on node 3: everyone gets everyone
            c, c_id = await join_and_publish(stack, users[2], node3, slug, "C")
            await until(
                lambda: a.decodes(c_id) and b.decodes(c_id) and c.decodes(a_id) and c.decodes(b_id),
                "everyone to decode everyone",
                describe=lambda: " | ".join(x.describe() for x in (a, b, c)),
            )
            # one copy of each track per node pair and direction, not per subscriber
            r1 = await read_relays(redis, "node-1")
            assert set(r1) == {"node-2", "node-3"}
            assert r1["node-2"]["tracks_out"] == 2 and r1["node-2"]["tracks_in"] == 2
            assert r1["node-2"]["rooms"] == [slug]
            assert r1["node-2"]["pair"] == ["node-1", "node-2"]
            # the link's setup time split into its phases (issue 22, item 3)
            phases = r1["node-2"]["setup_phases_ms"]
            assert set(phases) == {"signalling", "ice", "dtls"}, phases
            assert all(value >= 0 for value in phases.values()), phases
            assert sum(phases.values()) <= r1["node-2"]["setup_ms"] + 1, (phases, r1)
            # the operator's view of the same
            assert node1.serf is not None
            listed = _cluster(backing, node1.serf.rpc_addr, node1.serf.rpc_auth, "relays")
            pairs = {tuple(entry["pair"]) for entry in listed}
            assert pairs == {("node-1", "node-2"), ("node-1", "node-3"), ("node-2", "node-3")}

            for node in nodes:
                # the nodes forward, they never decode nor encode
                assert await metric(http, node, "sfumesh_media_codec_frames_total") == 0
                assert await metric(http, node, "sfumesh_relay_packets_total") > 0
                # every Serf message of the relay fits the bound
                largest = await metric(http, node, "sfumesh_relay_signalling_message_bytes_max")
                assert 0 < largest <= 1000
                # each node's one participant gets audio and video of the two others, all
                # relayed: its subscriptions are listed like local ones (issue 22, item 2)
                text = (await http.get(f"{node.url}/metrics")).text
                assert metric_sum(text, "sfumesh_media_forwarded_tracks") == 4, text
                for kind in ("audio", "video"):
                    out = f'direction="out",kind="{kind}"'
                    assert metric_sum(text, "sfumesh_media_packets_total", out) > 0, text
                assert metric_sum(text, "sfumesh_media_packets_total", 'direction="in"') > 0
                local = {node1.name: a_id, node2.name: b_id, node3.name: c_id}[node.name]
                _subscriber_series(text, local, {a_id, b_id, c_id} - {local})

            # each relay has its Vivaldi estimate once coordinates have converged a little,
            # its measured RTT from the RTCP reports of its senders, and its bitrates (from
            # the second report of a link on)
            deadline = time.monotonic() + 40
            while True:
                entry = (await read_relays(redis, "node-1"))["node-2"]
                if (
                    entry["rtt_estimated_ms"] is not None
                    and entry["rtt_ms"] is not None
                    and entry["bitrate_out_bps"] > 0
                    and entry["bitrate_in_bps"] > 0
                ):
                    break
                assert time.monotonic() < deadline, entry
                await asyncio.sleep(0.5)

            # B leaves: node 1 stops sending to node 2, and the relay closes after the linger
            await b.sock.close()
            await until(lambda: a.ended_from(b_id) and c.ended_from(b_id), "B's tracks to end")
            deadline = time.monotonic() + 20
            while "node-2" in await read_relays(redis, "node-1"):
                assert time.monotonic() < deadline, "the idle relay node-1/node-2 stayed open"
                await asyncio.sleep(0.2)
            assert a.decodes(c_id) and c.decodes(a_id)

            # B comes back on node 2 (a fresh relay), then node 2 is killed: its tracks end
            b2, b2_id = await join_and_publish(stack, users[1], node2, slug, "B2")
            await until(lambda: a.decodes(b2_id) and b2.decodes(a_id), "B back")
            assert node2.process.pid is not None
            os.kill(node2.process.pid, signal.SIGKILL)
            await until(lambda: a.ended_from(b2_id), "A's tracks from B to end", within_s=40)
            await until(lambda: c.ended_from(b2_id), "C's tracks from B to end", within_s=20)
            seen = a.from_(c_id, "video")[0].frames
            await until(lambda: a.decodes(c_id, frames=seen + 10), "A to keep decoding C")
            old_link = r1["node-2"]["link"]

            # node 2 comes back (same name, its agent rejoins): a fresh relay, nothing stale
            assert node1.serf is not None and node2.serf is not None
            node2 = await asyncio.to_thread(
                start_node,
                backing,
                TOKEN_KEYS,
                name="node-2",
                data_dir=tmp_path,
                extra_env={**env, "SFUMESH_REGION": "ap-southeast"},
                serf=node2.serf,
                join=[node1.serf.bind],
            )
            nodes.append(node2)
            b3, b3_id = await join_and_publish(stack, users[1], node2, slug, "B3")
            await until(lambda: a.decodes(b3_id) and b3.decodes(a_id), "B on the restarted node")
            await until(lambda: c.decodes(b3_id) and b3.decodes(c_id), "B and C again")
            fresh = (await read_relays(redis, "node-1")).get("node-2")
            assert fresh is not None and fresh["link"] != old_link
    finally:
        for node in nodes:
            node.stop()
