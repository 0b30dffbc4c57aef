"""Issue 20 in the WAN lab: relayed calls under loss never freeze for more than 2 s.

Three node regions 17 ms apart (one way): 2% random loss between node-a and node-b and
between node-b and node-d, bursty (Gilbert-Elliott) loss between node-a and node-d. The
client host is 40 ms from node-a behind 2% random loss, 3 ms from node-b behind bursty loss
and 3 ms from node-d without loss. Three kinds of call, one room each, media relayed:

* `random`: A on node-a, B on node-b (random loss on the relay, random and bursty on the
  participants' access links);
* `bursty`: A on node-a, D on node-d (the relay link itself loses in bursts);
* `three`: A, B and D on their three nodes: every node relays to both others. The span
  planner never chains relays (a track goes from the node it is published on straight to
  every node with a subscriber: `mesh.span`), so publisher -> node -> one relay -> node ->
  subscriber is the longest path it builds; with three nodes each of the three links
  carries four tracks.

After a warm-up: no gap between decoded video frames longer than 2 s in any direction,
never more frames decoded than the far side made, no keyframe wait given up on any node.

The issue asks for 20 calls of 60 s (and 5 bursty); the suite runs one call of each kind,
20 s each, on one cluster. `SFUMESH_LAB_LOSS_CALLS` and `SFUMESH_LAB_LOSS_CALL_S` make it
the issue's run: calls cycle random, bursty, three, random, so 20 calls are 10 random, 5
bursty and 5 with three nodes.
"""

from __future__ import annotations

import asyncio
import functools
import os
import secrets
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Final

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

#: which node hosts each participant, per kind of call
KINDS: Final = {
    "random": ("node-a", "node-b"),
    "bursty": ("node-a", "node-d"),
    "three": ("node-a", "node-b", "node-d"),
}
ORDER: Final = ("random", "bursty", "three", "random")

TOPOLOGY = """\
[lab]
seed = 20

[regions.a]
[regions.b]
[regions.c]
[regions.d]

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

[hosts.node-d]
region = "d"
role = "node"

[hosts.client]
region = "c"
role = "client"

[core.a.b]
delay_ms = 17
loss = 0.02

[core.b.d]
delay_ms = 17
loss = 0.02

[core.a.d]
delay_ms = 17
burst = { p_good_to_bad = 0.01, p_bad_to_good = 0.3, loss_bad = 0.5 }

[core.a.c]
delay_ms = 40
loss = 0.02

[core.b.c]
delay_ms = 3
burst = { p_good_to_bad = 0.01, p_bad_to_good = 0.3, loss_bad = 0.5 }

[core.c.d]
delay_ms = 3
"""


async def _call(nodes: dict[str, str], kind: str, index: int) -> dict[str, Any]:
    """One relayed call over `nodes` (host -> URL, a participant on each, named after its
    node's letter); per direction the longest video gap after the warm-up, frames decoded
    and keyframe requests sent."""
    urls = list(nodes.values())
    async with httpx.AsyncClient(timeout=30.0) as http, AsyncExitStack() as stack:
        slug = f"loss-{index}-{secrets.token_hex(3)}"
        users = [await sign_up(http, urls[0], "p")]
        await create_room(users[0], urls[0], slug)  # before its connection idles out
        users += [await sign_up(http, url, "p") for url in urls[1:]]
        peers: list[tuple[MediaPeer, str]] = []
        for n, (user, url) in enumerate(zip(users, urls, strict=True)):
            sock = await user.connect(url)
            stack.push_async_callback(sock.close)
            await user.join(sock, slug, url)
            peer = MediaPeer(sock, list(nodes)[n].removeprefix("node-").upper())
            stack.push_async_callback(peer.close)
            await peer.start_publishing()
            peers.append((peer, sock.session_id))
        await until(
            lambda: all(
                p.decodes(other, 5) for p, me in peers for _, other in peers if other != me
            ),
            f"media every way ({kind})",
            describe=lambda: "; ".join(p.describe() for p, _ in peers),
        )
        warm = time.monotonic() + WARM_UP_S
        await asyncio.sleep(CALL_S)
        result: dict[str, Any] = {"kind": kind}
        for peer, me in peers:
            for sender, other in peers:
                if other == me:
                    continue
                video = [r for r in peer.from_(other, "video") if not r.ended.is_set()]
                assert video, peer.describe()
                # never more frames decoded than the far side made (issue 22, item 1)
                assert sum(r.frames for r in video) <= sender.pattern.frames
                result[f"{sender.name}->{peer.name}"] = {
                    "longest_gap_s": round(max(r.longest_gap(after=warm) for r in video), 2),
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
        results = []
        for index in range(CALLS):
            kind = ORDER[index % len(ORDER)]
            nodes = {host: cluster.urls[host] for host in KINDS[kind]}
            try:
                results.append(cluster.run("client", functools.partial(_call, nodes, kind, index)))
            except (AssertionError, httpx.HTTPError) as error:  # reported with the others
                results.append({"kind": kind, "error": f"{type(error).__name__}: {error}"[:2000]})
            print(f"relay-loss call {index + 1}/{CALLS}:", results[-1], flush=True)
        figures = _node_figures(cluster)
        print("relay-loss nodes:", figures)
        assert not [r for r in results if "error" in r], results
        for result in results:
            for direction, side in result.items():
                if direction != "kind":
                    assert side["longest_gap_s"] <= MAX_GAP_S, (direction, results, figures)
        for host in figures.values():
            assert host["keyframe_gave_up_total"] == 0, figures
