"""Simulcast layer switching in the pure forwarding core (node.media.forward.LayerRewriter):
the subscriber's stream stays one continuous RTP stream across switches, under
hypothesis-generated packet orders and losses."""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass
from typing import Any, TypeVar

from hypothesis import example, given, settings
from hypothesis import strategies as st

from node.media.choice import LayerChoice, View, choose_layer
from node.media.forward import (
    SEQ_MASK,
    TS_MASK,
    LayerRewriter,
    vp8_ids,
    vp8_is_keyframe_start,
    vp8_keyframe_size,
    vp8_rewrite_ids,
)


def vp8_payload(pid: int, tl0: int, keyframe: bool, start: bool, size: tuple[int, int]) -> bytes:
    """A VP8 RTP payload: descriptor with a 15-bit picture id and TL0PICIDX; a keyframe's
    first packet carries the frame header (tag, start code, width, height)."""
    descriptor = bytes([0x90 if start else 0x80, 0xC0, 0x80 | (pid >> 8), pid & 0xFF, tl0])
    if not start:
        return descriptor + b"\x11\x22"
    if keyframe:
        width, height = size
        return (
            descriptor
            + b"\x50\x02\x00\x9d\x01\x2a"
            + width.to_bytes(2, "little")
            + height.to_bytes(2, "little")
        )
    return descriptor + b"\x51\x02\x00\x33"


P = TypeVar("P")


@dataclass(frozen=True)
class Sent:
    layer: int
    seq: int
    ts: int
    marker: int
    payload: bytes
    keyframe: bool
    at: float
    index: int  # position in publication order


SIZES = ((320, 180), (640, 360), (1280, 720))


def publish(frames: int, keyframes: list[set[int]], bases: list[tuple[int, int, int, int]]):
    """Three layers' packets in the order the publisher sends them (frame by frame)."""
    out: list[Sent] = []
    seqs = [b[0] for b in bases]
    for frame in range(frames):
        at = frame / 30
        for layer in range(3):
            _seq_base, ts_base, pid_base, tl0_base = bases[layer]
            key = frame == 0 or frame in keyframes[layer]
            count = layer + 1  # bigger layers, more packets per frame
            for part in range(count):
                payload = vp8_payload(
                    (pid_base + frame) & 0x7FFF,
                    (tl0_base + frame) & 0xFF,
                    key,
                    part == 0,
                    SIZES[layer],
                )
                out.append(
                    Sent(
                        layer,
                        seqs[layer] & SEQ_MASK,
                        (ts_base + 3000 * frame) & TS_MASK,
                        int(part == count - 1),
                        payload + len(out).to_bytes(3, "big"),  # (which packet it is)
                        key and part == 0,
                        at,
                        len(out),
                    )
                )
                seqs[layer] += 1
    return out


def shuffle(packets: list[P], swaps: list[tuple[int, int]]) -> list[P]:
    """Reorder: each swap moves a packet up to 6 places later (test_temporal's too)."""
    order = list(packets)
    for position, distance in swaps:
        i = position % len(order)
        j = min(len(order) - 1, i + distance)
        order.insert(j, order.pop(i))
    return order


layer_bases = st.tuples(
    st.integers(0, SEQ_MASK), st.integers(0, TS_MASK), st.integers(0, 0x7FFF), st.integers(0, 255)
)
#: a `publish` of up to 40 frames (the three layers' keyframes beyond frame 0's, their
#: numbering bases), reordered (`shuffle`) and some packets lost: `@given(**published, ...)`
published = {
    "frames": st.integers(10, 40),
    "keyframes": st.lists(st.sets(st.integers(1, 39), max_size=6), min_size=3, max_size=3),
    "bases": st.lists(layer_bases, min_size=3, max_size=3),
    "swaps": st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 6)), max_size=30),
    "losses": st.sets(st.integers(0, 10_000), max_size=8),
}


def run(
    order: list[Sent], targets: dict[int, int | None], first: int
) -> list[tuple[int, int, int, bytes, int]]:
    rewriter = LayerRewriter(0xABCD, 100, seq_base=4000, ts_base=123)
    rewriter.set_target(first)
    emitted = []
    # each layer's latest packets, as the Forwarder keeps them for its rewriters
    recent: dict[int, deque[tuple[int, int, int, bytes]]] = {}
    for step, packet in enumerate(order):
        if step in targets:
            rewriter.set_target(targets[step])
        window = recent.setdefault(packet.layer, deque(maxlen=LayerRewriter.PENDING))
        window.append((packet.seq, packet.ts, packet.marker, packet.payload))
        for seq, ts, marker, payload in rewriter.rewrite(
            packet.layer,
            packet.seq,
            packet.ts,
            packet.marker,
            packet.payload,
            packet.keyframe,
            packet.at,
            window,
        ):
            emitted.append((seq, ts, marker, payload, int.from_bytes(payload[-3:], "big")))
    return emitted


def unwrap(values: list[int], mask: int) -> list[int]:
    out = [values[0]]
    half = (mask + 1) // 2
    for value in values[1:]:
        delta = (value - out[-1]) & mask
        out.append(out[-1] + (delta if delta < half else delta - mask - 1))
    return out


@settings(max_examples=150, deadline=None)
# A keyframe's second packet arrives first, while the subscriber still takes layer 0; it
# asks for layer 1 just before the keyframe's start comes (it was dropped: a gap at 4002).
@example(
    frames=10,
    keyframes=[set(), set(), set()],
    bases=[(0, 0, 0, 0)] * 3,
    swaps=[(1, 1)],
    losses=set(),
    switches={2: 1},
    first=0,
)
@given(
    **published,
    switches=st.dictionaries(
        st.integers(0, 300), st.one_of(st.none(), st.integers(0, 2)), max_size=6
    ),
    first=st.integers(0, 2),
)
def test_switches_keep_one_continuous_stream(
    frames: int,
    keyframes: list[set[int]],
    bases: list[tuple[int, int, int, int]],
    swaps: list[tuple[int, int]],
    losses: set[int],
    switches: dict[int, int | None],
    first: int,
) -> None:
    packets = publish(frames, keyframes, bases)
    order = shuffle(packets, swaps)
    lost = {i % len(packets) for i in losses}
    delivered = [p for p in order if p.index not in lost]
    emitted = run(delivered, switches, first)
    if not emitted:
        return
    seqs = [e[0] for e in emitted]
    # one number per packet: nothing sent twice, no two packets under one number
    assert len(set(seqs)) == len(seqs)
    assert len({e[4] for e in emitted}) == len(emitted)
    by_seq = sorted(zip(unwrap(seqs, SEQ_MASK), emitted, strict=True), key=lambda x: x[0])
    # the stream starts where the subscriber's numbering starts, at a keyframe
    assert by_seq[0][0] == 4000
    assert vp8_is_keyframe_start(by_seq[0][1][3])
    span = by_seq[-1][0] - by_seq[0][0] + 1
    missing = span - len(by_seq)
    # every gap a receiver sees is a packet the publisher lost: switching opens none
    assert missing <= len(lost)
    if not lost:
        assert missing == 0
    # timestamps never go back, picture ids step by at most the frames lost
    stamps = unwrap([e[1] for _, e in by_seq], TS_MASK)
    assert all(b >= a for a, b in itertools.pairwise(stamps))
    pids = [vp8_ids(e[3])[0] or 0 for _, e in by_seq]
    steps = [(b - a) & 0x7FFF for a, b in itertools.pairwise(pids)]
    assert all(step <= 1 + len(lost) for step in steps)
    if not lost:
        assert all(step in (0, 1) for step in steps)
        tl0s = [vp8_ids(e[3])[2] or 0 for _, e in by_seq]
        assert all((b - a) & 0xFF in (0, 1) for a, b in itertools.pairwise(tl0s))


def test_switch_up_waits_for_the_targets_keyframe() -> None:
    packets = publish(12, [set(), set(), {6}], [(100, 0, 5, 1), (200, 0, 50, 2), (300, 0, 9, 3)])
    emitted = run(packets, {0: 0, 20: 2}, 0)
    layers = [packets[e[4]].layer for e in emitted]
    # layer 0 until layer 2's keyframe at frame 6, then layer 2 only
    switch = layers.index(2)
    assert set(layers[:switch]) == {0} and set(layers[switch:]) == {2}
    assert packets[emitted[switch][4]].keyframe
    assert vp8_keyframe_size(emitted[switch][3]) == (1280, 720)


def test_pause_and_resume_continue_the_numbers() -> None:
    packets = publish(12, [{8}, set(), set()], [(100, 0, 5, 1), (200, 0, 50, 2), (300, 0, 9, 3)])
    # paused during frame 1, asked again during frame 5: back at frame 8's keyframe
    emitted = run(packets, {8: None, 33: 0}, 0)
    seqs = [e[0] for e in emitted]
    assert seqs == list(range(4000, 4000 + len(seqs)))
    frames = sorted({round(packets[e[4]].at * 30) for e in emitted})
    assert frames == [0, 1, 8, 9, 10, 11]
    pids = [vp8_ids(e[3])[0] for e in emitted]
    assert pids == [5, 6, 7, 8, 9, 10]


def test_rewrite_ids_wraps() -> None:
    payload = vp8_payload(0x7FFE, 255, False, True, (0, 0))
    pid, mask, tl0, _ = vp8_ids(vp8_rewrite_ids(payload, 3, 2))
    assert (pid, mask, tl0) == (1, 0x7FFF, 1)


RATES = [150_000.0, 500_000.0, 1_500_000.0]
HEIGHTS = [180, 360, 720]


def choose(**kw: Any) -> LayerChoice:
    args: dict[str, Any] = {
        "estimate_bps": None,
        "loss": 0.0,
        "current": 2,
        "view": None,
        "cap": 2,
    }
    args.update(kw)
    rates = args.pop("rates", RATES)
    return choose_layer(rates, HEIGHTS, **args)


def test_choice_is_the_lowest_of_bandwidth_view_and_cap() -> None:
    assert choose() == LayerChoice(2, "top")
    assert choose(view=View(320, 180)) == LayerChoice(0, "view")
    assert choose(view=View(640, 360)) == LayerChoice(1, "view")
    assert choose(view=View(1920, 1080)) == LayerChoice(2, "top")
    assert choose(estimate_bps=800_000) == LayerChoice(1, "bandwidth")
    assert choose(estimate_bps=800_000, view=View(320, 180)) == LayerChoice(0, "view")
    assert choose(cap=1) == LayerChoice(1, "cap")
    assert choose(loss=0.2, current=2) == LayerChoice(1, "bandwidth")
    # a layer not being received is never chosen
    assert choose(rates=[150_000.0, 500_000.0, None]) == LayerChoice(1, "top")


def test_no_video_when_hidden_or_nothing_fits() -> None:
    assert choose(view=View(320, 180, visible=False)) == LayerChoice(None, "hidden")
    assert choose(estimate_bps=100_000, probe=False) == LayerChoice(None, "bandwidth")
    assert choose(loss=0.3, current=0, probe=False) == LayerChoice(None, "bandwidth")
    # unless it may try again: then the lowest layer (a paused stream has no estimate)
    assert choose(estimate_bps=100_000) == LayerChoice(0, "bandwidth")


def test_an_estimate_covering_the_current_layer_tries_the_next() -> None:
    # a receiver's estimate stays near what it gets: 200 kbit/s on the 150 kbit/s layer
    assert choose(estimate_bps=200_000, current=0) == LayerChoice(1, "bandwidth")
    assert choose(estimate_bps=600_000, current=1) == LayerChoice(2, "top")
    # held off after a step down, or under loss: no climbing
    assert choose(estimate_bps=200_000, current=0, probe=False) == LayerChoice(0, "bandwidth")
    assert choose(estimate_bps=200_000, current=0, loss=0.15, probe=False) == LayerChoice(
        None, "bandwidth"
    )
    # an estimate below the current layer's rate: down to what fits
    assert choose(estimate_bps=400_000, current=2) == LayerChoice(0, "bandwidth")
    # just stepped up: the lagging estimate alone does not take it down again; loss does
    assert choose(estimate_bps=700_000, current=2, settling=True) == LayerChoice(2, "top")
    assert choose(estimate_bps=700_000, current=2, settling=True, loss=0.2) == LayerChoice(
        1, "bandwidth"
    )
    # an estimate just above the current layer's rate keeps it (the headroom is for going up)
    assert choose(estimate_bps=520_000, current=1, probe=False) == LayerChoice(1, "bandwidth")
    assert choose(estimate_bps=450_000, current=1, probe=False) == LayerChoice(0, "bandwidth")
    # a layer costs at least what a lower one does: a new layer's low first rate is no bargain
    assert choose(
        estimate_bps=480_000, current=0, probe=False, rates=[400_000.0, 500_000.0, 40_000.0]
    ) == LayerChoice(0, "bandwidth")


def test_target_packets_ahead_of_its_keyframe_start_are_not_lost() -> None:
    packets = publish(12, [set(), set(), {6}], [(100, 0, 5, 1), (200, 0, 50, 2), (300, 0, 9, 3)])
    key = next(p for p in packets if p.layer == 2 and p.keyframe and p.at > 0)
    order = list(packets)
    # the keyframe's first packet arrives after the rest of its frame
    order.insert(order.index(key) + 2, order.pop(order.index(key)))
    emitted = run(order, {0: 0, 20: 2}, 0)
    seqs = sorted(e[0] for e in emitted)
    assert seqs == list(range(4000, 4000 + len(seqs)))
    assert sum(1 for e in emitted if packets[e[4]].layer == 2 and packets[e[4]].at == key.at) == 3
