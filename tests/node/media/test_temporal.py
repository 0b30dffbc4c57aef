"""VP8 temporal layers in the pure forwarding core (node.media.forward): the descriptor's
TID / Y / TL0PICIDX are read, and a subscriber given a temporal target gets whole frames of
the layers it asked for as one continuous stream (sequence numbers and picture ids close up
over the frames left out, every frame it gets can be decoded), under hypothesis-generated
temporal and spatial switches, reorderings and losses."""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, cast

from hypothesis import given, settings
from hypothesis import strategies as st

from node.config import MediaSettings
from node.media.choice import LayerChoice, TemporalRates, View, choose_temporal
from node.media.forward import (
    SEQ_MASK,
    TS_MASK,
    LayerRewriter,
    vp8_ids,
    vp8_is_keyframe_start,
    vp8_rewrite_ids,
    vp8_temporal,
)
from node.media.session import MediaHub, Published, Subscription
from node.state.hub import Connection
from tests.node.media.test_allocation import RATES, Sink, Tap, Transceiver
from tests.node.media.test_layers import shuffle, unwrap

#: L1T3's temporal pattern (what libvpx and Chromium send)
TIDS = (0, 2, 1, 2)
SIZES = ((320, 180), (640, 360), (1280, 720))


def descriptor(
    pid: int | None,
    tl0: int | None,
    tid: int | None,
    sync: bool,
    start: bool,
    keyidx: int = 0,
    long: bool = True,
) -> bytes:
    """A VP8 payload descriptor; the picture id in 15 bits (as Chromium sends it), or in
    7 when it fits and not `long`."""
    ext = (0x80 if pid is not None else 0) | (0x40 if tl0 is not None else 0)
    ext |= 0x20 if tid is not None else 0
    out = bytes([0x90 if start else 0x80, ext])
    if pid is not None:
        out += bytes([0x80 | (pid >> 8), pid & 0xFF]) if long or pid > 0x7F else bytes([pid])
    if tl0 is not None:
        out += bytes([tl0])
    if tid is not None:
        out += bytes([(tid << 6) | (0x20 if sync else 0) | keyidx])
    return out


@given(
    pid=st.one_of(st.none(), st.integers(0, 0x7FFF)),
    tl0=st.one_of(st.none(), st.integers(0, 255)),
    tid=st.one_of(st.none(), st.integers(0, 3)),
    sync=st.booleans(),
    keyidx=st.integers(0, 31),
    long=st.booleans(),
    body=st.binary(max_size=8),
)
def test_descriptor_fields_read_back(
    pid: int | None,
    tl0: int | None,
    tid: int | None,
    sync: bool,
    keyidx: int,
    long: bool,
    body: bytes,
) -> None:
    payload = descriptor(pid, tl0, tid, sync, True, keyidx, long) + b"\x51\x02\x00" + body
    temporal = vp8_temporal(payload)
    if tid is None:
        assert temporal is None
    else:
        assert temporal == (tid, sync, tl0)
    read_pid, _, read_tl0, _ = vp8_ids(payload)
    assert read_pid == pid
    assert read_tl0 == tl0
    # shifting the ids keeps the temporal fields
    assert vp8_temporal(vp8_rewrite_ids(payload, 5, 7)) == (
        None if tid is None else (tid, sync, None if tl0 is None else (tl0 + 7) & 0xFF)
    )


def test_no_t_bit_no_temporal_fields() -> None:
    assert vp8_temporal(b"") is None
    assert vp8_temporal(b"\x10\x00\x00") is None  # no extension octet
    assert vp8_temporal(descriptor(5, 9, None, False, True) + b"\x00") is None
    assert vp8_temporal(bytes([0x80, 0x20])) is None  # cut short


@dataclass(frozen=True)
class Packet:
    layer: int
    seq: int
    ts: int
    marker: int
    payload: bytes
    keyframe: bool
    frame: int
    tid: int
    index: int  # position in publication order


def frame_refs(frame: int, keyframes: set[int], unsynced: set[int]) -> set[int]:
    """The frames `frame` refers to in the L1T3 pattern: a sync frame (Y) only to TID 0,
    any other also to the latest frame of its own layer (never across a keyframe)."""
    phase = frame % 4
    if phase == 0:
        return set() if frame == 0 or frame in keyframes else {frame - 4}
    if phase == 3:
        refs = {frame - 1, frame - 3}
    elif frame in unsynced:
        refs = {frame - phase, frame - 2 if phase == 1 else frame - 4}
    else:
        refs = {frame - phase}
    start = max(k for k in {0, *keyframes} if k <= frame and k % 4 == 0)
    return {r for r in refs if r >= start}


def publish(
    frames: int,
    layers: int,
    keyframes: list[set[int]],
    bases: list[tuple[int, int, int, int]],
    unsynced: set[int],
    parts: list[int],
) -> list[Packet]:
    """`layers` simulcast layers of L1T3, frame by frame (keyframes only at TID 0). A sync
    frame (Y) refers only to TID 0; `unsynced` frames have their Y bit cleared (allowed:
    the bit is a promise, never a duty)."""
    out: list[Packet] = []
    seqs = [b[0] for b in bases]
    for frame in range(frames):
        tid = TIDS[frame % 4]
        for layer in range(layers):
            _, ts_base, pid_base, tl0_base = bases[layer]
            key = frame == 0 or (frame % 4 == 0 and frame in keyframes[layer])
            sync = frame % 4 in (1, 2) and frame not in unsynced
            tl0 = (tl0_base + frame // 4) & 0xFF
            count = parts[(frame * 3 + layer) % len(parts)]
            for part in range(count):
                head = descriptor((pid_base + frame) & 0x7FFF, tl0, tid, sync, part == 0)
                if part:
                    body = b"\x11\x22"
                elif key:
                    width, height = SIZES[layer]
                    body = (
                        b"\x50\x02\x00\x9d\x01\x2a"
                        + width.to_bytes(2, "little")
                        + height.to_bytes(2, "little")
                    )
                else:
                    body = b"\x51\x02\x00\x33"
                out.append(
                    Packet(
                        layer,
                        seqs[layer] & SEQ_MASK,
                        (ts_base + 3000 * frame) & TS_MASK,
                        int(part == count - 1),
                        head + body + len(out).to_bytes(3, "big"),
                        key and part == 0,
                        frame,
                        tid,
                        len(out),
                    )
                )
                seqs[layer] += 1
    return out


@dataclass(frozen=True)
class Out:
    seq: int
    ts: int
    payload: bytes
    source: Packet
    target: int  # the temporal target when it went out


def run(
    order: list[Packet],
    spatial: dict[int, int | None],
    temporal: dict[int, int | None],
    first: int,
    first_tid: int | None,
) -> list[Out]:
    by_index = {p.index: p for p in order}
    rewriter = LayerRewriter(0xABCD, 100, seq_base=4000, ts_base=123)
    rewriter.set_target(first)
    rewriter.set_temporal_target(first_tid)
    emitted: list[Out] = []
    recent: dict[int, deque[tuple[int, int, int, bytes]]] = {}
    for step, packet in enumerate(order):
        if step in spatial:
            rewriter.set_target(spatial[step])
        if step in temporal:
            rewriter.set_temporal_target(temporal[step])
        window = recent.setdefault(packet.layer, deque(maxlen=LayerRewriter.PENDING))
        window.append((packet.seq, packet.ts, packet.marker, packet.payload))
        wanted = rewriter.temporal_target
        for seq, ts, _marker, payload in rewriter.rewrite(
            packet.layer,
            packet.seq,
            packet.ts,
            packet.marker,
            packet.payload,
            packet.keyframe,
            step / 100,
            window,
        ):
            source = by_index[int.from_bytes(payload[-3:], "big")]
            emitted.append(Out(seq, ts, payload, source, 3 if wanted is None else wanted))
    return emitted


layer_bases = st.tuples(
    st.integers(0, SEQ_MASK), st.integers(0, TS_MASK), st.integers(0, 0x7FFF), st.integers(0, 255)
)
targets = st.dictionaries(st.integers(0, 400), st.one_of(st.none(), st.integers(0, 2)), max_size=8)


def check(
    packets: list[Packet],
    delivered: list[Packet],
    emitted: list[Out],
    keyframes: list[set[int]],
    unsynced: set[int],
    in_order: bool,
    whole: bool = True,
) -> None:
    if not emitted:
        return
    lost = len(packets) - len(delivered)
    seqs = [e.seq for e in emitted]
    # one number per packet, nothing sent twice
    assert len(set(seqs)) == len(seqs)
    assert len({e.source.index for e in emitted}) == len(emitted)
    by_seq = sorted(zip(unwrap(seqs, SEQ_MASK), emitted, strict=True), key=lambda x: x[0])
    assert by_seq[0][0] == 4000
    assert vp8_is_keyframe_start(by_seq[0][1].payload)
    # whole frames only: every packet of a frame that went out, as far as it arrived (a
    # spatial switch or pause cuts the old layer's frame: not this one's doing)
    arrived: dict[tuple[int, int], int] = {}
    for p in delivered:
        arrived[(p.layer, p.frame)] = arrived.get((p.layer, p.frame), 0) + 1
    sent: dict[tuple[int, int], int] = {}
    for e in emitted:
        key = (e.source.layer, e.source.frame)
        sent[key] = sent.get(key, 0) + 1
    if whole:
        assert all(sent[key] == arrived[key] for key in sent)
    # packets the publisher lost, or, after a reordering, of a frame left out once later
    # numbers were out: the only gaps a receiver sees
    span = by_seq[-1][0] - by_seq[0][0] + 1
    missing = span - len(by_seq)
    late = sum(
        1
        for i, p in enumerate(delivered)
        if any(q.layer == p.layer and q.index > p.index for q in delivered[:i])
    )
    assert missing <= lost + late
    stamps = unwrap([e.ts for _, e in by_seq], TS_MASK)
    assert all(b >= a for a, b in itertools.pairwise(stamps))
    if lost:
        return
    # every frame sent can be decoded: what it refers to was sent too
    for layer, frame in sent:
        for ref in frame_refs(frame, keyframes[layer], unsynced):
            assert (layer, ref) in sent, (layer, frame, ref)
    if not in_order:
        return
    assert missing == 0
    # the temporal target holds from the next frame on (one under way goes out whole)
    wanted: dict[tuple[int, int], int] = {}
    for e in emitted:
        wanted.setdefault((e.source.layer, e.source.frame), e.target)
    for e in emitted:
        assert e.source.tid <= wanted[(e.source.layer, e.source.frame)]
    # picture ids and TL0PICIDX step by one frame at a time
    pids = [vp8_ids(e.payload)[0] or 0 for _, e in by_seq]
    assert all((b - a) & 0x7FFF in (0, 1) for a, b in itertools.pairwise(pids))
    tl0s = [vp8_ids(e.payload)[2] or 0 for _, e in by_seq]
    assert all((b - a) & 0xFF in (0, 1) for a, b in itertools.pairwise(tl0s))


@settings(max_examples=200, deadline=None)
@given(
    frames=st.integers(8, 48),
    keyframes=st.sets(st.integers(1, 47), max_size=4),
    base=layer_bases,
    unsynced=st.sets(st.integers(0, 47), max_size=10),
    parts=st.lists(st.integers(1, 3), min_size=1, max_size=7),
    swaps=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 6)), max_size=20),
    losses=st.sets(st.integers(0, 10_000), max_size=4),
    temporal=targets,
    first_tid=st.one_of(st.none(), st.integers(0, 2)),
)
def test_temporal_target_keeps_one_continuous_decodable_stream(
    frames: int,
    keyframes: set[int],
    base: tuple[int, int, int, int],
    unsynced: set[int],
    parts: list[int],
    swaps: list[tuple[int, int]],
    losses: set[int],
    temporal: dict[int, int | None],
    first_tid: int | None,
) -> None:
    packets = publish(frames, 1, [keyframes], [base], unsynced, parts)
    order = shuffle(packets, swaps)
    lost = {i % len(packets) for i in losses}
    delivered = [p for p in order if p.index not in lost]
    emitted = run(delivered, {}, temporal, 0, first_tid)
    check(packets, delivered, emitted, [keyframes], unsynced, in_order=order == packets)


@settings(max_examples=150, deadline=None)
@given(
    frames=st.integers(8, 40),
    keyframes=st.lists(st.sets(st.integers(1, 39), max_size=6), min_size=3, max_size=3),
    bases=st.lists(layer_bases, min_size=3, max_size=3),
    unsynced=st.sets(st.integers(0, 39), max_size=8),
    parts=st.lists(st.integers(1, 3), min_size=1, max_size=7),
    swaps=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 6)), max_size=20),
    losses=st.sets(st.integers(0, 10_000), max_size=4),
    spatial=st.dictionaries(
        st.integers(0, 300), st.one_of(st.none(), st.integers(0, 2)), max_size=6
    ),
    temporal=targets,
    first=st.integers(0, 2),
)
def test_temporal_and_spatial_switches_together(
    frames: int,
    keyframes: list[set[int]],
    bases: list[tuple[int, int, int, int]],
    unsynced: set[int],
    parts: list[int],
    swaps: list[tuple[int, int]],
    losses: set[int],
    spatial: dict[int, int | None],
    temporal: dict[int, int | None],
    first: int,
) -> None:
    packets = publish(frames, 3, keyframes, bases, unsynced, parts)
    order = shuffle(packets, swaps)
    lost = {i % len(packets) for i in losses}
    delivered = [p for p in order if p.index not in lost]
    emitted = run(delivered, spatial, temporal, first, None)
    check(packets, delivered, emitted, keyframes, unsynced, order == packets, whole=not spatial)


def test_down_at_once_up_at_a_sync_frame() -> None:
    """Target 0 from the start: a quarter of the frames (TID 0 in L1T3's 0,2,1,2); raised
    to 2 mid-pattern, the next TID 1 sync frame brings TID 1, the next TID 2 sync frame
    TID 2 (a TID 2 sync frame before TID 1 is on would be followed by TID 2 frames that
    refer to the TID 1 frame left out)."""
    packets = publish(16, 1, [set()], [(100, 0, 10, 0)], set(), [1])
    emitted = run(packets, {}, {5: 2}, 0, 0)
    frames = [e.source.frame for e in emitted]
    # frames 0 and 4 (TID 0); target raised at frame 5 (TID 2, sync, but TID 1 is not on
    # yet): frame 6 (TID 1, sync) brings TID 1, frame 9 (TID 2, sync) TID 2
    assert frames == [0, 4, 6, 8, 9, 10, 11, 12, 13, 14, 15]
    seqs = [e.seq for e in emitted]
    assert seqs == list(range(4000, 4000 + len(seqs)))
    pids = [vp8_ids(e.payload)[0] for e in emitted]
    assert pids == list(range(10, 10 + len(pids)))


def test_without_tids_nothing_is_dropped() -> None:
    """A publisher that sends no T bit (aiortc, a browser without L1T3): the temporal
    target changes nothing."""
    rewriter = LayerRewriter(1, 96, seq_base=10, ts_base=0)
    rewriter.set_target(0)
    rewriter.set_temporal_target(0)
    out = []
    for frame in range(8):
        head = descriptor(frame, frame, None, False, True)
        body = b"\x50\x02\x00\x9d\x01\x2a\x40\x01\xb4\x00" if frame == 0 else b"\x51\x02\x00"
        out += rewriter.rewrite(0, 500 + frame, 3000 * frame, 1, head + body, frame == 0, 0.0)
    assert [seq for seq, *_ in out] == list(range(10, 18))
    assert rewriter.temporal_level is None


def test_rates_per_temporal_layer() -> None:
    """L1T3 at 32 fps, TID 0 frames twice the size of the others: TIDs 0..t carry 40%,
    60%, 100% of the bytes at 8, 16 and 32 fps; nothing for 2 s: no temporal layers."""
    rates = TemporalRates(window_s=1.0)
    for frame in range(97):
        tid = TIDS[frame % 4]
        rates.add(tid, 2000 if tid == 0 else 1000, True, frame / 32)
    assert rates.levels(3.0) == 3
    assert [round(x, 2) for x in rates.shares] == [0.4, 0.6, 1.0]
    assert [round(x, 1) for x in rates.fps] == [8.0, 16.0, 32.0]
    assert rates.levels(5.1) == 0
    plain = TemporalRates()
    for frame in range(60):
        plain.add(0, 1000, True, frame / 30)
    assert plain.levels(2.0) == 0  # (TID 0 alone: no step to take)


SHARES = [0.4, 0.6, 1.0]
FPS = [7.5, 15.0, 30.0]


def pick(
    choice: LayerChoice,
    *,
    estimate: float | None = None,
    current: int | None = None,
    fps: float | None = None,
    probe: bool = False,
    shares: list[float] = SHARES,
) -> LayerChoice:
    view = View(320, 180, True, fps)
    return choose_temporal(
        choice,
        0,
        150_000,
        shares,
        FPS[: len(shares)],
        estimate_bps=estimate,
        current=current,
        view=view,
        probe=probe,
    )


def test_the_tile_frame_rate_picks_the_fewest_temporal_layers() -> None:
    assert pick(LayerChoice(0, "view"), fps=2) == LayerChoice(0, "view", 0)
    assert pick(LayerChoice(0, "view"), fps=7.5) == LayerChoice(0, "view", 0)
    assert pick(LayerChoice(0, "view"), fps=12) == LayerChoice(0, "view", 1)
    assert pick(LayerChoice(0, "view"), fps=30) == LayerChoice(0, "view")
    assert pick(LayerChoice(2, "top"), fps=10) == LayerChoice(2, "top", 1)
    assert pick(LayerChoice(0, "view")) == LayerChoice(0, "view")
    # no temporal layers: nothing changes
    assert pick(LayerChoice(0, "view"), fps=2, shares=[1.0]) == LayerChoice(0, "view")
    # a hidden tile stays without video
    assert pick(LayerChoice(None, "hidden"), estimate=1e6) == LayerChoice(None, "hidden")


def test_bandwidth_lowers_the_frame_rate_before_pausing() -> None:
    # the lowest layer (150 kbit/s) does not fit 100 kbit/s; its TID 0 (60) does
    assert pick(LayerChoice(0, "bandwidth"), estimate=100_000) == LayerChoice(0, "bandwidth", 0)
    assert pick(LayerChoice(0, "bandwidth"), estimate=120_000) == LayerChoice(0, "bandwidth", 1)
    # paused for bandwidth: back on TID 0 when it fits, else still paused
    paused = LayerChoice(None, "bandwidth")
    assert pick(paused, estimate=80_000) == LayerChoice(0, "bandwidth", 0)
    assert pick(paused, estimate=60_000) == paused
    # the set sent stays while the estimate covers it (no headroom needed to stay) ...
    assert pick(LayerChoice(0, "bandwidth"), estimate=92_000, current=1) == LayerChoice(
        0, "bandwidth", 1
    )
    # ... and one more is tried when probing is allowed (here: all of them)
    assert pick(LayerChoice(0, "bandwidth"), estimate=92_000, current=1, probe=True) == (
        LayerChoice(0, "bandwidth")
    )
    # enough for the whole layer: every frame
    assert pick(LayerChoice(0, "top"), estimate=500_000) == LayerChoice(0, "top")
    # above the lowest layer the spatial step is the cheaper one: untouched
    above = choose_temporal(
        LayerChoice(1, "bandwidth"),
        0,
        500_000,
        SHARES,
        FPS,
        estimate_bps=100_000,
        current=None,
        view=None,
        probe=False,
    )
    assert above == LayerChoice(1, "bandwidth")


@given(
    layer=st.one_of(st.none(), st.integers(0, 2)),
    reason=st.sampled_from(["top", "view", "cap", "bandwidth", "hidden", "allocation"]),
    estimate=st.one_of(st.none(), st.floats(0, 2e6)),
    current=st.one_of(st.none(), st.integers(0, 3)),
    fps=st.one_of(st.none(), st.floats(1, 240)),
    probe=st.booleans(),
    levels=st.integers(1, 4),
)
def test_temporal_choice_only_refines(
    layer: int | None,
    reason: str,
    estimate: float | None,
    current: int | None,
    fps: float | None,
    probe: bool,
    levels: int,
) -> None:
    """The temporal step never changes a spatial layer that was chosen, never gives video
    to a tile that asked for none, and never names a temporal layer the publisher does not
    send; with no estimate and no frame rate asked it changes nothing."""
    shares = [(t + 1) / levels for t in range(levels)]
    choice = LayerChoice(layer, reason)
    got = choose_temporal(
        choice,
        0,
        150_000,
        shares,
        [7.5 * 2**t for t in range(levels)],
        estimate_bps=estimate,
        current=current,
        view=View(320, 180, True, fps),
        probe=probe,
    )
    if layer is not None:
        assert got.layer == layer
    elif reason != "bandwidth":
        assert got == choice
    else:
        assert got.layer in (None, 0)
    assert got.temporal is None or 0 <= got.temporal < levels - 1
    if estimate is None and fps is None:
        assert got == choice


@settings(max_examples=300, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=12), min_size=1, max_size=40),
    target=st.one_of(st.none(), st.integers(0, 3)),
)
def test_hostile_descriptors_never_raise(payloads: list[bytes], target: int | None) -> None:
    """Any bytes as VP8 payloads (cut short, any bits set): packets go out or are dropped,
    nothing raises, no number is given twice."""
    rewriter = LayerRewriter(1, 96, seq_base=10, ts_base=0)
    rewriter.set_target(0)
    rewriter.set_temporal_target(target)
    seqs = []
    for i, payload in enumerate(payloads):
        for seq, *_ in rewriter.rewrite(0, i, 90 * i, 1, payload, i == 0, i / 30):
            seqs.append(seq)
        vp8_temporal(payload)
    assert len(seqs) == len(set(seqs))


# --------------------------------------------------------------------------- in the hub


def _camera_with_temporal_layers(hub: MediaHub, remb: int) -> tuple[Published, Subscription]:
    """A three-layer simulcast camera whose lowest layer carries L1T3 (TIDs 0..t: 40%,
    60%, 100% of its 150 kbit/s at 7.5, 15, 30 fps), and one subscriber with `remb`."""
    later = time.monotonic() + 3600
    owner = hub.session(Connection("s-p", "u-p", "p", 1, room="room"))
    published = Published(owner, "1", "video", tap=cast(Any, Tap()))
    published.rids = ("q", "h", "f")
    published.mime_type = "video/VP8"
    published.forwarder = published.new_forwarder()
    published.layer_seen = {0: later, 1: later, 2: later}
    published._layer_marks = {layer: (later, 0) for layer in range(3)}
    published.layer_rates = dict(enumerate(RATES))
    published.layer_sizes = dict(enumerate(((320, 180), (640, 360), (1280, 720))))
    measured = published.temporal_rates[0] = TemporalRates()
    measured.shares, measured.fps, measured.seen = list(SHARES), list(FPS), later
    owner.published["1"] = published
    watcher = hub.session(Connection("s-w", "u-w", "w", 1, room="room"))
    sink = Sink(1000, remb)
    transceiver = cast(Any, Transceiver("3"))
    subscription = Subscription(published, watcher, transceiver, cast(Any, sink))
    published.subscriptions[watcher] = subscription
    watcher.incoming[transceiver] = subscription
    assert published.attach(cast(Any, sink), 2)
    return published, subscription


async def test_the_hub_lowers_the_frame_rate_before_pausing() -> None:
    """A subscriber whose estimate does not hold the lowest layer at full frame rate gets
    its TID 0 (not a paused video); with the estimate grown, every frame and the top layer
    again; a tile that asks for 7.5 fps gets TID 0 whatever the estimate."""
    hub = MediaHub(MediaSettings(simulcast_layer_off_s=0.0))
    try:
        published, subscription = _camera_with_temporal_layers(hub, 100_000)
        forwarder = published.forwarder
        assert forwarder is not None
        rewriter = forwarder.layer_rewriter(subscription.sink)
        assert rewriter is not None
        hub.select_layers()
        assert (rewriter.target, rewriter.temporal_target) == (0, 0)
        assert subscription.choice == LayerChoice(0, "bandwidth", 0)
        assert subscription.paused_since is None
        cast(Any, subscription.sink).remb_bitrate = 10_000_000
        for _ in range(4):  # (the estimate climbs the way it does; probes step up)
            hub.select_layers()
            subscription.probe_after = 0.0
            subscription.settle_until = 0.0
        assert (rewriter.target, rewriter.temporal_target) == (2, None)
        # a tile that needs 7.5 fps: TID 0 of the layer its size takes
        subscription.subscriber.set_views({"3": View(320, 180, True, 7.5)})
        assert (rewriter.target, rewriter.temporal_target) == (0, 0)
        assert subscription.choice is not None and subscription.choice.reason == "view"
        # the publisher stops sending TIDs: the temporal target goes
        published.temporal_rates[0].seen = time.monotonic() - 10
        subscription.subscriber.set_views({"3": View(320, 180, True)})
        assert (rewriter.target, rewriter.temporal_target) == (0, None)
    finally:
        await hub.close()
