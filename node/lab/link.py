"""The link model and packet scheduler of the WAN lab: pure, seeded, no I/O.

The emulator process (node.lab.emulator) is a thin shell around `Network`: it hands every
packet it reads to `Network.submit` with the current time, asks `Network.next_due` how long
it may sleep, and writes out what `Network.pop_due` returns. Time is a plain float (seconds)
passed in by the caller and randomness comes from seeded `random.Random`s, so the model is
tested by hypothesis with a fake clock, like mesh/vivaldi.py and mesh/span.py.

One `Stage` is one direction of one link (FINDINGS, "WAN emulation"), in this order:

1. loss: random with `loss`, or two-state Gilbert-Elliott when `burst` is set (cause
   `loss` in the good state, `burst` in the bad one);
2. rate: the packet waits behind the ones before it and takes size * 8 / rate to send; if the
   wait would exceed `queue_ms` it is dropped (drop-tail, cause `queue`);
3. delay: `delay_ms` plus a jitter offset that drifts smoothly in time (random knots every
   `jitter_correlation_ms`, linear in between), never below zero, and never earlier than the
   packet before it (a link is FIFO: jitter does not reorder). Drifting rather than
   independent jitter keeps the mean delay honest: FINDINGS measured 80 ms + sd 5 of
   independent jitter, kept in order, as 86 ms mean at 2,000 pkt/s.

A path is the sender's access uplink, the core link between the regions and the receiver's
access downlink, each its own stage with its own queue. `Network` runs every stage's step as
its own event on one time-ordered heap, so a stage shared by several paths (a downlink, a
core link) sees its packets in arrival order.

Every stage keeps its own ground truth (`LinkStats`): packets and bytes in and out, drops by
cause, and the delay it added (queueing included); every path the end-to-end delay.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Final, Generic, Protocol, TypeVar

from node.lab.params import LinkParams

#: at most this many recent delay samples are kept per link for percentiles (count, mean,
#: min and max cover every packet)
SAMPLES_KEPT: Final = 100_000
#: knots are N(0, sd * this): a line between two independent knots has, averaged over the
#: segment, 2/3 of a knot's variance, so the offset's sd over time is `jitter_ms`
_KNOT_SCALE: Final = math.sqrt(1.5)
#: knots are cut at this many sd above zero (keeps the drift's slope, hence reordering
#: pressure, bounded)
_KNOT_CLIP_SD: Final = 3.0

P = TypeVar("P")


class DropCause(StrEnum):
    LOSS = "loss"
    BURST = "burst"
    QUEUE = "queue"
    #: the stage was cut at run time (`Stage.cut`): a fault, not the link's model
    CUT = "cut"


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence (q in [0, 100])."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass
class DelayStats:
    """One-way delays (seconds): exact count, mean, min, max; percentiles over the most
    recent `SAMPLES_KEPT` samples."""

    count: int = 0
    total: float = 0.0
    low: float = math.inf
    high: float = -math.inf
    samples: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLES_KEPT))

    def add(self, delay: float) -> None:
        self.count += 1
        self.total += delay
        self.low = min(self.low, delay)
        self.high = max(self.high, delay)
        self.samples.append(delay)

    def summary_ms(self) -> dict[str, float | int]:
        """count, mean, min, p50, p99, max in milliseconds (NaN when empty)."""
        ordered = sorted(self.samples)
        if not self.count:
            return {"count": 0, "mean": math.nan, "min": math.nan, "p50": math.nan,
                    "p99": math.nan, "max": math.nan}  # fmt: skip
        return {
            "count": self.count,
            "mean": self.total / self.count * 1e3,
            "min": self.low * 1e3,
            "p50": _percentile(ordered, 50) * 1e3,
            "p99": _percentile(ordered, 99) * 1e3,
            "max": self.high * 1e3,
        }


@dataclass
class LinkStats:
    """Ground truth of one stage (or one path): what came in, what left, what was dropped
    and why, and the delay added."""

    packets_in: int = 0
    bytes_in: int = 0
    packets_out: int = 0
    bytes_out: int = 0
    drops: dict[DropCause, int] = field(default_factory=lambda: dict.fromkeys(DropCause, 0))
    delay: DelayStats = field(default_factory=DelayStats)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: packets/bytes in and out, drops by cause, delay summary in ms."""
        return {
            "packets_in": self.packets_in,
            "bytes_in": self.bytes_in,
            "packets_out": self.packets_out,
            "bytes_out": self.bytes_out,
            "drops": {cause.value: n for cause, n in self.drops.items()},
            "delay_ms": self.delay.summary_ms(),
        }


class Jitter:
    """A delay offset (seconds) that drifts smoothly in time: knots drawn every
    `correlation` seconds, linear in between. Asked at non-decreasing times."""

    def __init__(self, sd: float, correlation: float, floor: float, rng: random.Random) -> None:
        self._sd = sd * _KNOT_SCALE
        self._period = correlation
        self._floor = floor
        self._rng = rng
        self._start: float | None = None
        self._a = 0.0
        self._b = 0.0

    def _knot(self) -> float:
        value = self._rng.gauss(0.0, self._sd)
        return min(max(value, self._floor), _KNOT_CLIP_SD * self._sd)

    def at(self, now: float) -> float:
        if self._sd == 0.0:
            return 0.0
        if self._start is None:
            self._start, self._a, self._b = now, self._knot(), self._knot()
        elapsed = now - self._start
        if elapsed >= self._period:
            steps = int(elapsed // self._period)
            if steps == 1:
                self._a, self._b = self._b, self._knot()
            else:  # a long quiet spell: start afresh
                self._a, self._b = self._knot(), self._knot()
            self._start += steps * self._period
            elapsed = now - self._start
        u = max(0.0, elapsed / self._period)
        return self._a + (self._b - self._a) * u


class Stage:
    """One direction of one link (see the module docstring for what it does, in order)."""

    def __init__(self, name: str, params: LinkParams, rng: random.Random) -> None:
        self.name = name
        self.params = params
        self.stats = LinkStats()
        self._rng = rng
        self._delay = params.delay_ms / 1e3
        self._queue = params.queue_ms / 1e3
        self._seconds_per_byte = 8.0 / (params.rate_mbps * 1e6) if params.rate_mbps else 0.0
        self._jitter = Jitter(
            params.jitter_ms / 1e3, params.jitter_correlation_ms / 1e3, -self._delay, rng
        )
        self._bad = False
        self._busy_until = -math.inf
        self._last_departure = -math.inf
        #: cut at run time (a fault: a cable cut, a dead router): every packet is dropped
        #: until it is restored; packets already past the stage still arrive
        self.cut = False

    def set_rate(self, rate_mbps: float | None) -> None:
        """Change the rate limit at run time (None: none), as a link whose capacity changes
        (a phone moving to a better cell): packets already queued keep their departure,
        the next ones are sent at the new rate."""
        self.params = replace(self.params, rate_mbps=rate_mbps)
        self._seconds_per_byte = 8.0 / (rate_mbps * 1e6) if rate_mbps else 0.0

    @property
    def bad(self) -> bool:
        """Whether the bursty-loss chain is in its bad state."""
        return self._bad

    def _lost(self) -> DropCause | None:
        burst = self.params.burst
        if burst is not None:
            if self._bad:
                if self._rng.random() < burst.p_bad_to_good:
                    self._bad = False
            elif self._rng.random() < burst.p_good_to_bad:
                self._bad = True
            if self._bad:
                return DropCause.BURST if self._rng.random() < burst.loss_bad else None
        if self.params.loss and self._rng.random() < self.params.loss:
            return DropCause.LOSS
        return None

    def offer(self, now: float, size: int) -> float | DropCause:
        """A packet of `size` bytes arrives at `now` (non-decreasing between calls): the time
        it leaves the stage, or why it was dropped."""
        stats = self.stats
        stats.packets_in += 1
        stats.bytes_in += size
        cause = DropCause.CUT if self.cut else self._lost()
        if cause is None and self._seconds_per_byte:
            start = max(now, self._busy_until)
            if start - now > self._queue:
                cause = DropCause.QUEUE
            else:
                self._busy_until = start + size * self._seconds_per_byte
        if cause is not None:
            stats.drops[cause] += 1
            return cause
        sent = max(now, self._busy_until) if self._seconds_per_byte else now
        departure = max(sent + self._delay + self._jitter.at(sent), self._last_departure, sent)
        self._last_departure = departure
        stats.packets_out += 1
        stats.bytes_out += size
        stats.delay.add(departure - now)
        return departure


@dataclass(frozen=True, slots=True)
class Delivery(Generic[P]):
    """A packet that crossed its whole path: where to, what, when sent and when due."""

    src: Hashable
    dst: Hashable
    payload: P
    sent: float
    due: float


@dataclass(slots=True)
class _Flight(Generic[P]):
    src: Hashable
    dst: Hashable
    stages: tuple[Stage, ...]
    payload: P
    size: int
    sent: float
    next_stage: int = 0


class Network(Generic[P]):
    """Stages and the paths through them, and one time-ordered heap of packets in flight.

    `paths[(src, dst)]` is the sequence of stage names a packet from `src` to `dst` crosses
    (possibly empty: delivered at once, still through the heap). Each stage gets its own
    `random.Random`, seeded from (`seed`, stage name), so adding a link leaves the others'
    draws alone.
    """

    def __init__(
        self,
        stages: Mapping[str, LinkParams],
        paths: Mapping[tuple[Hashable, Hashable], Sequence[str]],
        seed: int = 1,
    ) -> None:
        self.stages = {
            name: Stage(name, params, random.Random(f"{seed}:{name}"))  # noqa: S311 (a seeded model)
            for name, params in stages.items()
        }
        self._paths = {
            pair: tuple(self.stages[name] for name in names) for pair, names in paths.items()
        }
        self.path_stats: dict[tuple[Hashable, Hashable], LinkStats] = {
            pair: LinkStats() for pair in paths
        }
        self._heap: list[tuple[float, int, _Flight[P]]] = []
        self._sequence = 0
        self.unroutable = 0

    def __len__(self) -> int:
        """Packets in flight."""
        return len(self._heap)

    def _push(self, at: float, flight: _Flight[P]) -> None:
        self._sequence += 1
        heapq.heappush(self._heap, (at, self._sequence, flight))

    def submit(self, now: float, src: Hashable, dst: Hashable, payload: P, size: int) -> bool:
        """A packet from `src` to `dst` enters the network at `now`; False if no path.

        Its first stage runs as an event at `now` (not here), so packets that reach a shared
        stage are processed in time order whatever order they were submitted in."""
        stages = self._paths.get((src, dst))
        if stages is None:
            self.unroutable += 1
            return False
        stats = self.path_stats[(src, dst)]
        stats.packets_in += 1
        stats.bytes_in += size
        self._push(now, _Flight(src, dst, stages, payload, size, now))
        return True

    def next_due(self) -> float | None:
        """When the next event is due (None: nothing in flight)."""
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> list[Delivery[P]]:
        """Run every event due at or before `now`, in time order; the packets delivered."""
        heap = self._heap
        out: list[Delivery[P]] = []
        while heap and heap[0][0] <= now:
            at, _, flight = heapq.heappop(heap)
            if flight.next_stage < len(flight.stages):
                stage = flight.stages[flight.next_stage]
                result = stage.offer(at, flight.size)
                if isinstance(result, DropCause):
                    self.path_stats[(flight.src, flight.dst)].drops[result] += 1
                    continue
                flight.next_stage += 1
                self._push(result, flight)
                continue
            stats = self.path_stats[(flight.src, flight.dst)]
            stats.packets_out += 1
            stats.bytes_out += flight.size
            stats.delay.add(at - flight.sent)
            out.append(Delivery(flight.src, flight.dst, flight.payload, flight.sent, at))
        return out

    def drain(self) -> list[Delivery[P]]:
        """Everything still in flight, delivered at its due time (tests, shutdown)."""
        return self.pop_due(math.inf)

    def stats(self) -> dict[str, Any]:
        """Ground truth, JSON-ready: per link (stage name) and per path ("src->dst")."""
        return {
            "links": {name: stage.stats.as_dict() for name, stage in self.stages.items()},
            "paths": {f"{s}->{d}": st.as_dict() for (s, d), st in self.path_stats.items()},
            "unroutable": self.unroutable,
        }


class TopologyLike(Protocol):
    """What `network_for` needs of a topology (node.lab.topology.Topology has it)."""

    @property
    def hosts(self) -> Mapping[str, object]: ...

    @property
    def seed(self) -> int: ...

    def path(self, src: str, dst: str) -> list[tuple[str, LinkParams]]: ...


def network_for(topology: TopologyLike) -> Network[Any]:
    """The `Network` of a topology: every host to every other host along `topology.path`."""
    stages: dict[str, LinkParams] = {}
    paths: dict[tuple[Hashable, Hashable], list[str]] = {}
    for src in topology.hosts:
        for dst in topology.hosts:
            if src == dst:
                continue
            names = []
            for name, params in topology.path(src, dst):
                stages[name] = params
                names.append(name)
            paths[(src, dst)] = names
    return Network(stages, paths, topology.seed)
