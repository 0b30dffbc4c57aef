"""A simulcast track across a relay (issue 14): a Chromium publisher on node 1 sends three
encodings; node 1 relays one layer of it to node 2 (the best its link's estimate allows,
never none), where an aiortc subscriber decodes it like any track."""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path

import httpx
import pytest

from node.local.launch import start_nodes
from node.local.participant import MediaPeer
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
