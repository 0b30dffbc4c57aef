"""A simulcast track across a relay (issue 14): a Chromium publisher on node 1 sends three
encodings; node 1 relays one layer of it to node 2 (the one node 2's tiles select, within
what the link's estimate allows; none while nobody there shows it), where an aiortc
subscriber decodes it like any track."""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path

import httpx
import pytest

from node.local.launch import start_nodes
from node.local.participant import MediaPeer, Received
from node.runtime.services import BackingServices
from tests.browser import chromium, page
from tests.node.live_client import create_room, sign_up
from tests.node.media.test_simulcast import SIMULCAST_PUBLISH, video_from
from tests.node.relay.test_relay_nodes import TOKEN_KEYS, _env, http, loopback_candidates

pytestmark = [pytest.mark.slow, pytest.mark.browser]
__all__ = ["http", "loopback_candidates"]  # fixtures

LIMIT_S = 60.0


async def test_a_relay_carries_one_layer_of_a_simulcast_track(
    backing: BackingServices, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    nodes = start_nodes(backing, TOKEN_KEYS, count=2, data_dir=tmp_path, extra_env=_env())
    node1, node2 = nodes
    try:
        publisher = await sign_up(http, node1.url, "pub")
        watcher = await sign_up(http, node1.url, "far")
        slug = f"far-{secrets.token_hex(3)}"
        await create_room(publisher, node1.url, slug)
        token = await publisher.new_session(node1.url)
        async with chromium() as browser, page(browser, f"{node1.url}/") as publisher_page:
            arguments = {"sessionToken": token, "slug": slug, "videoCodec": None}
            session_id = await asyncio.wait_for(
                publisher_page.evaluate(SIMULCAST_PUBLISH, arguments), LIMIT_S
            )
            sock = await watcher.connect(node2.url)
            await watcher.join(sock, slug, node2.url)
            peer = MediaPeer(sock, "far")
            try:
                deadline = time.monotonic() + LIMIT_S
                while True:
                    track = video_from(peer, session_id)
                    if track is not None and track.frames > 30 and track.size is not None:
                        break
                    assert time.monotonic() < deadline, peer.describe()
                    await asyncio.sleep(0.5)
                # one of the encodings, whole (a relayed track is one stream at node 2)
                assert track.size in {(320, 180), (640, 360), (1280, 720)}, track.size
                assert peer.errors == []
            finally:
                await peer.close()
                await sock.close()
    finally:
        for node in nodes:
            node.stop()


async def test_a_relay_carries_the_layer_the_far_tiles_select(
    backing: BackingServices, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """Node 2 reports what its subscriber's tile needs (`needs`); node 1 relays that layer,
    none while the tile is hidden, and a bigger one again (from its keyframe, the publisher's
    encoding switched back on) when it grows."""
    # the tiles alone choose (aiortc's delay-based estimates swing with the test host's load)
    env = {**_env(), "SFUMESH_MEDIA_SIMULCAST_FOLLOW_BANDWIDTH": "false"}
    nodes = start_nodes(backing, TOKEN_KEYS, count=2, data_dir=tmp_path, extra_env=env)
    node1, node2 = nodes
    try:
        publisher = await sign_up(http, node1.url, "pub")
        watcher = await sign_up(http, node1.url, "far")
        slug = f"far-{secrets.token_hex(3)}"
        await create_room(publisher, node1.url, slug)
        token = await publisher.new_session(node1.url)
        async with chromium() as browser, page(browser, f"{node1.url}/") as publisher_page:
            arguments = {"sessionToken": token, "slug": slug, "videoCodec": None}
            session_id = await asyncio.wait_for(
                publisher_page.evaluate(SIMULCAST_PUBLISH, arguments), LIMIT_S
            )
            sock = await watcher.connect(node2.url)
            await watcher.join(sock, slug, node2.url)
            peer = MediaPeer(sock, "far")
            try:

                async def tile(width: int, height: int, visible: bool = True) -> Received:
                    deadline = time.monotonic() + LIMIT_S
                    while (track := video_from(peer, session_id)) is None or track.mid is None:
                        assert time.monotonic() < deadline, peer.describe()
                        await asyncio.sleep(0.3)
                    view = {"width": width, "height": height, "visible": visible}
                    ack = await sock.request("view", tiles={track.mid: view})
                    assert ack["type"] == "ack", ack
                    return track

                async def decoded(size: tuple[int, int]) -> None:
                    deadline = time.monotonic() + LIMIT_S
                    while True:
                        track = video_from(peer, session_id)
                        if track is not None and track.size == size:
                            frames = track.frames
                            await asyncio.sleep(1.0)
                            if track.frames > frames and track.size == size:
                                return
                        assert time.monotonic() < deadline, (size, peer.describe())
                        await asyncio.sleep(0.3)

                # a large tile first: the full layer crosses (and the publisher's uplink
                # estimate grows with it, which REMB then holds while layers are off)
                await tile(1280, 720)
                await decoded((1280, 720))
                await tile(320, 180)
                await decoded((320, 180))
                # hidden: node 1 stops relaying it (a frame in flight at most)
                track = await tile(320, 180, visible=False)
                await asyncio.sleep(2.0)
                frames = track.frames
                await asyncio.sleep(2.0)
                assert track.frames - frames <= 1, (frames, track.frames)
                # a large tile: the full layer crosses, from a keyframe asked across the relay
                await tile(1280, 720)
                await decoded((1280, 720))
                assert peer.errors == []
            finally:
                await peer.close()
                await sock.close()
    finally:
        for node in nodes:
            node.stop()
