"""Several layers per relayed track (issue 14 item 6): the benches' synthetic simulcast
publisher on node 1, two subscribers on node 2 with a small and a large tile. Node 2 reports
both tiles (`needs`), node 1 relays exactly the two layers they select (each its own stream
on the link), and node 2 gives each subscriber its own: 320x180 and 1280x720 decoded, the
half-size layer never crossing. Real node processes, agents and aiortc peers."""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from pathlib import Path

import httpx
import pytest

from node.bench.forward.sfumesh import SfumeshSignalling
from node.bench.forward.simulcast import LayeredPublisher, load_or_encode_layers
from node.local.launch import LocalNode, start_nodes
from node.local.participant import MediaPeer, Socket, until
from node.runtime.services import BackingServices
from tests.node.bench.test_simulcast_publisher import TILES, subscriber, video_track, watch
from tests.node.live_client import create_room, sign_up
from tests.node.relay.test_relay_nodes import TOKEN_KEYS, _env, http, loopback_candidates

pytestmark = [pytest.mark.slow]
__all__ = ["http", "loopback_candidates"]  # fixtures

LIMIT_S = 90.0


def layer_rates(text: str) -> dict[str, float]:
    """Node 1's /metrics: bit/s it relays of each simulcast layer."""
    return {
        layer: float(value)
        for layer, value in re.findall(
            r'^sfumesh_relay_layer_bitrate_bps\{layer="(\d+)",peer="[^"]+"\} (\S+)$',
            text,
            re.MULTILINE,
        )
    }


async def carried(http: httpx.AsyncClient, node: LocalNode, seconds: float) -> dict[str, float]:
    """The least bit/s of each layer node 1 relayed over `seconds` of reports."""
    least: dict[str, float] = {}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        rates = layer_rates((await http.get(f"{node.url}/metrics")).text)
        for layer, bps in rates.items():
            least[layer] = min(least.get(layer, bps), bps)
        await asyncio.sleep(0.5)
    return least


async def test_a_relay_carries_the_two_layers_two_far_tiles_select(
    backing: BackingServices, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    # the tiles alone choose (aiortc's delay-based estimates swing with the test host's load)
    env = {**_env(), "SFUMESH_MEDIA_SIMULCAST_FOLLOW_BANDWIDTH": "false"}
    nodes = start_nodes(backing, TOKEN_KEYS, count=2, data_dir=tmp_path, extra_env=env)
    node1, node2 = nodes
    layers = [media for media, _ in await asyncio.to_thread(load_or_encode_layers, 2.0)]
    peers: list[tuple[Socket, MediaPeer]] = []
    publisher: LayeredPublisher | None = None
    try:
        owner = await sign_up(http, node1.url, prefix="pub")
        slug = f"layers-{secrets.token_hex(3)}"
        await create_room(owner, node1.url, slug)
        spec = {"url": node1.url, "user_token": owner.user_token, "room": slug}
        publisher = LayeredPublisher(layers, SfumeshSignalling(spec, "publisher"))
        await publisher.start(30.0)
        users = [await sign_up(http, node1.url, prefix=name) for name in TILES]
        peers = [await subscriber(user, node2.url, slug) for user in users]
        sizes = await watch(peers)
        assert sizes == list(TILES.values()), (sizes, [p.describe() for _, p in peers])
        # the link carries the quarter and the full layer, and never the half one
        relayed = await carried(http, node1, 3.0)
        assert relayed.get("0", 0) > 50_000 and relayed.get("2", 0) > 300_000, relayed
        assert relayed.get("1", 0) == 0, relayed
        # node 1 switched the encoding nobody anywhere selects off at the publisher
        await until(lambda: publisher is not None and publisher.active == {0, 2}, "half off", 15)
        # the small tile grows: node 2 asks for the full layer alone, the quarter one stops
        sock, peer = peers[0]
        track = video_track(peer)
        assert track is not None and track.mid is not None
        ack = await sock.request("view", tiles={track.mid: {"width": 1280, "height": 720}})
        assert ack["type"] == "ack", ack
        await until(
            lambda: (t := video_track(peer)) is not None and t.size == (1280, 720),
            "the grown tile decodes the full layer",
            LIMIT_S,
        )
        await asyncio.sleep(1.5)  # (the reports' period, and a layer winding down)
        relayed = await carried(http, node1, 2.0)
        assert relayed.get("0", 0) == 0 and relayed.get("2", 0) > 300_000, relayed
        for _, peer in peers:
            assert peer.errors == []
    finally:
        for sock, peer in peers:
            await peer.close()
            await sock.close()
        if publisher is not None:
            await publisher.close()
        for node in nodes:
            node.stop()
