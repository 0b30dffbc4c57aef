"""Media through one in-process node: aiortc clients publish and subscribe over the WebSocket.

Each client has a publish PC (it offers sendonly VP8 video + Opus audio, the node answers)
and a subscribe PC (the node offers the room's other tracks, the client answers). All ICE on
127.0.0.1 (`media.host_addresses`), no ICE servers. The node forwards raw RTP: its
`CODEC_WORK` counter stays 0 while the clients decode each other's video.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import AsyncExitStack
from typing import Any

import pytest
from aiortc import (
    AudioStreamTrack,
    MediaStreamTrack,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError

from node.local.participant import SmallPattern
from node.media import adapter
from tests.conftest import Api
from tests.node.runtime.test_live_inprocess import Peer, connect

log = logging.getLogger(__name__)

VIDEO_FRAMES = 31
AUDIO_FRAMES = 31
WAIT = 30.0


async def join_clients(
    stack: AsyncExitStack,
    api: Api,
    tokens: dict[str, str],
    names: list[str],
    slug: str,
    clients: list[MediaClient],
    *,
    start: bool = True,
) -> None:
    """Each named user connects its WebSocket, joins `slug`, and (if `start`) starts its
    MediaClient; appended to `clients` one by one, so a failure still closes the earlier."""
    for name in names:
        peer = await connect(stack, api, await api.session_token(tokens[name]))
        await peer.join(slug)
        client = MediaClient(peer, name)
        clients.append(client)
        if start:
            client.start()


class RemoteTrack:
    """A track the client receives on its subscribe PC: frames counted until it ends."""

    def __init__(self, track: MediaStreamTrack) -> None:
        self.track = track
        self.kind = track.kind
        self.frames = 0
        self.ended = asyncio.Event()
        self.task = asyncio.ensure_future(self._consume())

    async def _consume(self) -> None:
        try:
            while True:
                await self.track.recv()
                self.frames += 1
        except MediaStreamError:
            pass
        finally:
            self.ended.set()


class MediaClient:
    """An aiortc participant speaking the node's signalling over one WebSocket."""

    def __init__(self, peer: Peer, name: str) -> None:
        self.peer = peer
        self.name = name
        self.publish = RTCPeerConnection(adapter.rtc_configuration())
        self.subscribe = RTCPeerConnection(adapter.rtc_configuration())
        self.remote: list[RemoteTrack] = []
        self.offers = 0
        #: the latest subscribe offer's `tracks`: mid -> {session_id, user_id, kind, source_mid}
        self.track_owners: dict[str, dict[str, str]] = {}
        self.errors: list[dict[str, Any]] = []
        self.published = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._counter = 0

        @self.subscribe.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            receiver = next(
                t.receiver for t in self.subscribe.getTransceivers() if t.receiver.track is track
            )
            adapter.route_declared_rtx(receiver.transport)  # as node.local.participant does
            self.remote.append(RemoteTrack(track))

    async def send(self, type_: str, **fields: Any) -> None:
        self._counter += 1
        frame = {"type": type_, "id": f"{self.name}-{self._counter}", **fields}
        await self.peer.ws.send(json.dumps(frame))

    def start(self) -> None:
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        for message in list(self.peer.seen):
            await self._handle(message)
        self.peer.seen.clear()
        while True:
            message = json.loads(await self.peer.ws.receive())
            await self._handle(message)

    async def _handle(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "offer" and message.get("pc") == "subscribe":
            self.offers += 1
            self.track_owners = message["tracks"]
            await self.subscribe.setRemoteDescription(
                RTCSessionDescription(sdp=message["sdp"], type="offer")
            )
            await self.subscribe.setLocalDescription(await self.subscribe.createAnswer())
            await self.send("answer", pc="subscribe", sdp=self.subscribe.localDescription.sdp)
        elif kind == "answer" and message.get("pc") == "publish":
            await self.publish.setRemoteDescription(
                RTCSessionDescription(sdp=message["sdp"], type="answer")
            )
            self.published.set()
        elif kind == "error":
            log.error("%s got an error: %s", self.name, message)
            self.errors.append(message)

    async def start_publishing(self) -> None:
        self.publish.addTransceiver(SmallPattern(), direction="sendonly")
        self.publish.addTransceiver(AudioStreamTrack(), direction="sendonly")
        await self.publish.setLocalDescription(await self.publish.createOffer())
        await self.send("offer", pc="publish", sdp=self.publish.localDescription.sdp)
        await asyncio.wait_for(self.published.wait(), WAIT)

    async def renegotiate_publish(self) -> None:
        """Offer the publish connection again (after a direction change) and apply the answer."""
        self.published.clear()
        await self.publish.setLocalDescription(await self.publish.createOffer())
        await self.send("offer", pc="publish", sdp=self.publish.localDescription.sdp)
        await asyncio.wait_for(self.published.wait(), WAIT)

    def tracks(self, kind: str) -> list[RemoteTrack]:
        return [t for t in self.remote if t.kind == kind]

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        await self.publish.close()
        await self.subscribe.close()
        for remote in self.remote:
            remote.task.cancel()
        await asyncio.gather(*(r.task for r in self.remote), return_exceptions=True)


async def until(condition: Any, what: str = "", limit_s: float = WAIT) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_two_clients_decode_each_other_third_joins_and_leaves(
    make_app: Any,
) -> None:
    test_app = await make_app(media__host_addresses=["127.0.0.1"])
    api = Api(test_app.test_client())
    work_before = adapter.CODEC_WORK.total
    started = time.monotonic()
    names = ["alice", "bob", "carol"]
    tokens = {name: await api.user_token(name) for name in names}
    await api.create_room(tokens["alice"], "studio")
    clients: list[MediaClient] = []
    async with AsyncExitStack() as stack:
        try:
            # Before joining, media is refused.
            loner = await connect(stack, api, await api.session_token(tokens["alice"]))
            refused = await loner.request("offer", pc="publish", sdp="v=0")
            assert refused["type"] == "error" and refused["code"] == "not_in_room"

            await join_clients(stack, api, tokens, names[:2], "studio", clients)
            alice, bob = clients
            await alice.start_publishing()
            await bob.start_publishing()

            def decoded(client: MediaClient, kind: str, wanted: int) -> bool:
                return any(t.frames >= wanted for t in client.tracks(kind))

            for client in clients:
                await until(lambda c=client: decoded(c, "video", VIDEO_FRAMES), what="video")
                await until(lambda c=client: decoded(c, "audio", AUDIO_FRAMES), what="audio")
            log.info("two clients decoding after %.2f s", time.monotonic() - started)
            for client in clients:
                assert len(client.tracks("video")) == 1 and len(client.tracks("audio")) == 1
                assert client.errors == []
            # Each subscribe offer says whose every m-line is.
            for client, other in ((alice, bob), (bob, alice)):
                owners = client.track_owners
                assert sorted(o["kind"] for o in owners.values()) == ["audio", "video"]
                assert {o["session_id"] for o in owners.values()} == {other.peer.session_id}
                mids = {t.mid for t in client.subscribe.getTransceivers()}
                assert set(owners) <= mids
                # ... and which m-line of its publisher's it is (screen share vs camera).
                published = {t.mid: t.kind for t in other.publish.getTransceivers()}
                assert {o["source_mid"]: o["kind"] for o in owners.values()} == published

            # A third joins late: it gets both publishers' tracks, and they get its own.
            peer = await connect(stack, api, await api.session_token(tokens["carol"]))
            await peer.join("studio")
            carol = MediaClient(peer, "carol")
            clients.append(carol)
            carol.start()
            await carol.start_publishing()
            await until(lambda: len(carol.tracks("video")) == 2, what="carol's two videos")
            await until(
                lambda: all(t.frames >= VIDEO_FRAMES for t in carol.tracks("video")),
                what="carol decodes both",
            )
            for client in (alice, bob):
                await until(lambda c=client: len(c.tracks("video")) == 2, what="carol's video")
                carol_video = client.tracks("video")[1]
                await until(lambda t=carol_video: t.frames >= VIDEO_FRAMES, what="carol decoded")

            # Carol leaves: her tracks end at alice and bob; theirs keep flowing.
            await carol.send("leave")
            for client in (alice, bob):
                gone = client.tracks("video")[1:] + client.tracks("audio")[1:]
                assert len(gone) == 2
                for track in gone:
                    await asyncio.wait_for(track.ended.wait(), WAIT)
                staying = client.tracks("video")[0]
                before = staying.frames
                await until(lambda t=staying, n=before: t.frames > n + 10, what="still flowing")
                assert not staying.ended.is_set()
                # The node renegotiated: carol's two m-lines are now inactive.
                await until(
                    lambda c=client: c.subscribe.remoteDescription.sdp.count("a=inactive") == 2,
                    what="inactive m-lines",
                )
                assert client.errors == []

            assert adapter.CODEC_WORK.total == work_before
            log.info("whole scenario took %.2f s", time.monotonic() - started)
        finally:
            for client in clients:
                await client.close()


@pytest.mark.slow
async def test_closed_webrtc_connection_ends_membership(make_app: Any) -> None:
    test_app = await make_app(media__host_addresses=["127.0.0.1"])
    api = Api(test_app.test_client())
    tokens = {name: await api.user_token(name) for name in ("alice", "bob")}
    await api.create_room(tokens["alice"], "studio")
    clients: list[MediaClient] = []
    async with AsyncExitStack() as stack:
        try:
            await join_clients(stack, api, tokens, ["alice", "bob"], "studio", clients, start=False)
            alice, bob = clients
            # bob listens through Peer.next (no reader task); alice's reader answers offers
            alice.start()
            await alice.start_publishing()
            await until(lambda: bool(alice.publish.connectionState == "connected"), "connected")
            # alice's browser closes its publish connection: the node ends her membership
            await alice.publish.close()
            left = await bob.peer.next("participant-left")
            assert left["reason"] == "media-failed"
            assert left["session_id"] == alice.peer.session_id
        finally:
            for client in clients:
                await client.close()


@pytest.mark.slow
async def test_publisher_stops_and_resumes_a_track_by_renegotiation(make_app: Any) -> None:
    test_app = await make_app(media__host_addresses=["127.0.0.1"])
    api = Api(test_app.test_client())
    tokens = {name: await api.user_token(name) for name in ("alice", "bob")}
    await api.create_room(tokens["alice"], "studio")
    clients: list[MediaClient] = []
    work_before = adapter.CODEC_WORK.total
    async with AsyncExitStack() as stack:
        try:
            await join_clients(stack, api, tokens, ["alice", "bob"], "studio", clients)
            alice, bob = clients
            await alice.start_publishing()
            await until(lambda: len(bob.tracks("video")) == 1, what="bob's video")
            first = bob.tracks("video")[0]
            audio = bob.tracks("audio")[0]
            await until(lambda: first.frames >= 10, what="bob decodes alice")

            # Alice stops sending video (as removeTrack does): bob's video track ends, the
            # audio goes on.
            video = next(t for t in alice.publish.getTransceivers() if t.kind == "video")
            video.direction = "inactive"
            await alice.renegotiate_publish()
            await asyncio.wait_for(first.ended.wait(), WAIT)
            heard = audio.frames
            await until(lambda: audio.frames > heard + 10, what="audio still flowing")
            assert not audio.ended.is_set()

            # She sends video again on the same transceiver: bob gets a new track that decodes.
            video.direction = "sendonly"
            await alice.renegotiate_publish()
            await until(lambda: len(bob.tracks("video")) == 2, what="bob's new video track")
            again = bob.tracks("video")[1]
            await until(lambda: again.frames >= 10, what="bob decodes the resumed video")
            assert alice.errors == [] and bob.errors == []
            assert adapter.CODEC_WORK.total == work_before
        finally:
            for client in clients:
                await client.close()
