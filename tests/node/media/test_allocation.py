"""One subscriber's bandwidth shared over its video tracks (node.media.choice.allocate) and
a simulcast publisher's encodings switched on and off (PublisherLayers): pure, so tested
under hypothesis-generated tracks and budgets."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, cast

from hypothesis import given, settings
from hypothesis import strategies as st

from node.config import MediaSettings
from node.media.choice import (
    PRIORITY_OTHER,
    PRIORITY_SCREEN,
    PRIORITY_SPEAKER,
    LayerChoice,
    PublisherLayers,
    TrackDemand,
    allocate,
)
from node.media.session import (
    ALLOCATION_RETRY_S,
    PAUSE_HOLD_S,
    PROBE_HOLD_S,
    MediaHub,
    MediaSession,
    Published,
    Subscription,
)
from node.state.hub import Connection

RATES = [150_000.0, 500_000.0, 1_500_000.0]


def costs(rates: list[float | None]) -> dict[int, float]:
    out: dict[int, float] = {}
    highest = 0.0
    for i, rate in enumerate(rates):
        if rate is not None:
            highest = max(highest, rate)
            out[i] = highest
    return out


def test_a_constrained_subscriber_keeps_the_speaker() -> None:
    tracks = [
        TrackDemand("a", PRIORITY_OTHER, RATES, LayerChoice(2, "top")),
        TrackDemand("speaker", PRIORITY_SPEAKER, RATES, LayerChoice(2, "top")),
        TrackDemand("c", PRIORITY_OTHER, RATES, LayerChoice(2, "top")),
    ]
    # room for one lowest layer: the speaker's; the others pause, having lost to it
    got = allocate(tracks, 200_000)
    assert got == {
        "speaker": LayerChoice(0, "bandwidth"),
        "a": LayerChoice(None, "allocation"),
        "c": LayerChoice(None, "allocation"),
    }
    # everyone's lowest layer before anyone's next: 3 x 150k, then the speaker climbs
    got = allocate(tracks, 850_000)
    assert got["a"] == got["c"] == LayerChoice(0, "allocation")
    assert got["speaker"] == LayerChoice(1, "bandwidth")
    # plenty: every track gets what it would get alone
    assert allocate(tracks, 10_000_000) == {d.key: d.ceiling for d in tracks}
    # no estimate: no allocation
    assert allocate(tracks, None) == {d.key: d.ceiling for d in tracks}


def test_the_screen_share_comes_first_and_fixed_tracks_are_spent_anyway() -> None:
    tracks = [
        TrackDemand("speaker", PRIORITY_SPEAKER, RATES, LayerChoice(2, "top")),
        TrackDemand("screen", PRIORITY_SCREEN, RATES, LayerChoice(1, "view")),
        # one encoding (an H264 camera): its 400k go whatever happens
        TrackDemand("h264", PRIORITY_OTHER, [400_000.0], LayerChoice(0, "top"), fixed=True),
    ]
    got = allocate(tracks, 1_100_000)
    assert got["h264"] == LayerChoice(0, "top")
    # 700k left: the screen's lowest, the speaker's lowest, then the screen climbs to 1
    assert got["screen"] == LayerChoice(1, "view")
    assert got["speaker"] == LayerChoice(0, "allocation")
    # the screen share alone fits: the speaker pauses first
    got = allocate(tracks, 600_000)
    assert got["screen"] == LayerChoice(0, "bandwidth")
    assert got["speaker"] == LayerChoice(None, "allocation")


def test_view_and_hidden_ceilings_are_kept() -> None:
    tracks = [
        TrackDemand("hidden", PRIORITY_SPEAKER, RATES, LayerChoice(None, "hidden")),
        TrackDemand("small", PRIORITY_OTHER, RATES, LayerChoice(0, "view")),
        TrackDemand("big", PRIORITY_OTHER, RATES, LayerChoice(2, "top")),
    ]
    got = allocate(tracks, 700_000)
    assert got["hidden"] == LayerChoice(None, "hidden")
    assert got["small"] == LayerChoice(0, "view")
    assert got["big"] == LayerChoice(1, "bandwidth")


rates_lists = st.lists(
    st.one_of(st.none(), st.floats(10_000, 3_000_000, allow_nan=False)), min_size=1, max_size=3
)


@st.composite
def demands(draw: st.DrawFn) -> list[TrackDemand[int]]:
    out: list[TrackDemand[int]] = []
    for key in range(draw(st.integers(0, 6))):
        rates = draw(rates_lists)
        fixed = draw(st.booleans()) and len(rates) == 1 and rates[0] is not None
        available = [i for i, rate in enumerate(rates) if rate is not None]
        layer = draw(st.one_of(st.none(), st.sampled_from(available))) if available else None
        reason = draw(st.sampled_from(["top", "view", "cap", "bandwidth", "hidden"]))
        priority = draw(st.sampled_from([PRIORITY_SCREEN, PRIORITY_SPEAKER, PRIORITY_OTHER]))
        out.append(TrackDemand(key, priority, rates, LayerChoice(layer, reason), fixed))
    return out


@settings(max_examples=300, deadline=None)
@given(tracks=demands(), budget=st.floats(0, 6_000_000, allow_nan=False))
def test_allocation_invariants(tracks: list[TrackDemand[int]], budget: float) -> None:
    got = allocate(tracks, budget)
    assert set(got) == {d.key for d in tracks}
    assert got == allocate(tracks, budget)  # pure
    spent_fixed = sum(d.rates_bps[0] or 0.0 for d in tracks if d.fixed)
    left = budget - spent_fixed
    spent = 0.0
    order = sorted((d for d in tracks if not d.fixed), key=lambda d: d.priority)
    for d in tracks:
        choice = got[d.key]
        if d.fixed:
            assert choice == d.ceiling
            continue
        cost = costs(list(d.rates_bps))
        ceiling = d.ceiling.layer
        if choice == d.ceiling:
            pass
        else:
            # held below its ceiling, never above it, at a layer being received
            assert ceiling is not None
            assert choice.reason in ("allocation", "bandwidth")
            assert choice.layer is None or (choice.layer in cost and choice.layer < ceiling)
        if choice.layer is not None:
            spent += cost[choice.layer]
    # the budget (after the fixed tracks) is never overspent
    assert spent <= max(0.0, left) + 1e-6
    leftover = left - spent
    for d in order:
        choice, ceiling = got[d.key], d.ceiling.layer
        if ceiling is None or choice.layer == ceiling:
            continue
        cost = costs(list(d.rates_bps))
        # nothing left over would have paid for this track's next step up
        above = min(i for i in cost if choice.layer is None or i > choice.layer)
        step = cost[above] - (0.0 if choice.layer is None else cost[choice.layer])
        assert step > leftover - 1e-6
        if choice.layer is None:
            # lowest layers first, in priority order: what the tracks ahead of this one got
            # at their lowest layer left too little for this one's lowest
            ahead = order[: order.index(d)]
            taken = sum(
                min(costs(list(o.rates_bps)).values())
                for o in ahead
                if got[o.key].layer is not None
            )
            assert min(cost.values()) > left - taken - 1e-6
            if choice.reason == "allocation":
                assert min(cost.values()) <= left + 1e-6
            else:
                assert min(cost.values()) > left - 1e-6


def test_a_layer_goes_off_after_nobody_selected_it_for_a_while() -> None:
    layers = PublisherLayers(3, off_s=3.0)
    assert layers.active == {0, 1, 2}
    # the first round says what is on (an earlier track may have left some off)
    assert layers.update({0}, 0.0) == frozenset({0, 1, 2})
    assert layers.update({0}, 2.9) is None
    assert layers.update({0}, 3.0) == frozenset({0})
    # wanted again: on at once
    assert layers.update({0, 2}, 3.5) == frozenset({0, 2})
    assert layers.switched_on == {2: 3.5}  # (offered meanwhile, while its packets come)
    # a tile resized back and forth inside the delay: no flapping
    assert layers.update({0}, 4.0) is None
    assert layers.update({0, 2}, 5.0) is None
    assert layers.update({0}, 6.0) is None
    assert layers.update({0}, 8.9) is None
    assert layers.update({0}, 9.0) == frozenset({0})
    # nobody at all
    assert layers.update(set(), 20.0) is None
    assert layers.update(set(), 23.0) == frozenset()


@settings(max_examples=200, deadline=None)
@given(
    rounds=st.lists(
        st.tuples(st.floats(0.01, 5.0), st.sets(st.integers(0, 2))), min_size=1, max_size=40
    ),
    off_s=st.floats(0, 5),
)
def test_selected_layers_are_always_on(rounds: list[tuple[float, set[int]]], off_s: float) -> None:
    layers = PublisherLayers(3, off_s)
    now = 0.0
    last_selected: dict[int, float] = {}
    for step, selected in rounds:
        now += step
        for layer in selected:
            last_selected[layer] = now
        layers.update(selected, now)
        assert selected <= layers.active
        for layer in range(3):
            if layer not in layers.active:
                # off only after `off_s` without being selected
                assert now - last_selected.get(layer, 0.0) >= off_s - 1e-9


# --------------------------------------------------------------------------- in the hub


class Tap:
    """What `Published` reads of its publisher's receiver tap (nothing arrives here)."""

    def __init__(self) -> None:
        self.on_drop: Any = None
        self.remb_limit: Any = None
        self.on_layer: Any = None
        self.bytes = 0
        self.remb_estimate: int | None = None
        self.receiver: Any = None
        self.rids: tuple[str, ...] = ()
        self.media_ssrcs: list[int] = []


class Sink:
    """A subscriber's sender as the layer choice reads it: its REMB, no receiver reports."""

    def __init__(self, ssrc: int, remb: int | None) -> None:
        self.ssrc = ssrc
        self.payload_type: int | None = 96
        self.remb_bitrate = remb
        self.packets_sent = 0
        self.bytes_sent = 0
        self.nacked = 0
        self.last_sequence_number: int | None = None
        self.reported_sequence_number: int | None = None
        self.on_keyframe_request: Any = None
        self.pace_bps: float | None = None
        self.paced_packets = 0
        self.paced_wait_max_s = 0.0

    def reception(self) -> None:
        return None

    def send_padding(self, size: int) -> int:
        return 0

    def pace(self, rate_bps: float | None) -> None:
        self.pace_bps = rate_bps

    def write(self, *args: Any) -> bool:
        return True


class Transceiver:
    def __init__(self, mid: str) -> None:
        self.mid = mid


def messages(conn: Connection, kind: str) -> list[dict[str, Any]]:
    out = []
    while not conn.outbox.empty():
        message = conn.outbox.get_nowait()
        if message is not None and message["type"] == kind:
            out.append(message)
    return out


@dataclass
class Cameras:
    publishers: dict[str, Published]
    watcher: MediaSession
    sinks: dict[str, Sink]

    def target(self, name: str) -> int | None:
        forwarder = self.publishers[name].forwarder
        assert forwarder is not None
        rewriter = forwarder.layer_rewriter(cast(Any, self.sinks[name]))
        assert rewriter is not None
        return rewriter.target


def _two_cameras(hub: MediaHub, slug: str, names: tuple[str, ...] = ("a", "b")) -> Cameras:
    """Publishers a and b (three-layer simulcast cameras arriving at `RATES`; or those
    `names`) and one watcher subscribed to both, each sink's REMB at 200 kbit/s."""
    now = time.monotonic()
    publishers: dict[str, Published] = {}
    for name in names:
        conn = Connection(f"s-{name}", f"u-{name}", name, 1, room=slug)
        owner = hub.session(conn)
        published = Published(owner, "1", "video", tap=cast(Any, Tap()))
        published.rids = ("q", "h", "f")
        published.mime_type = "video/VP8"
        published.forwarder = published.new_forwarder()
        # every layer arriving at these rates for the whole test (however slow the
        # host: the rates are measured only after a round's time, from now on)
        later = now + 3600
        published.layer_seen = {0: later, 1: later, 2: later}
        published._layer_marks = {layer: (later, 0) for layer in range(3)}
        published.layer_rates = dict(enumerate(RATES))
        owner.published["1"] = published
        publishers[name] = published
    watcher = hub.session(Connection("s-w", "u-w", "w", 1, room=slug))
    sinks: dict[str, Sink] = {}
    for index, (name, published) in enumerate(publishers.items()):
        sink = sinks[name] = Sink(1000 + index, 200_000)
        transceiver = cast(Any, Transceiver(str(index + 3)))
        subscription = Subscription(published, watcher, transceiver, cast(Any, sink))
        published.subscriptions[watcher] = subscription
        watcher.incoming[transceiver] = subscription
        assert published.attach(cast(Any, sink), 2)
    return Cameras(publishers, watcher, sinks)


async def test_the_hub_shares_a_subscribers_estimate_and_switches_encodings_off() -> None:
    """Two camera tracks to one constrained subscriber: the active speaker's is kept, the
    other pauses (told "bandwidth", counted as "allocation"); the encodings nobody takes
    go off at each publisher (`layers`), and REMB asks each for what is taken."""
    hub = MediaHub(MediaSettings(simulcast_layer_off_s=0.0))
    slug = "room"
    now = time.monotonic()
    try:
        room = _two_cameras(hub, slug)
        publishers, watcher, sinks, target = room.publishers, room.watcher, room.sinks, room.target
        hub.speakers[slug] = ("s-b", "u-b")
        hub.select_layers()
        # 200 kbit/s hold one quarter-size layer: the speaker's
        assert (target("a"), target("b")) == (None, 0)
        subscription_a = publishers["a"].subscriptions[watcher]
        assert subscription_a.choice == LayerChoice(None, "allocation")
        paused = messages(watcher.conn, "video-paused")
        assert [(m["session_id"], m["paused"], m["reason"]) for m in paused] == [
            ("s-a", True, "bandwidth")
        ]
        # publishers: b keeps its quarter-size encoding only, a none; REMB follows
        a_conn = publishers["a"].owner.conn
        b_conn = publishers["b"].owner.conn
        assert a_conn is not None and b_conn is not None
        assert [m["active"] for m in messages(b_conn, "layers")] == [["q"]]
        assert [m["active"] for m in messages(a_conn, "layers")] == [[]]
        assert publishers["b"].remb_limit() == round(150_000 * 1.25)
        assert publishers["b"].arriving(now) == [0]
        # once its uplink was estimated at 2 Mbit/s, REMB holds that while encodings are off
        # (so one switched on again has the rate at once), within what all layers take
        cast(Any, publishers["b"].tap).remb_estimate = 2_000_000
        hub.select_layers()
        assert publishers["b"].remb_floor() == 2_000_000
        assert publishers["b"].remb_limit() == 2_000_000
        cast(Any, publishers["b"].tap).remb_estimate = 9_000_000
        hub.select_layers()
        assert publishers["b"].remb_limit() == round(sum(RATES) * 1.25)
        cast(Any, publishers["b"].tap).remb_estimate = None
        publishers["b"].remb_held = 0.0
        messages(b_conn, "layers")
        messages(a_conn, "layers")

        # a speaks now: the allocation follows, and a's encoding comes back
        hub.speakers[slug] = ("s-a", "u-a")
        hub.select_layers()
        assert (target("a"), target("b")) == (0, None)
        assert [m["active"] for m in messages(a_conn, "layers")] == [["q"]]
        assert [m["active"] for m in messages(b_conn, "layers")] == [[]]
        # b's track is its screen share (the room's state says so): before the speaker
        hub.set_screen("s-b", "1")
        hub.select_layers()
        assert (target("a"), target("b")) == (None, 0)
        hub.set_screen("s-b", None)
        hub.select_layers()
        assert (target("a"), target("b")) == (0, None)
        messages(a_conn, "layers")
        messages(b_conn, "layers")

        # the estimate grows: both get the top layer, every encoding is wanted again
        for sink in sinks.values():
            sink.remb_bitrate = 10_000_000
        hub.select_layers()
        assert (target("a"), target("b")) == (2, 2)
        assert [m["active"] for m in messages(b_conn, "layers")] == [["f"]]
        assert publishers["b"].remb_limit() == round(1_500_000 * 1.25)
    finally:
        await hub.close()


async def test_a_track_the_sharing_paused_is_tried_again_at_its_lowest_layer() -> None:
    """The allocation's retry (issue 14): a camera paused because the other track took the
    estimate gets its lowest layer again once paused `PROBE_HOLD_S`, for
    `ALLOCATION_RETRY_S` (so a browser's REMB, which follows what it receives, can grow), then
    pauses again if the estimate still does not cover it. Pacing follows: only a video the
    estimate holds down is paced (`MediaHub._pace`)."""
    hub = MediaHub(MediaSettings(simulcast_layer_off_s=0.0))
    try:
        room = _two_cameras(hub, "room")
        hub.speakers["room"] = ("s-b", "u-b")
        hub.select_layers()
        assert (room.target("a"), room.target("b")) == (None, 0)
        # the speaker's video, held to its lowest layer by bandwidth, is paced: at its
        # estimate, or 1.5x its layer's rate when that is more; the paused one is not
        assert room.sinks["b"].pace_bps == max(200_000, RATES[0] * 1.5)
        assert room.sinks["a"].pace_bps is None
        paused = room.publishers["a"].subscriptions[room.watcher]
        assert paused.paused_since is not None
        hub.select_layers()  # a moment later: still paused
        assert room.target("a") is None
        # as if PROBE_HOLD_S had passed
        paused.paused_since -= PROBE_HOLD_S
        paused.probe_after = 0.0
        hub.select_layers()
        assert (room.target("a"), room.target("b")) == (0, 0)
        assert paused.choice == LayerChoice(0, "bandwidth")
        assert paused.paused_since is None
        left = paused.retry_until - time.monotonic()
        assert ALLOCATION_RETRY_S - 1 < left <= ALLOCATION_RETRY_S
        hub.select_layers()  # within the retry: kept
        assert room.target("a") == 0
        # the retry over, the estimate still 200 kbit/s: paused again
        paused.retry_until = 0.0
        hub.select_layers()
        assert (room.target("a"), room.target("b")) == (None, 0)
        assert paused.paused_since is not None
        # the estimate grows past every layer: nothing held by bandwidth, nothing paced
        for sink in room.sinks.values():
            sink.remb_bitrate = 10_000_000
        hub.select_layers()
        assert (room.target("a"), room.target("b")) == (2, 2)
        assert [sink.pace_bps for sink in room.sinks.values()] == [None, None]
    finally:
        await hub.close()


async def test_a_video_paused_for_bandwidth_gets_its_lowest_layer_again_within_2_s() -> None:
    """One camera, one subscriber, just stepped down (probing held off for `PROBE_HOLD_S`),
    whose estimate then falls below half the lowest layer (a REMB plunge, or one report's
    loss burst): the video pauses, and is tried again at its lowest layer `PAUSE_HOLD_S`
    later, not when the step down's hold ends. Seen in CI: `bench quality`'s weak
    subscriber got no video for the whole window and after the limit was lifted."""
    hub = MediaHub(MediaSettings(simulcast_layer_off_s=0.0))
    try:
        room = _two_cameras(hub, "room", names=("a",))
        hub.select_layers()
        assert room.target("a") == 0  # (200 kbit/s: the lowest layer fits)
        subscription = room.publishers["a"].subscriptions[room.watcher]
        # as a step down for bandwidth leaves it: no climbing, nor retrying, for 8 s
        subscription.probe_after = time.monotonic() + PROBE_HOLD_S
        room.sinks["a"].remb_bitrate = 50_000
        hub.select_layers()
        assert room.target("a") is None
        assert subscription.choice == LayerChoice(None, "bandwidth")
        left = subscription.probe_after - time.monotonic()
        assert PAUSE_HOLD_S - 1 < left <= PAUSE_HOLD_S
        hub.select_layers()  # a moment later: still paused, the retry not pushed back
        assert room.target("a") is None
        assert subscription.probe_after - time.monotonic() <= left
        # as if PAUSE_HOLD_S had passed: the lowest layer again, the estimate unchanged
        subscription.probe_after = time.monotonic()
        hub.select_layers()
        assert room.target("a") == 0
        assert subscription.choice == LayerChoice(0, "bandwidth")
        hub.select_layers()  # and it stays: probing allowed, the lowest layer is kept
        assert room.target("a") == 0
        paused = messages(room.watcher.conn, "video-paused")
        assert [(m["paused"], m["reason"]) for m in paused] == [
            (True, "bandwidth"),
            (False, "bandwidth"),
        ]
    finally:
        await hub.close()
