"""`sfumesh bench vivaldi`: how well Serf's Vivaldi coordinates fit an RTT matrix, and how
well a client placed from a few RTT samples finds its nearest node.

Input: a CSV of measured (or synthetic) round-trip times, rows `a,b,rtt_ms` (see
`parse_matrix_csv`); without `--matrix`, the measured matrix shipped in `mesh/data/`.

1. Accuracy, as in the Vivaldi paper and Serf's `phantom.go`: every node runs Serf's
   algorithm (`mesh.vivaldi.simulate`: each round, each node samples one random other node
   it has an RTT to); then the relative error |estimate - RTT| / RTT of every known pair.
2. Clients: the nodes are split into folds of `holdout` of them; in each fold the held-out
   nodes play clients of a mesh made of the others (which run Vivaldi without them). Each
   client, `trials` times: measures its RTT to `samples` random mesh nodes, is ranked by
   `rank_from_samples`; then measures the `follow_ups` nodes `suggest_probes` names, and
   is ranked again. A case is a hit when the first node is the true nearest mesh node by
   the matrix (or ties with it); the penalty of a miss is the RTT to the chosen node minus
   the RTT to the true nearest. "Best measured" is the baseline without coordinates: the
   sampled node with the smallest RTT. Only mesh nodes with a known RTT to the client take
   part. (The 3 + 2 procedure is what clients did before issue 13; kept for comparison.)
3. The clients' procedure (`mesh.closest.Procedure`, which `mesh/closest.py` and the web
   client run): the same held-out clients, new (round 1: landmarks spread over the mesh)
   and returning (round 1 guided by the samples cached from their first pick), each at
   most `FIRST_PROBES` + `NEXT_PROBES` probes in two rounds of parallel probes. Reported
   as the main figures: `within_10ms_rate`, `probes_max`, `probes_mean`, `procedure_rounds`,
   and the time it takes a client 300 ms from every node (`time_ms_at_300ms_rtt`: each
   round a TCP connect and one request, the node listing one more request).

Everything is seeded (`--seed`): the same matrix and options give the same figures.

Exit status: 0 when the run completed, 1 when the JSON report could not be written, 2 on
bad arguments or an unusable matrix.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

from mesh.closest import FIRST_PROBES, NEXT_PROBES, Rtts, estimated_rtts
from mesh.closest import Procedure as ClientProcedure
from mesh.vivaldi import (
    DEFAULT_CONFIG,
    MAX_RTT_S,
    Coordinate,
    LatencyMatrix,
    evaluate,
    percentile,
    rank_from_samples,
    simulate,
    suggest_probes,
)

DEFAULT_MATRIX = "azure-regions-p95.csv"
DEFAULT_ROUNDS = 1000
DEFAULT_SEED = 1
DEFAULT_HOLDOUT = 0.2
DEFAULT_SAMPLES = 3
DEFAULT_FOLLOW_UPS = 2
DEFAULT_TRIALS = 10
MAX_ROUNDS = 100_000
# A pick within this much of the true nearest node's RTT is "near" (reported beside hits).
NEAR_MS = 10.0
# The client the issue sizes the procedure for: 300 ms RTT to every node.
FAR_CLIENT_RTT_MS = 300.0
# The Vivaldi paper's median relative error on real Internet latencies.
TARGET_MEDIAN_REL_ERROR = 0.11
HEADER = ("a", "b", "rtt_ms")


class MatrixError(ValueError):
    """The matrix CSV cannot be used; the message names the file and line."""


def parse_matrix_csv(text: str, source: str = "<matrix>") -> LatencyMatrix:
    """Read `a,b,rtt_ms` rows: two node names and their round-trip time in milliseconds.

    A header line `a,b,rtt_ms` is optional; blank lines and lines starting with `#` are
    skipped; names are trimmed, may hold spaces, and may be quoted CSV-style. RTTs must be
    numbers in (0, 10000] ms (Serf refuses RTTs above 10 s). The matrix is symmetric: a pair
    appears once in either order, or once in each order, in which case the mean of the two
    is used (measured RTTs differ a little by direction). Missing pairs are allowed. Raises
    MatrixError naming `source` and the line on the first problem.
    """
    seen: dict[tuple[str, str], int] = {}
    directed: dict[tuple[str, str], float] = {}
    reader = csv.reader(io.StringIO(text))
    first = True
    for row in reader:
        line = reader.line_num
        fields = [value.strip() for value in row]
        if not fields or fields == [""] or fields[0].startswith("#"):
            continue
        is_first, first = first, False
        if len(fields) != 3:
            raise MatrixError(
                f"{source}:{line}: expected 3 fields a,b,rtt_ms, got {len(fields)}: {row!r}"
            )
        a, b, value = fields
        try:
            rtt_ms = float(value)
        except ValueError:
            if is_first and tuple(field.lower() for field in fields) == HEADER:
                continue
            raise MatrixError(f"{source}:{line}: rtt_ms is not a number: {value!r}") from None
        if not a or not b:
            raise MatrixError(f"{source}:{line}: empty node name")
        if a == b:
            raise MatrixError(f"{source}:{line}: a node has no RTT to itself: {a!r}")
        if not (math.isfinite(rtt_ms) and 0.0 < rtt_ms <= MAX_RTT_S * 1000.0):
            raise MatrixError(f"{source}:{line}: rtt_ms must be in (0, 10000], got {value!r}")
        if (a, b) in seen:
            raise MatrixError(f"{source}:{line}: pair {a},{b} repeats line {seen[(a, b)]}")
        seen[(a, b)] = line
        directed[(a, b)] = rtt_ms
    matrix = LatencyMatrix()
    for (a, b), rtt_ms in directed.items():
        back = directed.get((b, a))
        if back is not None and b < a:
            continue  # taken with the other direction
        mean_ms = rtt_ms if back is None else (rtt_ms + back) / 2.0
        matrix.set(a, b, mean_ms / 1000.0)
    if len(matrix) < 3:
        raise MatrixError(f"{source}: needs RTTs between at least 3 nodes, has {len(matrix)}")
    return matrix


def load_matrix(path: Path | None) -> tuple[LatencyMatrix, str, str]:
    """The matrix, its label and the SHA-256 of its text; the shipped one without a path."""
    if path is None:
        data = resources.files("mesh").joinpath("data", DEFAULT_MATRIX).read_bytes()
        label = f"mesh/data/{DEFAULT_MATRIX}"
    else:
        try:
            data = path.read_bytes()
        except OSError as error:
            raise MatrixError(f"{path}: cannot read: {error.strerror or error}") from None
        label = str(path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise MatrixError(f"{label}: not UTF-8 text ({error.reason})") from None
    return parse_matrix_csv(text, label), label, hashlib.sha256(data).hexdigest()


@dataclass
class Procedure:
    """How one way of choosing a node did over every client case."""

    label: str
    hits: int = 0
    near: int = 0
    penalties_ms: list[float] = field(default_factory=list)
    probes: list[int] = field(default_factory=list)
    rounds: int = 0

    @property
    def cases(self) -> int:
        return self.hits + len(self.penalties_ms)

    def record(self, chosen_ms: float, nearest_ms: float, probes: int, rounds: int = 1) -> None:
        self.probes.append(probes)
        self.rounds = max(self.rounds, rounds)
        if chosen_ms <= nearest_ms:
            self.hits += 1
            self.near += 1
            return
        self.penalties_ms.append(chosen_ms - nearest_ms)
        if chosen_ms - nearest_ms <= NEAR_MS:
            self.near += 1

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.penalties_ms)
        cases = max(self.cases, 1)
        return {
            "label": self.label,
            "cases": self.cases,
            "nearest_hit_rate": round(self.hits / cases, 4),
            f"within_{NEAR_MS:g}ms_rate": round(self.near / cases, 4),
            "misses": len(ordered),
            "nearest_median_penalty_ms": round(percentile(ordered, 0.5), 2) if ordered else 0.0,
            "nearest_p90_penalty_ms": round(percentile(ordered, 0.9), 2) if ordered else 0.0,
            "probes_mean": round(sum(self.probes) / max(len(self.probes), 1), 2),
            "probes_max": max(self.probes, default=0),
            "rounds": self.rounds,
        }


@dataclass
class ClientRun:
    samples: int
    follow_ups: int
    folds: int = 0
    baseline: Procedure = field(default_factory=lambda: Procedure("best measured"))
    sampled: Procedure = field(default_factory=lambda: Procedure("samples"))
    followed: Procedure = field(default_factory=lambda: Procedure("samples + follow-ups"))
    fresh: Procedure = field(default_factory=lambda: Procedure("closest.py, new client"))
    returning: Procedure = field(default_factory=lambda: Procedure("closest.py, returning"))

    def __post_init__(self) -> None:
        self.baseline.label = f"best measured of {self.samples} random (no coordinates)"
        self.sampled.label = f"{self.samples} random samples, ranked"
        self.followed.label = (
            f"{self.samples} random + {self.follow_ups} suggested, ranked"
            if self.follow_ups
            else self.sampled.label
        )

        self.fresh.label = f"clients' procedure ({FIRST_PROBES} + {NEXT_PROBES}), new client"
        self.returning.label = (
            f"clients' procedure ({FIRST_PROBES} + {NEXT_PROBES}), returning client"
        )

    @property
    def before(self) -> Procedure:
        """The procedure clients ran before issue 13 (3 random + 2 suggested, ranked)."""
        return self.followed if self.follow_ups else self.sampled

    @property
    def main(self) -> Procedure:
        return self.fresh


def folds_of(nodes: list[str], holdout: float, rng: random.Random) -> list[list[str]]:
    """Disjoint groups of about `holdout` of the nodes, covering every node once."""
    order = list(nodes)
    rng.shuffle(order)
    count = max(1, min(len(order) - 2, round(1.0 / holdout)))
    return [order[index::count] for index in range(count)]


def run_clients(
    matrix: LatencyMatrix,
    *,
    rounds: int,
    seed: int,
    holdout: float,
    samples: int,
    follow_ups: int,
    trials: int,
) -> ClientRun:
    """Held-out nodes as clients of a mesh of the others, fold by fold (module docstring)."""
    rng = random.Random(seed)  # noqa: S311 (not for security)
    run = ClientRun(samples=samples, follow_ups=follow_ups)
    for fold, clients in enumerate(folds_of(matrix.nodes, holdout, rng)):
        members = [name for name in matrix.nodes if name not in set(clients)]
        coords = simulate(matrix, rounds, seed + 1 + fold, nodes=members)
        everyone = estimated_rtts(coords)
        run.folds += 1
        for client in clients:
            known = matrix.neighbours(client)
            reachable = {name: coords[name] for name in members if name in known}
            if len(reachable) < 2:
                continue
            nearest_ms = min(known[name] for name in reachable) * 1000.0
            estimates = {a: {b: everyone[a][b] for b in reachable} for a in reachable}
            for _ in range(trials):
                _one_client(run, known, reachable, nearest_ms, rng)
                _closest_client(run, known, reachable, estimates, nearest_ms, rng)
    return run


def _closest_client(
    run: ClientRun,
    known: dict[str, float],
    reachable: dict[str, Coordinate],
    estimates: Rtts,
    nearest_ms: float,
    rng: random.Random,
) -> None:
    """The clients' procedure, new and then returning (with the samples of the first)."""
    cached: dict[str, float] | None = None
    for outcome in (run.fresh, run.returning):
        procedure = ClientProcedure(reachable, rng, cached=cached, rtts=estimates)
        while probes := procedure.next_round():
            for name in probes:
                procedure.record(name, known[name])
        chosen = procedure.ranking()[0][0]
        outcome.record(known[chosen] * 1000.0, nearest_ms, procedure.probes, procedure.rounds)
        cached = dict(procedure.samples)


def _one_client(
    run: ClientRun,
    known: dict[str, float],
    reachable: dict[str, Coordinate],
    nearest_ms: float,
    rng: random.Random,
) -> None:
    probes = suggest_probes({}, reachable, run.samples, rng)
    measured = {name: known[name] for name in probes}
    best = min(measured, key=lambda name: (measured[name], name))
    run.baseline.record(known[best] * 1000.0, nearest_ms, len(measured))
    ranked = rank_from_samples(measured, reachable)
    run.sampled.record(known[ranked[0][0]] * 1000.0, nearest_ms, len(measured))
    if run.follow_ups:
        extra = [name for name, _ in ranked if name not in measured][: run.follow_ups]
        measured.update({name: known[name] for name in extra})
        ranked = rank_from_samples(measured, reachable)
        run.followed.record(known[ranked[0][0]] * 1000.0, nearest_ms, len(measured), 2)


def bench(
    matrix: LatencyMatrix,
    *,
    label: str,
    digest: str,
    rounds: int,
    seed: int,
    holdout: float,
    samples: int,
    follow_ups: int,
    trials: int,
) -> dict[str, Any]:
    """Run both parts; the figures for the table and the JSON report."""
    from node.bench.report import rounded  # here: importing this module stays cheap for the CLI

    started = time.perf_counter()
    coords = simulate(matrix, rounds, seed)
    accuracy = evaluate(matrix, coords)
    clients = run_clients(
        matrix,
        rounds=rounds,
        seed=seed,
        holdout=holdout,
        samples=samples,
        follow_ups=follow_ups,
        trials=trials,
    )
    main = clients.main.summary()
    before = clients.before.summary()
    procedures = [clients.baseline, clients.sampled] + ([clients.followed] if follow_ups else [])
    keys = ["best_measured", "samples"] + (["follow_ups"] if follow_ups else [])
    procedures += [clients.fresh, clients.returning]
    keys += ["closest_new", "closest_returning"]
    returning = clients.returning.summary()
    errors = accuracy.errors
    return {
        "bench": "vivaldi",
        "matrix": label,
        "matrix_sha256": digest,
        "nodes": len(matrix),
        "pairs": len(errors),
        "rounds": rounds,
        "seed": seed,
        "config": {
            "dimensionality": DEFAULT_CONFIG.dimensionality,
            "vivaldi_error_max": DEFAULT_CONFIG.vivaldi_error_max,
            "vivaldi_ce": DEFAULT_CONFIG.vivaldi_ce,
            "vivaldi_cc": DEFAULT_CONFIG.vivaldi_cc,
            "adjustment_window_size": DEFAULT_CONFIG.adjustment_window_size,
            "height_min": DEFAULT_CONFIG.height_min,
            "latency_filter_size": DEFAULT_CONFIG.latency_filter_size,
            "gravity_rho": DEFAULT_CONFIG.gravity_rho,
        },
        "median_rel_error": round(accuracy.median, 4),
        "p90_rel_error": round(accuracy.p90, 4),
        "mean_rel_error": round(sum(errors) / len(errors), 4),
        "target_median_rel_error": TARGET_MEDIAN_REL_ERROR,
        "target_met": accuracy.median <= TARGET_MEDIAN_REL_ERROR,
        "holdout": holdout,
        "folds": clients.folds,
        "samples": samples,
        "follow_ups": follow_ups,
        "trials": trials,
        "client_procedure": clients.main.label,
        "nearest_hit_rate": main["nearest_hit_rate"],
        "nearest_median_penalty": main["nearest_median_penalty_ms"],
        "nearest_median_penalty_unit": "ms",
        f"within_{NEAR_MS:g}ms_rate": main[f"within_{NEAR_MS:g}ms_rate"],
        f"returning_within_{NEAR_MS:g}ms_rate": returning[f"within_{NEAR_MS:g}ms_rate"],
        "probes_max": max(main["probes_max"], returning["probes_max"]),
        "probes_mean": main["probes_mean"],
        "procedure_rounds": main["rounds"],
        f"time_ms_at_{FAR_CLIENT_RTT_MS:g}ms_rtt": time_at(FAR_CLIENT_RTT_MS, main["rounds"]),
        f"probes_time_ms_at_{FAR_CLIENT_RTT_MS:g}ms_rtt": time_at(
            FAR_CLIENT_RTT_MS, main["rounds"], listing=False
        ),
        f"before_within_{NEAR_MS:g}ms_rate": before[f"within_{NEAR_MS:g}ms_rate"],
        "before_procedure": clients.before.label,
        "procedures": {
            key: procedure.summary() for key, procedure in zip(keys, procedures, strict=True)
        },
        "elapsed_s": rounded(time.perf_counter() - started),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def time_at(rtt_ms: float, rounds: int, *, listing: bool = True) -> float:
    """How long the clients' procedure takes a client `rtt_ms` from every node: each round
    of parallel probes a TCP connect and one request (2 RTT), and, with `listing`, the node
    listing before it (one request on the page's open connection). The node's own work and
    TLS are left out (plain HTTP; a TLS 1.3 handshake adds one RTT per round)."""
    return rtt_ms * (2 * rounds + (1 if listing else 0))


def print_table(figures: dict[str, Any]) -> None:
    print(
        f"sfumesh bench vivaldi: {figures['matrix']}: {figures['nodes']} nodes, "
        f"{figures['pairs']} pairs, {figures['rounds']} rounds, seed {figures['seed']}"
    )
    met = "met" if figures["target_met"] else "NOT met"
    print(
        f"Vivaldi (Serf's algorithm and defaults, {DEFAULT_CONFIG.dimensionality} dimensions "
        f"+ height), every node in the mesh:"
    )
    print(
        f"  relative error: median {100 * figures['median_rel_error']:.1f}%, "
        f"p90 {100 * figures['p90_rel_error']:.1f}%, mean {100 * figures['mean_rel_error']:.1f}%"
        f"  (target median <= {100 * TARGET_MEDIAN_REL_ERROR:.0f}%: {met})"
    )
    print(
        f"Clients: held-out nodes, {figures['folds']} folds of ~{100 * figures['holdout']:.0f}%,"
        f" {figures['trials']} trials each"
    )
    near = f"within {NEAR_MS:g} ms"
    header = (
        f"{'procedure':<52} {'cases':>6} {'nearest':>8} {near:>13} "
        f"{'median penalty':>15} {'p90 penalty':>12} {'probes':>7} {'rounds':>6}"
    )
    print(header)
    print("-" * len(header))
    for summary in figures["procedures"].values():
        print(
            f"{summary['label']:<52} {summary['cases']:>6} "
            f"{100 * summary['nearest_hit_rate']:>7.1f}% "
            f"{100 * summary[f'within_{NEAR_MS:g}ms_rate']:>12.1f}% "
            f"{summary['nearest_median_penalty_ms']:>12.1f} ms "
            f"{summary['nearest_p90_penalty_ms']:>9.1f} ms "
            f"{summary['probes_max']:>7} {summary['rounds']:>6}"
        )
    print("(penalty: RTT to the chosen node minus RTT to the true nearest, over misses;")
    print(" probes: the most any case used)")
    far = f"{FAR_CLIENT_RTT_MS:g}"
    print(
        f"clients' procedure: within {NEAR_MS:g} ms of the best node "
        f"{100 * figures[f'within_{NEAR_MS:g}ms_rate']:.1f}% (new client), "
        f"{100 * figures[f'returning_within_{NEAR_MS:g}ms_rate']:.1f}% (returning), "
        f"before {100 * figures[f'before_within_{NEAR_MS:g}ms_rate']:.1f}%; "
        f"at most {figures['probes_max']} probes in {figures['procedure_rounds']} rounds: "
        f"{figures[f'probes_time_ms_at_{far}ms_rtt']:.0f} ms of probing "
        f"({figures[f'time_ms_at_{far}ms_rtt']:.0f} ms with the listing) at {far} ms RTT"
    )
    print(f"elapsed: {figures['elapsed_s']} s")


def _add(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, *flags: str, **kwargs: Any
) -> None:
    """Add an option unless the parser has it already (`sfumesh bench` shares options such
    as --json and --rounds between benches)."""
    try:
        parser.add_argument(*flags, **kwargs)
    except argparse.ArgumentError:
        pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `sfumesh bench vivaldi`, added to `parser` (those it lacks)."""
    group = parser.add_argument_group("vivaldi (Serf's network coordinates on an RTT matrix)")
    _add(
        group,
        "--matrix",
        type=Path,
        help=f"vivaldi: CSV of a,b,rtt_ms rows (default: mesh/data/{DEFAULT_MATRIX}, measured)",
    )
    _add(
        group,
        "--rounds",
        type=int,
        help=f"vivaldi: rounds of Vivaldi updates per node (default {DEFAULT_ROUNDS})",
    )
    _add(group, "--seed", type=int, help=f"vivaldi: random seed (default {DEFAULT_SEED})")
    _add(
        group,
        "--holdout",
        type=float,
        help=f"vivaldi: fraction of nodes held out as clients per fold (default {DEFAULT_HOLDOUT})",
    )
    _add(
        group,
        "--samples",
        type=int,
        help=f"vivaldi: random RTT samples per client (default {DEFAULT_SAMPLES})",
    )
    _add(
        group,
        "--follow-ups",
        type=int,
        help=f"vivaldi: suggested probes after the samples (default {DEFAULT_FOLLOW_UPS})",
    )
    _add(
        group,
        "--trials",
        type=int,
        help=f"vivaldi: cases per held-out client (default {DEFAULT_TRIALS})",
    )
    _add(group, "--json", type=Path, help="also write the figures here")


def _option(args: argparse.Namespace, name: str, default: Any) -> Any:
    value = getattr(args, name, None)
    return default if value is None else value


def run(args: argparse.Namespace) -> int:
    """`sfumesh bench vivaldi`: 0 when it ran, 1 when the JSON could not be written, 2 on
    bad arguments or a bad matrix."""
    rounds: int = _option(args, "rounds", DEFAULT_ROUNDS)
    seed: int = _option(args, "seed", DEFAULT_SEED)
    holdout: float = _option(args, "holdout", DEFAULT_HOLDOUT)
    samples: int = _option(args, "samples", DEFAULT_SAMPLES)
    follow_ups: int = _option(args, "follow_ups", DEFAULT_FOLLOW_UPS)
    trials: int = _option(args, "trials", DEFAULT_TRIALS)
    if (
        not 1 <= rounds <= MAX_ROUNDS
        or not 0.0 < holdout <= 0.5
        or samples < 1
        or follow_ups < 0
        or trials < 1
    ):
        print(
            f"sfumesh bench: --rounds 1..{MAX_ROUNDS}, --holdout in (0, 0.5], --samples >= 1, "
            "--follow-ups >= 0, --trials >= 1",
            file=sys.stderr,
        )
        return 2
    try:
        matrix, label, digest = load_matrix(_option(args, "matrix", None))
    except MatrixError as error:
        print(f"sfumesh bench: {error}", file=sys.stderr)
        return 2
    figures = bench(
        matrix,
        label=label,
        digest=digest,
        rounds=rounds,
        seed=seed,
        holdout=holdout,
        samples=samples,
        follow_ups=follow_ups,
        trials=trials,
    )
    print_table(figures)
    from node.bench.report import write_report

    json_path: Path | None = getattr(args, "json", None)
    if json_path is not None and not write_report(json_path, figures):
        return 1
    return 0
