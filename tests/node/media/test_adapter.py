"""The aiortc adapter: start-up check, ICE host addresses, configuration."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import random
import time

import aioice
import aioice.ice
import pytest
from aiortc import (
    MediaStreamTrack,
    RTCCertificate,
    RTCDtlsTransport,
    RTCIceGatherer,
    RTCIceTransport,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCRtpSender,
)
from aiortc.rate import RemoteBitrateEstimator
from aiortc.rtp import RtpPacket

from node.media import adapter
from tests.node.media.test_room_media import until


def test_check_aiortc_passes_on_pinned_version():
    assert adapter.missing_private_api() == []
    adapter.check_aiortc()


def test_check_aiortc_names_missing_method(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delattr(RTCRtpReceiver, "_send_rtcp_pli")
    with pytest.raises(RuntimeError) as info:
        adapter.check_aiortc()
    message = str(info.value)
    assert "RTCRtpReceiver._send_rtcp_pli" in message
    assert "aiortc==1.16.0" in message


def test_check_aiortc_names_missing_instance_attribute(monkeypatch: pytest.MonkeyPatch):
    def init_without_history(self, trackOrKind, transport):
        self._ssrc = 1

    monkeypatch.setattr(RTCRtpSender, "__init__", init_without_history)
    with pytest.raises(RuntimeError, match=r"RTCRtpSender\._RTCRtpSender__rtp_history"):
        adapter.check_aiortc()


def test_check_aiortc_notices_aioice_change(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delattr(aioice.ice, "get_host_addresses")
    with pytest.raises(RuntimeError, match="get_host_addresses"):
        adapter.check_aiortc()


def test_rtc_configuration_has_no_ice_servers_by_default():
    assert adapter.rtc_configuration().iceServers == []


async def test_host_addresses_include_loopback():
    adapter.set_host_addresses(["127.0.0.1", "::1"])
    try:
        assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=False) == ["127.0.0.1"]
        assert aioice.ice.get_host_addresses(use_ipv4=False, use_ipv6=True) == ["::1"]
        connection = aioice.Connection(ice_controlling=True, use_ipv6=False)
        try:
            await connection.gather_candidates()
            hosts = [(c.type, c.host) for c in connection.local_candidates]
        finally:
            await connection.close()
        assert hosts == [("host", "127.0.0.1")]
    finally:
        adapter.set_host_addresses(None)
    assert "127.0.0.1" not in aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=False)


def test_host_addresses_are_validated():
    with pytest.raises(ValueError):
        adapter.set_host_addresses(["not-an-address"])


async def test_written_packets_carry_the_senders_header_and_extensions():
    """`SenderTap.write` packs the header by hand: what the peer parses must be exactly the
    sender's SSRC, the given numbers and payload, its MID, the stamp's abs-send-time and the
    audio level (audio and video senders, whose negotiated extensions differ)."""
    adapter.set_host_addresses(["127.0.0.1"])
    node = RTCPeerConnection(adapter.rtc_configuration())
    peer = RTCPeerConnection(adapter.rtc_configuration())
    received: dict[str, list[RtpPacket]] = {"audio": [], "video": []}
    try:
        sinks = {
            kind: adapter.tap_sender(node.addTransceiver(kind, direction="sendonly").sender)
            for kind in ("audio", "video")
        }

        @peer.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            receiver = next(t.receiver for t in peer.getTransceivers() if t.receiver.track is track)

            def keep(packet: RtpPacket) -> None:
                received[track.kind].append(packet)

            adapter.tap_rtp(receiver, keep)

        await node.setLocalDescription(await node.createOffer())
        await peer.setRemoteDescription(node.localDescription)
        await peer.setLocalDescription(await peer.createAnswer())
        await node.setRemoteDescription(peer.localDescription)
        for sink in sinks.values():
            await asyncio.wait_for(sink.wait_ready(), 10)
        stamp = adapter.send_stamp()
        for kind, sink in sinks.items():
            assert sink.payload_type is not None
            for seq in range(1000, 1010):
                level = (seq % 2 == 0, seq % 100) if kind == "audio" else None
                payload = bytes([0x10, seq % 256]) + bytes(20)
                assert sink.write(sink.payload_type, seq % 2, seq, seq * 960, payload, level, stamp)
        await until(lambda: min(len(v) for v in received.values()) >= 10, "the packets", 10)
        for kind, sink in sinks.items():
            packets = received[kind]
            assert [p.sequence_number for p in packets] == list(range(1000, 1010))
            for p in packets:
                seq = p.sequence_number
                assert (p.ssrc, p.payload_type, p.marker) == (sink.ssrc, sink.payload_type, seq % 2)
                assert p.timestamp == seq * 960
                assert p.payload == bytes([0x10, seq % 256]) + bytes(20)
                assert p.extensions.mid == sink.mid
                if kind == "audio":
                    assert p.extensions.audio_level == (seq % 2 == 0, seq % 100)
                else:
                    sent = int.from_bytes(stamp.abs_send_time, "big")
                    assert p.extensions.abs_send_time == sent
            assert sink.packets_sent == 10 and sink.send_errors == 0
    finally:
        await node.close()
        await peer.close()
        adapter.set_host_addresses(None)


async def test_tapped_receivers_take_the_fast_path_and_still_nack():
    """Issue 19: once DTLS is up, SRTP for a tapped receiver is handled in the datagram
    callback (`adapter.fast_receive`), not through aiortc's queue and reader task; the
    transport's counters still count it, and a gap still sends a NACK to the sender."""
    adapter.set_host_addresses(["127.0.0.1"])
    node = RTCPeerConnection(adapter.rtc_configuration())
    peer = RTCPeerConnection(adapter.rtc_configuration())
    received: list[RtpPacket] = []
    receivers: list[RTCRtpReceiver] = []
    try:
        sink = adapter.tap_sender(node.addTransceiver("video", direction="sendonly").sender)

        @peer.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            receiver = next(t.receiver for t in peer.getTransceivers() if t.receiver.track is track)
            receivers.append(receiver)
            adapter.tap_rtp(receiver, received.append)

        await node.setLocalDescription(await node.createOffer())
        await peer.setRemoteDescription(node.localDescription)
        await peer.setLocalDescription(await peer.createAnswer())
        await node.setRemoteDescription(peer.localDescription)
        await asyncio.wait_for(sink.wait_ready(), 10)
        dtls = receivers[0].transport
        await until(lambda: dtls.state == "connected", "the peer's DTLS", 10)
        fast = adapter.fast_receive(dtls)  # the one the tap installed
        assert adapter.fast_receive(dtls) is fast
        before = fast.packets
        stamp = adapter.send_stamp()
        assert sink.payload_type is not None
        sent = [seq for seq in range(2000, 2030) if seq != 2010]  # 2010 is "lost"
        for seq in sent:
            payload = bytes([0x10, seq % 256]) + bytes(100)
            assert sink.write(sink.payload_type, 0, seq, seq * 3000, payload, None, stamp)
        await until(lambda: len(received) >= len(sent), "the packets", 10)
        assert [p.sequence_number for p in received] == sent
        assert fast.packets - before == len(sent)  # every one on the fast path
        # written back to back, the burst was read in few event-loop turns, not one each
        assert fast.drained > 0
        # the NACK the gap calls for reaches the sender (scheduled from the fast path)
        await until(lambda: sink.nacked >= 1, "a NACK for 2010", 10)
        stats = [s for s in (await peer.getStats()).values() if s.type == "transport"]
        assert stats and stats[0].packetsReceived >= len(sent)
    finally:
        await node.close()
        await peer.close()
        adapter.set_host_addresses(None)


async def test_the_lightened_remb_estimator_gives_aiortcs_figures():
    """Issue 19: a tapped receiver's REMB estimator keeps its incoming bitrate as a queue of
    busy milliseconds and takes the minimum frame period with the built-in `min`
    (`adapter.lighten_estimator`), instead of walking a bucket per millisecond and a Python
    loop per frame; what it returns (the REMB sent to the publisher) is aiortc's, packet
    for packet, over frames, bursts in one millisecond, gaps longer than the window and an
    overuse."""
    ice = RTCIceTransport(RTCIceGatherer(iceServers=[]))
    receiver = RTCRtpReceiver(
        "video", RTCDtlsTransport(ice, [RTCCertificate.generateCertificate()])
    )
    adapter.tap_rtp(receiver, lambda packet: None)
    lightened = receiver._RTCRtpReceiver__remote_bitrate_estimator  # type: ignore[attr-defined]
    assert isinstance(lightened.incoming_bitrate, adapter._WindowRate)
    assert "update_min_frame_period" in vars(lightened.estimator)
    adapter.lighten_estimator(lightened)  # idempotent
    plain = RemoteBitrateEstimator()
    rng = random.Random(19)
    now_ms, send_ms = 1_000_000, 0.0
    outputs: list[object] = []
    rates: list[object] = []
    for frame in range(3000):
        # ~30 frames/s, 1-6 packets each (same or next millisecond), now and then a pause
        # longer than the 1 s window, and a stretch where arrivals lag more and more (overuse)
        gap = 33 + rng.randint(-3, 3)
        if frame % 500 == 499:
            gap += 1500
        send_ms += gap
        now_ms += gap + (frame % 97 if 1000 <= frame < 1200 else 0)
        for packet in range(rng.randint(1, 6)):
            arrival = now_ms + (packet // 3)
            abs_send_time = (int(send_ms * 262.144) + packet) & 0xFFFFFF
            size = rng.randint(200, 1200)
            ssrc = 1234 + frame % 2
            got = lightened.add(arrival, abs_send_time, size, ssrc)
            want = plain.add(arrival, abs_send_time, size, ssrc)
            assert got == want, (frame, packet)
            outputs.append(want)
        rates.append(plain.incoming_bitrate.rate(now_ms))
        assert lightened.incoming_bitrate.rate(now_ms) == rates[-1], frame
    assert sum(o is not None for o in outputs) > 50  # REMBs were produced and compared
    assert len({r for r in rates if r is not None}) > 100
    assert lightened.estimator.update_min_frame_period(5.0) == (
        plain.estimator.update_min_frame_period(5.0)
    )


async def test_arrival_stamps_are_the_kernels_not_a_blocked_loops() -> None:
    """Issue 18: in a process that stamps arrivals, a tap handler reads when the kernel
    received its packet's datagram. The loop is blocked after each send (the datagrams wait
    in the socket buffer): the handler runs after the block, the stamp stays at the send."""
    assert adapter.stamp_arrivals()
    adapter.set_host_addresses(["127.0.0.1"])
    node = RTCPeerConnection(adapter.rtc_configuration())
    peer = RTCPeerConnection(adapter.rtc_configuration())
    seen: list[tuple[int, float | None, float]] = []
    try:
        sink = adapter.tap_sender(node.addTransceiver("video", direction="sendonly").sender)

        @peer.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            receiver = next(t.receiver for t in peer.getTransceivers() if t.receiver.track is track)

            def keep(packet: RtpPacket) -> None:
                seen.append((packet.sequence_number, adapter.arrival_time(), time.time()))

            adapter.tap_rtp(receiver, keep)

        await node.setLocalDescription(await node.createOffer())
        await peer.setRemoteDescription(node.localDescription)
        await peer.setLocalDescription(await peer.createAnswer())
        await node.setRemoteDescription(peer.localDescription)
        await asyncio.wait_for(sink.wait_ready(), 10)
        receiver_dtls = peer.getTransceivers()[0].receiver.transport
        await until(lambda: receiver_dtls.state == "connected", "the peer's DTLS", 10)
        assert sink.payload_type is not None
        stamp = adapter.send_stamp()
        sent: dict[int, float] = {}
        for seq in range(3000, 3005):
            assert sink.write(sink.payload_type, 1, seq, seq * 3000, bytes(100), None, stamp)
            sent[seq] = time.time()
            time.sleep(0.05)  # noqa: ASYNC251 (the point: the loop is blocked, nothing read)
        unblocked = time.time()
        await until(lambda: len(seen) >= len(sent), "the packets", 10)
        for seq, arrived, handled in seen:
            assert arrived is not None, "no kernel stamp on the fast path"
            assert handled >= unblocked
            # received while the loop slept (during the sendto), not when it was read
            assert sent[seq] - 0.01 <= arrived <= sent[seq] + 0.04 < unblocked
    finally:
        await node.close()
        await peer.close()
        adapter.set_host_addresses(None)
        adapter.stamp_arrivals(False)


def test_arrival_stamps_fall_back_when_the_kernel_cannot_give_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without SIOCGSTAMPNS (another system, an older kernel) stamping is off: handlers read
    None and the bench falls back to its handler's clock."""

    def refuse(*args: object) -> bytes:
        raise OSError(errno.ENOTTY, "Inappropriate ioctl for device")

    monkeypatch.setattr(fcntl, "ioctl", refuse)
    assert not adapter.stamp_arrivals()
    assert adapter.arrival_time() is None
    monkeypatch.undo()
    assert adapter.stamp_arrivals()
    assert adapter.stamp_arrivals(False) is False


async def test_padding_is_recent_packets_again_as_rtx():
    """Issue 14's probes: `SenderTap.send_padding` sends recently written packets again
    as RTX (what the subscriber's bandwidth estimator and its link carry; the receiver
    unwraps them into repeats it already has), about the size asked; nothing before the
    first packet. The receiver's reports are heard (`reported_sequence_number`)."""
    adapter.set_host_addresses(["127.0.0.1"])
    node = RTCPeerConnection(adapter.rtc_configuration())
    peer = RTCPeerConnection(adapter.rtc_configuration())
    received: list[RtpPacket] = []
    try:
        sink = adapter.tap_sender(node.addTransceiver("video", direction="sendonly").sender)

        @peer.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            receiver = next(t.receiver for t in peer.getTransceivers() if t.receiver.track is track)
            adapter.tap_rtp(receiver, received.append)

        await node.setLocalDescription(await node.createOffer())
        await peer.setRemoteDescription(node.localDescription)
        await peer.setLocalDescription(await peer.createAnswer())
        await node.setRemoteDescription(peer.localDescription)
        await asyncio.wait_for(sink.wait_ready(), 10)
        assert sink.send_padding(5000) == 0  # (nothing written yet)
        stamp = adapter.send_stamp()
        assert sink.payload_type is not None
        for seq in range(3000, 3010):
            payload = bytes([0x10, seq % 256]) + bytes(1000)
            assert sink.write(sink.payload_type, 0, seq, seq * 3000, payload, None, stamp)
        await until(lambda: len(received) >= 10, "the packets", 10)
        sent = sink.send_padding(3000)
        assert 3000 <= sent < 3000 + 1002
        assert sink.padding_packets == 3 and sink.padding_bytes == sent
        await until(lambda: len(received) >= 13, "the padding", 10)
        repeats = received[10:]
        # the newest packets again, unwrapped from RTX by the receiver: the same numbers
        # and payloads as before
        originals = {p.sequence_number: p.payload for p in received[:10]}
        assert all(originals[p.sequence_number] == p.payload for p in repeats)
        assert sink.packets_sent == 10  # (padding is not media: not in the sender's counts)
        # a gap: the subscriber NACKs it, it is answered; after a failed probe the NACKed
        # packets go again (`resend_nacked`)
        for seq in (3010, 3012):
            payload = bytes([0x10, seq % 256]) + bytes(1000)
            sink.drop = (lambda packet: packet.sequence_number == 3011) if seq == 3010 else None
            assert sink.write(sink.payload_type, 0, seq, seq * 3000, payload, None, stamp)
            if seq == 3010:
                assert sink.write(sink.payload_type, 0, 3011, 3011 * 3000, bytes(100), None, stamp)
        await until(lambda: sink.nacked >= 1, "a NACK for 3011", 10)
        count = len([p for p in received if p.sequence_number == 3011])
        assert sink.resend_nacked(within_s=5.0) == 1
        await until(
            lambda: len([p for p in received if p.sequence_number == 3011]) > count,
            "3011 again",
            10,
        )
        assert sink.resend_nacked(within_s=5.0) == 0  # (each once)
        # the receiver's reports say how far it got (a probe's evidence it was heard)
        await until(
            lambda: sink.reported_sequence_number == 3012, "a receiver report up to 3012", 10
        )
    finally:
        await node.close()
        await peer.close()
        adapter.set_host_addresses(None)


async def test_a_paced_sender_spreads_a_burst_at_its_rate():
    """Issue 14's weak link: `SenderTap.pace` spreads a keyframe-sized burst at the given
    rate, in order and whole, with fresh send times; unpaced again, what waits goes at once
    and later packets pass straight through."""
    adapter.set_host_addresses(["127.0.0.1"])
    node = RTCPeerConnection(adapter.rtc_configuration())
    peer = RTCPeerConnection(adapter.rtc_configuration())
    arrivals: list[tuple[float, RtpPacket]] = []
    try:
        sink = adapter.tap_sender(node.addTransceiver("video", direction="sendonly").sender)

        @peer.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            receiver = next(t.receiver for t in peer.getTransceivers() if t.receiver.track is track)
            adapter.tap_rtp(receiver, lambda packet: arrivals.append((time.monotonic(), packet)))

        await node.setLocalDescription(await node.createOffer())
        await peer.setRemoteDescription(node.localDescription)
        await peer.setLocalDescription(await peer.createAnswer())
        await node.setRemoteDescription(peer.localDescription)
        await asyncio.wait_for(sink.wait_ready(), 10)
        assert sink.payload_type is not None
        with pytest.raises(ValueError):
            sink.pace(0)
        rate = 200_000.0
        sink.pace(rate)
        stamp = adapter.send_stamp()
        burst = range(5000, 5020)  # 20 x 1 KB: 0.85 s at 200 kbit/s with the overhead
        started = time.monotonic()
        for seq in burst:
            payload = bytes([0x10, seq % 256]) + bytes(1000)
            assert sink.write(sink.payload_type, 0, seq, seq * 3000, payload, None, stamp)
        assert sink.packets_sent < 3  # the rest waits in the pacer
        await until(lambda: len(arrivals) >= 20, "the burst", 10)
        spread = arrivals[19][0] - started
        expected = 19 * (1002 + adapter.PACKET_OVERHEAD_BYTES) * 8 / rate
        assert spread >= expected - adapter.PACE_BURST_S - 0.05, (spread, expected)
        assert [p.sequence_number for _, p in arrivals] == list(burst)
        assert sink.packets_sent == 20 and sink.paced_packets >= 17
        assert sink.paced_wait_max_s >= expected - adapter.PACE_BURST_S - 0.05
        # each waiting packet got its own send time (abs-send-time), not the burst's
        sent_at = {p.extensions.abs_send_time for _, p in arrivals}
        assert len(sent_at) > 10

        # a second burst, then pacing off: what waits leaves at once
        for seq in range(5020, 5040):
            payload = bytes([0x10, seq % 256]) + bytes(1000)
            assert sink.write(sink.payload_type, 0, seq, seq * 3000, payload, None, stamp)
        flushed_at = time.monotonic()
        sink.pace(None)
        assert sink.packets_sent == 40
        await until(lambda: len(arrivals) >= 40, "the flushed rest", 10)
        assert arrivals[39][0] - flushed_at < 0.3
        assert [p.sequence_number for _, p in arrivals] == list(range(5000, 5040))
    finally:
        await node.close()
        await peer.close()
        adapter.set_host_addresses(None)
