"""Issue 22, item 3: a relay link's setup under loss does not wait for OpenSSL's 1 s timer.

Two links in one process on 127.0.0.1 (as in test_relay_link) with a short `setup_rto_s`;
one DTLS handshake datagram is lost on the way (the link's `setup_loss` test hook, below the
resender): the ClientHello, the server's flight, the client's flight, or the server's final
flight. The handshake completes, and the peer received the very bytes that were lost, that
is the resender's verbatim copy: OpenSSL's own retransmission (after 1 s, or after the
peer's 1 s timer for the final flight) would carry new record sequence numbers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from mesh.relay_description import is_controlling
from node.relay.link import RelayLink
from tests.node.relay.test_relay_link import Received, exchange, loopback

__all__ = ["loopback"]

RTO_S = 0.05


def _lose(nth: int, lost: list[bytes]) -> Callable[[bytes], bool]:
    """Lose the `nth` (1-based) distinct DTLS datagram a side sends, once."""
    sent: list[bytes] = []

    def drop(data: bytes) -> bool:
        if data not in sent:
            sent.append(data)
            if len(sent) == nth:
                lost.append(data)
                return True
        return False

    return drop


@pytest.mark.parametrize(
    ("side", "nth"),
    [
        ("client", 1),  # ClientHello
        ("server", 1),  # ServerHello ... ServerHelloDone
        ("client", 2),  # Certificate ... Finished
        ("server", 2),  # ChangeCipherSpec, Finished: the handshake's last flight
    ],
)
async def test_a_lost_handshake_flight_is_sent_again_verbatim(side: str, nth: int) -> None:
    server = RelayLink(is_controlling("node-a", "node-b"), Received(), setup_rto_s=RTO_S)
    client = RelayLink(is_controlling("node-b", "node-a"), Received(), setup_rto_s=RTO_S)
    assert server.dtls_role == "server" and client.dtls_role == "client"
    loser, peer = (client, server) if side == "client" else (server, client)
    lost: list[bytes] = []
    loser.setup_loss = _lose(nth, lost)
    try:
        await asyncio.wait_for(exchange(server, client), 10)
        assert server.dtls_state == client.dtls_state == "connected"
        assert len(lost) == 1
        # the lost datagram reached the peer as the resender's copy, byte for byte
        assert lost[0] in peer.dtls_seen, (side, nth)
        assert loser.dtls_resent >= 1
    finally:
        await server.close()
        await client.close()


async def test_without_a_setup_rto_nothing_is_resent() -> None:
    server = RelayLink(is_controlling("node-a", "node-b"), Received())
    client = RelayLink(is_controlling("node-b", "node-a"), Received())
    try:
        await asyncio.wait_for(exchange(server, client), 10)
        assert server.dtls_resent == client.dtls_resent == 0
        assert server.dtls_seen == client.dtls_seen == frozenset()
    finally:
        await server.close()
        await client.close()
