"""Unit tests for the pure RTP rewriter and fan-out (node.media.forward)."""

from __future__ import annotations

from typing import Any

from aiortc.rtp import RtpPacket
from hypothesis import given
from hypothesis import strategies as st

from node.media.forward import (
    ByteBudget,
    Forwarder,
    KeyframeThrottle,
    SubscriberRewriter,
    h264_is_keyframe_start,
    keyframe_detector,
    vp8_is_keyframe_start,
)

PUB_SSRC = 0x11111111
PUB_PT = 96


def pkt(seq: int, ts: int, *, ssrc: int = PUB_SSRC, payload: bytes = b"\x00\x01", marker: int = 0):
    p = RtpPacket(payload_type=PUB_PT, marker=marker, sequence_number=seq, timestamp=ts, ssrc=ssrc)
    p.payload = payload
    return p


def rewriter(seq_base: int = 1000, ts_base: int = 50_000, **kw) -> SubscriberRewriter:
    return SubscriberRewriter(0xABCDEF01, 100, seq_base=seq_base, ts_base=ts_base, **kw)


class Recorded:
    """A sink that keeps what the forwarder wrote to it (the node's is adapter.SenderTap)."""

    def __init__(self, name: str) -> None:
        self.name: str = name
        self.writes: list[tuple[Any, ...]] = []

    def write(self, *fields: Any) -> bool:
        self.writes.append(fields)  # payload type, marker, number, timestamp, payload, ...
        return True

    def numbers(self) -> list[int]:
        return [write[2] for write in self.writes]


def test_first_packet_starts_at_subscriber_base_and_keeps_payload_marker_level():
    fwd: Forwarder[Recorded] = Forwarder()
    sink = Recorded("a")
    fwd.add(sink, rewriter())
    src = pkt(31_000, 7_000_000, marker=1, payload=b"payload")
    src.extensions.audio_level = (False, 30)
    stamp = object()
    assert fwd.forward(src, stamp) == 1
    [(payload_type, marker, seq, ts, payload, level, sent_stamp)] = sink.writes
    assert (seq, ts) == (1000, 50_000)
    assert (payload_type, marker) == (100, 1)
    assert payload is src.payload  # no copy of the payload
    assert level == (False, 30) and sent_stamp is stamp
    # the incoming packet is untouched (shared by every subscriber)
    assert (src.sequence_number, src.ssrc, src.payload_type) == (31_000, PUB_SSRC, PUB_PT)


def test_offsets_keep_gaps():
    rw = rewriter()
    outs = [rw.numbers(pkt(s, t)) for s, t in [(500, 9000), (501, 9000), (505, 12000)]]
    assert [o for o in outs if o] == [
        (1000, 50_000),
        (1001, 50_000),
        (1005, 53_000),
    ]


def first_number(rw: SubscriberRewriter) -> int:
    numbers = rw.numbers(pkt(10, 10))
    assert numbers is not None
    return numbers[0]


def test_random_bases_differ_per_subscriber():
    bases = {first_number(SubscriberRewriter(1, 100)) for _ in range(20)}
    assert len(bases) > 1
    assert all(b < 0x8000 for b in bases)


def test_sequence_wraparound_of_input_and_output():
    rw = rewriter(seq_base=65_534)
    seqs = [65_533, 65_534, 65_535, 0, 1, 2]
    outs = [rw.numbers(pkt(s, 0)) for s in seqs]
    assert [o[0] for o in outs if o] == [65_534, 65_535, 0, 1, 2, 3]


def test_timestamp_wraparound():
    rw = rewriter(ts_base=0xFFFF_FF00)
    a = rw.numbers(pkt(1, 100))
    b = rw.numbers(pkt(2, 100 + 0x200))
    assert a is not None and b is not None
    assert a[1] == 0xFFFF_FF00
    assert b[1] == 0x100


def test_many_wraps_no_drops():
    rw = rewriter(seq_base=10)
    for i in range(300):  # 300 * 1000 sequence numbers: several 16-bit wraps
        out = rw.numbers(pkt((40_000 + i * 1000) & 0xFFFF, i * 3000))
        assert out is not None
        assert out[0] == (10 + i * 1000) & 0xFFFF


def test_reordered_kept_and_packets_before_start_dropped():
    rw = rewriter()
    assert rw.numbers(pkt(100, 0)) is not None
    assert rw.numbers(pkt(103, 0)) is not None
    late = rw.numbers(pkt(101, 0))  # reordered, after the start: kept with its own number
    assert late is not None and late[0] == 1001
    assert rw.numbers(pkt(99, 0)) is None  # older than the subscriber's first packet


def test_reordered_across_wrap_before_start_dropped():
    rw = rewriter()
    assert rw.numbers(pkt(1, 0)) is not None
    assert rw.numbers(pkt(65_535, 0)) is None


def test_nack_mapping_roundtrip():
    rw = rewriter(seq_base=3)
    rw.numbers(pkt(65_000, 0))
    assert rw.to_subscriber_seq(65_000) == 3
    assert rw.to_subscriber_seq(2) == (3 + 538) & 0xFFFF
    for s in (0, 1, 65_535, 12_345):
        assert rw.to_publisher_seq(rw.to_subscriber_seq(s)) == s


def test_source_switch_continues_numbering():
    rw = rewriter(switch_ts_step=3000)
    rw.numbers(pkt(10, 1000))
    last = rw.numbers(pkt(11, 4000))
    assert last is not None
    new = rw.numbers(pkt(60_000, 123, ssrc=0x2222))
    assert new is not None
    assert new[0] == last[0] + 1
    assert new[1] == last[1] + 3000
    assert rw.numbers(pkt(12, 7000)) is None  # late packet of the old source


@given(
    start=st.integers(0, 0xFFFF),
    seq_base=st.integers(0, 0xFFFF),
    steps=st.lists(st.integers(-200, 400), min_size=1, max_size=200),
)
def test_renumbering_is_a_fixed_shift_from_the_first_packet(start, seq_base, steps):
    """Any walk of publisher numbers (gaps, reordering, wraps): every packet kept gets
    publisher + offset (mod 2^16), the offset fixed by the first; NACKs map back exactly;
    nothing older than the first packet is sent."""
    rw = rewriter(seq_base=seq_base)
    assert rw.numbers(pkt(start, 0)) == (seq_base, 50_000)
    position = 0  # publisher numbers relative to the first, unwrapped
    newest = 0
    for step in steps:
        position = max(position + step, newest - 0x7FFF)  # within half the number space
        newest = max(newest, position)
        seq = (start + position) & 0xFFFF
        out = rw.numbers(pkt(seq, 0))
        if position < 0:
            assert out is None
        else:
            assert out is not None and out[0] == (seq_base + position) & 0xFFFF
            assert rw.to_publisher_seq(out[0]) == seq


def test_vp8_keyframe_detection():
    assert vp8_is_keyframe_start(b"\x10\x00\x00\x00")  # S=1, PID=0, P=0
    assert not vp8_is_keyframe_start(b"\x10\x01\x00")  # interframe
    assert not vp8_is_keyframe_start(b"\x00\x00\x00")  # not a partition start
    assert not vp8_is_keyframe_start(b"\x11\x00")  # partition 1
    # X, I with a 15-bit picture id (what aiortc sends), then the VP8 header
    assert vp8_is_keyframe_start(b"\x90\x80\x81\x02\x00\x00")
    assert not vp8_is_keyframe_start(b"\x90\x80\x81\x02\x01\x00")
    # X with I (7 bit), L and T/K
    assert vp8_is_keyframe_start(b"\x90\xe0\x05\x07\x20\x00")
    assert not vp8_is_keyframe_start(b"\x90\x80")
    assert not vp8_is_keyframe_start(b"")


def test_h264_keyframe_detection():
    assert h264_is_keyframe_start(b"\x65\x88")  # IDR
    assert h264_is_keyframe_start(b"\x67\x42")  # SPS
    assert not h264_is_keyframe_start(b"\x41\x9a")  # non-IDR slice
    assert h264_is_keyframe_start(b"\x18\x00\x02\x67\x42\x00\x02\x68\xce")  # STAP-A SPS+PPS
    assert not h264_is_keyframe_start(b"\x18\x00\x02\x41\x9a")
    assert h264_is_keyframe_start(b"\x7c\x85\x00")  # FU-A start of IDR
    assert not h264_is_keyframe_start(b"\x7c\x05\x00")  # FU-A continuation
    assert keyframe_detector("video/VP8") is vp8_is_keyframe_start
    assert keyframe_detector("audio/opus") is None


def test_keyframe_throttle():
    t = KeyframeThrottle(0.5)
    assert t.allow(10.0)
    assert not t.allow(10.2)
    assert t.allow(10.6)
    assert t.suppressed == 1


def test_forwarder_fans_out_and_waits_for_keyframe():
    fwd: Forwarder[Recorded] = Forwarder(vp8_is_keyframe_start)
    a, b = Recorded("a"), Recorded("b")
    fwd.add(a, SubscriberRewriter(0xA, 100, seq_base=0, ts_base=0))
    delta = b"\x10\x01\x00"
    key = b"\x10\x00\x00"
    assert fwd.forward(pkt(1, 0, payload=delta), None) == 0
    assert fwd.waiting == {a}
    assert fwd.forward(pkt(2, 3000, payload=key), None) == 1
    assert a.numbers() == [0]
    fwd.add(b, SubscriberRewriter(0xB, 101, seq_base=500, ts_base=0))
    assert fwd.forward(pkt(3, 3000, payload=delta), None) == 1
    assert (a.numbers(), b.numbers()) == ([0, 1], [])
    assert fwd.forward(pkt(4, 6000, payload=key), None) == 2
    assert [w[:3] for w in a.writes[-1:] + b.writes] == [(100, 0, 2), (101, 0, 500)]
    assert fwd.remove(a) is not None
    assert fwd.forward(pkt(5, 6000, payload=delta), None) == 1
    assert (len(a.writes), b.numbers()) == (3, [500, 501])
    assert len(fwd) == 1 and b in fwd and a not in fwd
    assert fwd.packets_in == 5 and fwd.packets_out == 5 and fwd.dropped_waiting == 2


def test_forwarder_counts_only_the_copies_a_sink_took():
    class Refusing(Recorded):
        def write(self, *fields: Any) -> bool:
            super().write(*fields)
            return False

    fwd: Forwarder[Recorded] = Forwarder()
    fwd.add(Recorded("ok"), SubscriberRewriter(0x1, 111, seq_base=7, ts_base=0))
    fwd.add(Refusing("closed"), SubscriberRewriter(0x2, 111, seq_base=7, ts_base=0))
    assert fwd.forward(pkt(9, 0), None) == 1
    assert fwd.packets_out == 1


def test_forwarder_without_detector_starts_immediately():
    fwd: Forwarder[Recorded] = Forwarder()
    sink = Recorded("one")
    fwd.add(sink, SubscriberRewriter(0x1, 111, seq_base=7, ts_base=0))
    assert fwd.forward(pkt(9, 0), None) == 1
    assert sink.numbers() == [7]


# --------------------------------------------------------------------------- budget


def test_budget_allows_its_rate_and_refuses_the_excess() -> None:
    budget = ByteBudget(80_000, burst_s=1.0)  # 10 000 bytes/s, 10 000 bytes of burst
    assert budget.allow(10_000, 0.0)
    assert not budget.allow(1, 0.0)
    # Half a second refills 5 000 bytes: one 4 000-byte packet fits, a second does not.
    assert budget.allow(4_000, 0.5)
    assert not budget.allow(4_000, 0.5)
    assert budget.refused == 2
    # Never more than the burst, however long the pause.
    assert budget.allow(10_000, 100.0)
    assert not budget.allow(1, 100.0)


def test_budget_over_time_passes_about_its_rate() -> None:
    budget = ByteBudget(800_000)  # 100 000 bytes/s
    passed = sum(1000 for i in range(10_000) if budget.allow(1000, i * 0.001))  # 1 MB/s offered
    # 10 s at 100 kB/s plus the initial 100 kB burst
    assert 1_000_000 <= passed <= 1_100_000
