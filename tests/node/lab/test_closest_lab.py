"""The closest-node procedure in the WAN lab (issue 13 item 7): five node regions, a client
whose truly closest node is known from the topology's delays, and a client 300 ms (RTT)
from every node. The clients run `mesh.closest.pick` from their own hosts, over the
emulated links, against the nodes' real Serf coordinates.

Reported (printed and as test properties): each pick, its probes and rounds, and how long
the far client took (listing, and probing alone); asserted: the picks, the probe budget.
Time is measured, never asserted.

Runs inside the private namespace ./scripts/test makes (SFUMESH_PRIVATE_NETNS=1).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from itertools import combinations
from pathlib import Path

import httpx
import pytest

from mesh.closest import FIRST_PROBES, MAX_PROBES, NEXT_PROBES, Pick, pick
from node.lab.cluster import LabCluster
from node.lab.namespaces import namespace_problem
from node.lab.topology import Topology

pytestmark = pytest.mark.skipif(
    namespace_problem() is not None, reason=f"no lab here: {namespace_problem()}"
)

# Node regions and the client's, on a plane: one-way delay (ms) = distance. The client at
# c is 11 ms from r2 and at least 30 ms from any other node (the choice is not close).
PLACES = {
    "r1": (0.0, 0.0),
    "r2": (40.0, 0.0),
    "r3": (80.0, 0.0),
    "r4": (40.0, 40.0),
    "r5": (0.0, 60.0),
    "c": (45.0, 10.0),
}
# The far client: 150 ms one way (300 ms RTT) from every region.
FAR_MS = 150.0


def topology() -> str:
    lines = ["[lab]", "seed = 7", ""]
    regions = [*PLACES, "far"]
    lines += [f"[regions.{name}]" for name in regions]
    hosts = {f"node-{r}": (r, "node") for r in ("r1", "r2", "r3", "r4", "r5")}
    hosts |= {"redis": ("r1", "redis"), "store": ("r1", "store")}
    hosts |= {"client": ("c", "client"), "far-client": ("far", "client")}
    for host, (region, role) in hosts.items():
        lines += ["", f"[hosts.{host}]", f'region = "{region}"', f'role = "{role}"']
    for a, b in combinations(regions, 2):
        far = "far" in (a, b)
        delay = FAR_MS if far else math.dist(PLACES[a], PLACES[b])
        lines += ["", f"[core.{a}.{b}]", f"delay_ms = {delay:.1f}"]
    return "\n".join(lines) + "\n"


def rtt_ms(topo: Topology, a: str, b: str) -> float:
    """The RTT between two hosts by the topology's delays (both ways, every stage)."""
    return sum(p.delay_ms for _, p in topo.path(a, b) + topo.path(b, a))


def run_pick(
    cluster: LabCluster,
    host: str,
    seed_url: str,
    *,
    first: int = FIRST_PROBES,
    then: int = NEXT_PROBES,
    cached_ms: dict[str, float] | None = None,
) -> Pick:
    async def program() -> Pick:
        async with httpx.AsyncClient(timeout=10) as http:
            rng = random.Random(5)
            return await pick(http, seed_url, rng, cached_ms=cached_ms, first=first, then=then)

    return cluster.run(host, program)


@pytest.mark.slow
def test_clients_pick_their_closest_node_in_the_lab(
    tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    with LabCluster(topology(), "closest-lab.toml", tmp_path) as cluster:
        topo = cluster.topology
        cluster.wait_converged(timeout=60)
        truth = {node: rtt_ms(topo, "client", node) for node in cluster.nodes}
        closest = min(truth, key=truth.__getitem__)
        assert closest == "node-r2"
        seed = cluster.urls["node-r1"]

        # Five nodes: all probed at once, exact.
        first = run_pick(cluster, "client", seed)
        assert first.nodes[0].name == closest
        assert (first.probes, first.rounds) == (5, 1)
        # Its measurement is the real path's RTT: never below the emulated delays (how far
        # above depends on the machine's load: reported, not asserted).
        assert truth[closest] <= first.samples_ms[closest]

        # With the coordinates doing the work (2 landmarks, then the 1 best matching node:
        # 3 of 5), once every node has a coordinate.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            listed = cluster.request("client", "GET", f"{seed}/api/nodes").json()["nodes"]
            if len(listed) == 5 and all(n["coordinate"] for n in listed):
                break
            time.sleep(0.5)
        lean = run_pick(cluster, "client", seed, first=2, then=1)
        assert (lean.probes, lean.rounds) == (3, 2)
        # It connects to the best node it measured. Whether the coordinates sent it to the
        # truly closest depends on how far Vivaldi converged in the lab's first minute (on a
        # loaded machine not always: two runs picked a node 38 ms worse): reported, and
        # measured over many cases by `bench vivaldi`.
        measured = {n: ms for n, ms in lean.samples_ms.items() if ms is not None}
        assert lean.nodes[0].name == min(measured, key=measured.__getitem__), lean
        # A returning client: its cached samples send round 1 straight to its nodes.
        back = run_pick(cluster, "client", seed, first=1, then=1, cached_ms=first.samples_ms)
        assert back.nodes[0].name == closest and back.probes == 2

        # The far client (300 ms RTT from every node), two rounds as in a large mesh.
        far = run_pick(cluster, "far-client", seed, first=2, then=2)
        assert far.probes <= MAX_PROBES and far.rounds == 2
        assert cluster.dead() == []
    report = {
        "truth_ms": truth,
        "all_at_once": {
            "pick": first.nodes[0].name,
            "probes": first.probes,
            "measured_ms": round(first.samples_ms[closest], 1),
        },
        "lean": {
            "pick": lean.nodes[0].name,
            "probes": lean.probes,
            "rounds": lean.rounds,
            "error_ms": round(truth[lean.nodes[0].name] - truth[closest], 1),
        },
        "returning": {"pick": back.nodes[0].name, "probes": back.probes},
        "far": {
            "probes": far.probes,
            "rounds": far.rounds,
            "elapsed_s": round(far.elapsed_s, 3),
            "probing_s": round(far.probing_s, 3),
        },
    }
    print(f"\nclosest in the lab: {json.dumps(report)}")
    for key, value in report.items():
        record_property(key, value)
