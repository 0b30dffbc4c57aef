"""mesh/closest.py: the closest-node procedure (pure, seeded), its mirror in the browser
(webapp/closest_core.js: same constants, same rounds and pick in a real Chromium), and
how well it picks on the shipped measured matrix."""

from __future__ import annotations

import json
import math
import random
import re
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mesh.closest as closest
from mesh.closest import (
    FIRST_PROBES,
    MAX_PROBES,
    NEXT_PROBES,
    Procedure,
    estimated_rtts,
    next_probes,
    profile_costs,
    spread_probes,
)
from mesh.vivaldi import Coordinate
from node.bench.vivaldi import load_matrix, run_clients

CORE_JS = Path(__file__).resolve().parents[2] / "webapp" / "closest_core.js"


def coordinate(x: float, y: float, height: float = 0.001) -> Coordinate:
    return Coordinate(vec=(x, y), error=0.2, adjustment=0.0, height=height)


# Nodes on a plane (seconds), as a Vivaldi space with 2 dimensions.
points = st.tuples(
    st.floats(min_value=-0.15, max_value=0.15, allow_nan=False),
    st.floats(min_value=-0.15, max_value=0.15, allow_nan=False),
)
meshes = st.dictionaries(
    st.text("abcdefghijklmnopqrstuvwxyz-0123456789", min_size=1, max_size=6),
    points,
    min_size=1,
    max_size=24,
)


def world(
    nodes: dict[str, tuple[float, float]], client: tuple[float, float], access: float
) -> tuple[dict[str, Coordinate | None], dict[str, float]]:
    """Coordinates of the nodes, and the client's true RTT (s) to each: the plane distance
    plus both heights (the client's height is its access delay)."""
    coords: dict[str, Coordinate | None] = {
        name: coordinate(*point) for name, point in nodes.items()
    }
    truth = {
        name: math.dist(point, client) + 0.001 + access + 0.0005 for name, point in nodes.items()
    }
    return coords, truth


def run_procedure(procedure: Procedure, truth: dict[str, float]) -> list[list[str]]:
    rounds = []
    while probes := procedure.next_round():
        rounds.append(probes)
        for name in probes:
            procedure.record(name, truth[name])
    return rounds


@settings(max_examples=200, deadline=None)
@given(meshes, points, st.floats(0.0, 0.05), st.integers(0, 2**32), st.booleans())
def test_procedure_rounds_and_pick(
    nodes: dict[str, tuple[float, float]],
    client: tuple[float, float],
    access: float,
    seed: int,
    returning: bool,
) -> None:
    coords, truth = world(nodes, client, access)
    cached = dict(list(truth.items())[:3]) if returning else None
    procedure = Procedure(coords, random.Random(seed), cached=cached)
    rounds = run_procedure(procedure, truth)
    probed = [name for probes in rounds for name in probes]
    # Never a node twice, never more than the budget, at most two rounds.
    assert len(probed) == len(set(probed)) == procedure.probes <= MAX_PROBES
    assert len(rounds) == procedure.rounds <= 2
    if len(nodes) <= MAX_PROBES:
        # Few nodes: all of them at once, and the pick is exact.
        assert len(rounds) == 1 and sorted(probed) == sorted(nodes)
    else:
        assert [len(r) for r in rounds] == [FIRST_PROBES, NEXT_PROBES]
    ranking = procedure.ranking()
    # Every node once; the pick is the best measured; measured ones first, by RTT.
    assert sorted(name for name, _, _ in ranking) == sorted(nodes)
    assert ranking[0][0] == min(probed, key=lambda n: (truth[n], n))
    measured = [rtt for _, rtt, was in ranking if was and rtt is not None]
    assert measured == sorted(measured) and len(measured) == len(probed)
    # Seeded: the same inputs, the same rounds.
    again = Procedure(coords, random.Random(seed), cached=cached)
    assert run_procedure(again, truth) == rounds


@settings(max_examples=100, deadline=None)
@given(meshes, st.integers(0, 2**32), st.data())
def test_unanswered_probes_come_last_and_are_not_probed_again(
    nodes: dict[str, tuple[float, float]], seed: int, data: st.DataObject
) -> None:
    coords, truth = world(nodes, (0.0, 0.0), 0.01)
    procedure = Procedure(coords, random.Random(seed))
    dead: set[str] = set()
    seen: list[str] = []
    while probes := procedure.next_round():
        for name in probes:
            assert name not in seen
            seen.append(name)
            if data.draw(st.booleans()):
                dead.add(name)
                procedure.record(name, None)
            else:
                procedure.record(name, truth[name])
    ranking = procedure.ranking()
    tail = [name for name, _, _ in ranking[len(ranking) - len(dead) :]]
    assert sorted(tail) == sorted(dead)
    assert all(rtt is None and not measured for name, rtt, measured in ranking if name in dead)


@settings(max_examples=100, deadline=None)
@given(meshes, st.integers(1, 10), st.integers(0, 2**32))
def test_spread_probes_are_farthest_point_landmarks(
    nodes: dict[str, tuple[float, float]], count: int, seed: int
) -> None:
    rtts = estimated_rtts({name: coordinate(*p) for name, p in nodes.items()})
    chosen = spread_probes(rtts, count, random.Random(seed))
    assert len(chosen) == len(set(chosen)) == min(count, len(nodes))
    for index in range(1, len(chosen)):
        gap = min(rtts[chosen[index]][c] for c in chosen[:index])
        # No node left out was farther from those chosen before it.
        others = [n for n in nodes if n not in chosen[: index + 1]]
        assert all(min(rtts[n][c] for c in chosen[:index]) <= gap for n in others)


@settings(max_examples=100, deadline=None)
@given(meshes, st.data(), st.floats(0.0, 0.05))
def test_a_client_at_a_node_matches_that_node_best(
    nodes: dict[str, tuple[float, float]], data: st.DataObject, height: float
) -> None:
    """Samples that are exactly a node's estimated RTTs plus an access delay: that node's
    profile costs nothing (so it, or an equally good one, comes first), and the fitted
    access delay is the true one."""
    rtts = estimated_rtts({name: coordinate(*p) for name, p in nodes.items()})
    at = data.draw(st.sampled_from(sorted(nodes)))
    probed = data.draw(st.lists(st.sampled_from(sorted(nodes)), min_size=1, unique=True))
    samples = {n: rtts[at][n] + height for n in probed if rtts[at][n] + height >= 1e-5}
    if not samples:
        return
    profiles = profile_costs(rtts, samples)
    mine = next(p for p in profiles if p.node == at)
    assert mine.cost == pytest.approx(0.0, abs=1e-12)
    assert profiles[0].cost == pytest.approx(0.0, abs=1e-12)
    assert mine.height == pytest.approx(height, abs=1e-9)
    suggested = next_probes(rtts, samples, 3)
    assert not set(suggested) & set(samples)
    assert suggested == [p.node for p in profiles if p.node not in samples][:3]


def test_nodes_without_coordinates_are_probed_at_random() -> None:
    coords: dict[str, Coordinate | None] = {f"n{i}": None for i in range(12)}
    procedure = Procedure(coords, random.Random(5))
    truth = {name: 0.01 * (index + 1) for index, name in enumerate(sorted(coords))}
    rounds = run_procedure(procedure, truth)
    assert [len(r) for r in rounds] == [FIRST_PROBES, NEXT_PROBES]
    assert procedure.ranking()[0][0] == min(procedure.samples, key=procedure.samples.__getitem__)
    assert all(rtt is None for _, rtt, measured in procedure.ranking() if not measured)


def test_on_the_measured_matrix_the_pick_is_within_10_ms_nine_times_in_ten() -> None:
    """Issue 13 item 7 on the shipped 54-region matrix (held-out regions as clients), with a
    shorter Vivaldi run than the bench's: the procedure before (3 random + 2 suggested)
    scored 0.69 here; the new one must reach 0.9 with at most 8 probes in 2 rounds."""
    matrix, _, _ = load_matrix(None)
    run = run_clients(matrix, rounds=200, seed=4, holdout=0.2, samples=3, follow_ups=2, trials=1)
    fresh = run.fresh.summary()
    assert fresh["within_10ms_rate"] >= 0.9, fresh
    assert run.returning.summary()["within_10ms_rate"] >= 0.9
    assert fresh["probes_max"] <= MAX_PROBES and fresh["rounds"] == 2
    assert run.before.summary()["within_10ms_rate"] < 0.8  # what the issue measured


# --- the browser's copy -----------------------------------------------------------------

CONSTANTS = (
    "FIRST_PROBES",
    "NEXT_PROBES",
    "PINGS_PER_NODE",
    "PROBE_TIMEOUT_MS",
    "MIN_RTT_S",
    "PICK_CACHE_MS",
    "SAMPLE_CACHE_MS",
)


def js_constants(source: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name, expression in re.findall(r"^export const (\w+) = ([^;]+);$", source, re.M):
        if re.fullmatch(r"[0-9_ *+.e-]+", expression):
            found[name] = eval(expression.replace("_", ""))  # noqa: S307 (digits and * + only)
    return found


def test_browser_uses_the_same_constants() -> None:
    source = resources.files("webapp").joinpath("closest_core.js").read_text()
    found = js_constants(source)
    for name in CONSTANTS:
        assert found[name] == getattr(closest, name), name
    assert "MAX_PROBES = FIRST_PROBES + NEXT_PROBES" in source
    assert closest.MAX_PROBES == closest.FIRST_PROBES + closest.NEXT_PROBES


class Replay(random.Random):
    """Hands out the given numbers from `random()`: both implementations draw the same."""

    def __init__(self, numbers: list[float]) -> None:
        super().__init__(0)
        self.numbers = list(numbers)

    def random(self) -> float:
        return self.numbers.pop(0)


def cases() -> list[dict[str, Any]]:
    """Worlds for both implementations: coordinates from a real Vivaldi run (8 dims,
    adjustments on) so the arithmetic is exercised as in production."""
    from mesh.vivaldi import simulate, synthetic_matrix

    out = []
    for seed, size, returning in ((1, 6, False), (2, 20, False), (3, 20, True), (4, 31, False)):
        matrix = synthetic_matrix(size + 1, seed)
        names = matrix.nodes
        client, members = names[0], names[1:]
        coords = simulate(matrix, 200, seed, nodes=members)
        truth = {name: matrix.rtt[client][name] for name in members}
        rng = random.Random(seed)
        numbers = [rng.random() for _ in range(16)]
        unanswered = sorted(members)[seed % len(members)]
        cached = dict(list(sorted(truth.items()))[:4]) if returning else None
        out.append(
            {
                "coordinates": {name: c.to_rpc() for name, c in coords.items()},
                "truth": truth,
                "numbers": numbers,
                "unanswered": unanswered,
                "cached": cached,
            }
        )
    return out


def python_run(case: dict[str, Any]) -> dict[str, Any]:
    coords: dict[str, Coordinate | None] = {
        n: Coordinate.from_rpc(c) for n, c in case["coordinates"].items()
    }
    procedure = Procedure(coords, Replay(case["numbers"]), cached=case["cached"])
    rounds = []
    while probes := procedure.next_round():
        rounds.append(probes)
        for name in probes:
            procedure.record(name, None if name == case["unanswered"] else case["truth"][name])
    return {"rounds": rounds, "ranking": [list(r) for r in procedure.ranking()]}


JS_RUN = """
async ([source, cases]) => {
  const url = URL.createObjectURL(new Blob([source], {type: "text/javascript"}));
  const core = await import(url);
  return cases.map((c) => {
    const numbers = [...c.numbers];
    const coords = {};
    for (const [name, k] of Object.entries(c.coordinates)) {
      coords[name] = {vec: k.Vec, error: k.Error, adjustment: k.Adjustment, height: k.Height};
    }
    const p = new core.Procedure(coords, () => numbers.shift(), c.cached);
    const rounds = [];
    for (let probes = p.nextRound(); probes.length > 0; probes = p.nextRound()) {
      rounds.push(probes);
      for (const name of probes) p.record(name, name === c.unanswered ? null : c.truth[name]);
    }
    return {rounds, ranking: p.ranking()};
  });
}
"""


@pytest.mark.slow
async def test_browser_runs_the_same_procedure() -> None:
    """Real Chromium runs webapp/closest_core.js on the inputs Python gets: the same
    rounds, the same pick, the same ranking and figures (to float precision)."""
    from tests.browser import chromium, page

    worlds = cases()
    source = CORE_JS.read_text()
    async with chromium() as browser, page(browser) as tab:
        got = await tab.evaluate(JS_RUN, [source, json.loads(json.dumps(worlds))])
    for case, js in zip(worlds, got, strict=True):
        py = python_run(case)
        assert js["rounds"] == py["rounds"]
        assert [r[0] for r in js["ranking"]] == [r[0] for r in py["ranking"]]
        for (_, js_rtt, js_measured), (_, py_rtt, py_measured) in zip(
            js["ranking"], py["ranking"], strict=True
        ):
            assert js_measured == py_measured
            assert (js_rtt is None) == (py_rtt is None)
            if py_rtt is not None:
                assert js_rtt == pytest.approx(py_rtt, rel=1e-12)
    # The worlds do exercise both rounds, an unanswered probe and a returning client.
    assert any(len(python_run(c)["rounds"]) == 2 for c in worlds)
