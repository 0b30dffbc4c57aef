"""Issue 20 in the WAN lab: relayed calls under loss never freeze for more than 2 s.

Two node regions 17 ms apart (one way) with 2% random loss on the relay path; the client
host 40 ms from node-a behind 2% random loss and 3 ms from node-b behind bursty
(Gilbert-Elliott) loss, so participant A (on node-a) has the random loss and B (on node-b)
the bursts. Each call: A on node-a, B on node-b, one room, media relayed both
ways; after a warm-up, no gap between decoded video frames longer than 2 s on either side.

The issue asks for 20 calls of 60 s (and 5 bursty); the suite runs 3 calls of 20 s on one
cluster, every call over both kinds of loss. `SFUMESH_LAB_LOSS_CALLS` and
`SFUMESH_LAB_LOSS_CALL_S` make it the issue's run (e.g. 20 and 60).
"""

from __future__ import annotations

import asyncio
import functools
import os
import secrets
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from node.bench.report import metric_sum
from node.lab.cluster import LabCluster
from node.lab.namespaces import namespace_problem
from node.local.participant import MediaPeer, until
from tests.node.live_client import create_room, sign_up

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(namespace_problem() is not None, reason=f"no lab: {namespace_problem()}"),
]

CALLS = int(os.environ.get("SFUMESH_LAB_LOSS_CALLS", "3"))
CALL_S = float(os.environ.get("SFUMESH_LAB_LOSS_CALL_S", "20"))
WARM_UP_S = min(10.0, CALL_S / 4)
MAX_GAP_S = 2.0

TOPOLOGY = """\
[lab]
seed = 20

[regions.a]
[regions.b]
[regions.c]

[hosts.node-a]
region = "a"
role = "node"

[hosts.redis]
region = "a"
role = "redis"

[hosts.store]
region = "a"
role = "store"

[hosts.node-b]
region = "b"
role = "node"

[hosts.client]
region = "c"
role = "client"

[core.a.b]
delay_ms = 17
loss = 0.02

[core.a.c]
delay_ms = 40
loss = 0.02

[core.b.c]
delay_ms = 3
burst = { p_good_to_bad = 0.01, p_bad_to_good = 0.3, loss_bad = 0.5 }
"""


async def _call(url_a: str, url_b: str, index: int) -> dict[str, Any]:
    """One relayed call; the longest video gaps after the warm-up and the PLIs sent."""
    async with httpx.AsyncClient(timeout=30.0) as http, AsyncExitStack() as stack:
        first, second = await sign_up(http, url_a, "a"), await sign_up(http, url_b, "b")
        slug = f"loss-{index}-{secrets.token_hex(3)}"
        await create_room(first, url_a, slug)
        peers = []
        for user, url in ((first, url_a), (second, url_b)):
            sock = await user.connect(url)
            stack.push_async_callback(sock.close)
            await user.join(sock, slug, url)
            peer = MediaPeer(sock, user.username)
            stack.push_async_callback(peer.close)
            await peer.start_publishing()
            peers.append((peer, sock.session_id))
        (a, a_id), (b, b_id) = peers
        await until(
            lambda: a.decodes(b_id, 5) and b.decodes(a_id, 5),
            "media both ways",
            describe=lambda: f"{a.describe()}; {b.describe()}",
        )
        warm = time.monotonic() + WARM_UP_S
        await asyncio.sleep(CALL_S)
        result: dict[str, Any] = {}
        for name, peer, other, sender in (("A", a, b_id, b), ("B", b, a_id, a)):
            video = [r for r in peer.from_(other, "video") if not r.ended.is_set()]
            assert video, peer.describe()
            # never more frames decoded than the far side made (issue 22, item 1)
            assert sum(r.frames for r in video) <= sender.pattern.frames
            result[name] = {
                "longest_gap_s": max(r.longest_gap(after=warm) for r in video),
                "frames": sum(r.frames for r in video),
                "plis": sum(r.keyframe_requests for r in video),
                "holes_skipped": sum(r.holes_skipped for r in video),
            }
        return result


def _node_figures(cluster: LabCluster) -> dict[str, dict[str, float]]:
    figures = {}
    for host, url in cluster.urls.items():
        text = cluster.request("client", "GET", f"{url}/metrics").text
        figures[host] = {
            name: metric_sum(text, f"sfumesh_media_{name}")
            for name in (
                "keyframe_wait_seconds_count",
                "keyframe_wait_max_seconds",
                "keyframe_retries_total",
                "keyframe_gave_up_total",
            )
        }
        figures[host]["duplicates"] = metric_sum(
            text, "sfumesh_media_dropped_packets_total", 'reason="duplicate"'
        )
    return figures


def test_relayed_calls_under_loss_have_no_long_video_gap(tmp_path: Path) -> None:
    with LabCluster(TOPOLOGY, "relay-loss", tmp_path) as cluster:
        cluster.wait_converged(timeout=60)
        url_a, url_b = cluster.urls["node-a"], cluster.urls["node-b"]
        results = []
        for index in range(CALLS):
            results.append(cluster.run("client", functools.partial(_call, url_a, url_b, index)))
        figures = _node_figures(cluster)
        print("relay-loss calls:", results, "nodes:", figures)
        for result in results:
            for side in ("A", "B"):
                assert result[side]["longest_gap_s"] <= MAX_GAP_S, (results, figures)
        for host in figures.values():
            assert host["keyframe_gave_up_total"] == 0, figures
