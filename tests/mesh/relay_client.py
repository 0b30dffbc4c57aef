"""An aiortc participant of real node processes (over `tests.node.live_client.Socket`):
publishes a test pattern and a tone, answers the node's subscribe offers, and counts the
frames it decodes per remote track, with the owner the offer's `tracks` names."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from aiortc import AudioStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from node.media import adapter
from tests.node.live_client import Socket
from tests.node.media.test_loopback import SmallPattern

log = logging.getLogger(__name__)

WAIT_S = 40.0


class Received:
    """A remote track: frames decoded until it ends."""

    def __init__(self, track: MediaStreamTrack, mid: str | None) -> None:
        self.track = track
        self.kind = track.kind
        self.mid = mid
        self.owner = ""
        self.frames = 0
        self.first_frame_at: float | None = None
        self.ended = asyncio.Event()
        self.task = asyncio.ensure_future(self._consume())

    async def _consume(self) -> None:
        try:
            while True:
                await self.track.recv()
                self.frames += 1
                if self.first_frame_at is None:
                    self.first_frame_at = time.monotonic()
        except MediaStreamError:
            pass
        finally:
            self.ended.set()


class NodeMediaClient:
    def __init__(self, sock: Socket, name: str) -> None:
        self.sock = sock
        self.name = name
        self.publish = RTCPeerConnection(adapter.rtc_configuration())
        self.subscribe = RTCPeerConnection(adapter.rtc_configuration())
        self.received: list[Received] = []
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
            received = Received(track, mid)
            received.owner = self.owners.get(mid or "", "")
            self.received.append(received)

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
        self.publish.addTransceiver(SmallPattern(), direction="sendonly")
        self.publish.addTransceiver(AudioStreamTrack(), direction="sendonly")
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
        await asyncio.gather(self._reader, return_exceptions=True)
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
