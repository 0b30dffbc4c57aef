"""What a publisher cannot do to a node: flood it, spray foreign SSRCs, or make it ask for
more bitrate than its slowest subscriber takes. Through one in-process node with real aiortc
peers (the `scene` of test_repair: alice publishes, bob subscribes).

Alice's misbehaviour is sent by hand on her publish connection's transport, and bob's REMB
by hand from his receiver (with his own estimator silenced so only the chosen figure is
reported): test-side private aiortc access, standing in for a hostile or congested peer.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from aiortc.rtp import RTCP_PSFB_APP, RtcpPsfbPacket, RtpPacket, pack_remb_fci, unpack_remb_fci

from node.media.forward import ByteBudget
from tests.node.media.test_repair import LIMIT, scene
from tests.node.media.test_room_media import until


def _metric(text: str, name: str, reason: str) -> float:
    prefix = f'{name}{{reason="{reason}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


def record_rembs(sender: Any) -> list[int]:
    """The REMB bitrates `sender` (alice's) receives from now on, in order."""
    rembs: list[int] = []
    original = sender._handle_rtcp_packet

    async def handle_rtcp(packet: Any) -> None:
        if isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_APP:
            rembs.append(unpack_remb_fci(packet.fci)[0])
        await original(packet)

    sender._handle_rtcp_packet = handle_rtcp
    return rembs


@pytest.mark.slow
async def test_foreign_ssrcs_and_payload_types_are_dropped_and_counted(make_app: Any) -> None:
    async with scene(make_app) as s:
        sender: Any = s.alice_sender
        transport = sender.transport
        video_pt = next(
            pt
            for pt, codec in s.published.tap.codecs.items()
            if codec.mimeType.lower() == "video/vp8"
        )
        forwarded = s.media.forwarded_packets
        before = dict(s.media.dropped)
        sent = 30
        for index in range(sent):
            foreign = RtpPacket(
                payload_type=video_pt,
                sequence_number=index,
                timestamp=index * 3000,
                ssrc=random.getrandbits(32) | 1,
                payload=b"\x10\x00" + bytes(100),
            )
            await transport._send_rtp(foreign.serialize())
            unknown_pt = RtpPacket(
                payload_type=77, sequence_number=index, ssrc=random.getrandbits(32) | 1
            )
            unknown_pt.payload = bytes(50)
            await transport._send_rtp(unknown_pt.serialize())

        def count(reason: str) -> int:
            return s.media.dropped.get(reason, 0) - before.get(reason, 0)

        await until(
            lambda: count("unknown-ssrc") >= sent and count("unrouted") >= sent,
            "the node to drop the foreign packets",
            LIMIT,
        )
        # Only alice's own SSRCs have state on the node; her real video still flows to bob.
        assert set(s.published.tap.media_ssrcs) == {sender._ssrc}
        frames = s.video.frames
        await until(lambda: s.video.frames > frames + 5, "bob keeps decoding", LIMIT)
        assert s.media.forwarded_packets > forwarded
        text = await (await s.api.client.get("/metrics")).get_data(as_text=True)
        name = "sfumesh_media_dropped_packets_total"
        assert _metric(text, name, "unknown-ssrc") >= sent
        assert _metric(text, name, "unrouted") >= sent


@pytest.mark.slow
async def test_publisher_above_budget_loses_the_excess_and_is_asked_for_less(
    make_app: Any,
) -> None:
    async with scene(make_app) as s:
        rembs = record_rembs(s.alice_sender)
        budget = 20_000  # bits/s: far below what alice sends
        s.published.budget = ByteBudget(budget)
        before = s.media.dropped.get("over-budget", 0)
        await until(
            lambda: s.media.dropped.get("over-budget", 0) - before >= 20,
            "packets above the budget to be dropped",
            LIMIT,
        )
        await until(lambda: any(r <= budget for r in rembs), "a REMB within the budget", LIMIT)
        # (bob's own REMB, which follows the ~20 kbit/s he now receives, may be lower)
        assert s.published.remb_limit() <= budget
        # The node is unharmed: it still answers and forwards what fits.
        assert (await s.api.client.get("/healthz")).status_code == 200
        sent = s.sink.packets_sent
        await until(lambda: s.sink.packets_sent > sent, "packets within the budget", LIMIT)
        text = await (await s.api.client.get("/metrics")).get_data(as_text=True)
        assert _metric(text, "sfumesh_media_dropped_packets_total", "over-budget") >= 20


@pytest.mark.slow
async def test_remb_upstream_follows_the_slowest_subscriber(make_app: Any) -> None:
    async with scene(make_app) as s:
        rembs = record_rembs(s.alice_sender)
        await until(lambda: s.published.tap.remb_estimate is not None, "a first REMB", LIMIT)
        # Bob reports a congested link: only his chosen figure, several times a second.
        receiver: Any = s.bob_receiver
        receiver._RTCRtpReceiver__remote_bitrate_estimator = None
        slow = 30_000

        async def report() -> None:
            while True:
                await receiver._send_rtcp(
                    RtcpPsfbPacket(
                        fmt=RTCP_PSFB_APP,
                        ssrc=receiver._RTCRtpReceiver__rtcp_ssrc,
                        media_ssrc=0,
                        fci=pack_remb_fci(slow, [s.sink.ssrc]),
                    )
                )
                await asyncio.sleep(0.1)

        reporter = asyncio.ensure_future(report())
        try:
            await until(lambda: s.sink.remb_bitrate == slow, "bob's REMB at the node", LIMIT)
            assert s.published.remb_limit() == slow
            count = len(rembs)
            await until(
                lambda: any(r == slow for r in rembs[count:]), "alice asked for bob's rate", LIMIT
            )
            # The node's own estimate of alice's link is higher: the limit came from bob.
            estimate = s.published.tap.remb_estimate
            assert estimate is not None and estimate > slow
            assert s.published.tap.remb_bitrate == slow
        finally:
            reporter.cancel()
            await asyncio.gather(reporter, return_exceptions=True)
