"""A subscriber of `sfumesh bench quality`: what one person's client would show, from RTP.

    python -m node.bench.quality_peer --spec JSON --address A [--tile 1280x720]

One process per subscriber, inside its lab host (its own access link). It joins the room
with the forward bench's sfumesh signalling (`node.bench.forward.sfumesh`), tells the node
that every video track shows in a tile of `--tile` (`view`), and taps its receivers
(`adapter.tap_rtp`): raw RTP, never decoded. `FrameTracker` stands in for the decoder:

* a video frame is the packets of one RTP timestamp, from the packet that starts it (VP8
  descriptor S bit, partition 0) to the one with the marker bit; it is *complete* when
  every sequence number in between has arrived (retransmissions included);
* a complete frame is *decodable* when it is a keyframe or the frame before it (by sequence
  numbers) was decoded, as VP8 delta frames need their reference; a decodable keyframe past
  a hole skips it (what a receiver's frame buffer does). "Decoded" is the moment that is
  true; frames/s and freezes (gaps between decoded frames) come from those moments;
* a keyframe's size is read from its VP8 frame header (`vp8_keyframe_size`): which layer
  the node sends;
* as a client whose decoder starves, it asks for a keyframe (PLI) when nothing decoded for
  `STALL_S` while packets arrive, at most every `KEYFRAME_REQUEST_S`.

It speaks the forward bench's JSON lines: `ready` once a frame decoded, then per `mark`
everything since the previous one (payload bytes per `BIN_S` bin by arrival time, each
packet once; decoded frames as (time, bytes, keyframe height or null); keyframe requests),
`stop` to leave.
Times are `time.monotonic()`, one clock for every process of the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from aiortc import MediaStreamTrack, RTCPeerConnection
from aiortc.rtp import RtpPacket

from node.bench.forward.peers import (
    BigBufferLoop,
    close_quietly,
    command_loop,
    emit,
    run_on_big_buffer_loop,
    stdin_reader,
)
from node.bench.forward.sfumesh import SfumeshSignalling
from node.media import adapter
from node.media.forward import vp8_keyframe_size

log = logging.getLogger("node.bench.quality_peer")

#: byte counts are kept per bin of this many seconds of arrival time
BIN_S: Final = 0.25
#: nothing decoded for this long while packets arrive: ask for a keyframe ...
STALL_S: Final = 0.5
#: ... at most this often
KEYFRAME_REQUEST_S: Final = 1.0
#: frames not decoded this far behind the newest packet are forgotten (sequence numbers)
FORGET_AFTER: Final = 3000


def vp8_starts_frame(payload: bytes) -> bool:
    """The VP8 payload descriptor's S bit with partition id 0 (RFC 7741)."""
    return bool(payload) and bool(payload[0] & 0x10) and not payload[0] & 0x07


@dataclass
class _Frame:
    start: int | None = None
    end: int | None = None
    received: set[int] = field(default_factory=set)
    bytes: int = 0
    height: int | None = None
    keyframe: bool = False

    @property
    def complete(self) -> bool:
        return (
            self.start is not None
            and self.end is not None
            and self.end >= self.start
            and len(self.received) == self.end - self.start + 1
        )


class FrameTracker:
    """Completeness and decodability of one video stream's frames (see the module doc).
    Pure: packets and times are passed in."""

    def __init__(self) -> None:
        self._high: int | None = None
        self._frames: dict[int, _Frame] = {}  # by RTP timestamp
        self._waiting: dict[int, _Frame] = {}  # complete, not yet decodable; by start
        self._last_end: int | None = None
        #: decoded frames: (time, payload bytes, keyframe height or None)
        self.decoded: list[tuple[float, int, int | None]] = []
        self.last_decoded_at: float | None = None
        self.last_packet_at: float | None = None
        self.packets = 0

    def _extend(self, sequence_number: int) -> int:
        if self._high is None:
            self._high = sequence_number
            return sequence_number
        delta = ((sequence_number - self._high + 0x8000) & 0xFFFF) - 0x8000
        ext = self._high + delta
        self._high = max(self._high, ext)
        return ext

    def add(
        self, sequence_number: int, timestamp: int, marker: int, payload: bytes, now: float
    ) -> bool:
        """Take one packet; False when it is a repeat (a retransmission that came after
        all, the node's probe padding) or belongs to a frame already decoded or passed."""
        self.packets += 1
        self.last_packet_at = now
        ext = self._extend(sequence_number)
        if self._last_end is not None and ext <= self._last_end:
            return False  # a late copy of a frame already decoded (or passed)
        frame = self._frames.get(timestamp)
        if frame is None:
            frame = self._frames[timestamp] = _Frame()
        if ext in frame.received:
            return False
        frame.received.add(ext)
        frame.bytes += len(payload)
        if vp8_starts_frame(payload):
            frame.start = ext
            size = vp8_keyframe_size(payload)
            if size is not None:
                frame.keyframe = True
                frame.height = size[1]
        if marker:
            frame.end = ext
        if frame.complete and frame.start is not None:
            del self._frames[timestamp]
            self._waiting[frame.start] = frame
            self._advance(now)
        if len(self._frames) > 64:
            self._forget()
        return True

    def _advance(self, now: float) -> None:
        while True:
            following = (
                self._waiting.pop(self._last_end + 1, None) if self._last_end is not None else None
            )
            if following is None:
                last = self._last_end
                keys = sorted(
                    start
                    for start, f in self._waiting.items()
                    if f.keyframe and (last is None or start > last)
                )
                if not keys:
                    return
                following = self._waiting.pop(keys[0])
                for start in [s for s in self._waiting if s < keys[0]]:
                    del self._waiting[start]  # behind the keyframe: never decodable
            assert following.end is not None
            self._last_end = following.end
            self.decoded.append((now, following.bytes, following.height))
            self.last_decoded_at = now

    def _forget(self) -> None:
        high = self._high if self._high is not None else 0
        for timestamp, frame in list(self._frames.items()):
            newest = max(frame.received, default=high)
            if high - newest > FORGET_AFTER or (
                self._last_end is not None and newest <= self._last_end
            ):
                del self._frames[timestamp]
        for start in [s for s in self._waiting if high - s > FORGET_AFTER]:
            del self._waiting[start]

    def stalled(self, now: float) -> bool:
        """Packets arrive but nothing decoded for STALL_S: a keyframe is needed."""
        if self.last_packet_at is None or now - self.last_packet_at > STALL_S:
            return False
        since = self.last_decoded_at
        return since is None or now - since >= STALL_S


class QualitySubscriber:
    """One subscriber: a tapped peer connection, a frame tracker per video track."""

    def __init__(self, signalling: SfumeshSignalling) -> None:
        self.signalling = signalling
        self.pc = RTCPeerConnection(adapter.rtc_configuration())
        self.trackers: list[tuple[FrameTracker, Any, list[int]]] = []
        self.bins: dict[int, int] = {}
        self.audio_packets = 0
        self.keyframe_requests = 0
        self.ready = asyncio.Event()
        self.failed = False
        self._sent_upto = 0
        self._watch: asyncio.Task[None] | None = None

        @self.pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            transceiver = next(
                (t for t in self.pc.getTransceivers() if t.receiver.track is track), None
            )
            if transceiver is None:
                return
            adapter.route_declared_rtx(transceiver.receiver.transport)
            adapter.tap_rtp(transceiver.receiver, self._handler(track.kind, transceiver.receiver))

        @self.pc.on("connectionstatechange")
        def on_state() -> None:
            if self.pc.connectionState == "failed":
                self.failed = True

    def _handler(self, kind: str, receiver: Any) -> Callable[[RtpPacket], None]:
        if kind != "video":

            def on_audio(packet: RtpPacket) -> None:
                self.audio_packets += 1

            return on_audio
        tracker = FrameTracker()
        ssrc: list[int] = []
        self.trackers.append((tracker, receiver, ssrc))

        def on_video(packet: RtpPacket) -> None:
            now = time.monotonic()
            if not ssrc:
                ssrc.append(packet.ssrc)
            # video kbit/s counts each packet once: repeats (the node's probe padding is
            # recent packets sent again) are no picture
            if tracker.add(
                packet.sequence_number, packet.timestamp, packet.marker, packet.payload, now
            ):
                key = int(now / BIN_S)
                self.bins[key] = self.bins.get(key, 0) + len(packet.payload)
            if tracker.decoded and not self.ready.is_set():
                self.ready.set()

        return on_video

    async def start(self, limit_s: float) -> None:
        self.signalling.subscribe_pc = self.pc
        await asyncio.wait_for(self.signalling.subscribe(self.pc), limit_s)
        self._watch = asyncio.ensure_future(self._watch_stalls())
        await asyncio.wait_for(self.ready.wait(), limit_s)

    async def _watch_stalls(self) -> None:
        asked: dict[int, float] = {}
        while True:
            await asyncio.sleep(0.1)
            now = time.monotonic()
            for index, (tracker, receiver, ssrc) in enumerate(self.trackers):
                if not ssrc or not tracker.stalled(now):
                    continue
                if now - asked.get(index, -KEYFRAME_REQUEST_S) < KEYFRAME_REQUEST_S:
                    continue
                asked[index] = now
                with_pli = await adapter.request_keyframe(receiver, ssrc[0])
                self.keyframe_requests += int(with_pli)

    def mark(self) -> dict[str, Any]:
        bins, self.bins = self.bins, {}
        frames: list[tuple[float, int, int | None]] = []
        for tracker, _, _ in self.trackers:
            frames.extend(tracker.decoded)
            tracker.decoded = []
        return {
            "bin_s": BIN_S,
            "bins": sorted(bins.items()),
            "frames": sorted(frames),
            "audio_packets": self.audio_packets,
            "keyframe_requests": self.keyframe_requests,
            "failed": self.failed,
        }

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        await close_quietly("subscriber signalling", self.signalling.close())
        await close_quietly("subscriber connection", self.pc.close())


async def subscriber_main(spec: dict[str, Any], tile: tuple[int, int], limit_s: float) -> int:
    reader = await stdin_reader()
    signalling = SfumeshSignalling(spec, "subscriber")
    signalling.tile = tile
    subscriber = QualitySubscriber(signalling)
    try:
        try:
            await subscriber.start(limit_s)
        except Exception as error:
            log.exception("subscriber set-up failed")
            emit("error", message=f"subscriber: {type(error).__name__}: {error}")
            return 1
        emit("ready", t=time.monotonic(), rcvbuf=BigBufferLoop.rcvbuf)
        await command_loop(reader, subscriber.mark)
    finally:
        await subscriber.close()
    emit("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m node.bench.quality_peer")
    parser.add_argument("--spec", required=True, help="sfumesh's spec, JSON")
    parser.add_argument("--address", required=True, help="the only ICE host address")
    parser.add_argument("--tile", default="1280x720", help="the tile's size, WxH")
    parser.add_argument("--timeout", type=float, default=60.0, help="set-up time limit, s")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    width, _, height = args.tile.lower().partition("x")
    adapter.check_aiortc()
    adapter.set_host_addresses([args.address])
    return run_on_big_buffer_loop(
        subscriber_main(json.loads(args.spec), (int(width), int(height)), args.timeout)
    )


if __name__ == "__main__":
    sys.exit(main())
