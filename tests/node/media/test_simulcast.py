"""Simulcast end to end: a headless Chromium publishes its camera as three encodings
(quarter, half and full size, `webapp/media.js`), and three aiortc subscribers that show it
in small, medium and large tiles (`view` messages) each decode the layer they asked for.
A hidden tile gets no video and is told so (`video-paused`). Real node process, real
browser, real peers; ICE on 127.0.0.1 in the suite's private network namespace."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

import httpx
import pytest

from node.local.launch import LocalNode
from node.local.participant import MediaPeer, Received, Socket
from tests.browser import chromium, page
from tests.node.live_client import User, create_room, sign_up
from tests.node.media.test_browser import JOIN_AND_PUBLISH, STEP_S
from tests.node.media.test_loopback import loopback_ice  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.slow, pytest.mark.browser]

log = logging.getLogger(__name__)

LIMIT_S = 90.0
# the fake camera at 1280x720: the encodings are 320x180, 640x360 and 1280x720
SIMULCAST_PUBLISH = JOIN_AND_PUBLISH.replace(
    "getUserMedia({ audio: true, video: true })",
    "getUserMedia({ audio: true, video: { width: 1280, height: 720 } })",
).replace("{ videoCodec }", "{ simulcast: true }")
TILES = {"small": (320, 180), "medium": (640, 360), "large": (1280, 720)}


async def subscriber(user: User, url: str, slug: str) -> tuple[Socket, MediaPeer]:
    sock = await user.connect(url)
    await user.join(sock, slug, url)
    return sock, MediaPeer(sock, user.username)


def video_from(peer: MediaPeer, session_id: str) -> Received | None:
    tracks = [r for r in peer.from_(session_id, "video") if not r.ended.is_set()]
    return tracks[-1] if tracks else None


@pytest.mark.usefixtures("loopback_ice")
async def test_each_subscriber_gets_the_layer_its_tile_needs(
    node_processes: Callable[..., LocalNode],
) -> None:
    assert SIMULCAST_PUBLISH != JOIN_AND_PUBLISH
    # The tiles alone choose here: on a loaded test host the delay-based estimates of the
    # aiortc subscribers swing with the load (bandwidth choice: tests/node/media/test_layers)
    env = {
        "SFUMESH_MEDIA_HOST_ADDRESSES": json.dumps(["127.0.0.1"]),
        "SFUMESH_MEDIA_SIMULCAST_FOLLOW_BANDWIDTH": "false",
    }
    node = await asyncio.to_thread(node_processes, extra_env=env)
    slug = "simulcast"
    async with httpx.AsyncClient(timeout=STEP_S) as http:
        publisher = await sign_up(http, node.url, prefix="pub")
        await create_room(publisher, node.url, slug)
        token = await publisher.new_session(node.url)
        users = [await sign_up(http, node.url, prefix=name) for name in TILES]
        async with chromium() as browser, page(browser, f"{node.url}/") as publisher_page:
            arguments = {"sessionToken": token, "slug": slug, "videoCodec": None}
            session_id = await asyncio.wait_for(
                publisher_page.evaluate(SIMULCAST_PUBLISH, arguments), STEP_S
            )
            peers = [await subscriber(user, node.url, slug) for user in users]
            try:
                sizes = await watch(peers, session_id)
                log.info("decoded sizes: %s", sizes)
                assert sizes == list(TILES.values()), sizes

                # the small tile hidden: no video for it, and the client is told
                small_sock, small_peer = peers[0]
                track = video_from(small_peer, session_id)
                assert track is not None and track.mid is not None
                await small_sock.request(
                    "view", tiles={track.mid: {"width": 320, "height": 180, "visible": False}}
                )
                paused = await small_sock.wait_for("video-paused", paused=True, reason="hidden")
                assert paused["mid"] == track.mid and paused["session_id"] == session_id
                frames = track.frames
                await asyncio.sleep(2.0)
                assert track.frames - frames <= 2  # (a frame in flight)
                for _, peer in peers:
                    assert peer.errors == []
                # and a bad view is refused, changing nothing
                refused = await small_sock.request("view", tiles={track.mid: {"width": -1}})
                assert refused["type"] == "error" and refused["code"] == "bad_frame"
                # /metrics: the layers sent (one subscriber each), why, what arrives
                await asyncio.sleep(1.0)
                reply = await http.get(f"{node.url}/metrics")
                assert reply.status_code == 200, reply.text
                metrics = reply.text
                for line in (
                    'sfumesh_media_layer_selected{layer="1"} 1.0',
                    'sfumesh_media_layer_selected{layer="2"} 1.0',
                    'sfumesh_media_layer_target{reason="hidden"} 1.0',
                    'sfumesh_media_publisher_layers{layer="2"} 1.0',
                ):
                    assert line in metrics, metrics
                assert "sfumesh_media_layer_switches_total" in metrics
                assert "sfumesh_media_layer_paused_seconds_total" in metrics
            finally:
                for sock, peer in peers:
                    await peer.close()
                    await sock.close()


async def watch(peers: list[tuple[Socket, MediaPeer]], session_id: str) -> list[tuple[int, int]]:
    """Tell each subscriber's tile size once its video track is there; the sizes each
    decodes once all match (or when time is up)."""
    told: set[int] = set()
    deadline = time.monotonic() + LIMIT_S
    sizes: list[tuple[int, int] | None] = [None] * len(peers)
    wanted = list(TILES.values())
    while time.monotonic() < deadline:
        for index, ((sock, peer), (width, height)) in enumerate(zip(peers, wanted, strict=True)):
            track = video_from(peer, session_id)
            if track is None or track.mid is None:
                continue
            if index not in told:
                told.add(index)
                ack = await sock.request(
                    "view", tiles={track.mid: {"width": width, "height": height}}
                )
                assert ack["type"] == "ack", (ack, [m.get("type") for m in sock.messages])
            sizes[index] = track.size
        if sizes == wanted:
            # held for a while: no switch back and forth
            await asyncio.sleep(3.0)
            now = [video_from(p, session_id) for _, p in peers]
            return [t.size if t is not None and t.size is not None else (0, 0) for t in now]
        await asyncio.sleep(0.5)
    log.info("peers: %s", [p.describe() for _, p in peers])
    return [s or (0, 0) for s in sizes]


def frame_rate(track: Received) -> Callable[[], float]:
    """The frames decoded per second from this call until the returned function's."""
    frames, at = track.frames, time.monotonic()
    return lambda: (track.frames - frames) / max(1e-3, time.monotonic() - at)


async def metric_lines(http: httpx.AsyncClient, url: str) -> str:
    reply = await http.get(f"{url}/metrics")
    assert reply.status_code == 200, reply.text
    return reply.text


@pytest.mark.usefixtures("loopback_ice")
async def test_temporal_layers_lower_the_frame_rate_and_back(
    node_processes: Callable[..., LocalNode],
) -> None:
    """The page asks for L1T3 on each encoding: a subscriber on the lowest layer whose
    tile needs 2 fps gets TID 0 only (a quarter of the frames), keeps decoding without
    a freeze or a hole in the numbers, and gets every frame again once its tile asks for
    no frame rate."""
    env = {
        "SFUMESH_MEDIA_HOST_ADDRESSES": json.dumps(["127.0.0.1"]),
        "SFUMESH_MEDIA_SIMULCAST_FOLLOW_BANDWIDTH": "false",
    }
    node = await asyncio.to_thread(node_processes, extra_env=env)
    slug = "temporal"
    async with httpx.AsyncClient(timeout=STEP_S) as http:
        publisher = await sign_up(http, node.url, prefix="pub")
        await create_room(publisher, node.url, slug)
        token = await publisher.new_session(node.url)
        user = await sign_up(http, node.url, prefix="small")
        async with chromium() as browser, page(browser, f"{node.url}/") as publisher_page:
            arguments = {"sessionToken": token, "slug": slug, "videoCodec": None}
            session_id = await asyncio.wait_for(
                publisher_page.evaluate(SIMULCAST_PUBLISH, arguments), STEP_S
            )
            sock, peer = await subscriber(user, node.url, slug)
            try:
                deadline = time.monotonic() + LIMIT_S
                track = video_from(peer, session_id)
                while (track is None or track.mid is None) and time.monotonic() < deadline:
                    await asyncio.sleep(0.2)
                    track = video_from(peer, session_id)
                assert track is not None and track.mid is not None
                mid = track.mid
                tile = {"width": 320, "height": 180}
                assert (await sock.request("view", tiles={mid: tile}))["type"] == "ack"
                # the lowest layer, decoded, its temporal layers measured by the node
                while time.monotonic() < deadline:
                    metrics = await metric_lines(http, node.url)
                    if track.size == (320, 180) and 'sfumesh_media_temporal_selected{tid="2"}' in (
                        metrics
                    ):
                        break
                    await asyncio.sleep(0.5)
                assert track.size == (320, 180), peer.describe()
                assert 'sfumesh_media_temporal_selected{tid="2"} 1.0' in metrics, metrics
                await asyncio.sleep(2.0)
                full = frame_rate(track)
                await asyncio.sleep(4.0)
                full_fps = full()

                # a tile that needs 2 fps: TID 0 is enough (a quarter of the frames; on a
                # loaded host the encoder's rate drops, so TID 0..1 may give less than 7.5)
                holes = track.holes_skipped
                asked = {mid: {**tile, "fps": 2}}
                assert (await sock.request("view", tiles=asked))["type"] == "ack"
                await asyncio.sleep(1.5)
                low_at = time.monotonic()
                low = frame_rate(track)
                await asyncio.sleep(4.0)
                low_fps = low()
                metrics = await metric_lines(http, node.url)
                log.info("full %.1f fps, TID 0 %.1f fps", full_fps, low_fps)
                assert 'sfumesh_media_temporal_target{tid="0"} 1.0' in metrics, metrics
                assert 'sfumesh_media_temporal_selected{tid="0"} 1.0' in metrics, metrics
                assert 0 < low_fps < full_fps * 0.5, (full_fps, low_fps)
                assert track.longest_gap(after=low_at) < 1.0
                assert track.holes_skipped == holes
                assert track.size == (320, 180)

                # no frame rate asked: every frame again
                assert (await sock.request("view", tiles={mid: tile}))["type"] == "ack"
                await asyncio.sleep(1.5)
                back = frame_rate(track)
                await asyncio.sleep(4.0)
                back_fps = back()
                log.info("back to %.1f fps", back_fps)
                assert back_fps > low_fps * 2, (full_fps, low_fps, back_fps)
                metrics = await metric_lines(http, node.url)
                assert 'sfumesh_media_temporal_target{tid="all"} 1.0' in metrics, metrics
                assert track.holes_skipped == holes
                assert peer.errors == []
                # a bad frame rate is refused, changing nothing
                for bad in (0, "7.5", True, 1000):
                    refused = await sock.request("view", tiles={mid: {**tile, "fps": bad}})
                    assert refused["type"] == "error" and refused["code"] == "bad_frame"
                await asyncio.sleep(1.0)
                metrics = await metric_lines(http, node.url)
                assert 'sfumesh_media_temporal_target{tid="all"} 1.0' in metrics, metrics
            finally:
                await peer.close()
                await sock.close()
