"""A client's ICE candidates are probed only when it could own them, and only so many
(issue 21, item 14): WebSocket `candidate` messages and the a=candidate lines of its SDP
alike, through a real in-process node and an aiortc client."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

import pytest
from aiortc import AudioStreamTrack

from node.media.sdp import candidate_refusal
from node.web.context import EXTENSION
from tests.conftest import Api
from tests.node.media.test_room_media import MediaClient, join_clients

REFUSED = [
    "127.0.0.1",  # loopback
    "10.1.2.3",  # the node's own private networks
    "192.168.0.10",
    "169.254.10.1",  # link-local
    "0.0.0.0",  # noqa: S104  (unspecified: refused, not bound)
    "224.0.0.251",  # multicast
    "255.255.255.255",
    "::1",
    "fe80::1",
    "::ffff:10.0.0.1",
    "printer.local",
    "internal.example.org",
]


def candidate(address: str, port: int) -> dict[str, Any]:
    return {"candidate": f"candidate:1 1 udp 2130706431 {address} {port} typ host", "sdpMid": "0"}


def test_refused_addresses() -> None:
    for address in REFUSED:
        assert candidate_refusal(address, allow_private=False) is not None, address
    assert candidate_refusal("8.8.4.4", allow_private=False) is None
    assert candidate_refusal("2001:4860::8888", allow_private=False) is None
    # Local demos and tests allow their own networks, never the meaningless ones.
    assert candidate_refusal("127.0.0.1", allow_private=True) is None
    assert candidate_refusal("10.1.2.3", allow_private=True) is None
    assert candidate_refusal("x.local", allow_private=True) is None
    assert candidate_refusal("224.0.0.251", allow_private=True) is not None
    assert candidate_refusal("169.254.10.1", allow_private=True) is not None


def remote_candidates(test_app: Any) -> list[Any]:
    media = test_app.app.extensions[EXTENSION].live.media
    (session,) = [s for s in media.sessions.values() if s.publish_pc is not None]
    transports = {t.receiver.transport for t in session.publish_pc.getTransceivers()}
    return [c for transport in transports for c in transport.transport.getRemoteCandidates()]


@pytest.mark.slow
async def test_refused_and_surplus_candidates_are_not_added(make_app: Any) -> None:
    test_app = await make_app(
        media__host_addresses=["127.0.0.1"],
        media__allow_private_candidates=False,
        media__max_candidates_per_connection=3,
    )
    api = Api(test_app.test_client())
    token = await api.user_token("alice")
    await api.create_room(token, "probe")
    clients: list[MediaClient] = []
    async with AsyncExitStack() as stack:
        try:
            await join_clients(
                stack, api, {"alice": token}, ["alice"], "probe", clients, start=False
            )
            (alice,) = clients
            # Its offer's own candidates are on 127.0.0.1: dropped from the SDP.
            alice.publish.addTransceiver(AudioStreamTrack(), direction="sendonly")
            await alice.publish.setLocalDescription(await alice.publish.createOffer())
            # As a browser's would, the offer leaves candidates to trickle after it.
            offer = alice.publish.localDescription.sdp.replace("a=end-of-candidates\r\n", "")
            assert "127.0.0.1" in offer
            answer = await alice.peer.request("offer", pc="publish", sdp=offer)
            assert answer["type"] == "answer", answer
            assert remote_candidates(test_app) == []

            for address in REFUSED:
                refused = await alice.peer.request(
                    "candidate", pc="publish", candidate=candidate(address, 9)
                )
                assert refused["type"] == "error", (address, refused)
                assert refused["code"] == "candidate_refused" and refused["pc"] == "publish"
            for port in (5001, 5002, 5003, 5003):  # the same one twice counts once
                accepted = await alice.peer.request(
                    "candidate", pc="publish", candidate=candidate("8.8.4.4", port)
                )
                assert accepted["type"] == "ack", accepted
            surplus = await alice.peer.request(
                "candidate", pc="publish", candidate=candidate("8.8.4.4", 5004)
            )
            assert surplus["type"] == "error" and surplus["code"] == "too_many_candidates"
            added = {(c.ip, c.port) for c in remote_candidates(test_app)}
            assert added == {("8.8.4.4", 5001), ("8.8.4.4", 5002), ("8.8.4.4", 5003)}
        finally:
            for client in clients:
                await client.close()
