"""Issue 22, item 1: a relay under loss carries each publisher packet at most once, plus the
retransmissions actually asked for, and the far subscriber never gets more than was sent.

Two relay links in one process on 127.0.0.1 (as in test_relay_link). Node-1's fan-out (a
`Forwarder`, as `Published` runs it) feeds the relay sender; node-2's fan-out, fed by the
link's receiver, feeds a counting subscriber. Upstream of node-1 some packets arrive twice
(what aiortc's NACK generator causes: it re-lists every missing number at each new gap, so
a retransmission in flight is asked for, and sent, again) and some late; on the relay a
deterministic pattern (single losses and bursts, hundreds in all) loses first
transmissions, which node-2 NACKs and node-1 answers from its RTP history.
Before the fix each duplicate was forwarded again, to every subscriber and every relay.
"""

from __future__ import annotations

import asyncio

from aiortc.rtp import RtpPacket

from node.media import adapter
from node.media.adapter import SenderTap
from node.media.forward import Forwarder, SubscriberRewriter, vp8_is_keyframe_start
from node.relay.link import RelayLink, RemoteTrack
from tests.node.relay.test_relay_link import VP8_PT, Received, exchange, loopback, pair

__all__ = ["loopback", "pair"]

PACKETS = 2400  # two packets per frame
DUPLICATE_EVERY = 37  # ... arrives again 5 packets later
LATE_EVERY = 53  # ... arrives 3 packets late


def _payload(seq: int) -> bytes:
    # VP8 descriptor: S=1 on a frame's first packet; P=0 (keyframe) on every 100th frame
    if seq % 2 == 0:
        key = (seq // 2) % 100 == 0
        return bytes([0x10, 0x00 if key else 0x01]) + bytes(300)
    return bytes([0x00]) + bytes(300)


def _arrivals() -> list[int]:
    """The order packets reach node-1: every one, some late, some twice."""
    order = [s for s in range(PACKETS) if s % LATE_EVERY != 5]
    for s in range(5, PACKETS, LATE_EVERY):
        order.insert(min(len(order), order.index(s - 1) + 4), s)
    for s in range(0, PACKETS, DUPLICATE_EVERY):
        order.insert(min(len(order), order.index(s) + 6), s)
    return order


def _relay_loses(seq: int) -> bool:
    return seq % 17 == 3 or seq % 300 in range(100, 108)


class _Subscriber:
    def __init__(self) -> None:
        self.writes: list[tuple[int, int, int]] = []  # (sequence number, timestamp, marker)

    def write(self, pt: int, marker: int, seq: int, ts: int, *rest: object) -> bool:
        self.writes.append((seq, ts, marker))
        return True


async def test_relay_out_is_at_most_in_plus_retransmissions_asked_for(
    pair: tuple[RelayLink, RelayLink, Received, Received],
) -> None:
    a, b, _, _ = pair
    relay = await a.add_track("r/alice:v0", "video", "VP8", VP8_PT)
    await exchange(a, b)
    await relay.wait_ready()

    node1: Forwarder[SenderTap] = Forwarder(vp8_is_keyframe_start)
    node1.add(relay, SubscriberRewriter(relay.ssrc, VP8_PT))
    node2: Forwarder[_Subscriber] = Forwarder(vp8_is_keyframe_start)
    subscriber = _Subscriber()
    node2.add(subscriber, SubscriberRewriter(0x5EB5C, 96))
    arrived_at_node2 = 0

    def on_rtp(track: RemoteTrack, packet: RtpPacket) -> None:
        nonlocal arrived_at_node2
        arrived_at_node2 += 1
        node2.forward(packet, adapter.send_stamp())

    b._on_rtp = on_rtp
    dropped: set[int] = set()

    def loses(packet: RtpPacket) -> bool:
        # the relay sender's numbers are node-1's rewrite: a fixed shift of the publisher's
        seq = (packet.sequence_number - relay_base) & 0xFFFF
        if _relay_loses(seq):
            dropped.add(seq)
            return True
        return False

    rewriter = node1.rewriter(relay)
    assert rewriter is not None
    relay_base = rewriter.to_subscriber_seq(0)
    relay.drop = loses

    arrivals = _arrivals()
    for n, seq in enumerate(arrivals):
        packet = RtpPacket(
            payload_type=96, marker=seq % 2, sequence_number=seq, timestamp=(seq // 2) * 3000
        )
        packet.ssrc = 0xA11CE
        packet.payload = _payload(seq)
        node1.forward(packet, adapter.send_stamp())
        if n % 2:
            await asyncio.sleep(0.002)
    for _ in range(50):  # the last NACKs answered
        await asyncio.sleep(0.05)
        if len({w[0] for w in subscriber.writes}) == PACKETS:
            break

    duplicates_in = len(arrivals) - PACKETS
    assert duplicates_in > 50 and len(dropped) >= 200, (duplicates_in, len(dropped))
    # node-1: every publisher packet once into the relay, the duplicates not again
    assert node1.duplicates == duplicates_in
    assert relay.packets_sent == PACKETS
    # on the relay's wire: first transmissions not lost + retransmissions; at most what
    # came in (once each) plus what node-2 asked for again
    out_of_relay = relay.packets_sent - len(dropped) + relay.retransmitted
    assert out_of_relay <= PACKETS + relay.nacked, (out_of_relay, relay.nacked)
    assert relay.retransmitted >= len(dropped)  # every loss was asked for and answered
    assert arrived_at_node2 <= out_of_relay
    # node-2's subscriber: each packet at most once, never more frames than were sent
    numbers = [w[0] for w in subscriber.writes]
    assert len(numbers) == len(set(numbers)) == node2.packets_out
    frames = {w[1] for w in subscriber.writes}
    assert len(frames) <= PACKETS // 2
    assert len(numbers) >= PACKETS * 0.99, (len(numbers), node2.duplicates)
