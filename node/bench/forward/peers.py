"""Client processes of `sfumesh bench forward`: one publisher, and subscribers N per process.

    python -m node.bench.forward.peers publisher --spec JSON --address A --media FILE
        [--count N --first F]
    python -m node.bench.forward.peers subscribers --spec JSON --address A --count N
        [--first F --channels]
    python -m node.bench.forward.peers participants --spec JSON --address A --count N --media F
    python -m node.bench.forward.peers simulcast-publisher --spec JSON --address A \
        --layer-media Q --layer-media H --layer-media F [--ladder]

(`simulcast-publisher`: three encodings of one track, `node.bench.forward.simulcast`; with
`--ladder` one encoding that follows REMB. A spec with `tiles`, a list of [width, height],
gives subscriber N the tile `tiles[N % len(tiles)]`, told to the node: sfumesh only.)

(`participants`: the N people of one room of `sfumesh bench scale`, each publishing and
receiving the others on one session; sfumesh's signalling only. Their latency is read from
the kernel's receive stamps, on `time.time()`: see `RoomSubscriber`.)

Ingest runs: `publisher --count N --first F` runs N publishers, publisher n on channel F + n
of the spec (`systems.channel_spec`: its own room or feed); `subscribers --channels` puts
subscriber number n on channel n, so that each publisher has exactly one subscriber.

Every system under test gets exactly these clients; only the signalling differs
(`signalling_from_spec`). A process talks to the driver in JSON lines: it writes events on
stdout (`{"event": "ready", ...}` once set up, `{"event": "error", "message": ...}` when it
cannot be, `{"event": "marked", ...}` per `mark`) and reads commands on stdin:

* `{"cmd": "mark"}`: answer with everything counted since the previous mark (the first
  answer covers the set-up and warm-up), then start counting afresh. Two marks bracket a
  measuring window.
* `{"cmd": "stop"}` (or stdin closing): hang up, close the peer connections, exit 0.

Logs go to stderr, never stdout.

Publisher: an aiortc `RTCPeerConnection` with sendonly VP8 video and Opus audio whose senders
are tapped (`adapter.tap_sender`), so aiortc never encodes: pre-encoded payloads
(`node.bench.forward.media`) go out through `SenderTap.send` at 30 fps (each frame's packets
back to back, as an encoder's output) and every 20 ms for audio, with sequence numbers,
timestamps (irregular video steps, `media.video_ts_step`), marker bits and payload types set
here. A keyframe request (PLI/FIR) restarts the loop at its keyframe (at most once a second).
Per video frame the time its first packet was sent (read right after its `sendto`) is
recorded, `time.monotonic()` unless another clock is given (`participants`: `time.time()`).

Subscribers: each an `RTCPeerConnection` whose receivers are tapped (`adapter.tap_rtp`): raw
RTP, never depayloaded nor decoded. Per stream: packets, payload bytes, sequence gaps (loss),
packets that fill an earlier gap (retransmissions or reordering: the tap unwraps RTX, so a
repaired packet shows up as a late one) and duplicates; per video frame the monotonic time
its first packet arrived, keyed by RTP timestamp. `time.monotonic()` is the same clock in
every process of the machine, so arrival minus send time is the latency through the SFU
(and the two aiortc stacks at either end).

UDP receive buffers: aiortc/aioice make their sockets with `loop.create_datagram_endpoint`;
these processes run on an event loop whose `create_datagram_endpoint` raises SO_RCVBUF of
each new socket (SO_RCVBUFFORCE when allowed, as root), public asyncio API only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import random
import socket
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, Final

from aiortc import (
    MediaStreamTrack,
    RTCPeerConnection,
    RTCRtpSender,
    RTCRtpTransceiver,
)
from aiortc.rtcrtpparameters import RTCRtpCodecCapability
from aiortc.rtp import RtpPacket

from node.bench.forward import media as bench_media
from node.bench.forward.systems import Signalling, channel_spec, signalling_from_spec
from node.media import adapter

log = logging.getLogger("node.bench.forward.peers")
_rng = random.SystemRandom()

#: subscribers per client process (K is spread over ceil(K / this) processes)
SUBSCRIBERS_PER_PROCESS: Final = 8
RCVBUF_BYTES: Final = 4 * 1024 * 1024
#: a keyframe request restarts the loop at most this often
KEYFRAME_MIN_INTERVAL_S: Final = 1.0
#: how many recent video timestamps a subscriber remembers to tell new frames from old
SEEN_FRAMES: Final = 2048
#: gaps longer than this are counted as loss but not remembered packet by packet
MAX_TRACKED_GAP: Final = 2000
CLOSE_TIMEOUT_S: Final = 10.0
#: frames later than this behind schedule are not sent in a burst: the schedule restarts
MAX_BEHIND_S: Final = 0.5
#: set-up of subscribers in one process at once
SETUP_CONCURRENCY: Final = 4


# --------------------------------------------------------------------------- event loop


def set_receive_buffer(sock: Any, size: int = RCVBUF_BYTES) -> int:
    """Raise `sock`'s receive buffer to `size` (beyond rmem_max when permitted); returns
    the size the kernel reports afterwards (twice the request, as Linux books it)."""
    force = getattr(socket, "SO_RCVBUFFORCE", None)
    try:
        if force is None:
            raise PermissionError
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except OSError:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        except OSError:
            pass
    got: int = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    return got


class BigBufferLoop(asyncio.SelectorEventLoop):
    """An event loop whose UDP sockets get large receive buffers (see module doc)."""

    rcvbuf: int | None = None

    async def create_datagram_endpoint(
        self, protocol_factory: Callable[[], Any], *args: Any, **kwargs: Any
    ) -> tuple[asyncio.DatagramTransport, Any]:
        transport, protocol = await super().create_datagram_endpoint(
            protocol_factory, *args, **kwargs
        )
        sock = transport.get_extra_info("socket")
        if sock is not None:
            BigBufferLoop.rcvbuf = set_receive_buffer(sock)
        return transport, protocol


def run_on_big_buffer_loop(main: Coroutine[Any, Any, int]) -> int:
    with asyncio.Runner(loop_factory=BigBufferLoop) as runner:
        return runner.run(main)


# --------------------------------------------------------------------------- driver link


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def stdin_reader() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def command_loop(reader: asyncio.StreamReader, on_mark: Callable[[], dict[str, Any]]) -> None:
    """Answer `mark` until `stop` or the end of stdin."""
    while True:
        line = await reader.readline()
        if not line:
            return
        try:
            command = json.loads(line)
        except ValueError:
            log.warning("bad command line: %r", line[:200])
            continue
        name = command.get("cmd") if isinstance(command, dict) else None
        if name == "mark":
            emit("marked", t=time.monotonic(), **on_mark())
        elif name == "stop":
            return
        else:
            log.warning("unknown command: %r", command)


def codec_preferences(kind: str, mime_type: str) -> list[RTCRtpCodecCapability]:
    """aiortc's capabilities for `mime_type` (and RTX), so the answer picks that codec."""
    capabilities = RTCRtpSender.getCapabilities(kind).codecs
    wanted = [c for c in capabilities if c.mimeType.lower() == mime_type.lower()]
    rtx = [c for c in capabilities if c.mimeType.lower() == f"{kind}/rtx"]
    return wanted + rtx


async def close_quietly(what: str, work: Awaitable[None]) -> None:
    try:
        await asyncio.wait_for(work, CLOSE_TIMEOUT_S)
    except Exception as error:  # closing must go on whatever fails
        log.warning("closing %s failed: %s: %s", what, type(error).__name__, error)


# --------------------------------------------------------------------------- publisher


class PublisherMarks:
    """What a bench publisher counts between two marks, and the mark that reports it: one
    shape for the forward bench's `Publisher` and simulcast's `LayeredPublisher` (which
    adds its layers), so the benches reading either parse one report."""

    def __init__(self) -> None:
        self.frames: list[tuple[int, float]] = []
        self.counts = {"video": [0, 0, 0], "audio": [0, 0, 0]}  # packets, bytes, frames
        self.keyframe_requests = 0
        self.restarts = 0
        self.schedule_resets = 0
        self._marked = {"nacked": 0, "retransmitted": 0, "keyframe_requests": 0, "restarts": 0}

    def mark_counts(self, taps: Sequence[adapter.SenderTap]) -> dict[str, Any]:
        """Counts of `taps` since the previous mark; the frames sent since then."""
        frames, self.frames = self.frames, []
        totals = {
            "nacked": sum(t.nacked for t in taps),
            "retransmitted": sum(t.retransmitted for t in taps),
            "keyframe_requests": self.keyframe_requests,
            "restarts": self.restarts,
        }
        deltas = {key: value - self._marked[key] for key, value in totals.items()}
        self._marked = totals
        counts = {kind: list(values) for kind, values in self.counts.items()}
        for values in self.counts.values():
            values[:] = [0, 0, 0]
        return {
            **deltas,
            "video": dict(zip(("packets", "bytes", "frames"), counts["video"], strict=True)),
            "audio": dict(zip(("packets", "bytes", "frames"), counts["audio"], strict=True)),
            "send_errors": sum(t.send_errors for t in taps),
            "schedule_resets": self.schedule_resets,
            "frames": frames,
        }


class Publisher(PublisherMarks):
    """Sends the pre-encoded loop through tapped senders; never encodes."""

    def __init__(
        self,
        media: bench_media.PreEncoded,
        signalling: Signalling,
        *,
        audio: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.media = media
        self.signalling = signalling
        #: what each frame's send time is read from (the subscribers' clock must be the same)
        self.clock = clock
        self.pc = RTCPeerConnection(adapter.rtc_configuration())
        video = self.pc.addTransceiver("video", direction="sendonly")
        video.setCodecPreferences(codec_preferences("video", "video/VP8"))
        self.video = adapter.tap_sender(video.sender)
        #: None: a video-only publisher (one track: `sfumesh bench relay`'s track counts)
        self.audio: adapter.SenderTap | None = None
        if audio:
            sound = self.pc.addTransceiver("audio", direction="sendonly")
            sound.setCodecPreferences(codec_preferences("audio", "audio/opus"))
            self.audio = adapter.tap_sender(sound.sender)
        self.video.on_keyframe_request = self._keyframe_requested
        self._restart = False
        self._last_restart = -math.inf
        self._tasks: list[asyncio.Task[None]] = []

    def _keyframe_requested(self) -> None:
        self.keyframe_requests += 1
        now = time.monotonic()
        if now - self._last_restart >= KEYFRAME_MIN_INTERVAL_S:
            self._last_restart = now
            self._restart = True

    async def start(self, limit_s: float) -> None:
        await asyncio.wait_for(self.signalling.publish(self.pc), limit_s)
        taps = [self.video] if self.audio is None else [self.video, self.audio]
        await asyncio.wait_for(asyncio.gather(*(t.wait_ready() for t in taps)), limit_s)
        self._tasks = [asyncio.ensure_future(self._send_video())]
        if self.audio is not None:
            self._tasks.append(asyncio.ensure_future(self._send_audio()))

    def _send(self, tap: adapter.SenderTap, kind: str, packet: RtpPacket) -> None:
        if tap.write(
            packet.payload_type,
            packet.marker,
            packet.sequence_number,
            packet.timestamp,
            packet.payload,
            packet.extensions.audio_level,
            adapter.send_stamp(),
        ):
            counts = self.counts[kind]
            counts[0] += 1
            counts[1] += len(packet.payload)

    async def _send_video(self) -> None:
        media = self.media
        fps = media.params.fps
        payload_type = self.video.payload_type
        assert payload_type is not None
        sequence = _rng.randrange(1 << 15)
        timestamp = _rng.randrange(1 << 30)
        # The irregular steps start at a random place in their sequence: publishers that
        # start together would otherwise step alike, and a subscriber's track would match
        # any of them (at a constant shift: the latency measured against the wrong sender).
        counter = _rng.randrange(1 << 31)
        index = 0
        interval = 1 / fps
        due = time.monotonic()
        while True:
            if self._restart:
                self._restart = False
                self.restarts += 1
                index = 0
            payloads = media.video[index % len(media.video)]
            index += 1
            counter += 1
            timestamp = (timestamp + bench_media.video_ts_step(counter, fps)) & 0xFFFFFFFF
            self.counts["video"][2] += 1
            last = len(payloads) - 1
            for number, payload in enumerate(payloads):
                packet = RtpPacket(
                    payload_type=payload_type,
                    marker=1 if number == last else 0,
                    sequence_number=sequence,
                    timestamp=timestamp,
                    payload=payload,
                )
                sequence = (sequence + 1) & 0xFFFF
                self._send(self.video, "video", packet)
                if number == 0:
                    # Right after the first packet's sendto (`SenderTap.write` sends at
                    # once), not the pacing schedule: a publisher running late does not
                    # count its own lateness as latency through the SFU.
                    self.frames.append((timestamp, self.clock()))
            due += interval
            delay = due - time.monotonic()
            if delay < -MAX_BEHIND_S:
                self.schedule_resets += 1
                due = time.monotonic()
                delay = 0
            await asyncio.sleep(max(0.0, delay))

    async def _send_audio(self) -> None:
        media = self.media
        tap = self.audio
        assert tap is not None
        payload_type = tap.payload_type
        assert payload_type is not None
        sequence = _rng.randrange(1 << 15)
        timestamp = _rng.randrange(1 << 30)
        index = 0
        due = time.monotonic()
        while True:
            payload = media.audio[index % len(media.audio)]
            packet = RtpPacket(
                payload_type=payload_type,
                marker=1 if index == 0 else 0,
                sequence_number=sequence,
                timestamp=timestamp,
                payload=payload,
            )
            index += 1
            sequence = (sequence + 1) & 0xFFFF
            timestamp = (timestamp + bench_media.AUDIO_TS_STEP) & 0xFFFFFFFF
            self._send(tap, "audio", packet)
            self.counts["audio"][2] += 1
            due += bench_media.AUDIO_PTIME_S
            delay = due - time.monotonic()
            if delay < -MAX_BEHIND_S:
                due = time.monotonic()
                delay = 0
            await asyncio.sleep(max(0.0, delay))

    def mark(self) -> dict[str, Any]:
        """Counts since the previous mark; the frames sent since then."""
        taps = [self.video] if self.audio is None else [self.video, self.audio]
        return {"publisher": self.mark_counts(taps)}

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await close_quietly("publisher signalling", self.signalling.close())
        await close_quietly("publisher connection", self.pc.close())


# --------------------------------------------------------------------------- subscribers


class StreamCounter:
    """Sequence accounting of one received stream (one kind on one subscriber)."""

    __slots__ = (
        "bytes",
        "duplicates",
        "ext_max",
        "high_seq",
        "late",
        "missing",
        "packets",
        "ssrc",
        "ssrc_changes",
    )

    def __init__(self) -> None:
        self.ssrc: int | None = None
        self.ssrc_changes = 0
        self.packets = 0
        self.bytes = 0
        #: highest extended sequence number (counting from 0 at the first packet)
        self.ext_max = -1
        self.high_seq = 0
        self.late = 0
        self.duplicates = 0
        self.missing: set[int] = set()

    def add(self, ssrc: int, sequence_number: int, size: int) -> None:
        self.packets += 1
        self.bytes += size
        if ssrc != self.ssrc:
            # A new source: numbering continues right after the old one.
            if self.ssrc is not None:
                self.ssrc_changes += 1
            self.ssrc = ssrc
            self.high_seq = sequence_number
            self.ext_max += 1
            self.missing.clear()
            return
        delta = ((sequence_number - self.high_seq + 0x8000) & 0xFFFF) - 0x8000
        if delta > 0:
            if delta > 1 and delta <= MAX_TRACKED_GAP:
                self.missing.update(range(self.ext_max + 1, self.ext_max + delta))
            self.ext_max += delta
            self.high_seq = sequence_number
            if len(self.missing) > 4 * MAX_TRACKED_GAP:
                floor = self.ext_max - MAX_TRACKED_GAP
                self.missing = {s for s in self.missing if s > floor}
            return
        ext = self.ext_max + delta
        if ext in self.missing:
            self.missing.discard(ext)
            self.late += 1
        else:
            self.duplicates += 1

    def snapshot(self) -> tuple[int, int, int, int, int]:
        return (self.packets, self.bytes, self.ext_max, self.late, self.duplicates)


def window_counts(
    before: tuple[int, int, int, int, int], after: tuple[int, int, int, int, int]
) -> dict[str, int]:
    """Packets, bytes, expected, lost, late and duplicates between two snapshots."""
    packets = after[0] - before[0]
    duplicates = after[4] - before[4]
    expected = after[2] - before[2]
    return {
        "packets": packets,
        "bytes": after[1] - before[1],
        "expected": expected,
        "lost": max(0, expected - (packets - duplicates)),
        "late": after[3] - before[3],
        "duplicates": duplicates,
    }


class Subscriber:
    """One subscriber: a peer connection whose received RTP is counted, never decoded."""

    def __init__(self, number: int, signalling: Signalling) -> None:
        self.number = number
        self.signalling = signalling
        self.pc = RTCPeerConnection(adapter.rtc_configuration())
        self.streams = {"video": StreamCounter(), "audio": StreamCounter()}
        self._marked = {kind: counter.snapshot() for kind, counter in self.streams.items()}
        self.frames: list[tuple[int, float]] = []
        self._seen: set[int] = set()
        self._seen_order: deque[int] = deque()
        self.receiving = asyncio.Event()
        self.taps: list[adapter.RtpTap] = []
        self.failed = False
        self.closing = False

        @self.pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            transceiver = self._transceiver(track)
            if transceiver is None:
                log.warning("subscriber %d: a track without a transceiver", number)
                return
            self.taps.append(adapter.tap_rtp(transceiver.receiver, self._handler(track.kind)))

        @self.pc.on("connectionstatechange")
        def on_state() -> None:
            if self.pc.connectionState in ("failed", "closed") and not self.closing:
                # in the client's log: why a window's streams stopped
                log.warning("subscriber %d: connection %s", number, self.pc.connectionState)
            if self.pc.connectionState == "failed":
                self.failed = True

    def _transceiver(self, track: MediaStreamTrack) -> RTCRtpTransceiver | None:
        return next((t for t in self.pc.getTransceivers() if t.receiver.track is track), None)

    def _handler(self, kind: str) -> Callable[[RtpPacket], None]:
        counter = self.streams.get(kind)
        if counter is None:
            counter = self.streams[kind] = StreamCounter()
            self._marked[kind] = counter.snapshot()
        stream = counter

        if kind != "video":

            def on_audio(packet: RtpPacket) -> None:
                stream.add(packet.ssrc, packet.sequence_number, len(packet.payload))
                self._check_receiving()

            return on_audio

        def on_video(packet: RtpPacket) -> None:
            now = time.monotonic()
            stream.add(packet.ssrc, packet.sequence_number, len(packet.payload))
            timestamp = packet.timestamp
            if timestamp not in self._seen:
                self._seen.add(timestamp)
                self._seen_order.append(timestamp)
                if len(self._seen_order) > SEEN_FRAMES:
                    self._seen.discard(self._seen_order.popleft())
                self.frames.append((timestamp, now))
            self._check_receiving()

        return on_video

    def _check_receiving(self) -> None:
        if not self.receiving.is_set() and all(
            self.streams[kind].packets for kind in ("video", "audio")
        ):
            self.receiving.set()

    async def subscribe(self, limit_s: float) -> None:
        await asyncio.wait_for(self.signalling.subscribe(self.pc), limit_s)

    def mark(self) -> dict[str, Any]:
        streams: dict[str, Any] = {}
        for kind, counter in self.streams.items():
            now = counter.snapshot()
            streams[kind] = window_counts(self._marked[kind], now)
            self._marked[kind] = now
        frames, self.frames = self.frames, []
        return {
            "number": self.number,
            "streams": streams,
            "ssrc_changes": sum(c.ssrc_changes for c in self.streams.values()),
            "failed": self.failed,
            "frames": frames,
        }

    async def close(self) -> None:
        self.closing = True
        await close_quietly(f"subscriber {self.number} signalling", self.signalling.close())
        await close_quietly(f"subscriber {self.number} connection", self.pc.close())


class RoomSubscriber(Subscriber):
    """The receiving side of one participant of `sfumesh bench scale`: one counter per
    received track (every other participant's video and audio), never decoded.

    Per video frame of each track: (RTP timestamp, kernel receive time of its first packet
    or None, time its first packet reached the handler), both `time.time()` seconds. The
    kernel's time (`adapter.arrival_time`, in a process that `stamp_arrivals`) leaves out
    how long the datagram waited for this process; the handler's includes it."""

    def __init__(self, number: int, signalling: Signalling, streams_expected: int) -> None:
        self.streams_expected = streams_expected
        self.track_frames: dict[str, list[tuple[int, float | None, float]]] = {}
        super().__init__(number, signalling)
        # Counters are made per track as tracks arrive, not per kind.
        self.streams = {}
        self._marked = {}

    def _handler(self, kind: str) -> Callable[[RtpPacket], None]:
        key = f"{kind}-{len(self.streams)}"
        stream = self.streams[key] = StreamCounter()
        self._marked[key] = stream.snapshot()
        if kind != "video":

            def on_audio(packet: RtpPacket) -> None:
                stream.add(packet.ssrc, packet.sequence_number, len(packet.payload))
                self._check_receiving()

            return on_audio
        frames = self.track_frames[key] = []
        seen: set[int] = set()
        order: deque[int] = deque()
        arrival_time = adapter.arrival_time

        def on_video(packet: RtpPacket) -> None:
            handled = time.time()
            stream.add(packet.ssrc, packet.sequence_number, len(packet.payload))
            timestamp = packet.timestamp
            if timestamp not in seen:
                seen.add(timestamp)
                order.append(timestamp)
                if len(order) > SEEN_FRAMES:
                    seen.discard(order.popleft())
                frames.append((timestamp, arrival_time(), handled))
            self._check_receiving()

        return on_video

    def _check_receiving(self) -> None:
        if not self.receiving.is_set():
            flowing = sum(1 for counter in self.streams.values() if counter.packets)
            if flowing >= self.streams_expected:
                self.receiving.set()

    def mark(self) -> dict[str, Any]:
        report = super().mark()
        report["tracks"] = {}
        for key, frames in self.track_frames.items():
            report["tracks"][key] = list(frames)
            frames.clear()
        return report


async def participants_main(
    spec: dict[str, Any],
    media_path: Path,
    count: int,
    first: int,
    limit_s: float,
    room_size: int | None = None,
) -> int:
    """`count` participants of one room of `room_size` (default `count`; a large room is
    spread over several processes): each publishes the pre-encoded loop and receives every
    other participant's video and audio, on one session (`sfumesh bench scale`)."""
    size = room_size or count
    from node.bench.forward.sfumesh import SfumeshSignalling

    # Before any peer connection: the receive fast paths installed later stamp arrivals.
    latency_clock = "kernel" if adapter.stamp_arrivals() else "handler"
    media = bench_media.load(media_path)
    reader = await stdin_reader()
    publishers: list[Publisher] = []
    receivers: list[RoomSubscriber] = []
    # One user per participant when the driver made them (a node caps tracks per person).
    tokens = list(spec.get("user_tokens") or [spec.get("user_token")])
    for n in range(count):
        own = {**spec, "user_token": tokens[n % len(tokens)]}
        signalling = signalling_from_spec(own, "participant")
        if not isinstance(signalling, SfumeshSignalling):
            raise ValueError("participants speak sfumesh's signalling only")
        receiver = RoomSubscriber(first + n, signalling, 2 * (size - 1))
        # Set before the session joins, so that no subscribe offer finds it missing.
        signalling.subscribe_pc = receiver.pc
        # The send times on the kernel stamps' clock.
        publishers.append(Publisher(media, signalling, clock=time.time))
        receivers.append(receiver)
    gate = asyncio.Semaphore(SETUP_CONCURRENCY)

    async def start(publisher: Publisher, receiver: RoomSubscriber) -> None:
        async with gate:
            await publisher.start(limit_s)
        if size > 1:
            await receiver.subscribe(limit_s)
            await asyncio.wait_for(receiver.receiving.wait(), limit_s)

    try:
        results = await asyncio.gather(
            *(start(p, r) for p, r in zip(publishers, receivers, strict=True)),
            return_exceptions=True,
        )
        failures = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
        if failures:
            for result in results:
                if isinstance(result, BaseException):
                    log.error("participant set-up failed", exc_info=result)
            emit("error", message="; ".join(failures[:3]), failed=len(failures))
            return 1
        emit(
            "ready",
            t=time.monotonic(),
            rcvbuf=BigBufferLoop.rcvbuf,
            latency_clock=latency_clock,
        )

        def mark() -> dict[str, Any]:
            return {
                "publishers": [p.mark()["publisher"] for p in publishers],
                "subscribers": [r.mark() for r in receivers],
            }

        await command_loop(reader, mark)
    finally:
        for receiver in receivers:
            receiver.closing = True  # hanging up closes them: not worth a warning
        await asyncio.gather(*(p.close() for p in publishers))
        await asyncio.gather(*(close_quietly("receiver", r.pc.close()) for r in receivers))
    emit("stopped")
    return 0


# --------------------------------------------------------------------------- process mains


async def publisher_main(
    spec: dict[str, Any],
    media_path: Path,
    limit_s: float,
    count: int = 1,
    first: int = 0,
    audio: bool = True,
) -> int:
    """`count` publishers, publisher n on channel `first + n` (one channel: the spec's own);
    without `audio`, each sends video only."""
    media = bench_media.load(media_path)
    reader = await stdin_reader()
    publishers = [
        Publisher(
            media,
            signalling_from_spec(channel_spec(spec, first + n), "publisher"),
            audio=audio,
        )
        for n in range(count)
    ]
    try:
        try:
            await asyncio.gather(*(p.start(limit_s) for p in publishers))
        except Exception as error:
            log.exception("publisher set-up failed")
            emit("error", message=f"publisher: {type(error).__name__}: {error}")
            return 1
        emit("ready", t=time.monotonic(), rcvbuf=BigBufferLoop.rcvbuf)

        def mark() -> dict[str, Any]:
            return {"publishers": [p.mark()["publisher"] for p in publishers]}

        await command_loop(reader, mark)
    finally:
        await asyncio.gather(*(p.close() for p in publishers))
    emit("stopped")
    return 0


async def subscribers_main(
    spec: dict[str, Any],
    count: int,
    first: int,
    limit_s: float,
    channels: bool = False,
    streams: int | None = None,
) -> int:
    """`count` subscribers numbered from `first`; with `channels`, subscriber number n
    subscribes on channel n modulo the spec's channels (ingest runs: n; the forward bench's
    Janus layers system: the layer of tile n), else all to the spec's publisher(s). With
    `streams`, each counts every received track apart and is ready once that many flow (a
    room of several publishers: `sfumesh bench relay`'s track counts)."""
    reader = await stdin_reader()
    subscribers: list[Subscriber] = []
    for n in range(count):
        signalling = signalling_from_spec(
            channel_spec(spec, (first + n) % max(1, len(spec.get("channels") or [])))
            if channels
            else spec,
            "subscriber",
        )
        subscribers.append(
            Subscriber(first + n, signalling)
            if streams is None
            else RoomSubscriber(first + n, signalling, streams)
        )
    tiles = spec.get("tiles") or []
    if tiles:
        from node.bench.forward.sfumesh import SfumeshSignalling

        for subscriber in subscribers:
            if isinstance(subscriber.signalling, SfumeshSignalling):
                width, height = tiles[subscriber.number % len(tiles)]
                subscriber.signalling.tile = (int(width), int(height))
    gate = asyncio.Semaphore(SETUP_CONCURRENCY)

    async def start(subscriber: Subscriber) -> None:
        async with gate:
            await subscriber.subscribe(limit_s)
        await asyncio.wait_for(subscriber.receiving.wait(), limit_s)

    try:
        results = await asyncio.gather(*(start(s) for s in subscribers), return_exceptions=True)
        failures = [
            f"subscriber {s.number}: {type(r).__name__}: {r}"
            for s, r in zip(subscribers, results, strict=True)
            if isinstance(r, BaseException)
        ]
        if failures:
            for subscriber, result in zip(subscribers, results, strict=True):
                if isinstance(result, BaseException):
                    log.error("subscriber %d set-up failed", subscriber.number, exc_info=result)
            emit("error", message="; ".join(failures[:3]), failed=len(failures))
            return 1
        emit("ready", t=time.monotonic(), rcvbuf=BigBufferLoop.rcvbuf)

        def mark() -> dict[str, Any]:
            return {"subscribers": [s.mark() for s in subscribers]}

        await command_loop(reader, mark)
    finally:
        await asyncio.gather(*(s.close() for s in subscribers))
    emit("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m node.bench.forward.peers")
    parser.add_argument(
        "role", choices=["publisher", "subscribers", "participants", "simulcast-publisher"]
    )
    parser.add_argument("--spec", required=True, help="the system's spec, JSON")
    parser.add_argument("--address", required=True, help="the only ICE host address")
    parser.add_argument("--media", type=Path, help="publisher: pre-encoded media file")
    parser.add_argument(
        "--layer-media",
        type=Path,
        action="append",
        default=[],
        help="simulcast-publisher: each layer's pre-encoded media, lowest first",
    )
    parser.add_argument(
        "--ladder", action="store_true", help="simulcast-publisher: one encoding following REMB"
    )
    parser.add_argument(
        "--count", type=int, default=1, help="subscribers (or publishers) in this process"
    )
    parser.add_argument(
        "--channels",
        action="store_true",
        help="subscribers: subscriber n on channel n of the spec (ingest runs)",
    )
    parser.add_argument(
        "--video-only", action="store_true", help="publisher: send video only (one track)"
    )
    parser.add_argument(
        "--streams",
        type=int,
        help="subscribers: count each received track apart, ready once this many flow",
    )
    parser.add_argument(
        "--room-size", type=int, help="participants: people in the room (default --count)"
    )
    parser.add_argument("--first", type=int, default=0, help="number of the first subscriber")
    parser.add_argument("--timeout", type=float, default=60.0, help="set-up time limit, s")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    spec = json.loads(args.spec)
    import_system_modules(str(spec.get("system")))
    adapter.set_host_addresses([args.address])
    if args.role == "simulcast-publisher":
        from node.bench.forward.simulcast import publisher_main as layered_main

        return run_on_big_buffer_loop(
            layered_main(spec, args.layer_media, args.ladder, args.timeout)
        )
    if args.role in ("publisher", "participants") and args.media is None:
        parser.error(f"{args.role} needs --media")
    if args.role == "publisher":
        assert args.media is not None
        return run_on_big_buffer_loop(
            publisher_main(
                spec, args.media, args.timeout, args.count, args.first, not args.video_only
            )
        )
    if args.role == "participants":
        assert args.media is not None
        return run_on_big_buffer_loop(
            participants_main(
                spec, args.media, args.count, args.first, args.timeout, args.room_size
            )
        )
    return run_on_big_buffer_loop(
        subscribers_main(spec, args.count, args.first, args.timeout, args.channels, args.streams)
    )


def import_system_modules(system: str) -> None:
    """Import the module that registers `system`'s signalling (each registers its own)."""
    import importlib

    module = {
        "sfumesh": "node.bench.forward.sfumesh",
        "mediarelay": "node.bench.forward.mediarelay",
        "janus": "node.bench.forward.janus",
    }.get(system)
    if module is not None:
        importlib.import_module(module)


if __name__ == "__main__":
    sys.exit(main())
