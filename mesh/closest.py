"""The client side of "connect to the closest node" (N4): which nodes to probe, and the pick.

The procedure (issue 13 item 7; `webapp/closest_core.js` is the same, step by step, with
the same constants, checked by tests/mesh/test_closest.py):

1. Read the live nodes and their Vivaldi coordinates from any node (`GET /api/nodes`).
   With at most `MAX_PROBES` nodes, probe them all in one round: that is exact and takes
   no longer than one round of the procedure below.
2. Round 1, `FIRST_PROBES` nodes at once (in parallel). A new client probes landmarks
   spread over the mesh: a node at random, then each time the node farthest (by estimated
   RTT) from those chosen. A returning client (RTT samples cached from its last pick)
   probes instead the nodes its cached samples say are nearest.
3. Round 2, `NEXT_PROBES` nodes at once: the unmeasured nodes whose RTT profile to the
   probed nodes best matches the client's, i.e. the nodes the client most likely sits
   next to (`profile_costs`: for each node, the squared relative error between its
   estimated RTTs to the probed nodes, plus the best-fitting access delay, and what the
   client measured).
4. The pick is the node with the smallest measured RTT; the others follow, measured ones
   by RTT, then the rest by estimated RTT. A node probed that never answered comes last.

No ranking request to a node: a client far from every node (300 ms RTT) spends two rounds
of one request per node (a TCP connect and the request: 2 RTT, 1.2 s in all) and no more.
`sfumesh bench vivaldi` measures it on 54 measured regions: within 10 ms of the best node
in ~98% of cases with 8 probes, where the earlier 3 random + 2 suggested, ranked by the
node, managed ~69% (the figures are in the README).

Why profile matching rather than the node's fitted client coordinate (`estimate_client`)
for round 2: on the bench's matrix, fitting a point in 8 dimensions from 4 samples put the
nearest node among the next 4 less often (92-95% against 97-99.6% within 10 ms, three
seeds), and the profile needs only the node coordinates the listing already carries, so
the client can do it without a round trip; it is simple enough to mirror exactly in the
browser. Why the best measured node and
not the estimate-ranked first: after 8 probes a measurement beats any estimate.

Why cached samples and not a cached coordinate for a returning client: Serf's coordinates
drift (the whole space moves as nodes update); RTTs to named nodes do not, so the
procedure re-reads them against today's coordinates.

Everything above `pick` is pure: no I/O, and every random choice takes a
`random.Random` (only its `random()`, so a test can feed both implementations the same
numbers). `pick` / `pick_node` drive it with httpx for Python clients and tools
(`bench geo`, the lab, the tests).
"""

from __future__ import annotations

import asyncio
import functools
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from mesh.vivaldi import Coordinate, CoordinateError, estimate_rtt

#: round 1: landmarks (new client) or the cached-nearest (returning client)
FIRST_PROBES = 4
#: round 2: the nodes whose RTT profile best matches the client's
NEXT_PROBES = 4
#: at most this many nodes are probed; with no more nodes than this, all of them at once
MAX_PROBES = FIRST_PROBES + NEXT_PROBES
#: one request per probe: its RTT is read from the TCP connect and the request separately
PINGS_PER_NODE = 1
#: samples below this (s) count as this: 1/rtt^2 must stay finite (Serf's zero threshold)
MIN_RTT_S = 1.0e-6
#: a probe unanswered after this long counts as unreachable
PROBE_TIMEOUT_MS = 3000
#: a pick younger than this is reused without probing (a page refresh)
PICK_CACHE_MS = 10 * 60_000
#: samples younger than this guide a returning client's first round
SAMPLE_CACHE_MS = 7 * 24 * 3600_000

Rtts = dict[str, dict[str, float]]


def estimated_rtts(coordinates: Mapping[str, Coordinate | None]) -> Rtts:
    """The estimated RTT (seconds, as `serf rtt`) between every two nodes with a usable
    coordinate (valid, and of the dimensionality most nodes have)."""
    valid = {
        name: coord for name, coord in coordinates.items() if coord is not None and coord.is_valid()
    }
    counts: dict[int, int] = {}
    for coord in valid.values():
        counts[len(coord.vec)] = counts.get(len(coord.vec), 0) + 1
    if not counts:
        return {}
    dims = max(counts, key=lambda size: (counts[size], size))
    usable = {name: coord for name, coord in valid.items() if len(coord.vec) == dims}
    rtts: Rtts = {}
    for a, ca in usable.items():
        rtts[a] = {}
        for b, cb in usable.items():
            try:
                rtts[a][b] = 0.0 if a == b else estimate_rtt(ca, cb)
            except CoordinateError:  # pragma: no cover - dimensions checked above
                continue
    return rtts


def draw(names: Sequence[str], rng: random.Random) -> str:
    """One of `names` (sorted first), chosen with one `rng.random()`: as the browser does."""
    ordered = sorted(names)
    return ordered[min(len(ordered) - 1, int(rng.random() * len(ordered)))]


def spread_probes(rtts: Rtts, count: int, rng: random.Random) -> list[str]:
    """Landmarks for a client that knows nothing: a node at random, then each time the node
    whose estimated RTT to the nearest chosen one is largest (ties: first by name)."""
    names = sorted(rtts)
    if count <= 0 or not names:
        return []
    chosen = [draw(names, rng)]
    while len(chosen) < min(count, len(names)):
        best_name, best_gap = "", -1.0
        for name in names:
            if name in chosen:
                continue
            gap = min(rtts[name][other] for other in chosen)
            if gap > best_gap:
                best_name, best_gap = name, gap
        chosen.append(best_name)
    return chosen


@dataclass(frozen=True)
class Profile:
    """How well "the client sits at `node`" explains its samples: `cost` (sum of squared
    relative errors), with `height` the best-fitting access delay (seconds, >= 0)."""

    cost: float
    node: str
    height: float


def profile_costs(rtts: Rtts, samples: Mapping[str, float]) -> list[Profile]:
    """Every node of `rtts`, best match first (ties by name), for `samples` (seconds, to
    nodes of `rtts`; others ignored). Empty when no sample is usable.

    If the client sat at node n with an access delay h, its RTT to a probed node l would
    be est(n, l) + h (and h to n itself). h is the weighted least-squares fit (weights
    1/rtt^2, so relative errors count), clamped at 0."""
    usable = {
        name: max(rtt, MIN_RTT_S)
        for name, rtt in sorted(samples.items())  # sorted: the same sums as the browser's
        if name in rtts and math.isfinite(rtt) and rtt > 0
    }
    if not usable:
        return []
    profiles = []
    for node in sorted(rtts):
        row = rtts[node]
        num = den = 0.0
        for probed, rtt in usable.items():
            weight = 1.0 / (rtt * rtt)
            num += weight * (rtt - row[probed])
            den += weight
        height = max(0.0, num / den)
        cost = 0.0
        for probed, rtt in usable.items():
            error = (row[probed] + height - rtt) / rtt
            cost += error * error
        profiles.append(Profile(cost, node, height))
    profiles.sort(key=lambda p: (p.cost, p.node))
    return profiles


def next_probes(
    rtts: Rtts, samples: Mapping[str, float], count: int, exclude: Sequence[str] = ()
) -> list[str]:
    """The `count` nodes (not in `samples` nor `exclude`) best matching the samples."""
    skip = set(samples) | set(exclude)
    return [p.node for p in profile_costs(rtts, samples) if p.node not in skip][: max(0, count)]


def estimates(rtts: Rtts, samples: Mapping[str, float]) -> dict[str, float]:
    """Estimated RTT (seconds) from the client to every node of `rtts`: from the node whose
    profile matches the samples best, plus the fitted access delay."""
    profiles = profile_costs(rtts, samples)
    if not profiles:
        return {}
    best = profiles[0]
    return {name: rtt + best.height for name, rtt in rtts[best.node].items()}


@dataclass
class Procedure:
    """The closest-node procedure as a state machine, without I/O (module docstring).

        procedure = Procedure(coordinates, rng, cached=...)
        while probes := procedure.next_round():
            for name in probes: procedure.record(name, measured RTT in seconds or None)
        procedure.ranking()

    `coordinates`: every live node, with its coordinate or None (unknown: such a node is
    probed only at random or when there are few nodes). `cached`: the RTT samples
    (seconds) of a previous pick, or None.
    """

    coordinates: Mapping[str, Coordinate | None]
    rng: random.Random
    cached: Mapping[str, float] | None = None
    first: int = FIRST_PROBES
    then: int = NEXT_PROBES
    samples: dict[str, float] = field(default_factory=dict)
    unreachable: set[str] = field(default_factory=set)
    rounds: int = 0
    #: `estimated_rtts(coordinates)`, computed when not given (the bench reuses one)
    rtts: Rtts | None = None

    def __post_init__(self) -> None:
        if self.rtts is None:
            self.rtts = estimated_rtts(self.coordinates)

    @property
    def _rtts(self) -> Rtts:
        assert self.rtts is not None  # set in __post_init__
        return self.rtts

    @property
    def probes(self) -> int:
        return len(self.samples) + len(self.unreachable)

    def _probed(self) -> set[str]:
        return set(self.samples) | self.unreachable

    def _fill(self, chosen: list[str], count: int) -> list[str]:
        """Top `chosen` up to `count` with unprobed nodes drawn at random."""
        left = sorted(set(self.coordinates) - self._probed() - set(chosen))
        while len(chosen) < count and left:
            name = draw(left, self.rng)
            left.remove(name)
            chosen.append(name)
        return chosen

    def next_round(self) -> list[str]:
        """The nodes to probe now, all at once; empty when the procedure is done."""
        names = sorted(self.coordinates)
        budget = self.first + self.then
        if self.rounds == 0:
            self.rounds = 1
            if len(names) <= budget:
                return names
            cached = {name: rtt for name, rtt in (self.cached or {}).items() if name in self._rtts}
            if cached:
                chosen = [p.node for p in profile_costs(self._rtts, cached)][: self.first]
            else:
                chosen = spread_probes(self._rtts, self.first, self.rng)
            return self._fill(chosen, self.first)
        if self.rounds == 1 and len(names) > budget:
            self.rounds = 2
            chosen = next_probes(self._rtts, self.samples, self.then, sorted(self.unreachable))
            return self._fill(chosen, self.then)
        return []

    def record(self, name: str, rtt_s: float | None) -> None:
        """A probe's result: its RTT in seconds, or None when it never answered."""
        if rtt_s is None or not math.isfinite(rtt_s) or rtt_s <= 0:
            self.samples.pop(name, None)
            self.unreachable.add(name)
        else:
            self.unreachable.discard(name)
            self.samples[name] = rtt_s

    def ranking(self) -> list[tuple[str, float | None, bool]]:
        """Every node as (name, RTT seconds or None, measured), nearest first: measured by
        RTT, then the rest by estimate, then those without one, then the unreachable."""
        guess = estimates(self._rtts, self.samples)
        measured = sorted(self.samples.items(), key=lambda item: (item[1], item[0]))
        rest = [n for n in self.coordinates if n not in self.samples and n not in self.unreachable]
        known = sorted((guess[n], n) for n in rest if n in guess)
        unknown = sorted(n for n in rest if n not in guess)
        ranked: list[tuple[str, float | None, bool]] = [(n, rtt, True) for n, rtt in measured]
        ranked += [(n, rtt, False) for rtt, n in known]
        ranked += [(n, None, False) for n in unknown + sorted(self.unreachable)]
        return ranked


# --- Python clients: the procedure over HTTP --------------------------------------------


@dataclass(frozen=True)
class RankedNode:
    name: str
    url: str
    ws_url: str
    region: str
    rtt_ms: float | None
    measured: bool


@dataclass(frozen=True)
class Pick:
    """A finished pick: the ranking (nearest first), the samples to cache for next time
    (ms), how many probes and rounds it took, its duration (s, the node listing included)
    and the probing's alone (s, from the first probe sent to the pick)."""

    nodes: list[RankedNode]
    samples_ms: dict[str, float]
    probes: int
    rounds: int
    elapsed_s: float
    probing_s: float


async def time_ping(http: httpx.AsyncClient, url: str, pings: int = PINGS_PER_NODE) -> float | None:
    """Best round trip (ms) of `pings` GET /api/ping to a node; None if it never answered.

    One request gives two round trips: the TCP connect (when the request opens a
    connection) and the request itself (headers sent to headers received); the smaller
    counts, so a new connection does not need a second request to be measured."""
    best: float | None = None
    for _ in range(max(1, pings)):
        marks: dict[str, float] = {}
        trace = functools.partial(_mark, marks)
        started = time.perf_counter()
        try:
            reply = await http.get(
                f"{url}/api/ping",
                extensions={"trace": trace},
                timeout=PROBE_TIMEOUT_MS / 1000,
            )
        except httpx.HTTPError:
            continue
        if reply.status_code != 200:
            continue
        elapsed = time.perf_counter() - started
        parts = [
            marks[end] - marks[begin]
            for begin, end in (
                ("connection.connect_tcp.started", "connection.connect_tcp.complete"),
                ("http11.send_request_headers.started", "http11.receive_response_headers.complete"),
            )
            if begin in marks and end in marks
        ]
        rtt_ms = 1000 * (min(parts) if parts else elapsed)
        best = rtt_ms if best is None else min(best, rtt_ms)
    return best


async def _mark(marks: dict[str, float], event: str, info: dict[str, Any]) -> None:
    """httpx's trace callback: when each step of the request happened."""
    marks[event] = time.perf_counter()


def _coordinate(data: Any) -> Coordinate | None:
    if not isinstance(data, dict):
        return None
    try:
        return Coordinate.from_rpc(
            {
                "Vec": data.get("vec"),
                "Error": data.get("error"),
                "Adjustment": data.get("adjustment"),
                "Height": data.get("height"),
            },
            dimensionality=None,
        )
    except CoordinateError:
        return None


async def pick(
    http: httpx.AsyncClient,
    seed_url: str,
    rng: random.Random | None = None,
    *,
    cached_ms: Mapping[str, float] | None = None,
    first: int = FIRST_PROBES,
    then: int = NEXT_PROBES,
) -> Pick:
    """Run the procedure against the mesh `seed_url` belongs to (module docstring)."""
    started = time.perf_counter()
    reply = await http.get(f"{seed_url}/api/nodes")
    reply.raise_for_status()
    nodes = {n["name"]: n for n in reply.json()["nodes"]}
    procedure = Procedure(
        {name: _coordinate(node.get("coordinate")) for name, node in nodes.items()},
        rng or random.Random(),  # noqa: S311 (not for security)
        cached=None if cached_ms is None else {n: ms / 1000 for n, ms in cached_ms.items()},
        first=first,
        then=then,
    )
    probing = time.perf_counter()
    while probes := procedure.next_round():
        rtts = await asyncio.gather(*(time_ping(http, nodes[name]["url"]) for name in probes))
        for name, rtt_ms in zip(probes, rtts, strict=True):
            procedure.record(name, None if rtt_ms is None else max(rtt_ms, 0.001) / 1000)
    if nodes and not procedure.samples:
        raise httpx.ConnectError("no node answered /api/ping")
    ranked = [
        RankedNode(
            name=name,
            url=nodes[name]["url"],
            ws_url=nodes[name]["ws_url"],
            region=nodes[name]["region"],
            rtt_ms=None if rtt is None else round(rtt * 1000, 3),
            measured=measured,
        )
        for name, rtt, measured in procedure.ranking()
    ]
    return Pick(
        nodes=ranked,
        samples_ms={name: rtt * 1000 for name, rtt in procedure.samples.items()},
        probes=procedure.probes,
        rounds=procedure.rounds,
        elapsed_s=time.perf_counter() - started,
        probing_s=time.perf_counter() - probing,
    )


async def pick_node(
    http: httpx.AsyncClient,
    seed_url: str,
    rng: random.Random | None = None,
    *,
    cached_ms: Mapping[str, float] | None = None,
) -> list[RankedNode]:
    """Every live node, nearest first, as measured and estimated from this client."""
    return (await pick(http, seed_url, rng, cached_ms=cached_ms)).nodes
