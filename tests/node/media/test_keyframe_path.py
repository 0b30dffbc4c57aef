"""Issue 20, Build 2: a subscriber waiting for a keyframe gets one within a bound.

The node's side is `forward.KeyframeRequests`, one per published track on every node (a
relayed track on the receiving node too), so a chain subscriber -> node-2 -> relay ->
node-1 -> publisher has a retrying requester at each node. Here that chain is simulated
in discrete time with the real class, keyframe requests (PLI) and keyframes dropped on
purpose at each hop; the old throttle (one request per interval, the rest dropped, no
retry) left the subscriber frozen until the encoder's periodic keyframe.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from node.media.forward import Forwarder, KeyframeRequests, SeenWindow

INTERVAL, RETRY, GIVE_UP = 0.5, 0.6, 10.0
FRAME_S = 1 / 30
SUBSCRIBER_RETRY_S = 1.0  # the participant's own PLI repeat (node.local.participant)


def test_a_request_inside_the_interval_is_sent_when_it_ends() -> None:
    k = KeyframeRequests(INTERVAL, RETRY, GIVE_UP)
    k.request(10.0)
    assert k.due(10.0)
    k.keyframe(10.1)  # answered
    k.request(10.2)  # a second subscriber lost a packet just after
    assert not k.due(10.2)
    assert k.next_check(10.2) == pytest.approx(10.5)
    assert k.due(10.5)
    assert k.sent == 2 and k.recoveries == 1


def test_an_unanswered_request_is_repeated_then_given_up() -> None:
    k = KeyframeRequests(INTERVAL, RETRY, 2.0)
    k.request(0.0)
    assert k.due(0.0)
    sent_at = [0.0]
    now = 0.0
    while True:
        at = k.next_check(now)
        if at is None:
            break
        now = at
        if k.due(now):
            sent_at.append(now)
    assert k.gave_up == 1 and k.recoveries == 0
    assert sent_at == pytest.approx([0.0, 0.6, 1.2, 1.8])
    assert k.retries == 3


def test_a_keyframe_ends_the_wait_and_counts_it() -> None:
    k = KeyframeRequests(INTERVAL, RETRY, GIVE_UP)
    k.request(1.0)
    assert k.due(1.0)
    assert k.keyframe(1.25) == pytest.approx(0.25)
    assert k.next_check(1.3) is None and k.recoveries == 1
    assert k.keyframe(1.4) is None  # nobody waited


@dataclass(order=True)
class _Event:
    at: float
    order: int
    action: Callable[[], None] = field(compare=False)


class _Chain:
    """subscriber -> node-2 -> node-1 -> publisher; PLIs go up, keyframes come down."""

    def __init__(self, drop_pli: dict[str, int], drop_keyframe: dict[str, int]) -> None:
        self.now = 0.0
        self._events: list[_Event] = []
        self._order = itertools.count()
        self.node2 = KeyframeRequests(INTERVAL, RETRY, GIVE_UP)
        self.node1 = KeyframeRequests(INTERVAL, RETRY, GIVE_UP)
        self.drop_pli = dict(drop_pli)  # hop -> how many PLIs it loses
        self.drop_keyframe = dict(drop_keyframe)  # hop -> how many keyframes it loses
        self.latency = {"client": 0.08, "relay": 0.017, "publisher": 0.003}
        self.keyframe_at: float | None = None
        self.pli_sent = 0

    def later(self, delay: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, _Event(self.now + delay, next(self._order), action))

    def _lost(self, table: dict[str, int], hop: str) -> bool:
        if table.get(hop, 0) > 0:
            table[hop] -= 1
            return True
        return False

    # PLI path
    def subscriber_pli(self) -> None:
        if self.keyframe_at is not None:
            return
        self.pli_sent += 1
        if not self._lost(self.drop_pli, "client"):
            self.later(self.latency["client"], lambda: self._node_request(self.node2, "relay"))
        self.later(SUBSCRIBER_RETRY_S, self.subscriber_pli)

    def _node_request(self, node: KeyframeRequests, upstream: str) -> None:
        node.request(self.now)
        self._node_tick(node, upstream)

    def _node_tick(self, node: KeyframeRequests, upstream: str) -> None:
        if node.due(self.now):
            if not self._lost(self.drop_pli, upstream):
                if upstream == "relay":
                    self.later(
                        self.latency["relay"], lambda: self._node_request(self.node1, "publisher")
                    )
                else:
                    self.later(self.latency["publisher"], self._publisher_pli)
        at = node.next_check(self.now)
        if at is not None:
            self.later(at - self.now, lambda: self._node_tick(node, upstream))

    # keyframe path
    def _publisher_pli(self) -> None:
        self.later(FRAME_S + self.latency["publisher"], self._keyframe_at_node1)

    def _keyframe_at_node1(self) -> None:
        self.node1.keyframe(self.now)
        if not self._lost(self.drop_keyframe, "relay"):
            self.later(self.latency["relay"], self._keyframe_at_node2)

    def _keyframe_at_node2(self) -> None:
        self.node2.keyframe(self.now)
        if not self._lost(self.drop_keyframe, "client"):
            self.later(self.latency["client"], self._keyframe_at_subscriber)

    def _keyframe_at_subscriber(self) -> None:
        if self.keyframe_at is None:
            self.keyframe_at = self.now

    def run(self, until: float) -> None:
        self.subscriber_pli()
        while self._events and self.keyframe_at is None:
            event = heapq.heappop(self._events)
            if event.at > until:
                break
            self.now = event.at
            event.action()


# A bound on the wait: each lost PLI or keyframe costs at most one retry period of the hop
# that repeats it (the subscriber's own for its link), plus the round trip of the chain.
ROUND_TRIP = 2 * (0.08 + 0.017 + 0.003) + FRAME_S


@pytest.mark.parametrize(
    ("drop_pli", "drop_keyframe"),
    [
        ({}, {}),
        ({"client": 1}, {}),
        ({"relay": 1}, {}),
        ({"publisher": 1}, {}),
        ({"client": 1, "relay": 2, "publisher": 2}, {}),
        ({}, {"relay": 1}),
        ({}, {"client": 1}),
        ({"relay": 1, "publisher": 1}, {"relay": 2, "client": 1}),
    ],
)
def test_the_subscriber_gets_a_keyframe_within_the_bound_whatever_hop_loses_requests(
    drop_pli: dict[str, int], drop_keyframe: dict[str, int]
) -> None:
    chain = _Chain(drop_pli, drop_keyframe)
    losses = sum(drop_pli.values()) + sum(drop_keyframe.values())
    bound = ROUND_TRIP + losses * max(RETRY, SUBSCRIBER_RETRY_S) + INTERVAL
    chain.run(until=30.0)
    assert chain.keyframe_at is not None, "the subscriber never got a keyframe"
    assert chain.keyframe_at <= bound, (chain.keyframe_at, bound)
    assert chain.node1.gave_up == chain.node2.gave_up == 0


class _Sink:
    def __init__(self) -> None:
        self.numbers: list[int] = []

    def write(self, pt: int, marker: int, seq: int, ts: int, *rest: object) -> bool:
        self.numbers.append(seq)
        return True


def test_a_packet_arriving_twice_is_forwarded_once() -> None:
    from aiortc.rtp import RtpPacket

    fwd: Forwarder[_Sink] = Forwarder(None)
    sink = _Sink()
    from node.media.forward import SubscriberRewriter

    fwd.add(sink, SubscriberRewriter(1, 96, seq_base=100, ts_base=0))
    arrivals = [65530, 65531, 65533, 65534, 65532, 65533, 0, 1, 65532, 2, 0]
    for seq in arrivals:
        fwd.forward(RtpPacket(payload_type=96, sequence_number=seq, ssrc=7), None)
    assert fwd.packets_in == len(arrivals)
    assert fwd.duplicates == 3 and fwd.packets_out == len(set(arrivals))
    assert sorted(sink.numbers) == sorted({(s - 65530 + 100) & 0xFFFF for s in arrivals})


def test_seen_window_refuses_what_is_too_old_and_restarts_on_a_new_source() -> None:
    seen = SeenWindow()
    assert seen.first_time(1, 5000)
    assert seen.first_time(1, 5000 + SeenWindow.SIZE + 10)
    assert not seen.first_time(1, 5000)  # beyond the window: no subscriber can use it
    assert seen.first_time(1, 5000 + SeenWindow.SIZE + 9)
    assert seen.first_time(2, 5000)  # another SSRC
