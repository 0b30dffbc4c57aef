"""In-process loopback: publisher -> node (raw RTP, no codec) -> subscriber (decodes).

Three aiortc peers in one event loop, all on 127.0.0.1 (host addresses configured through the
adapter, no ICE servers). The node taps the publisher's raw RTP, fans it out through a
`Forwarder` and writes it through a tapped sender; the subscriber decodes real frames.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator

import pytest
from aiortc import MediaStreamTrack, RTCPeerConnection
from aiortc.mediastreams import MediaStreamError
from aiortc.rtp import RtpPacket

from node.local.participant import SmallPattern
from node.media import adapter
from node.media.adapter import SenderTap
from node.media.forward import Forwarder, KeyframeThrottle, SubscriberRewriter, keyframe_detector

log = logging.getLogger(__name__)

FRAMES_WANTED = 40


async def negotiate(offerer: RTCPeerConnection, answerer: RTCPeerConnection) -> None:
    await offerer.setLocalDescription(await offerer.createOffer())
    await answerer.setRemoteDescription(offerer.localDescription)
    await answerer.setLocalDescription(await answerer.createAnswer())
    await offerer.setRemoteDescription(answerer.localDescription)


@pytest.fixture
async def loopback_ice() -> AsyncIterator[None]:
    adapter.set_host_addresses(["127.0.0.1"])
    try:
        yield
    finally:
        adapter.set_host_addresses(None)


@pytest.mark.slow
async def test_forward_vp8_without_codec_work(loopback_ice: None) -> None:
    adapter.check_aiortc()
    work_before = (adapter.CODEC_WORK.decoded_frames, adapter.CODEC_WORK.encoded_frames)
    started = time.monotonic()
    publisher = RTCPeerConnection(adapter.rtc_configuration())
    node_in = RTCPeerConnection(adapter.rtc_configuration())
    node_out = RTCPeerConnection(adapter.rtc_configuration())
    subscriber = RTCPeerConnection(adapter.rtc_configuration())
    pcs = [publisher, node_in, node_out, subscriber]
    background: set[asyncio.Task[object]] = set()

    forwarder: Forwarder[SenderTap] = Forwarder(keyframe_detector("video/VP8"))
    taps: list[adapter.RtpTap] = []

    first_packet = asyncio.Event()

    def on_rtp(packet: RtpPacket) -> None:
        first_packet.set()
        forwarder.forward(packet, adapter.send_stamp())

    @node_in.on("track")
    def on_publisher_track(track: MediaStreamTrack) -> None:
        receiver = next(t.receiver for t in node_in.getTransceivers() if t.receiver.track is track)
        taps.append(adapter.tap_rtp(receiver, on_rtp))

    frames = 0
    enough = asyncio.Event()

    async def consume(track: MediaStreamTrack) -> None:
        nonlocal frames
        while True:
            try:
                await track.recv()
            except MediaStreamError:
                return
            frames += 1
            if frames >= FRAMES_WANTED:
                enough.set()

    @subscriber.on("track")
    def on_subscriber_track(track: MediaStreamTrack) -> None:
        task = asyncio.ensure_future(consume(track))
        background.add(task)

    try:
        publisher.addTrack(SmallPattern())
        await negotiate(publisher, node_in)
        assert len(taps) == 1
        tap = taps[0]

        sender = node_out.addTrack(adapter.ParkedTrack("video"))
        sink = adapter.tap_sender(sender)
        throttle = KeyframeThrottle(0.5)

        async def ask_keyframe() -> None:
            for ssrc in tap.media_ssrcs:
                await adapter.request_keyframe(tap.receiver, ssrc)

        def on_subscriber_pli() -> None:
            if throttle.allow(time.monotonic()):
                task = asyncio.ensure_future(ask_keyframe())
                background.add(task)

        sink.on_keyframe_request = on_subscriber_pli
        await negotiate(node_out, subscriber)

        await asyncio.wait_for(sink.wait_ready(), 10)
        await asyncio.wait_for(first_packet.wait(), 10)
        assert sink.payload_type is not None
        forwarder.add(sink, SubscriberRewriter(sink.ssrc, sink.payload_type))
        await ask_keyframe()  # aiortc's VP8 encoder only makes one every 3000 frames

        await asyncio.wait_for(enough.wait(), 30)
        elapsed = time.monotonic() - started
        log.info("subscriber decoded %d frames after %.2f s", frames, elapsed)

        assert frames >= FRAMES_WANTED
        assert tap.packets > 0 and tap.handler_errors == 0
        assert forwarder.packets_out > 0
        assert sink.packets_sent > 0 and sink.send_errors == 0
        # the node decoded and encoded nothing
        work = (adapter.CODEC_WORK.decoded_frames, adapter.CODEC_WORK.encoded_frames)
        assert work == work_before
        # one decoder thread in the process: the subscriber's, none for the node's receiver
        decoders = [t for t in threading.enumerate() if t.name == "video-decoder"]
        assert len(decoders) == 1

        # RTCP still flows both ways: the subscriber gets sender reports carrying the counters
        # the node's sends updated; the publisher gets the node's receiver reports.
        sub_receiver = subscriber.getReceivers()[0]
        pub_sender = publisher.getSenders()[0]
        sr = rr = None
        deadline = time.monotonic() + 5
        while (sr is None or rr is None) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            sub_stats = (await sub_receiver.getStats()).values()
            sr = next((x for x in sub_stats if x.type == "remote-outbound-rtp"), None)
            pub_stats = (await pub_sender.getStats()).values()
            rr = next((x for x in pub_stats if x.type == "remote-inbound-rtp"), None)
        assert sr is not None and rr is not None
        assert sr.ssrc == sink.ssrc
        assert 0 < sr.packetsSent <= sink.packets_sent
        assert rr.packetsReceived > 0
    finally:
        for pc in pcs:
            await pc.close()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
