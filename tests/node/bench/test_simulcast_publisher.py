"""The benches' synthetic simulcast publisher (node/bench/forward/simulcast.py): its offer
looks like Chromium's, its single-encoding `--ladder` follows REMB, and end to end a real
node learns its three layers (from the RIDs in the packets) and two aiortc subscribers with
a small and a large tile decode 320x180 and 1280x720. Real node process, real peers; ICE on
127.0.0.1 in the suite's private network namespace."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import httpx
import pytest
from aiortc import RTCPeerConnection

from node.bench.forward import media as bench_media
from node.bench.forward.sfumesh import SfumeshSignalling
from node.bench.forward.simulcast import (
    LAYERS,
    RIDS,
    LayeredPublisher,
    load_or_encode_layers,
    simulcast_offer,
)
from node.local.launch import LocalNode
from node.local.participant import MediaPeer, Received, Socket, until
from node.media import adapter
from node.media.sdp import offered_rids
from tests.node.live_client import User, create_room, sign_up
from tests.node.media.test_loopback import loopback_ice  # noqa: F401 (a fixture)

LIMIT_S = 90.0
TILES = {"small": (320, 180), "large": (1280, 720)}


def sections(sdp: str) -> list[str]:
    return sdp.replace("\r\n", "\n").split("\nm=")[1:]


async def test_the_offer_announces_three_rids_and_no_ssrc() -> None:
    adapter.enable_simulcast_extensions()
    pc = RTCPeerConnection(adapter.rtc_configuration())
    try:
        pc.addTransceiver("video", direction="sendonly")
        pc.addTransceiver("audio", direction="sendonly")
        original = (await pc.createOffer()).sdp
        offer = simulcast_offer(original)
        assert offered_rids(offer) == {"0": RIDS}  # (the first m-line's mid)
        video_section, audio_section = sections(offer)
        assert video_section.startswith("video")
        assert "a=ssrc" not in video_section  # the node learns the SSRCs from the RIDs
        assert "a=rid:q send" in video_section and "a=simulcast:send q;h;f" in video_section
        assert "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id" in video_section
        assert "urn:ietf:params:rtp-hdrext:sdes:mid" in video_section
        assert audio_section == sections(original)[1]  # audio left alone
    finally:
        await pc.close()
    with pytest.raises(ValueError, match="no video"):
        simulcast_offer("v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\n")


def fake_loop(layer: int, kbps: int) -> bench_media.PreEncoded:
    spec = LAYERS[layer]
    params = bench_media.MediaParams(spec.width, spec.height, 30, spec.bitrate, seconds=1)
    size = kbps * 1000 // 8 // 30
    return bench_media.PreEncoded(params, [[b"x" * size]] * 30, [True] * 30, [b"a"])


async def test_the_ladder_follows_remb_down_at_once_and_up_after_a_while() -> None:
    spec = {"url": "http://127.0.0.1:1", "user_token": "t", "room": "r"}
    layers = [fake_loop(0, 150), fake_loop(1, 500), fake_loop(2, 1500)]
    publisher = LayeredPublisher(layers, SfumeshSignalling(spec, "publisher"), ladder=True)
    try:
        assert publisher.current == 2  # starts at the top, as the forward bench's does
        publisher._ladder_step(0.0)  # no REMB yet: nothing changes
        assert publisher.current == 2 and publisher.switches == 0
        publisher.video.remb_bitrate = 400_000
        publisher._ladder_step(1.0)
        assert publisher.current == 0 and publisher.switches == 1
        publisher.video.remb_bitrate = 600_000  # covers 500 kbit/s by more than 15%
        publisher._ladder_step(10.0)
        publisher._ladder_step(11.9)
        assert publisher.current == 0
        publisher._ladder_step(12.1)
        assert publisher.current == 1 and publisher.switches == 2
        publisher._ladder_step(20.0)  # 600k does not cover 1.5M: stays
        assert publisher.current == 1
        publisher.video.remb_bitrate = 450_000
        publisher._ladder_step(21.0)
        assert publisher.current == 0 and publisher.switches == 3
        assert [rate for _, rate in publisher.remb] == [400_000, 600_000, 450_000]
    finally:
        await publisher.pc.close()


def video_track(peer: MediaPeer) -> Received | None:
    tracks = [r for r in peer.received if r.kind == "video" and not r.ended.is_set()]
    return tracks[-1] if tracks else None


async def subscriber(user: User, url: str, slug: str) -> tuple[Socket, MediaPeer]:
    sock = await user.connect(url)
    await user.join(sock, slug, url)
    return sock, MediaPeer(sock, user.username)


@pytest.mark.slow
@pytest.mark.usefixtures("loopback_ice")
async def test_the_node_learns_three_layers_and_each_tile_gets_its_own(
    node_processes: Callable[..., LocalNode],
) -> None:
    # The tiles alone choose here: on a loaded test host the delay-based estimates of the
    # aiortc subscribers swing with the load (bandwidth choice: `sfumesh bench quality`)
    env = {
        "SFUMESH_MEDIA_HOST_ADDRESSES": json.dumps(["127.0.0.1"]),
        "SFUMESH_MEDIA_SIMULCAST_FOLLOW_BANDWIDTH": "false",
    }
    node = await asyncio.to_thread(node_processes, extra_env=env)
    layers = [media for media, _ in await asyncio.to_thread(load_or_encode_layers, 2.0)]
    assert [(m.params.width, m.params.height) for m in layers] == [
        (320, 180),
        (640, 360),
        (1280, 720),
    ]
    slug = "synthetic-simulcast"
    async with httpx.AsyncClient(timeout=30.0) as http:
        owner = await sign_up(http, node.url, prefix="pub")
        await create_room(owner, node.url, slug)
        spec = {"url": node.url, "user_token": owner.user_token, "room": slug}
        publisher = LayeredPublisher(layers, SfumeshSignalling(spec, "publisher"))
        peers: list[tuple[Socket, MediaPeer]] = []
        try:
            await publisher.start(30.0)
            users = [await sign_up(http, node.url, prefix=name) for name in TILES]
            peers = [await subscriber(user, node.url, slug) for user in users]
            sizes = await watch(peers)
            assert sizes == list(TILES.values()), (sizes, [p.describe() for _, p in peers])
            for _, peer in peers:
                assert peer.errors == []
            reply = await http.get(f"{node.url}/metrics")
            assert reply.status_code == 200, reply.text
            for line in (
                # the encodings arrive, learnt from their RIDs, as layers of one track
                'sfumesh_media_publisher_layers{layer="0"} 1.0',
                'sfumesh_media_publisher_layers{layer="2"} 1.0',
                'sfumesh_media_layer_selected{layer="0"} 1.0',
                'sfumesh_media_layer_selected{layer="2"} 1.0',
            ):
                assert line in reply.text, reply.text
            sent = publisher.mark()["publisher"]
            assert all(layer["packets"] > 0 for layer in sent["layers"]), sent["layers"]
            # the half-size encoding nobody watches was switched off by the node's `layers`
            # (after `media.simulcast_layer_off_s` without a taker: wait for it, not a moment)
            await until(lambda: publisher.active == {0, 2}, "the half-size encoding off", 15.0)
            assert sent["send_errors"] == 0
            # the node asked the encodings it switched to for keyframes, by their SSRCs
            assert publisher.simulcast is not None
            assert sum(publisher.simulcast.layer_keyframe_requests) > 0
        finally:
            for sock, peer in peers:
                await peer.close()
                await sock.close()
            await publisher.close()


async def watch(peers: list[tuple[Socket, MediaPeer]]) -> list[tuple[int, int]]:
    """Tell each subscriber's tile size once its video track is there; the sizes each
    decodes once all match and held for 2 s (or when time is up)."""
    told: set[int] = set()
    wanted = list(TILES.values())
    deadline = time.monotonic() + LIMIT_S
    sizes: list[tuple[int, int] | None] = [None] * len(peers)
    while time.monotonic() < deadline:
        for index, ((sock, peer), (width, height)) in enumerate(zip(peers, wanted, strict=True)):
            track = video_track(peer)
            if track is None or track.mid is None:
                continue
            if index not in told:
                told.add(index)
                ack = await sock.request(
                    "view", tiles={track.mid: {"width": width, "height": height}}
                )
                assert ack["type"] == "ack", ack
            sizes[index] = track.size
        if sizes == wanted:
            await asyncio.sleep(2.0)
            now = [video_track(p) for _, p in peers]
            return [t.size if t is not None and t.size is not None else (0, 0) for t in now]
        await asyncio.sleep(0.5)
    return [s or (0, 0) for s in sizes]


async def test_the_nodes_layers_message_switches_encodings_off_and_on() -> None:
    spec = {"url": "http://127.0.0.1:1", "user_token": "t", "room": "r"}
    layers = [fake_loop(0, 150), fake_loop(1, 500), fake_loop(2, 1500)]
    signalling = SfumeshSignalling(spec, "publisher")
    publisher = LayeredPublisher(layers, signalling)
    try:
        assert publisher.active == {0, 1, 2} and signalling.on_layers is not None
        signalling.on_layers("0", ["q"])  # as the node's `layers` message is handed on
        assert publisher.active == {0}
        signalling.on_layers("0", ["q", "f", "nonsense"])
        assert publisher.active == {0, 2}
        assert publisher._restart[2]  # an encoding back on starts with its keyframe
    finally:
        await publisher.pc.close()
