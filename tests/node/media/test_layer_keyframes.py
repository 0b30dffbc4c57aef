"""A subscriber of a simulcast track asks for a keyframe (its PLI after loss it could not
repair): the publisher is asked for one of the layer that subscriber is sent. Found by
`bench quality`: only layers a switch waited for were asked, so a weak subscriber's own PLIs
were swallowed and it froze for seconds."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

from aiortc.rtp import RtpPacket

from node.config import MediaSettings
from node.media.session import MediaHub, Published
from node.state.hub import Connection

LAYER_SSRCS = {111: 0, 222: 1, 333: 2}


class Receiver:
    """The publisher's receiver as `adapter.request_keyframe` uses it: PLIs recorded."""

    def __init__(self) -> None:
        self._RTCRtpReceiver__rtcp_ssrc = 5
        self.plis: list[int] = []

    async def _send_rtcp_pli(self, media_ssrc: int) -> None:
        self.plis.append(media_ssrc)


class Tap:
    def __init__(self, receiver: Receiver) -> None:
        self.on_drop: Any = None
        self.remb_limit: Any = None
        self.on_layer: Any = None
        self.bytes = 0
        self.remb_estimate: int | None = None
        self.receiver = receiver
        self.rids = ("q", "h", "f")
        self.media_ssrcs = list(LAYER_SSRCS)


class Sink:
    def __init__(self) -> None:
        self.ssrc = 4242
        self.payload_type: int | None = 96
        self.remb_bitrate: int | None = None
        self.packets_sent = 0
        self.on_keyframe_request: Any = None
        self.written: list[int] = []

    def reception(self) -> None:
        return None

    def write(self, *args: Any) -> bool:
        self.packets_sent += 1
        return True


def vp8_packet(ssrc: int, sequence: int, keyframe: bool) -> RtpPacket:
    # payload descriptor: S bit, partition 0; then a VP8 frame tag (bit 0: 0 = keyframe)
    # and, for a keyframe, the start code and a 320x180 size
    header = bytes([0x50, 0x01, 0x00, 0x9D, 0x01, 0x2A, 0x40, 0x01, 0xB4, 0x00])
    frame = header if keyframe else bytes([0x51, 0x01, 0x00])
    return RtpPacket(
        payload_type=96,
        sequence_number=sequence,
        timestamp=sequence * 3000,
        ssrc=ssrc,
        payload=bytes([0x10]) + frame + bytes(40),
        marker=1,
    )


async def until(check: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_a_subscribers_pli_asks_the_layer_it_is_sent() -> None:
    hub = MediaHub(MediaSettings(keyframe_interval_s=0.05, keyframe_retry_s=0.3))
    receiver = Receiver()
    try:
        owner = hub.session(Connection("s-p", "u-p", "p", 1, room="room"))
        published = Published(owner, "1", "video", tap=cast(Any, Tap(receiver)))
        published.rids = ("q", "h", "f")
        published.mime_type = "video/VP8"
        published.forwarder = published.new_forwarder()
        for ssrc, layer in LAYER_SSRCS.items():
            published.layer_of[ssrc] = layer
        sink = Sink()
        assert published.attach(cast(Any, sink), 1)
        # the switch to layer 1 waits for its keyframe, asked of that layer alone
        await until(lambda: 222 in receiver.plis)
        assert set(receiver.plis) == {222}
        published.on_rtp(vp8_packet(222, 1, keyframe=True))
        published.on_rtp(vp8_packet(222, 2, keyframe=False))
        assert sink.packets_sent == 2
        forwarder = published.forwarder
        assert forwarder is not None and not forwarder.wanted_layers()
        receiver.plis.clear()

        # the subscriber lost what it could not repair: its PLI reaches layer 1's encoder
        assert sink.on_keyframe_request is not None
        sink.on_keyframe_request()
        await until(lambda: bool(receiver.plis))
        assert set(receiver.plis) == {222}, receiver.plis
        # asked again while no keyframe of that layer comes (other layers' do not count)
        published.on_rtp(vp8_packet(111, 3, keyframe=True))
        await until(lambda: len(receiver.plis) >= 2, timeout=hub.settings.keyframe_retry_s + 5)
        assert set(receiver.plis) == {222}, receiver.plis
        # its keyframe answers it
        published.on_rtp(vp8_packet(222, 4, keyframe=True))
        assert not published.asked_layers
        assert published.keyframes.waiting_since is None
    finally:
        await hub.close()
