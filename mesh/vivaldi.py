"""Vivaldi network coordinates, compatible with Serf's own (requirement N3).

A port of hashicorp/serf's `coordinate` package (config.go, coordinate.go, client.go,
phantom.go): the same defaults, the same arithmetic in the same order, so that
`estimate_rtt(a, b)` on two coordinates read from `get-coordinate` equals what `serf rtt`
prints, and `VivaldiClient.update` moves a coordinate exactly as a Serf agent would.

On top of that port, three things Serf does not have:

- client placement: a browser measures the RTT to 3-5 nodes whose coordinates are known,
  `estimate_client` places it in the same space and `rank_nodes` / `rank_from_samples`
  order every node by estimated RTT (used by `POST /api/nodes/rank`); `suggest_probes`
  says which nodes to measure (3 at random, then the 2 best-ranked; the bench's "before"
  procedure: clients run `mesh.closest`);
- `synthetic_matrix`: RTTs between points on a globe (fibre propagation, route inflation,
  access delay, noise), for tests and the bench when no measured matrix is at hand;
- `simulate`: Vivaldi over a whole matrix the way the paper and Serf's `phantom.go` do it
  (every round, every node samples one random other node), and `evaluate` of the result.

Pure: no I/O, no asyncio, no global random state: every random choice takes a
`random.Random` (a fresh unseeded one when None is given), so a seed gives the same result
every time.

Units: seconds everywhere, as in Serf, except where a name says `_ms`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

# coordinate.go: used to decide if two coordinates are on top of each other.
ZERO_THRESHOLD = 1.0e-6
# coordinate.go: `time.Duration(dist * secondsToNanoseconds)`.
SECONDS_TO_NANOSECONDS = 1.0e9
# client.go `Update`: RTTs outside [0, 10 s] are refused.
MAX_RTT_S = 10.0
# The dimensionality Serf agents use (config.go `DefaultConfig`).
DIMENSIONALITY = 8


class CoordinateError(ValueError):
    """A coordinate or an RTT sample that Serf would refuse (or panic on)."""


@dataclass(frozen=True)
class VivaldiConfig:
    """Serf's `coordinate.Config`, with `DefaultConfig()`'s values.

    `adjustment_window_size` 0 turns the adjustment term off, as in Serf.
    """

    dimensionality: int = DIMENSIONALITY
    vivaldi_error_max: float = 1.5
    vivaldi_ce: float = 0.25
    vivaldi_cc: float = 0.25
    adjustment_window_size: int = 20
    height_min: float = 10.0e-6
    latency_filter_size: int = 3
    gravity_rho: float = 150.0

    def __post_init__(self) -> None:
        if self.dimensionality < 1:
            raise CoordinateError("dimensionality must be >0")
        if self.adjustment_window_size < 0 or self.latency_filter_size < 1:
            raise CoordinateError("window sizes must be >= 0 (latency filter >= 1)")
        for name in ("vivaldi_error_max", "vivaldi_ce", "vivaldi_cc", "gravity_rho"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise CoordinateError(f"{name} must be a finite number > 0")
        if not (math.isfinite(self.height_min) and self.height_min >= 0):
            raise CoordinateError("height_min must be a finite number >= 0")


DEFAULT_CONFIG = VivaldiConfig()


def _finite(value: float) -> bool:
    return not math.isinf(value) and not math.isnan(value)


def _magnitude(vec: Sequence[float]) -> float:
    total = 0.0
    for component in vec:
        total += component * component
    return math.sqrt(total)


def _diff(vec1: Sequence[float], vec2: Sequence[float]) -> list[float]:
    return [a - b for a, b in zip(vec1, vec2, strict=True)]


def _go_duration_seconds(seconds: float) -> float:
    """`time.Duration(seconds * 1e9).Seconds()`: Go truncates to whole nanoseconds.

    Values a Duration cannot hold (NaN, infinities, beyond +-292 years) come back as they
    are: Go's result for those is platform-defined, and a coordinate that produces them is
    reset by `VivaldiClient.update` either way."""
    scaled = seconds * SECONDS_TO_NANOSECONDS
    if not (-(2.0**63) < scaled < 2.0**63):  # also NaN
        return seconds
    nanoseconds = int(scaled)  # truncates toward zero, as Go does
    # Go's `/` and `%` truncate toward zero; a Duration is never negative here, but be exact.
    whole = -(-nanoseconds // 1_000_000_000) if nanoseconds < 0 else nanoseconds // 1_000_000_000
    rest = nanoseconds - whole * 1_000_000_000
    return float(whole) + float(rest) / 1e9


@dataclass(frozen=True)
class Coordinate:
    """Serf's `coordinate.Coordinate`: `vec` and `height`, `adjustment` in seconds."""

    vec: tuple[float, ...]
    error: float
    adjustment: float
    height: float

    @classmethod
    def origin(cls, config: VivaldiConfig = DEFAULT_CONFIG) -> Coordinate:
        """`NewCoordinate`: at the origin, maximal error, minimal height."""
        return cls(
            vec=(0.0,) * config.dimensionality,
            error=config.vivaldi_error_max,
            adjustment=0.0,
            height=config.height_min,
        )

    @classmethod
    def from_rpc(
        cls,
        data: Mapping[str, object] | Mapping[bytes, object],
        dimensionality: int | None = DIMENSIONALITY,
    ) -> Coordinate:
        """A coordinate from Serf's RPC (`get-coordinate`'s `Coord`): Vec, Error, Adjustment,
        Height. Keys may be str or bytes (msgpack raw). Raises CoordinateError on a missing
        key, a non-number, NaN/infinity, a negative error or height, or a Vec whose length is
        not `dimensionality` (None accepts any length >= 1)."""
        if not isinstance(data, Mapping):
            raise CoordinateError(f"a coordinate is a map, not {type(data).__name__}")
        fields: dict[str, object] = {}
        for key, value in data.items():
            name = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
            fields[str(name)] = value
        missing = [key for key in ("Vec", "Error", "Adjustment", "Height") if key not in fields]
        if missing:
            raise CoordinateError(f"coordinate lacks {', '.join(missing)}")
        raw_vec = fields["Vec"]
        if not isinstance(raw_vec, list | tuple):
            raise CoordinateError("coordinate Vec is not a list")
        if dimensionality is not None and len(raw_vec) != dimensionality:
            raise CoordinateError(
                f"coordinate Vec has {len(raw_vec)} dimensions, expected {dimensionality}"
            )
        if not raw_vec:
            raise CoordinateError("coordinate Vec is empty")
        vec = tuple(_rpc_number(component, "Vec") for component in raw_vec)
        coordinate = cls(
            vec=vec,
            error=_rpc_number(fields["Error"], "Error"),
            adjustment=_rpc_number(fields["Adjustment"], "Adjustment"),
            height=_rpc_number(fields["Height"], "Height"),
        )
        if coordinate.error < 0 or coordinate.height < 0:
            raise CoordinateError("coordinate Error and Height must be >= 0")
        return coordinate

    def to_rpc(self) -> dict[str, object]:
        """The RPC/JSON form, the keys Serf uses."""
        return {
            "Vec": list(self.vec),
            "Error": self.error,
            "Adjustment": self.adjustment,
            "Height": self.height,
        }

    def is_valid(self) -> bool:
        """`IsValid`: no component is NaN or infinite."""
        return (
            all(_finite(component) for component in self.vec)
            and _finite(self.error)
            and _finite(self.adjustment)
            and _finite(self.height)
        )

    def is_compatible_with(self, other: Coordinate) -> bool:
        """`IsCompatibleWith`: same dimensionality."""
        return len(self.vec) == len(other.vec)

    def _check_compatible(self, other: Coordinate) -> None:
        if not self.is_compatible_with(other):
            raise CoordinateError("coordinate dimensionality does not match")

    def raw_distance_to(self, other: Coordinate) -> float:
        """`rawDistanceTo`: |Va - Vb| + Ha + Hb, seconds, without adjustments."""
        self._check_compatible(other)
        return _magnitude(_diff(self.vec, other.vec)) + self.height + other.height

    def distance_to(self, other: Coordinate) -> float:
        """`DistanceTo(...).Seconds()`: the raw distance plus both adjustments when that sum
        stays positive, truncated to whole nanoseconds as Serf's time.Duration is."""
        dist = self.raw_distance_to(other)
        adjusted = dist + self.adjustment + other.adjustment
        if adjusted > 0.0:
            dist = adjusted
        return _go_duration_seconds(dist)

    def apply_force(
        self,
        config: VivaldiConfig,
        force: float,
        other: Coordinate,
        rng: random.Random | None = None,
    ) -> Coordinate:
        """`ApplyForce`: move `force` seconds away from `other` (toward it when negative);
        the height grows or shrinks in proportion. `rng` draws the random direction used
        when the two coordinates coincide (Serf uses Go's global generator there)."""
        self._check_compatible(other)
        unit, mag = _unit_vector_at(self.vec, other.vec, rng)
        vec = tuple(a + b for a, b in zip(self.vec, [u * force for u in unit], strict=True))
        height = self.height
        if mag > ZERO_THRESHOLD:
            height = (height + other.height) * force / mag + height
            height = max(height, config.height_min)
        return Coordinate(vec=vec, error=self.error, adjustment=self.adjustment, height=height)


def _rpc_number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CoordinateError(f"coordinate {name} is not a number: {value!r}")
    number = float(value)
    if not _finite(number):
        raise CoordinateError(f"coordinate {name} is not finite: {value!r}")
    return number


def _unit_vector_at(
    vec1: Sequence[float], vec2: Sequence[float], rng: random.Random | None
) -> tuple[list[float], float]:
    """`unitVectorAt`: the unit vector pointing at vec1 from vec2, and their distance; a
    random unit vector (distance 0) when they coincide."""
    ret = _diff(vec1, vec2)
    mag = _magnitude(ret)
    if mag > ZERO_THRESHOLD:
        return [component * (1.0 / mag) for component in ret], mag
    draw = (rng or random.Random()).random  # noqa: S311 (not for security)
    ret = [draw() - 0.5 for _ in ret]
    mag = _magnitude(ret)
    if mag > ZERO_THRESHOLD:
        return [component * (1.0 / mag) for component in ret], 0.0
    ret = [0.0] * len(ret)
    ret[0] = 1.0
    return ret, 0.0


def estimate_rtt(a: Coordinate, b: Coordinate) -> float:
    """Estimated RTT in seconds between two coordinates: Serf's `DistanceTo`, which is what
    `serf rtt` prints (as `format_serf_rtt`). Raises CoordinateError on mismatched
    dimensions (where Serf panics)."""
    return a.distance_to(b)


def format_serf_rtt(seconds: float) -> str:
    """The way `serf rtt` prints an estimate: `fmt.Sprintf("%.3f ms", d.Seconds()*1000.0)`."""
    return f"{seconds * 1000.0:.3f} ms"


class VivaldiClient:
    """Serf's `coordinate.Client`: one node's coordinate, updated from RTT observations."""

    def __init__(
        self, config: VivaldiConfig = DEFAULT_CONFIG, rng: random.Random | None = None
    ) -> None:
        self.config = config
        self._rng = rng
        self._coord = Coordinate.origin(config)
        self._origin = Coordinate.origin(config)
        self._adjustment_index = 0
        self._adjustment_samples = [0.0] * config.adjustment_window_size
        self._latency_samples: dict[str, list[float]] = {}
        self.resets = 0

    @property
    def coordinate(self) -> Coordinate:
        """`GetCoordinate` (coordinates are immutable: no copy needed)."""
        return self._coord

    def set_coordinate(self, coord: Coordinate) -> None:
        """`SetCoordinate`: force a known state (checked as Serf checks it)."""
        self._check(coord)
        self._coord = coord

    def forget_node(self, node: str) -> None:
        """`ForgetNode`: drop the latency filter's samples of a node."""
        self._latency_samples.pop(node, None)

    def distance_to(self, other: Coordinate) -> float:
        """`DistanceTo`, seconds."""
        return self._coord.distance_to(other)

    def _check(self, coord: Coordinate) -> None:
        if not self._coord.is_compatible_with(coord):
            raise CoordinateError("dimensions aren't compatible")
        if not coord.is_valid():
            raise CoordinateError("coordinate is invalid")

    def _latency_filter(self, node: str, rtt_s: float) -> float:
        samples = self._latency_samples.setdefault(node, [])
        samples.append(rtt_s)
        if len(samples) > self.config.latency_filter_size:
            del samples[0]
        ordered = sorted(samples)
        return ordered[len(ordered) // 2]

    def _update_vivaldi(self, other: Coordinate, rtt_s: float) -> None:
        config = self.config
        dist = self._coord.distance_to(other)
        rtt_s = max(rtt_s, ZERO_THRESHOLD)
        wrongness = abs(dist - rtt_s) / rtt_s
        total_error = max(self._coord.error + other.error, ZERO_THRESHOLD)
        weight = self._coord.error / total_error
        error = config.vivaldi_ce * weight * wrongness + self._coord.error * (
            1.0 - config.vivaldi_ce * weight
        )
        error = min(error, config.vivaldi_error_max)
        force = config.vivaldi_cc * weight * (rtt_s - dist)
        coord = Coordinate(self._coord.vec, error, self._coord.adjustment, self._coord.height)
        self._coord = coord.apply_force(config, force, other, self._rng)

    def _update_adjustment(self, other: Coordinate, rtt_s: float) -> None:
        window = self.config.adjustment_window_size
        if window == 0:
            return
        self._adjustment_samples[self._adjustment_index] = rtt_s - self._coord.raw_distance_to(
            other
        )
        self._adjustment_index = (self._adjustment_index + 1) % window
        total = 0.0
        for sample in self._adjustment_samples:
            total += sample
        coord = self._coord
        self._coord = Coordinate(coord.vec, coord.error, total / (2.0 * window), coord.height)

    def _update_gravity(self) -> None:
        dist = self._origin.distance_to(self._coord)
        force = -1.0 * math.pow(dist / self.config.gravity_rho, 2.0)
        self._coord = self._coord.apply_force(self.config, force, self._origin, self._rng)

    def update(self, node: str, other: Coordinate, rtt_s: float) -> Coordinate:
        """`Update`: an RTT observation `rtt_s` (seconds) to `node`, whose coordinate is
        `other`; returns the new coordinate. Raises CoordinateError for an incompatible or
        invalid coordinate or an RTT outside [0, 10 s], as Serf does."""
        self._check(other)
        if not (0.0 <= rtt_s <= MAX_RTT_S):  # also refuses NaN
            raise CoordinateError(
                f"round trip time not in valid range, {rtt_s!r} s is not in [0, {MAX_RTT_S:g}] s"
            )
        rtt = self._latency_filter(node, _go_duration_seconds(rtt_s))
        self._update_vivaldi(other, rtt)
        self._update_adjustment(other, rtt)
        self._update_gravity()
        if not self._coord.is_valid():
            self.resets += 1
            self._coord = Coordinate.origin(self.config)
        return self._coord


# --- client placement ------------------------------------------------------------------

# Gradient steps that refine a client's coordinate from its start point.
CLIENT_FIT_ITERATIONS = 30


@dataclass(frozen=True)
class _Fit:
    """The client fit: squared relative errors of the samples, position and height free."""

    samples: tuple[tuple[Coordinate, float], ...]
    height_min: float

    def offsets(self, vec: Sequence[float]) -> list[float]:
        """The estimate to each sampled node, without the client's own height."""
        return [
            _magnitude(_diff(vec, coord.vec)) + coord.height + coord.adjustment
            for coord, _ in self.samples
        ]

    def cost(self, vec: Sequence[float], height: float) -> float:
        total = 0.0
        for offset, (_, rtt_s) in zip(self.offsets(vec), self.samples, strict=True):
            total += ((offset + height - rtt_s) / rtt_s) ** 2
        return total

    def best_height(self, vec: Sequence[float]) -> float:
        """The height minimising `cost` at this position (closed form, >= height_min)."""
        num = den = 0.0
        for offset, (_, rtt_s) in zip(self.offsets(vec), self.samples, strict=True):
            weight = 1.0 / (rtt_s * rtt_s)
            num += weight * (rtt_s - offset)
            den += weight
        return max(self.height_min, num / den)

    def descend(self, vec: list[float], iterations: int) -> tuple[list[float], float, float]:
        """Gradient descent with backtracking on position and height, from `vec`."""
        height = self.best_height(vec)
        cost = self.cost(vec, height)
        step = min(rtt_s for _, rtt_s in self.samples) * 0.5
        for _ in range(iterations):
            grad = [0.0] * len(vec)
            grad_h = 0.0
            for coord, rtt_s in self.samples:
                delta = _diff(vec, coord.vec)
                dist = _magnitude(delta)
                scale = 2.0 * (dist + height + coord.height + coord.adjustment - rtt_s)
                scale /= rtt_s * rtt_s
                grad_h += scale
                if dist > ZERO_THRESHOLD:
                    for i, component in enumerate(delta):
                        grad[i] += scale * component / dist
            norm = math.sqrt(sum(g * g for g in grad) + grad_h * grad_h)
            if norm < 1e-12:
                break
            while step > 1e-9:
                new_vec = [v - step * g / norm for v, g in zip(vec, grad, strict=True)]
                new_height = max(self.height_min, height - step * grad_h / norm)
                new_cost = self.cost(new_vec, new_height)
                if new_cost < cost:
                    vec, height, cost = new_vec, new_height, new_cost
                    step *= 1.5
                    break
                step *= 0.5
            else:
                break
        return vec, height, cost


def _check_samples(samples: Sequence[tuple[Coordinate, float]]) -> None:
    if not samples:
        raise CoordinateError("at least one RTT sample is needed")
    dims = len(samples[0][0].vec)
    for coord, rtt_s in samples:
        if len(coord.vec) != dims:
            raise CoordinateError("coordinate dimensionality does not match")
        if not coord.is_valid():
            raise CoordinateError("coordinate is invalid")
        if not (math.isfinite(rtt_s) and 0.0 < rtt_s <= MAX_RTT_S):
            raise CoordinateError(f"RTT sample {rtt_s!r} s is not in (0, {MAX_RTT_S:g}] s")


def estimate_client(
    samples: Sequence[tuple[Coordinate, float]],
    config: VivaldiConfig = DEFAULT_CONFIG,
    *,
    candidates: Iterable[Coordinate] = (),
) -> Coordinate:
    """Place a client from RTT samples (seconds) to nodes whose coordinates are known.

    The fit minimises the squared relative errors of the samples,
    `sum(((|x - x_i| + h + h_i + a_i - rtt_i) / rtt_i)^2)`, over the position x and the
    client's height h (its access delay, free: browsers on Wi-Fi or mobile have large
    ones). With 3-5 samples in 8 dimensions the samples alone do not pin a point down: many
    points fit them exactly, most of them off the surface the nodes live on. So the fit
    starts where the client most likely is: at the known node (sampled or one of
    `candidates`) whose estimated RTTs to the sampled nodes, plus the best height, match the
    samples best; then `CLIENT_FIT_ITERATIONS` gradient steps refine it.

    Chosen on synthetic matrices (tests/mesh/test_vivaldi.py, `sfumesh bench vivaldi`):
    Vivaldi updates from the origin, or a fit from the nearest sampled node, or the best of
    several starts, or a prior that the client's height is small, all picked the nearest
    node less often; the prior broke down for clients with 20-60 ms of access delay.

    Raises CoordinateError on no samples, mixed dimensions, an invalid coordinate or an
    RTT outside (0, 10 s].
    """
    _check_samples(samples)
    dims = len(samples[0][0].vec)
    fit = _Fit(tuple(samples), config.height_min)
    starts = [coord for coord, _ in samples]
    starts += [coord for coord in candidates if coord.is_valid() and len(coord.vec) == dims]
    best_start = starts[0].vec
    best_cost = math.inf
    for coord in starts:
        cost = fit.cost(coord.vec, fit.best_height(coord.vec))
        if cost < best_cost:
            best_start, best_cost = coord.vec, cost
    vec, height, cost = fit.descend(list(best_start), CLIENT_FIT_ITERATIONS)
    error = min(config.vivaldi_error_max, math.sqrt(cost / len(samples)))
    return Coordinate(vec=tuple(vec), error=error, adjustment=0.0, height=height)


def rank_nodes(client: Coordinate, nodes: Mapping[str, Coordinate]) -> list[tuple[str, float]]:
    """Every node with the estimated RTT (seconds) from `client`, nearest first (ties by
    name). Nodes whose coordinate is invalid or of another dimensionality are left out."""
    ranked = [
        (name, estimate_rtt(client, coord))
        for name, coord in nodes.items()
        if coord.is_valid() and coord.is_compatible_with(client)
    ]
    ranked.sort(key=lambda item: (item[1], item[0]))
    return ranked


def rank_from_samples(
    samples_by_node: Mapping[str, float],
    coords: Mapping[str, Coordinate],
    config: VivaldiConfig = DEFAULT_CONFIG,
) -> list[tuple[str, float]]:
    """What `POST /api/nodes/rank` needs: RTT samples (seconds) from a client to some nodes
    in; every node of `coords` with an RTT (seconds) out, nearest first (ties by name).

    The client is placed with `estimate_client` (the other nodes as candidates); a node the
    client measured keeps its measured RTT (a measurement beats an estimate), the others get
    the estimate. Samples to nodes not in `coords`, or not finite in (0, 10 s], are ignored.
    A node that can be neither measured nor estimated (no usable sample at all, or its own
    coordinate invalid or of another dimensionality) gets `math.inf` and comes last.
    """
    usable = {
        name: rtt_s
        for name, rtt_s in samples_by_node.items()
        if name in coords and math.isfinite(rtt_s) and 0.0 < rtt_s <= MAX_RTT_S
    }
    valid = {name: coord for name, coord in coords.items() if coord.is_valid()}
    if valid:
        counts: dict[int, int] = {}
        for coord in valid.values():
            counts[len(coord.vec)] = counts.get(len(coord.vec), 0) + 1
        dims = max(counts, key=lambda size: (counts[size], size))
        valid = {name: coord for name, coord in valid.items() if len(coord.vec) == dims}
    estimates: dict[str, float] = {}
    samples = [(valid[name], rtt_s) for name, rtt_s in usable.items() if name in valid]
    if samples:
        client = estimate_client(samples, config, candidates=valid.values())
        estimates = dict(rank_nodes(client, valid))
    ranked = [(name, usable.get(name, estimates.get(name, math.inf))) for name in coords]
    ranked.sort(key=lambda item: (item[1], item[0]))
    return ranked


def suggest_probes(
    samples_by_node: Mapping[str, float],
    coords: Mapping[str, Coordinate],
    count: int,
    rng: random.Random | None = None,
) -> list[str]:
    """The nodes a client should measure next, at most `count`, none it measured already.

    Without a usable sample: nodes drawn at random (`rng`). With samples: the unmeasured
    nodes that `rank_from_samples` puts first. 3 random probes, then the 2 nodes suggested
    here, then `rank_from_samples` on all 5, was the clients' procedure before issue 13;
    clients now run `mesh.closest.Procedure` (landmarks, then profile matching: 98% within
    10 ms of the best node on the measured matrix against 69%, `sfumesh bench vivaldi`).
    """
    measured = {
        name
        for name, rtt_s in samples_by_node.items()
        if name in coords and math.isfinite(rtt_s) and 0.0 < rtt_s <= MAX_RTT_S
    }
    if not measured:
        names = sorted(coords)
        chooser = rng or random.Random()  # noqa: S311 (not for security)
        return chooser.sample(names, min(count, len(names)))
    ranked = rank_from_samples(samples_by_node, coords)
    return [name for name, _ in ranked if name not in measured][: max(0, count)]


# --- matrices, simulation, evaluation -------------------------------------------------


@dataclass
class LatencyMatrix:
    """Symmetric RTTs (seconds) between named nodes; pairs may be missing."""

    rtt: dict[str, dict[str, float]] = field(default_factory=dict)

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, str, float]]) -> LatencyMatrix:
        matrix = cls()
        for a, b, rtt_s in pairs:
            matrix.set(a, b, rtt_s)
        return matrix

    def set(self, a: str, b: str, rtt_s: float) -> None:
        if a == b:
            raise ValueError(f"a node has no RTT to itself: {a!r}")
        if not (math.isfinite(rtt_s) and 0.0 < rtt_s <= MAX_RTT_S):
            raise ValueError(f"RTT {rtt_s!r} s between {a!r} and {b!r} not in (0, 10] s")
        self.rtt.setdefault(a, {})[b] = rtt_s
        self.rtt.setdefault(b, {})[a] = rtt_s

    @property
    def nodes(self) -> list[str]:
        return sorted(self.rtt)

    def get(self, a: str, b: str) -> float | None:
        return self.rtt.get(a, {}).get(b)

    def neighbours(self, node: str) -> dict[str, float]:
        return self.rtt.get(node, {})

    def pairs(self) -> Iterator[tuple[str, str, float]]:
        """Every known pair once, (a, b, rtt) with a < b."""
        for a in sorted(self.rtt):
            for b, rtt_s in sorted(self.rtt[a].items()):
                if a < b:
                    yield a, b, rtt_s

    def __len__(self) -> int:
        return len(self.rtt)


EARTH_RADIUS_KM = 6371.0
# Light in fibre covers about 200 km per ms (2/3 c): 0.01 ms of RTT per km of distance.
RTT_MS_PER_KM = 2.0 / 200.0

# Places where an operator might run SFU nodes, far apart (>= 3,600 km from each other):
# (latitude, longitude) in degrees. For synthetic regional meshes; not measurements.
REGIONS: dict[str, tuple[float, float]] = {
    "virginia": (38.9, -77.4),
    "oregon": (45.6, -121.2),
    "sao-paulo": (-23.5, -46.6),
    "frankfurt": (50.1, 8.7),
    "johannesburg": (-26.2, 28.0),
    "mumbai": (19.1, 72.9),
    "singapore": (1.35, 103.8),
    "tokyo": (35.7, 139.7),
    "sydney": (-33.9, 151.2),
}

LatLon = tuple[float, float]


def random_point(rng: random.Random) -> LatLon:
    """A (latitude, longitude) in degrees, uniform over the sphere."""
    return math.degrees(math.asin(rng.uniform(-1.0, 1.0))), rng.uniform(-180.0, 180.0)


def point_near(centre: LatLon, max_km: float, rng: random.Random) -> LatLon:
    """A point uniform over the disc of radius `max_km` around `centre`."""
    angle = max_km * math.sqrt(rng.random()) / EARTH_RADIUS_KM
    bearing = rng.uniform(0.0, 2.0 * math.pi)
    lat1, lon1 = math.radians(centre[0]), math.radians(centre[1])
    lat2 = math.asin(
        math.sin(lat1) * math.cos(angle) + math.cos(lat1) * math.sin(angle) * math.cos(bearing)
    )
    lon2 = lon1 + math.atan2(
        math.sin(bearing) * math.sin(angle) * math.cos(lat1),
        math.cos(angle) - math.sin(lat1) * math.sin(lat2),
    )
    return math.degrees(lat2), (math.degrees(lon2) + 540.0) % 360.0 - 180.0


def great_circle_km(p: LatLon, q: LatLon) -> float:
    """Haversine distance between two (latitude, longitude) points in degrees."""
    lat1, lon1, lat2, lon2 = map(math.radians, (p[0], p[1], q[0], q[1]))
    h = (
        math.sin((lat2 - lat1) / 2) ** 2
        + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    )
    return 2.0 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


def matrix_from_points(
    points: Mapping[str, LatLon],
    seed: int,
    *,
    inflation: tuple[float, float] = (1.3, 1.7),
    access_ms: tuple[float, float] = (1.0, 20.0),
    noise: float = 0.05,
) -> LatencyMatrix:
    """SYNTHETIC RTTs between named points on a globe (not measurements).

    rtt = great-circle distance / (2/3 c), both ways, times a route inflation drawn per pair
    from `inflation`, plus each end's access delay (drawn per node from `access_ms`, RTT
    ms), times (1 + a noise drawn per pair from +-`noise`). Deterministic for a seed.
    """
    rng = random.Random(seed)  # noqa: S311 (not for security)
    names = sorted(points)
    access = {name: rng.uniform(*access_ms) for name in names}
    matrix = LatencyMatrix()
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            km = great_circle_km(points[a], points[b])
            rtt_ms = km * RTT_MS_PER_KM * rng.uniform(*inflation) + access[a] + access[b]
            rtt_ms *= 1.0 + rng.uniform(-noise, noise)
            matrix.set(a, b, max(rtt_ms, 0.01) / 1000.0)
    return matrix


def synthetic_matrix(n: int, seed: int) -> LatencyMatrix:
    """SYNTHETIC RTTs between `n` points spread uniformly over a globe, named `n000`,
    `n001`, ... (`matrix_from_points` with its defaults: route inflation 1.3-1.7, access
    delay 1-20 ms per node, noise +-5%). Not measurements."""
    if n < 2:
        raise ValueError("a matrix needs at least 2 nodes")
    rng = random.Random(seed)  # noqa: S311 (not for security)
    points = {f"n{index:03d}": random_point(rng) for index in range(n)}
    return matrix_from_points(points, seed)


def regional_points(
    clients: int, seed: int, *, regions: Mapping[str, LatLon] = REGIONS, spread_km: float = 1000.0
) -> dict[str, LatLon]:
    """The `regions` themselves plus `clients` points `c000`, `c001`, ... each within
    `spread_km` of a region drawn at random: a regional mesh and its users (synthetic)."""
    rng = random.Random(seed)  # noqa: S311 (not for security)
    names = sorted(regions)
    points = dict(regions)
    for index in range(clients):
        points[f"c{index:03d}"] = point_near(regions[rng.choice(names)], spread_km, rng)
    return points


def simulate(
    matrix: LatencyMatrix,
    rounds: int,
    seed: int,
    *,
    nodes: Iterable[str] | None = None,
    config: VivaldiConfig = DEFAULT_CONFIG,
) -> dict[str, Coordinate]:
    """Vivaldi over a matrix as the paper and Serf's `phantom.go` `Simulate` run it: every
    round, every node (in a fixed order) picks one random other node it has an RTT to and
    updates its coordinate from that node's current coordinate and the RTT. `nodes` limits
    the run to a subset (the others never take part). Deterministic for a seed."""
    rng = random.Random(seed)  # noqa: S311 (not for security)
    members = sorted(set(matrix.nodes if nodes is None else nodes))
    member_set = set(members)
    peers = {
        name: sorted(
            (other, rtt) for other, rtt in matrix.neighbours(name).items() if other in member_set
        )
        for name in members
    }
    clients = {name: VivaldiClient(config, rng) for name in members}
    for _ in range(rounds):
        for name in members:
            options = peers[name]
            if not options:
                continue
            other, rtt_s = options[rng.randrange(len(options))]
            clients[name].update(other, clients[other].coordinate, rtt_s)
    return {name: client.coordinate for name, client in clients.items()}


@dataclass(frozen=True)
class Accuracy:
    """Relative errors |estimate - truth| / truth over every known pair of coordinates."""

    errors: tuple[float, ...]

    @property
    def median(self) -> float:
        return percentile(sorted(self.errors), 0.5)

    @property
    def p90(self) -> float:
        return percentile(sorted(self.errors), 0.9)


def evaluate(matrix: LatencyMatrix, coords: Mapping[str, Coordinate]) -> Accuracy:
    """Serf's `Evaluate`: the relative error of `estimate_rtt` on every pair of `coords`
    whose RTT the matrix knows."""
    errors = [
        abs(estimate_rtt(coords[a], coords[b]) - rtt_s) / rtt_s
        for a, b, rtt_s in matrix.pairs()
        if a in coords and b in coords
    ]
    if not errors:
        raise ValueError("no pair of the matrix has coordinates on both ends")
    return Accuracy(tuple(errors))


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of sorted values, linear between ranks."""
    if not sorted_values:
        raise ValueError("no values")
    rank = (len(sorted_values) - 1) * q
    low = int(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)
