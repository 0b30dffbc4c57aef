"""Issue 20: a packet whose NACK (or whose retransmission) is lost is asked for again.

aiortc NACKs only when a packet arrives past a new gap, so a NACK lost on the way left the
packet missing until the next gap (a second or more at 2% loss), and a client's jitter
buffer stalled behind it: the freezes over 2 s in the lab. Over a real relay link (two
aiortc ORTC ends on 127.0.0.1, as in test_relay_link) packet 5 is lost, then b's first
NACK for it is lost too, and nothing more is sent: no new gap will ever re-list it.
"""

from __future__ import annotations

import asyncio

from node.media import adapter
from node.relay.link import RelayLink
from tests.node.relay.test_relay_link import VP8_PT, Received, exchange, loopback, pair, vp8_payload

__all__ = ["loopback", "pair"]


async def test_a_packet_whose_nack_was_lost_is_asked_for_again(
    pair: tuple[RelayLink, RelayLink, Received, Received],
) -> None:
    a, b, _, got_b = pair
    video = await a.add_track("r/alice:v0", "video", "VP8", VP8_PT)
    await exchange(a, b)
    await video.wait_ready()
    (remote,) = b.remote_tracks.values()
    retry = remote.tap.nack_retry
    assert retry is not None
    nacks: list[list[int]] = []

    def lose_first_nack(lost: list[int]) -> bool:
        nacks.append(lost)
        return len(nacks) == 1

    retry.drop = lose_first_nack
    video.drop = lambda packet: packet.sequence_number == 5 and video.retransmitted == 0
    stamp = adapter.send_stamp()
    for seq in range(1, 11):
        video.write(VP8_PT, 0, seq, seq * 3000, vp8_payload(seq), None, stamp)
        await asyncio.sleep(0.005)
    await got_b.wait_for(10, within_s=5.0)
    assert sorted(p.sequence_number for _, _, p in got_b.packets) == list(range(1, 11))
    assert nacks[0] == [5] and len(nacks) >= 2  # the lost NACK, then the retry
    assert retry.retries >= 1 and video.retransmitted >= 1
