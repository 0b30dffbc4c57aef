"""The mesh's timings on the default topology (node/lab/mesh_timing.py, issue 13 item 6):
Serf convergence, join and failure detection across the emulated Singapore - Ho Chi Minh
City link. Reported (printed, and written as JSON to SFUMESH_LAB_TIMINGS if set), asserted
only within generous bounds: they measure, they do not tune.

Runs inside the private namespace ./scripts/test makes (SFUMESH_PRIVATE_NETNS=1).
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import pytest

from node.lab.cluster import LabCluster
from node.lab.mesh_timing import serf_failure_detection, serf_join_s
from node.lab.namespaces import namespace_problem

pytestmark = pytest.mark.skipif(
    namespace_problem() is not None, reason=f"no lab here: {namespace_problem()}"
)


@pytest.mark.slow
def test_serf_join_convergence_and_failure_detection_on_the_default_topology(
    tmp_path: Path,
) -> None:
    with LabCluster.from_file(None, tmp_path) as cluster:
        convergence = cluster.wait_converged(timeout=60)
        ready = {host: node.ready_s for host, node in cluster.nodes.items()}
        joins = serf_join_s(cluster, "hcm-node", "sg-node", repeats=5)
        detection = serf_failure_detection(cluster, "hcm-node", "sg-node", timeout=60)
        # the victim's node froze and resumed: it is still the lab's, and alive
        assert cluster.dead() == []
    report = {
        "topology": "default",
        "ready_s": ready,
        "convergence": convergence.as_dict(),
        "serf_join_s": joins,
        "serf_join_s_p50": statistics.median(joins),
        "failure_detection": detection.as_dict(),
    }
    print(f"\nmesh timings: {json.dumps(report)}")
    if os.environ.get("SFUMESH_LAB_TIMINGS"):
        Path(os.environ["SFUMESH_LAB_TIMINGS"]).write_text(json.dumps(report, indent=2) + "\n")
    # one push/pull over a 35 ms RTT path: at least one round trip, far below a second
    assert all(0.035 <= j < 5 for j in joins), joins
    assert 0 < detection.detect_s < 30
    assert detection.recover_s is not None and detection.recover_s < 60
