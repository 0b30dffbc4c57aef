"""Which layer each subscriber gets: pure choice and sharing, no I/O, no packets.

`forward.py` rewrites and fans out whatever layer it is told; this module decides what to
tell it. Per (subscriber, track): `choose_layer` (bandwidth estimate, loss, the tile, the
operator's cap, hysteresis) and, below it, `choose_temporal` (VP8 temporal layers, from the
shares `TemporalRates` measures). Per subscriber: `allocate` shares one estimate over its
video tracks, screen share, then the active speaker, then the rest, lowest layers first.
Per publisher: `PublisherLayers` says which encodings anybody still selects (the others are
switched off at the publisher). Seeded and hypothesis-tested (tests/node/media/
test_layers.py, test_allocation.py, test_temporal.py).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from node.media.forward import TID_MAX

# --------------------------------------------------------------------------- layer choice


@dataclass(frozen=True, slots=True)
class View:
    """How the subscriber shows a track: its tile's size in CSS pixels (times the device
    pixel ratio, as the client sends it) and whether it is visible."""

    width: int
    height: int
    visible: bool = True
    #: the frame rate the tile needs (None: all the publisher sends); with temporal layers
    #: the subscriber gets the lowest set of them that gives at least this
    fps: float | None = None


@dataclass(frozen=True, slots=True)
class LayerChoice:
    """The layer a subscriber should get (None: no video) and what bound it: "bandwidth",
    "view", "hidden", "cap", or "top" (nothing did: the best layer sent). `temporal`: the
    highest VP8 temporal layer of it to send (None: all; see `choose_temporal`)."""

    layer: int | None
    reason: str
    temporal: int | None = None


#: a layer fits a bandwidth estimate when its measured rate is at most this share of it
BANDWIDTH_HEADROOM: Final = 0.85
#: receiver-report loss above this share steps the subscriber one layer down from its own
LOSS_STEP_DOWN: Final = 0.10


def choose_layer(
    rates_bps: Sequence[float | None],
    heights: Sequence[int | None],
    *,
    estimate_bps: int | None,
    loss: float,
    current: int | None,
    view: View | None,
    cap: int,
    probe: bool = True,
    settling: bool = False,
    climb: bool = True,
    keep_lowest_share: float | None = None,
) -> LayerChoice:
    """The layer (index into `rates_bps`, lowest first; None where a layer is not being
    received) to send a subscriber: the lowest of what its bandwidth allows (its estimate,
    REMB, against each layer's measured rate; one step below `current` when its reports
    show more than `LOSS_STEP_DOWN` loss), what its view needs (the lowest layer at least
    as tall as the tile; the top one when no height is known) and `cap`.

    A receiver's estimate grows only with what it receives (aiortc's stays under 1.5 times
    the incoming rate), so it can never vouch for a layer well above the current one: when
    it covers the current layer and `probe` allows, the next layer up is tried (the caller
    holds `probe` off for a while after a bandwidth step down, so a weak link does not
    bounce). With `probe`, a subscriber whose estimate fits nothing (at the start, or
    paused) tries the lowest layer; without it, it gets no video. While `settling` (just
    after a step up, before the estimate could follow the new rate) the estimate alone
    never takes the subscriber below `current`; loss still does.

    `climb` False: no layer above what the estimate covers is tried (the caller raises the
    estimate by probing with padding instead, `node.media.estimate`), and while `probe` is
    held (after a step down) none above `current` is taken at all. `keep_lowest_share`:
    a subscriber on the lowest layer keeps it while the estimate covers at least this share
    of its rate (a dip from a loss burst does not pause the video; pausing and resuming
    costs a keyframe's wait)."""
    available = [i for i, rate in enumerate(rates_bps) if rate is not None]
    if not available:
        return LayerChoice(None, "top")
    if view is not None and (not view.visible or view.width <= 0 or view.height <= 0):
        return LayerChoice(None, "hidden")
    top = available[-1]
    choice = LayerChoice(top, "top")
    bandwidth: int | None = top
    if estimate_bps is not None:
        # a layer costs at least what any lower one does (a measured rate can dip: a layer
        # just started, or the lower ones inflated by keyframes)
        cost: dict[int, float] = {}
        highest = 0.0
        for i in available:
            highest = max(highest, rates_bps[i] or 0.0)
            cost[i] = highest
        fitting = [i for i in available if cost[i] <= estimate_bps * BANDWIDTH_HEADROOM]
        bandwidth = fitting[-1] if fitting else None
        # hysteresis: the headroom is for going up; the current layer stays while the
        # estimate covers it (an estimate hovers near what the subscriber receives)
        if current is not None and current in available:
            if (rates_bps[current] or 0.0) <= estimate_bps:
                bandwidth = current if bandwidth is None else max(bandwidth, current)
        if (
            keep_lowest_share is not None
            and current is not None
            and current == available[0]
            and (rates_bps[current] or 0.0) * keep_lowest_share <= estimate_bps
            and bandwidth is None
        ):
            bandwidth = current
        if (
            probe
            and climb
            and current is not None
            and current in available
            and (rates_bps[current] or 0.0) <= estimate_bps
            and loss <= LOSS_STEP_DOWN
        ):
            above = [i for i in available if i > current]
            if above and (bandwidth is None or bandwidth < above[0]):
                bandwidth = above[0]
        if settling and current is not None and current in available:
            bandwidth = current if bandwidth is None else max(bandwidth, current)
        if (
            not climb
            and not probe
            and current is not None
            and current in available
            and bandwidth is not None
            and bandwidth > current
        ):
            # held after a step down: the estimate that stepped it down is not new news
            # when a layer's measured rate dips under it again (seen: 180p and 360p every
            # 0.5 s on the weak link); a probe's success or a rising REMB counts once the
            # hold is over
            bandwidth = current
    if loss > LOSS_STEP_DOWN and current is not None:
        lower = [i for i in available if i < current]
        stepped = lower[-1] if lower else None
        bandwidth = stepped if bandwidth is None or stepped is None else min(bandwidth, stepped)
    if bandwidth is None:
        if not probe:
            return LayerChoice(None, "bandwidth")
        bandwidth = available[0]  # (re)try the lowest: a paused stream has no estimate
    if bandwidth < top:
        choice = LayerChoice(bandwidth, "bandwidth")
    if view is not None:
        needed = next(
            (i for i in available if (heights[i] or 0) >= view.height * 0.9),
            top,
        )
        if needed < (choice.layer if choice.layer is not None else top):
            choice = LayerChoice(needed, "view")
    capped = max((i for i in available if i <= cap), default=available[0])
    if choice.layer is not None and capped < choice.layer:
        choice = LayerChoice(capped, "cap")
    return choice


# --------------------------------------------------------------------------- temporal layers


class TemporalRates:
    """What each set of temporal layers of one simulcast layer carries (time passed in):
    for TIDs 0..t, the share of the layer's bytes and the frame rate, measured over windows
    of `window_s` and smoothed (the mean of the last two). Empty when the layer carries no
    temporal layers (none seen for `idle_s`)."""

    __slots__ = ("_bytes", "_frames", "_start", "fps", "idle_s", "seen", "shares", "window_s")

    def __init__(self, window_s: float = 1.0, idle_s: float = 2.0) -> None:
        self.window_s = window_s
        self.idle_s = idle_s
        self._bytes = [0] * (TID_MAX + 1)
        self._frames = [0] * (TID_MAX + 1)
        self._start: float | None = None
        self.seen: float | None = None
        #: index t: TIDs 0..t (cumulative), up to the highest TID seen
        self.shares: list[float] = []
        self.fps: list[float] = []

    def add(self, tid: int, size: int, frame_start: bool, now: float) -> None:
        start = self._start
        if start is None:
            start = self._start = now
        elif now - start >= self.window_s:
            self._close(now - start)
            self._start = now
        self._bytes[tid] += size
        if frame_start:
            self._frames[tid] += 1
        self.seen = now

    def _close(self, span: float) -> None:
        counts = self._bytes
        top = max((t for t in range(TID_MAX + 1) if counts[t]), default=0)
        total = sum(counts) or 1
        shares: list[float] = []
        fps: list[float] = []
        cum_bytes = cum_frames = 0
        for t in range(top + 1):
            cum_bytes += counts[t]
            cum_frames += self._frames[t]
            shares.append(cum_bytes / total)
            fps.append(cum_frames / span)
        if len(self.shares) == len(shares):
            shares = [(a + b) / 2 for a, b in zip(self.shares, shares, strict=True)]
            fps = [(a + b) / 2 for a, b in zip(self.fps, fps, strict=True)]
        self.shares, self.fps = shares, fps
        self._bytes = [0] * (TID_MAX + 1)
        self._frames = [0] * (TID_MAX + 1)

    def levels(self, now: float) -> int:
        """How many temporal layers the layer carries now (0: none, or not lately)."""
        if self.seen is None or now - self.seen >= self.idle_s or len(self.shares) < 2:
            return 0
        return len(self.shares)


def choose_temporal(
    choice: LayerChoice,
    lowest: int | None,
    rate_bps: float | None,
    shares: Sequence[float],
    fps: Sequence[float],
    *,
    estimate_bps: float | None,
    current: int | None,
    view: View | None,
    probe: bool,
) -> LayerChoice:
    """The temporal step below the spatial one: `choice` with the highest temporal layer to
    send of its layer (`temporal`; None: all of them). `shares` and `fps` describe the
    layer the choice is about (or, when the choice pauses the video for bandwidth, the
    `lowest` layer, whose full rate is `rate_bps`): index t, TIDs 0..t (`TemporalRates`).
    `current`: the temporal target the subscriber has now (None: all).

    - view: the fewest temporal layers that give the tile's `fps`;
    - bandwidth, on the lowest layer only (above it a lower spatial layer is the cheaper
      step): the most temporal layers whose share of the layer's rate fits the estimate
      (`BANDWIDTH_HEADROOM`); the current set stays while the estimate covers it, and, as
      for spatial layers, one more is tried when `probe` allows. A video the bandwidth
      would pause comes back on the lowest layer's TID 0 when that fits.

    No temporal layers (`shares` shorter than 2): `choice` as it is."""
    if len(shares) < 2 or rate_bps is None:
        return choice
    top = len(shares) - 1
    layer = choice.layer
    if layer is None and not (choice.reason == "bandwidth" and lowest is not None):
        return choice
    chosen = top
    if view is not None and view.fps is not None:
        chosen = next((t for t, f in enumerate(fps) if f >= view.fps * 0.9), top)
    reason = choice.reason
    if estimate_bps is not None and (layer is None or layer == lowest):
        fitting = [
            t for t in range(top + 1) if rate_bps * shares[t] <= estimate_bps * BANDWIDTH_HEADROOM
        ]
        bandwidth = fitting[-1] if fitting else None
        held = top if current is None else min(current, top)  # (None: all were sent)
        if choice.layer is not None and rate_bps * shares[held] <= estimate_bps:
            bandwidth = held if bandwidth is None else max(bandwidth, held)
            if probe and held < top:
                bandwidth = max(bandwidth, held + 1)
        if layer is None:
            if bandwidth is None:
                return choice
            layer = lowest
        elif bandwidth is None:
            bandwidth = 0  # (the spatial choice kept the lowest layer: its least)
        if bandwidth < chosen:
            chosen = bandwidth
            reason = "bandwidth"
    return LayerChoice(layer, reason, None if chosen >= top else chosen)


# --------------------------------------------------------------------------- allocation

#: allocation priority of a subscriber's video tracks (lower first)
PRIORITY_SCREEN: Final = 0
PRIORITY_SPEAKER: Final = 1
PRIORITY_OTHER: Final = 2

H = TypeVar("H", bound=Hashable)


@dataclass(frozen=True)
class TrackDemand(Generic[H]):
    """One video track a subscriber receives, as the allocation sees it.

    `ceiling` is what the track would get alone (`choose_layer` with the subscriber's whole
    estimate, its tile and the cap). A `fixed` track (one encoding: a screen share, an
    H264 camera) cannot be switched nor paused here: its `rates_bps[0]` is spent whatever
    is decided, so it is taken off the budget first."""

    key: H
    priority: int
    rates_bps: Sequence[float | None]
    ceiling: LayerChoice
    fixed: bool = False


def layer_costs(rates_bps: Sequence[float | None]) -> dict[int, float]:
    """Layer -> what it costs (at least what any lower layer does; see `choose_layer`)."""
    cost: dict[int, float] = {}
    highest = 0.0
    for i, rate in enumerate(rates_bps):
        if rate is not None:
            highest = max(highest, rate)
            cost[i] = highest
    return cost


def allocate(demands: Sequence[TrackDemand[H]], budget_bps: float | None) -> dict[H, LayerChoice]:
    """Share one subscriber's bandwidth estimate over its video tracks (LiveKit's way): in
    priority order (screen share, the active speaker, the rest; ties in the order given)
    every track first gets its lowest layer, then, level by level, each climbs towards its
    `ceiling` while what is left covers the step. So a constrained subscriber keeps the
    speaker (at its lowest layer) while the others pause, and no track gets a better layer
    before every one of higher priority has its lowest.

    A track held below its ceiling says why: "allocation" when it alone would have had
    more (it lost to higher-priority tracks), "bandwidth" when even alone it would not.
    `budget_bps` None (no estimate): every track gets its ceiling. Pure: the same input
    always gives the same answer."""
    out: dict[H, LayerChoice] = {d.key: d.ceiling for d in demands}
    if budget_bps is None:
        return out
    order = sorted(
        (d for d in demands if not d.fixed), key=lambda d: d.priority
    )  # (stable: ties keep the caller's order)
    budget = float(budget_bps) - sum(
        d.rates_bps[0] or 0.0 for d in demands if d.fixed and d.rates_bps
    )
    left = budget
    costs = {id(d): layer_costs(d.rates_bps) for d in order}
    alloc: dict[int, int | None] = {}
    # every track's lowest layer first, in priority order
    for d in order:
        cost = costs[id(d)]
        ceiling = d.ceiling.layer
        lowest = min(cost, default=None)
        alloc[id(d)] = None
        if ceiling is None or lowest is None or lowest > ceiling:
            continue
        if cost[lowest] <= left:
            alloc[id(d)] = lowest
            left -= cost[lowest]
    # then climb, one level at a time across all tracks
    top = max((len(d.rates_bps) for d in order), default=0)
    for level in range(1, top):
        for d in order:
            now = alloc[id(d)]
            ceiling = d.ceiling.layer
            if now is None or ceiling is None:
                continue
            cost = costs[id(d)]
            wanted = max((i for i in cost if i <= min(level, ceiling)), default=None)
            if wanted is None or wanted <= now:
                continue
            step = cost[wanted] - cost[now]
            if step <= left:
                alloc[id(d)] = wanted
                left -= step
    for d in order:
        got = alloc[id(d)]
        ceiling = d.ceiling.layer
        if got == ceiling:
            continue
        cost = costs[id(d)]
        above = min((i for i in cost if got is None or i > got), default=None)
        alone = above is not None and cost[above] <= budget  # (what it would take alone)
        out[d.key] = LayerChoice(got, "allocation" if alone else "bandwidth")
    return out


class PublisherLayers:
    """Which encodings of a simulcast publisher should be on (time passed in).

    A layer somebody selects is switched on at once; one nobody has selected for `off_s`
    is switched off (the publisher then neither encodes nor sends it). The delay keeps a
    tile being resized, or a subscriber probing a layer up, from flapping the encodings.
    `update` returns the set of active layers when it changes (and the first time: the
    publisher may still have encodings off from an earlier track on its connection), else
    None."""

    __slots__ = ("_told", "_unwanted_since", "active", "layers", "off_s", "switched_on")

    def __init__(self, layers: int, off_s: float) -> None:
        self.layers = layers
        self.off_s = off_s
        #: the layers on at the publisher (all of them at first, as it starts)
        self.active: frozenset[int] = frozenset(range(layers))
        self._unwanted_since: dict[int, float] = {}
        self._told = False
        #: when each layer was last switched on again (its packets take a moment to come)
        self.switched_on: dict[int, float] = {}

    def update(self, selected: set[int], now: float) -> frozenset[int] | None:
        active = set(self.active)
        for layer in range(self.layers):
            if layer in selected:
                self._unwanted_since.pop(layer, None)
                if layer not in active:
                    active.add(layer)
                    self.switched_on[layer] = now
                continue
            since = self._unwanted_since.setdefault(layer, now)
            if layer in active and now - since >= self.off_s:
                active.discard(layer)
        if active == self.active and self._told:
            return None
        self._told = True
        self.active = frozenset(active)
        return self.active
