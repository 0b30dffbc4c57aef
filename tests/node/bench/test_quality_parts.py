"""`sfumesh bench quality`'s parts without a lab: the subscriber's stand-in for a decoder
(`FrameTracker`: complete and decodable frames from RTP alone) and each figure's definition
(kbit/s, fps, freezes, the layer's height, recovery)."""

from __future__ import annotations

from node.bench.quality import Received, fps, freezes, kbps, recovery, series, typical_height
from node.bench.quality_peer import FrameTracker


def vp8(start: bool, keyframe: bool = False, size: tuple[int, int] = (320, 180)) -> bytes:
    """A VP8 RTP payload: a 15-bit picture id descriptor; a keyframe's first packet carries
    the frame header (tag, start code, width, height)."""
    descriptor = bytes([0x90 if start else 0x80, 0x80, 0x80, 0x01])
    if start and keyframe:
        width, height = size
        return (
            descriptor
            + b"\x50\x02\x00\x9d\x01\x2a"
            + width.to_bytes(2, "little")
            + height.to_bytes(2, "little")
        )
    return descriptor + (b"\x51\x02\x00\x33" if start else b"\x11\x22")


def frames(count: int, first_seq: int = 65530, per_frame: int = 3, keyframes=None):
    """Packets (seq, ts, marker, payload) of `count` frames, sequence numbers wrapping."""
    keyframes = {0} if keyframes is None else keyframes
    out = []
    seq = first_seq
    for frame in range(count):
        for part in range(per_frame):
            payload = vp8(part == 0, frame in keyframes, (1280, 720))
            out.append((seq & 0xFFFF, 1000 + 3000 * frame, int(part == per_frame - 1), payload))
            seq += 1
    return out


def feed(tracker: FrameTracker, packets, start: float = 0.0, step: float = 0.01) -> None:
    for index, (seq, ts, marker, payload) in enumerate(packets):
        tracker.add(seq, ts, marker, payload, start + index * step)


def test_complete_frames_decode_in_order_across_a_sequence_wrap() -> None:
    tracker = FrameTracker()
    feed(tracker, frames(5))
    assert len(tracker.decoded) == 5
    assert [height for _, _, height in tracker.decoded] == [720, None, None, None, None]
    assert all(size > 0 for _, size, _ in tracker.decoded)


def test_a_lost_packet_stops_decoding_until_its_retransmission_or_a_keyframe() -> None:
    packets = frames(8, keyframes={0, 6})
    lost = packets[4]  # frame 1's middle packet
    tracker = FrameTracker()
    feed(tracker, [p for p in packets[:12] if p is not lost])  # frames 0-3
    assert len(tracker.decoded) == 1  # frame 0 only: 1 is incomplete, 2-3 lack their reference
    assert not tracker.stalled(0.2)  # (not yet STALL_S since frame 0)
    assert tracker.stalled(0.55)
    seq, ts, marker, payload = lost
    tracker.add(seq, ts, marker, payload, 0.6)  # the retransmission: 1, 2 and 3 decode at once
    assert len(tracker.decoded) == 4 and tracker.decoded[-1][0] == 0.6
    # frame 4 never complete: 5 waits; the keyframe 6 decodes and skips past the hole
    rest = [p for p in packets[12:] if p is not packets[13]]
    feed(tracker, rest, start=1.0)
    assert len(tracker.decoded) == 6
    assert tracker.decoded[-2][2] == 720  # the keyframe
    # a late copy of a decoded frame's packet changes nothing
    seq, ts, marker, payload = packets[0]
    tracker.add(seq, ts, marker, payload, 2.0)
    assert len(tracker.decoded) == 6


def test_without_a_keyframe_nothing_decodes() -> None:
    tracker = FrameTracker()
    feed(tracker, frames(4, keyframes=set()))
    assert tracker.decoded == []
    assert tracker.stalled(0.6)


def received(frames_at: list[float], height: int | None = 360, bins: dict[int, int] | None = None):
    out = Received(bin_s=0.25, bins=bins or {})
    out.frames = [(t, 1000, height if i == 0 else None) for i, t in enumerate(frames_at)]
    return out


def test_figures_of_one_subscriber() -> None:
    # 30 fps for 10 s, except a 1.5 s gap from 4.0 s
    times = [i / 30 for i in range(300) if not 4.0 <= i / 30 < 5.5]
    # 2,500 bytes per 0.25 s bin: 80 kbit/s
    r = received(times, bins={k: 2500 for k in range(40)})
    assert kbps(r, 0.0, 10.0) == 80.0
    assert kbps(r, 2.0, 4.0) == 80.0
    assert 24.9 < fps(r, 0.0, 10.0) < 25.6
    gaps = freezes(r, 0.0, 10.0)
    assert len(gaps) == 1 and abs(gaps[0] - 1.5) < 0.04
    assert freezes(r, 6.0, 10.0) == []
    # nothing at all in a window is one freeze as long as the window
    assert freezes(received([]), 1.0, 3.5) == [2.5]
    assert typical_height(r, 0.0, 10.0) == 360
    assert series(r, 0.0, 3.0) == [(0.0, 80.0), (1.0, 80.0), (2.0, 80.0)]


def test_recovery_is_the_first_top_keyframe_or_the_top_rate() -> None:
    r = Received(bin_s=0.25)
    r.frames = [(1.0, 100, 180), (12.5, 100, 720)]
    assert recovery(r, 10.0, 720, 0.0, 20.0) == 2.5
    assert recovery(r, 10.0, 720, 0.0, 12.0) is None  # not by then
    # or by rate: 1,500 kbit/s wanted, 90% reached over the second from 14.0 s
    r.bins = {int(14.0 / 0.25) + k: 1500 * 1000 // 8 // 4 for k in range(8)}
    assert recovery(r, 10.0, None, 1500.0, 20.0) == 5.0
    assert recovery(r, 10.0, 720, 1500.0, 20.0) == 2.5
