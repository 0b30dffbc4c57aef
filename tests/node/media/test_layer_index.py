"""The forwarder's per-layer index of simulcast subscribers (node.media.forward.Forwarder):
a packet of a layer is looked at only by the subscribers whose `LayerRewriter` takes that
layer, and every subscriber still gets exactly what it got when every packet visited every
rewriter (checked against twin rewriters fed every packet, under hypothesis-generated
orders, losses and switches); a retired stretch stops taking its layer `LATE_S` after that
layer's packets came past it."""

from __future__ import annotations

from collections import deque

from aiortc.rtp import RtpPacket
from hypothesis import example, given, settings
from hypothesis import strategies as st

from node.media.forward import Forwarder, LayerRewriter, vp8_is_keyframe_start
from tests.node.media.test_layers import Sent, publish, published, shuffle

Emitted = tuple[int, int, int, bytes]


class Sink:
    """A subscriber's sender: keeps what it is written."""

    def __init__(self) -> None:
        self.got: list[Emitted] = []

    def write(
        self,
        payload_type: int,
        marker: int,
        seq: int,
        ts: int,
        payload: bytes,
        level: object,
        stamp: object,
    ) -> bool:
        self.got.append((seq, ts, marker, payload))
        return True


def rtp(packet: Sent) -> RtpPacket:
    out = RtpPacket(
        payload_type=96,
        marker=packet.marker,
        sequence_number=packet.seq,
        timestamp=packet.ts,
        ssrc=1000 + packet.layer,
    )
    out.payload = packet.payload
    return out


def pair(number: int) -> tuple[LayerRewriter, LayerRewriter]:
    """Twin rewriters with the same numbering: one for the forwarder, one fed by hand."""
    return tuple(  # type: ignore[return-value]
        LayerRewriter(0x100 + number, 96, seq_base=1000 * number, ts_base=7 * number)
        for _ in range(2)
    )


@settings(max_examples=300, deadline=None)
# a switch down from layer 2 at layer 0's keyframe (frame 5), and a packet of layer 2's frame
# 4 arriving after it: a late packet of the retired stretch, which must still go out
@example(
    frames=10,
    keyframes=[{5}, set(), set()],
    bases=[(0, 0, 0, 0)] * 3,
    swaps=[(28, 3)],
    losses=set(),
    firsts=[2],
    switches=[(0, 12, 0)],
    frame_s=1 / 30,
)
@given(
    # (keyframes often, so that switches happen and late packets meet retired stretches)
    **{
        **published,
        "keyframes": st.lists(st.sets(st.integers(1, 39), max_size=15), min_size=3, max_size=3),
    },
    firsts=st.lists(st.one_of(st.none(), st.integers(0, 2)), min_size=1, max_size=4),
    switches=st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 240), st.one_of(st.none(), st.integers(0, 2))),
        max_size=12,
    ),
    frame_s=st.sampled_from([1 / 30, 0.1, 0.25]),  # (0.25: 40 frames span 10 s, past LATE_S)
)
def test_the_index_gives_every_subscriber_what_visiting_every_packet_gave(
    frames: int,
    keyframes: list[set[int]],
    bases: list[tuple[int, int, int, int]],
    swaps: list[tuple[int, int]],
    losses: set[int],
    firsts: list[int | None],
    switches: list[tuple[int, int, int | None]],
    frame_s: float,
) -> None:
    packets = publish(frames, keyframes, bases)
    lost = {i % len(packets) for i in losses}
    order = [p for p in shuffle(packets, swaps) if p.index not in lost]
    forwarder: Forwarder[Sink] = Forwarder(vp8_is_keyframe_start)
    forwarder.layers = {1000: 0, 1001: 1, 1002: 2}
    sinks: list[Sink] = []
    twins: list[LayerRewriter] = []
    expected: list[list[Emitted]] = []
    for number, first in enumerate(firsts):
        indexed, twin = pair(number)
        indexed.set_target(first)
        twin.set_target(first)
        sink = Sink()
        forwarder.add(sink, indexed)
        sinks.append(sink)
        twins.append(twin)
        expected.append([])
    at_step: dict[int, list[tuple[int, int | None]]] = {}
    for who, step, target in switches:
        at_step.setdefault(step, []).append((who % len(firsts), target))
    recent: dict[int, deque[tuple[int, int, int, bytes]]] = {}
    for step, packet in enumerate(order):
        for who, target in at_step.get(step, []):
            rewriter = forwarder.layer_rewriter(sinks[who])
            assert rewriter is not None
            rewriter.set_target(target)
            twins[who].set_target(target)
        now = packet.at * 30 * frame_s
        forwarder.forward_layer(packet.layer, rtp(packet), None, now)
        window = recent.setdefault(packet.layer, deque(maxlen=LayerRewriter.PENDING))
        window.append((packet.seq, packet.ts, packet.marker, packet.payload))
        keyframe = vp8_is_keyframe_start(packet.payload)
        for twin, got in zip(twins, expected, strict=True):
            got.extend(
                twin.rewrite(
                    packet.layer,
                    packet.seq,
                    packet.ts,
                    packet.marker,
                    packet.payload,
                    keyframe,
                    now,
                    window,
                )
            )
    for sink, got in zip(sinks, expected, strict=True):
        assert sink.got == got


def test_a_retired_stretch_takes_late_packets_then_lets_its_layer_go() -> None:
    forwarder: Forwarder[Sink] = Forwarder(vp8_is_keyframe_start)
    forwarder.layers = {1000: 0, 1001: 1, 1002: 2}
    rewriter = LayerRewriter(0x100, 96, seq_base=500, ts_base=0)
    rewriter.set_target(0)
    sink = Sink()
    forwarder.add(sink, rewriter)
    # 30 frames a second, layer 1's keyframes at frames 0 and 10
    packets = publish(80, [set(), {10}, set()], [(100, 0, 5, 1), (200, 0, 50, 2), (300, 0, 9, 3)])
    by_frame: dict[int, list[Sent]] = {}
    for packet in packets:
        by_frame.setdefault(round(packet.at * 30), []).append(packet)

    def play(frame: int, skip: Sent | None = None) -> None:
        for packet in by_frame[frame]:
            if packet is not skip:
                forwarder.forward_layer(packet.layer, rtp(packet), None, packet.at)

    held = by_frame[5][0]  # a layer-0 packet that will come late
    for frame in range(5):
        play(frame)
    play(5, skip=held)
    rewriter.set_target(1)
    assert rewriter.layers_taken() == {0, 1}
    for frame in range(6, 12):
        play(frame)
    assert rewriter.current == 1
    assert rewriter.layers_taken() == {0, 1}  # the old stretch still takes late packets
    before = len(sink.got)
    forwarder.forward_layer(0, rtp(held), None, held.at + 0.3)
    assert len(sink.got) == before + 1  # the late packet went out, in its own number
    for frame in range(12, 80):  # layer 0 flows on past the old stretch for over 2 s
        play(frame)
    assert rewriter.layers_taken() == {1}
    assert forwarder.layer_subscribers(0) == ()
    assert [key for key, _ in forwarder.layer_subscribers(1)] == [sink]
