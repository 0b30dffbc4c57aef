"""A participant of real node processes, as a program sees it: the WebSocket (`Socket`,
every message kept in order) and an aiortc `MediaPeer` that publishes a test pattern and a
tone, answers the node's subscribe offers and counts the frames it decodes per remote track
(with the owner the offer's `tracks` names). Used by `sfumesh bench relay` and the tests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import websockets
from aiortc import (
    AudioStreamTrack,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCSessionDescription,
    VideoStreamTrack,
)
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import VideoFrame
from websockets.asyncio.client import ClientConnection

from node.media import adapter

log = logging.getLogger(__name__)

TIMEOUT = 15.0
WAIT_S = 40.0
# A `ping` this often keeps a long run from being dropped as idle (the node's
# `live.ws_idle_timeout_s`, 45 s by default); the web client pings every 20 s too.
PING_INTERVAL_S = 20.0
# A received video track that decoded nothing for this long asks for a keyframe, and again
# each STALL_S while it stays frozen (as browsers do), and moves its jitter buffer past a
# hole it waits behind (`adapter.skip_jitter_hole`: the freeze of issue 20 was there).
STALL_S = 1.0
# Gaps between decoded frames longer than this are kept (`Received.gaps`).
GAP_KEPT_S = 0.5


class SmallPattern(VideoStreamTrack):
    """320x240 frames whose shade changes, 30 fps (aiortc's VideoStreamTrack clock)."""

    #: frames made so far (what a subscriber may decode at most)
    frames = 0

    async def recv(self) -> VideoFrame:
        pts, time_base = await self.next_timestamp()
        self.frames += 1
        frame = VideoFrame(width=320, height=240)
        shade = (pts // 3000) % 200
        for plane in frame.planes:
            plane.update(bytes([shade]) * plane.buffer_size)
        frame.pts = pts
        frame.time_base = time_base
        return frame


@dataclass
class Socket:
    ws: ClientConnection
    node_url: str
    session_token: str
    session_id: str = ""
    node: str = ""
    messages: list[dict[str, Any]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    reader: asyncio.Task[None] | None = None
    pinger: asyncio.Task[None] | None = None
    #: pings sent (each answered by a `pong`, kept in `messages` like any message)
    pings: int = 0
    _ids: int = 0

    async def _ping(self, interval_s: float) -> None:
        while not self.closed:
            await asyncio.sleep(interval_s)
            try:
                await self.ws.send(json.dumps({"type": "ping"}))
            except websockets.exceptions.ConnectionClosed:
                return
            self.pings += 1

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                self.messages.append(json.loads(raw))
                self.arrived.set()
        except websockets.exceptions.ConnectionClosed:
            pass
        finally:
            self.arrived.set()

    @property
    def closed(self) -> bool:
        return self.reader is not None and self.reader.done()

    async def wait_for(self, type_: str, within_s: float = TIMEOUT, **match: Any) -> dict[str, Any]:
        """The first message of this type whose fields (or participant's) match."""

        def fits(message: dict[str, Any]) -> bool:
            if message.get("type") != type_:
                return False
            inner = message.get("participant", {})
            return all(message.get(k, inner.get(k)) == v for k, v in match.items())

        async def scan() -> dict[str, Any]:
            seen = 0
            while True:
                for message in self.messages[seen:]:
                    if fits(message):
                        return message
                seen = len(self.messages)
                if self.closed:
                    raise ConnectionError(f"closed before {type_} {match}: {self.messages[-3:]}")
                self.arrived.clear()
                if len(self.messages) == seen:
                    await self.arrived.wait()

        return await asyncio.wait_for(scan(), within_s)

    async def request(self, type_: str, **fields: Any) -> dict[str, Any]:
        self._ids += 1
        frame_id = f"{type_}-{self._ids}"
        await self.ws.send(json.dumps({"type": type_, "id": frame_id, **fields}))
        reply = await self.wait_for_id(frame_id)
        return reply

    async def wait_for_id(self, frame_id: str) -> dict[str, Any]:
        async def scan() -> dict[str, Any]:
            while True:
                for message in self.messages:
                    if message.get("id") == frame_id:
                        return message
                if self.closed:
                    raise ConnectionError(f"closed before reply {frame_id}")
                self.arrived.clear()
                await self.arrived.wait()

        return await asyncio.wait_for(scan(), TIMEOUT)

    async def close(self) -> None:
        if self.pinger is not None:
            self.pinger.cancel()
            await asyncio.gather(self.pinger, return_exceptions=True)
        await self.ws.close()
        if self.reader is not None:
            await self.reader


async def open_socket(
    node_url: str, session_token: str, ping_interval_s: float | None = PING_INTERVAL_S
) -> Socket:
    """A node's WebSocket for this session, once its `hello` arrived; it sends a `ping`
    every `ping_interval_s` (None: never, and the node drops it once idle)."""
    ws_url = node_url.replace("http", "ws", 1) + f"/ws?session_token={session_token}"
    sock = Socket(await websockets.connect(ws_url, max_size=2**22), node_url, session_token)
    sock.reader = asyncio.create_task(sock._read())
    hello = await sock.wait_for("hello")
    sock.session_id, sock.node = hello["session_id"], hello["node"]
    if ping_interval_s is not None:
        sock.pinger = asyncio.create_task(sock._ping(ping_interval_s))
    return sock


class Received:
    """A remote track: frames decoded until it ends."""

    def __init__(
        self, track: MediaStreamTrack, mid: str | None, receiver: RTCRtpReceiver | None = None
    ) -> None:
        self.track = track
        self.kind = track.kind
        self.mid = mid
        self.receiver = receiver
        self.owner = ""
        self.frames = 0
        #: the last decoded video frame's (width, height)
        self.size: tuple[int, int] | None = None
        self.first_frame_at: float | None = None
        self.last_frame_at: float | None = None
        #: (monotonic time the gap ended, its length) of gaps longer than GAP_KEPT_S
        self.gaps: list[tuple[float, float]] = []
        #: keyframe requests (PLI) this participant sent because the track froze
        self.keyframe_requests = 0
        self.last_request_at = 0.0
        #: times the receiver's jitter buffer was stuck behind a hole and moved past it
        self.holes_skipped = 0
        self.ended = asyncio.Event()
        self.task = asyncio.ensure_future(self._consume())

    def longest_gap(self, after: float = 0.0) -> float:
        """The longest time without a decoded frame, among gaps that ended after `after`
        (the current one included while the track lives)."""
        longest = max((gap for at, gap in self.gaps if at > after), default=0.0)
        if self.last_frame_at is not None and not self.ended.is_set():
            longest = max(longest, time.monotonic() - max(self.last_frame_at, after))
        return longest

    async def _consume(self) -> None:
        try:
            while True:
                frame = await self.track.recv()
                now = time.monotonic()
                self.frames += 1
                if isinstance(frame, VideoFrame):
                    self.size = (frame.width, frame.height)
                if self.first_frame_at is None:
                    self.first_frame_at = now
                elif self.last_frame_at is not None and now - self.last_frame_at > GAP_KEPT_S:
                    self.gaps.append((now, now - self.last_frame_at))
                self.last_frame_at = now
        except MediaStreamError:
            pass
        finally:
            self.ended.set()


class MediaPeer:
    def __init__(self, sock: Socket, name: str) -> None:
        self.sock = sock
        self.name = name
        self.publish = RTCPeerConnection(adapter.rtc_configuration())
        self.subscribe = RTCPeerConnection(adapter.rtc_configuration())
        self.received: list[Received] = []
        self.pattern = SmallPattern()
        self.owners: dict[str, str] = {}  # mid -> publisher session id
        self.errors: list[dict[str, Any]] = []
        self._seen = 0
        self._reader = asyncio.ensure_future(self._read())

        @self.subscribe.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            mid = next(
                (t.mid for t in self.subscribe.getTransceivers() if t.receiver.track is track),
                None,
            )
            receiver = next(
                (t.receiver for t in self.subscribe.getTransceivers() if t.receiver.track is track),
                None,
            )
            received = Received(track, mid, receiver)
            received.owner = self.owners.get(mid or "", "")
            self.received.append(received)

        self._watchdog = asyncio.ensure_future(self._watch_frozen())

    async def _watch_frozen(self) -> None:
        """Ask for a keyframe for a video track that decoded nothing for STALL_S."""
        while True:
            await asyncio.sleep(STALL_S / 4)
            now = time.monotonic()
            for r in self.received:
                if r.kind != "video" or r.receiver is None or r.ended.is_set():
                    continue
                if r.last_frame_at is None or now - r.last_frame_at < STALL_S:
                    continue
                if now - r.last_request_at < STALL_S:
                    continue
                r.last_request_at = now
                r.keyframe_requests += 1
                r.holes_skipped += adapter.skip_jitter_hole(r.receiver) > 0
                for ssrc in adapter.remote_media_ssrcs(r.receiver):
                    await adapter.request_keyframe(r.receiver, ssrc)

    async def _read(self) -> None:
        while True:
            while self._seen < len(self.sock.messages):
                message = self.sock.messages[self._seen]
                self._seen += 1
                await self._handle(message)
            if self.sock.closed:
                return
            self.sock.arrived.clear()
            if self._seen == len(self.sock.messages):
                await self.sock.arrived.wait()

    async def _handle(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "offer" and message.get("pc") == "subscribe":
            self.owners.update(
                {mid: str(owner["session_id"]) for mid, owner in message["tracks"].items()}
            )
            await self.subscribe.setRemoteDescription(
                RTCSessionDescription(sdp=message["sdp"], type="offer")
            )
            await self.subscribe.setLocalDescription(await self.subscribe.createAnswer())
            sdp = self.subscribe.localDescription.sdp
            await self.sock.request("answer", pc="subscribe", sdp=sdp)
            for received in self.received:
                received.owner = received.owner or self.owners.get(received.mid or "", "")
        elif kind == "error":
            log.error("%s got an error: %s", self.name, message)
            self.errors.append(message)

    async def start_publishing(self, audio: MediaStreamTrack | None = None) -> None:
        """Publish the test pattern and `audio` (silence by default)."""
        self.publish.addTransceiver(self.pattern, direction="sendonly")
        self.publish.addTransceiver(audio or AudioStreamTrack(), direction="sendonly")
        await self.publish.setLocalDescription(await self.publish.createOffer())
        sdp = self.publish.localDescription.sdp
        answer = await self.sock.request("offer", pc="publish", sdp=sdp)
        assert answer["type"] == "answer" and answer["pc"] == "publish", answer
        await self.publish.setRemoteDescription(
            RTCSessionDescription(sdp=answer["sdp"], type="answer")
        )

    def from_(self, session_id: str, kind: str) -> list[Received]:
        return [r for r in self.received if r.owner == session_id and r.kind == kind]

    def decodes(self, session_id: str, frames: int = 20) -> bool:
        """Video and audio of `session_id` are arriving (at least `frames` of each)."""
        return all(
            any(r.frames >= frames and not r.ended.is_set() for r in self.from_(session_id, k))
            for k in ("video", "audio")
        )

    def describe(self) -> str:
        return f"{self.name}: " + ", ".join(
            f"{r.owner[:6] or '?'}/{r.mid}/{r.kind}={r.frames}{'x' if r.ended.is_set() else ''}"
            for r in self.received
        )

    def ended_from(self, session_id: str) -> bool:
        tracks = [r for r in self.received if r.owner == session_id]
        return bool(tracks) and all(r.ended.is_set() for r in tracks)

    async def close(self) -> None:
        self._reader.cancel()
        self._watchdog.cancel()
        await asyncio.gather(self._reader, self._watchdog, return_exceptions=True)
        await self.publish.close()
        await self.subscribe.close()
        for received in self.received:
            received.task.cancel()
        await asyncio.gather(*(r.task for r in self.received), return_exceptions=True)


async def until(
    check: Callable[[], bool],
    what: str,
    within_s: float = WAIT_S,
    describe: Callable[[], str] | None = None,
) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        if time.monotonic() > deadline:
            state = f" ({describe()})" if describe is not None else ""
            raise AssertionError(f"timed out waiting for {what}{state}")
        await asyncio.sleep(0.1)
