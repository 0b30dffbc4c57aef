"""One participant must not flood everyone else's connections with tracks (issue 21, item 3).

Real aiortc clients through one in-process node: a publish offer with more m-lines than
`media.max_tracks_per_offer`, or one that would take the room over
`media.max_tracks_per_room`, is refused with `too_many_tracks` and nothing of it is
published; and a subscriber's answer to a subscribe offer larger than the plain frame limit
still gets through (its limit follows the offer), so a busy room cannot stall it.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import Any

import pytest
from aiortc import AudioStreamTrack, RTCPeerConnection, RTCSessionDescription

from node.media import adapter
from node.web.context import EXTENSION
from tests.conftest import Api
from tests.node.media.test_room_media import WAIT, MediaClient, join_clients, until


def hub_of(test_app: Any) -> Any:
    return test_app.app.extensions[EXTENSION].live.media


async def offer_audio(client: MediaClient, count: int) -> dict[str, Any]:
    """Offer `count` sendonly audio m-lines on a fresh publish PC; the node's reply."""
    await client.publish.close()
    client.publish = RTCPeerConnection(adapter.rtc_configuration())
    for _ in range(count):
        client.publish.addTransceiver(AudioStreamTrack(), direction="sendonly")
    await client.publish.setLocalDescription(await client.publish.createOffer())
    return await client.peer.request("offer", pc="publish", sdp=client.publish.localDescription.sdp)


async def publish_audio(client: MediaClient, count: int) -> None:
    """Publish `count` audio tracks through the client's reader (which applies the answer)."""
    client.published.clear()
    for _ in range(count):
        client.publish.addTransceiver(AudioStreamTrack(), direction="sendonly")
    await client.publish.setLocalDescription(await client.publish.createOffer())
    await client.send("offer", pc="publish", sdp=client.publish.localDescription.sdp)
    await asyncio.wait_for(client.published.wait(), WAIT)


@pytest.mark.slow
async def test_offer_over_the_m_line_cap_is_refused_and_nothing_reaches_subscribers(
    make_app: Any,
) -> None:
    test_app = await make_app(media__host_addresses=["127.0.0.1"])
    api = Api(test_app.test_client())
    tokens = {name: await api.user_token(name) for name in ("alice", "bob")}
    await api.create_room(tokens["alice"], "flood")
    clients: list[MediaClient] = []
    async with AsyncExitStack() as stack:
        try:
            await join_clients(stack, api, tokens, ["alice"], "flood", clients, start=False)
            await join_clients(stack, api, tokens, ["bob"], "flood", clients)
            alice, bob = clients
            refused = await offer_audio(alice, 5)
            assert refused["type"] == "error", refused
            assert refused["code"] == "too_many_tracks" and refused["pc"] == "publish"
            media = hub_of(test_app)
            assert media.room_tracks("flood") == 0
            assert all(s.publish_pc is None for s in media.sessions.values())
            # Within the cap the same participant publishes; the subscriber then holds
            # exactly those tracks: none of the refused offer's ever reached it.
            accepted = await offer_audio(alice, 4)
            assert accepted["type"] == "answer", accepted
            await until(lambda: len(bob.tracks("audio")) == 4, "bob gets alice's 4 tracks")
            assert media.room_tracks("flood") == 4
            assert len(bob.track_owners) == 4
            assert bob.errors == []
        finally:
            for client in clients:
                await client.close()


@pytest.mark.slow
async def test_room_at_its_track_cap_refuses_the_next_publisher(make_app: Any) -> None:
    test_app = await make_app(media__host_addresses=["127.0.0.1"], media__max_tracks_per_room=2)
    api = Api(test_app.test_client())
    tokens = {name: await api.user_token(name) for name in ("alice", "bob")}
    await api.create_room(tokens["alice"], "full-of-tracks")
    clients: list[MediaClient] = []
    async with AsyncExitStack() as stack:
        try:
            await join_clients(stack, api, tokens, ["alice", "bob"], "full-of-tracks", clients)
            alice, bob = clients
            await publish_audio(alice, 2)
            await until(lambda: len(bob.tracks("audio")) == 2, "bob gets alice's tracks")
            await bob.close()  # its reader stops: the reply is read here
            bob.publish = RTCPeerConnection(adapter.rtc_configuration())
            refused = await offer_audio(bob, 1)
            assert refused["type"] == "error" and refused["code"] == "too_many_tracks"
            media = hub_of(test_app)
            assert media.room_tracks("full-of-tracks") == 2
            assert sum(len(s.published) for s in media.sessions.values()) == 2
        finally:
            for client in clients:
                await client.close()


@pytest.mark.slow
async def test_answer_to_a_large_subscribe_offer_is_not_cut_by_the_frame_limit(
    make_app: Any,
) -> None:
    # Publish offers (2 audio m-lines, ~3 KB) fit the frame limit; the answer to a subscribe
    # offer of 4 tracks (~6 KB) does not: it used to be refused and the subscriber stalled.
    test_app = await make_app(media__host_addresses=["127.0.0.1"], live__ws_max_frame_bytes=4096)
    api = Api(test_app.test_client())
    names = ["alice", "carol", "bob"]
    tokens = {name: await api.user_token(name) for name in names}
    await api.create_room(tokens["alice"], "busy")
    clients: list[MediaClient] = []
    async with AsyncExitStack() as stack:
        try:
            await join_clients(stack, api, tokens, names, "busy", clients)
            alice, carol, bob = clients
            await publish_audio(alice, 2)
            await publish_audio(carol, 2)
            # Frames flow only once the node has applied bob's answer.
            await until(
                lambda: len([t for t in bob.tracks("audio") if t.frames > 0]) == 4,
                "bob receives all four tracks",
            )
            assert bob.errors == []
        finally:
            for client in clients:
                await client.close()


async def offer_again(client: MediaClient) -> dict[str, Any]:
    """Offer the publish PC as it is now; apply the node's answer if it gives one."""
    await client.publish.setLocalDescription(await client.publish.createOffer())
    reply = await client.peer.request(
        "offer", pc="publish", sdp=client.publish.localDescription.sdp
    )
    if reply["type"] == "answer":
        await client.publish.setRemoteDescription(
            RTCSessionDescription(sdp=reply["sdp"], type="answer")
        )
    return reply


@pytest.mark.slow
async def test_toggling_a_track_cannot_grow_subscribers_sdp_without_end(make_app: Any) -> None:
    # Each restart of a track is a new m-line at every subscriber (never reused): a
    # connection may start only so many.
    test_app = await make_app(
        media__host_addresses=["127.0.0.1"], media__max_track_starts_per_connection=3
    )
    api = Api(test_app.test_client())
    token = await api.user_token("alice")
    await api.create_room(token, "flicker")
    clients: list[MediaClient] = []
    async with AsyncExitStack() as stack:
        try:
            await join_clients(
                stack, api, {"alice": token}, ["alice"], "flicker", clients, start=False
            )
            (alice,) = clients
            transceiver = alice.publish.addTransceiver(AudioStreamTrack(), direction="sendonly")
            media = hub_of(test_app)
            replies = []
            for direction in ["sendonly", "inactive", "sendonly", "inactive", "sendonly"]:
                transceiver.direction = direction
                replies.append((await offer_again(alice))["type"])
            assert replies == ["answer"] * 5
            assert media.room_tracks("flicker") == 1
            transceiver.direction = "inactive"
            assert (await offer_again(alice))["type"] == "answer"
            transceiver.direction = "sendonly"
            refused = await offer_again(alice)
            assert refused["type"] == "error" and refused["code"] == "too_many_tracks"
            assert media.room_tracks("flicker") == 0
        finally:
            for client in clients:
                await client.close()
