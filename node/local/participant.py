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

import httpx
import websockets
from aiortc import (
    AudioStreamTrack,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCSessionDescription,
    VideoStreamTrack,
)
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import VideoFrame
from av.frame import Frame
from av.packet import Packet
from websockets.asyncio.client import ClientConnection

from mesh.closest import RankedNode, pick_node
from node.media import adapter

log = logging.getLogger(__name__)

TIMEOUT = 15.0
WAIT_S = 40.0
# A `ping` this often keeps a long run from being dropped as idle (the node's
# `live.ws_idle_timeout_s`, 45 s by default); the web client pings every 20 s too.
PING_INTERVAL_S = 20.0
# A received video track that decoded nothing for this long asks for a keyframe, and again
# each STALL_RETRY_S while it stays frozen (as browsers do), and moves its jitter buffer
# past a hole it waits behind (`adapter.skip_jitter_hole`: the freeze of issue 20 was
# there). A keyframe answers within a round trip or two; one that has not made the picture
# move within STALL_RETRY_S met another hole or was lost: in the lab, waiting a whole
# STALL_S for the next try made the gaps over 2 s.
STALL_S = 1.0
STALL_RETRY_S = 0.5
# Gaps between decoded frames longer than this are kept (`Received.gaps`).
GAP_KEPT_S = 0.5

#: what `MediaPeer(on_frame=...)` is called with: the remote track and a decoded frame
FrameHook = Callable[["Received", "Frame | Packet[Any]"], None]


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
    #: the RTCIceServer entries of the `hello` (TURN credentials of this session, if any)
    ice_servers: list[dict[str, Any]] = field(default_factory=list)
    #: when the node was last heard from (monotonic): a silent node may be gone
    last_heard: float = field(default_factory=time.monotonic)
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
                self.last_heard = time.monotonic()
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
    sock.ice_servers = list(hello.get("ice_servers", []))
    if ping_interval_s is not None:
        sock.pinger = asyncio.create_task(sock._ping(ping_interval_s))
    return sock


class Received:
    """A remote track: frames decoded until it ends (each handed to `on_frame`, if given)."""

    def __init__(
        self,
        track: MediaStreamTrack,
        mid: str | None,
        receiver: RTCRtpReceiver | None = None,
        on_frame: FrameHook | None = None,
    ) -> None:
        self.track = track
        self.on_frame = on_frame
        self.kind = track.kind
        self.mid = mid
        self.receiver = receiver
        self.owner = ""
        self.frames = 0
        #: the last decoded video frame's (width, height)
        self.size: tuple[int, int] | None = None
        #: when the track arrived (monotonic), its first and latest decoded frames
        self.arrived_at = time.monotonic()
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
                if self.on_frame is not None:
                    self.on_frame(self, frame)
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
    """`video`/`audio`: the tracks it publishes (default: `SmallPattern` and silence);
    `on_frame`: called with each decoded frame of every remote track (`bench geo` reads
    the capture time painted into it)."""

    def __init__(
        self,
        sock: Socket,
        name: str,
        *,
        video: MediaStreamTrack | None = None,
        audio: MediaStreamTrack | None = None,
        on_frame: FrameHook | None = None,
    ) -> None:
        self.sock = sock
        self.name = name
        # As the web client does: the TURN servers the node handed this session, if any.
        servers = [
            RTCIceServer(
                urls=server["urls"],
                username=server.get("username"),
                credential=server.get("credential"),
            )
            for server in sock.ice_servers
        ]
        self.publish = RTCPeerConnection(adapter.rtc_configuration(servers))
        self.subscribe = RTCPeerConnection(adapter.rtc_configuration(servers))
        self.received: list[Received] = []
        self.pattern = SmallPattern()
        self.video: MediaStreamTrack = video or self.pattern
        self.audio: MediaStreamTrack = audio or AudioStreamTrack()
        self._on_frame = on_frame
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
            if receiver is not None:
                adapter.route_declared_rtx(receiver.transport)  # retransmissions reach it
                adapter.retry_nacks(receiver)  # a lost NACK is asked again, not at the next gap
            received = Received(track, mid, receiver, self._on_frame)
            received.owner = self.owners.get(mid or "", "")
            self.received.append(received)

        for role, pc in (("publish", self.publish), ("subscribe", self.subscribe)):
            pc.on("connectionstatechange", self._state_logger(role, pc))
        self._watchdog = asyncio.ensure_future(self._watch_frozen())

    def _state_logger(self, role: str, pc: RTCPeerConnection) -> Callable[[], None]:
        """Logs each connection state change: a lost connection says when, on which side."""

        def changed() -> None:
            log.info(
                "participant.pc_state",
                extra={"participant": self.name, "pc": role, "state": pc.connectionState},
            )

        return changed

    async def _watch_frozen(self) -> None:
        """Ask for a keyframe for a video track that decoded nothing for STALL_S (since its
        latest frame, or since it arrived when it never decoded one)."""
        while True:
            await asyncio.sleep(STALL_RETRY_S / 4)
            now = time.monotonic()
            for r in self.received:
                if r.kind != "video" or r.receiver is None or r.ended.is_set():
                    continue
                # a track that never decoded its first frame counts from its arrival: its
                # first keyframe may have lost a packet for good just the same
                if now - (r.last_frame_at or r.arrived_at) < STALL_S:
                    continue
                if now - r.last_request_at < STALL_RETRY_S:
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

    async def start_publishing(self) -> None:
        self.publish.addTransceiver(self.video, direction="sendonly")
        self.publish.addTransceiver(self.audio, direction="sendonly")
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


# Failover (issue 17), as the web client does it (webapp/room.js): a socket that closes
# without a `reconnect`, on a node that no longer answers a ping, or a node not heard from
# for SILENT_S (pings every FAILOVER_PING_S), is dead; the participant goes at once to the
# next closest live node, ranked again without the dead one, and joins there with the same
# session (its seat was kept for it: the seat grace).
FAILOVER_PING_S = 5.0
SILENT_S = 7.5
PROBE_TIMEOUT_S = 1.5
WATCH_S = 0.1


@dataclass
class Failover:
    """One failover: the node it left, the node it reached, and when (monotonic)."""

    dead: str
    reached: str
    detected_at: float
    joined_at: float


class FailoverParticipant:
    """A participant that publishes, subscribes and survives its node's death (no drain)
    by rejoining the next closest live node, with the web client's procedure."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        user_token: str,
        slug: str,
        ranking: list[RankedNode],
        name: str,
    ) -> None:
        self.http = http
        self.user_token = user_token
        self.slug = slug
        self.ranking = ranking
        self.name = name
        self.dead: set[str] = set()
        self.session_token = ""
        self.session_id = ""
        self.node: RankedNode | None = None
        self.peer: MediaPeer | None = None
        #: every MediaPeer it had, the current one last (what was decoded before a failover)
        self.peers: list[MediaPeer] = []
        self.failovers: list[Failover] = []
        #: the failover going on, if any (set when the death was noticed)
        self.failing_since: float | None = None
        self._watcher: asyncio.Task[None] | None = None

    def frames_from(self, owner: str, kind: str = "video") -> int:
        """Frames of `owner`'s `kind` decoded so far, over every peer it had."""
        return sum(r.frames for peer in self.peers for r in peer.from_(owner, kind))

    def live(self) -> list[RankedNode]:
        return [n for n in self.ranking if n.name not in self.dead]

    async def start(self) -> None:
        reply = await self.http.post(
            f"{self.live()[0].url}/api/sessions",
            headers={"Authorization": f"Bearer {self.user_token}"},
        )
        reply.raise_for_status()
        self.session_token = reply.json()["session_token"]
        await self._enter(self.live()[0])
        self._watcher = asyncio.create_task(self._watch(), name=f"failover-{self.name}")

    async def _enter(self, node: RankedNode) -> None:
        """Connect to `node`, join the room (over its own API) and publish."""
        sock = await open_socket(node.url, self.session_token, FAILOVER_PING_S)
        reply = await self.http.post(
            f"{node.url}/api/rooms/{self.slug}/join",
            headers={"Authorization": f"Bearer {self.session_token}"},
        )
        if reply.status_code != 200:
            await sock.close()
            raise ConnectionError(f"join on {node.name}: {reply.status_code} {reply.text}")
        ack = await sock.request("join", room_token=reply.json()["room_token"])
        if ack.get("type") != "ack":
            await sock.close()
            raise ConnectionError(f"join on {node.name}: {ack}")
        self.session_id = sock.session_id
        self.node = node
        self.peer = MediaPeer(sock, self.name)
        self.peers.append(self.peer)
        await self.peer.start_publishing()

    def _gone(self, sock: Socket) -> bool:
        return sock.closed or time.monotonic() - sock.last_heard > SILENT_S

    async def _node_answers(self, node: RankedNode) -> bool:
        try:
            reply = await self.http.get(f"{node.url}/api/ping", timeout=PROBE_TIMEOUT_S)
        except httpx.HTTPError:
            return False
        return reply.status_code == 200

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_S)
            peer, node = self.peer, self.node
            if peer is None or node is None or not self._gone(peer.sock):
                continue
            detected = time.monotonic()
            self.failing_since = detected
            moved = next(
                (m for m in reversed(peer.sock.messages) if m.get("type") == "reconnect"), None
            )
            if any(m.get("type") == "session-replaced" for m in peer.sock.messages):
                return  # opened elsewhere: never fight back (as the web client)
            silent = not peer.sock.closed
            if moved is not None or silent or not await self._node_answers(node):
                self.dead.add(node.name)
            await peer.close()
            await peer.sock.close()
            self.peer = None
            await self._rejoin(node, moved)
            assert self.node is not None
            self.failovers.append(Failover(node.name, self.node.name, detected, time.monotonic()))
            self.failing_since = None

    async def _refresh(self) -> None:
        """Rank again without the dead nodes, asking any node that answers."""
        for seed in self.live():
            try:
                ranking = await pick_node(self.http, seed.url)
            except (httpx.HTTPError, KeyError, ValueError):
                continue
            fresh = [n for n in ranking if n.name not in self.dead]
            if fresh:
                self.ranking = fresh + [n for n in self.ranking if n.name in self.dead]
            return

    async def _rejoin(self, left: RankedNode, moved: dict[str, Any] | None) -> None:
        attempt = 0
        while True:
            if moved is not None and moved.get("url"):
                target = [n for n in self.live() if n.url == moved["url"]]
            else:
                await self._refresh()
                target = []
            candidates = target + [n for n in self.live() if n not in target]
            for node in candidates:
                try:
                    await self._enter(node)
                    return
                except (OSError, ConnectionError, TimeoutError, httpx.HTTPError) as error:
                    log.warning("%s: rejoin on %s failed: %s", self.name, node.name, error)
                    if not await self._node_answers(node):
                        self.dead.add(node.name)
            attempt += 1
            moved = None
            await asyncio.sleep(min(0.5 * 2**attempt, 5.0))
            if not self.live():
                self.dead.clear()  # everything looked dead: look again

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        if self.peer is not None:
            await self.peer.close()
            await self.peer.sock.close()
