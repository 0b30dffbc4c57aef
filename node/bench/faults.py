"""`sfumesh bench faults`: two faults injected mid-call in the WAN lab (issue 13, item 8).

The lab: Singapore and Ho Chi Minh City as in the shipped topology (the sg-hcm core link
with its figures, Redis and the store in Singapore), and one peers host near both (its two
participants run in one program, so one clock times both sides). A on the Singapore node, B
on the HCM node, one room, media relayed sg <-> hcm. Both are `FailoverParticipant`s
(node/local/participant.py: the web client's procedure, in aiortc).

1. **Link cut**: the sg-hcm core link (both directions) is cut in the emulator for
   `--cut` seconds (10), then restored. This also cuts the HCM node from Redis and the
   store, and the two nodes' Serf agents from each other. Reported: the media gap per
   direction (the longest time without a decoded video frame, from just before the cut until
   video flows again after it), and whether media came back.
2. **Node kill**: the Singapore node is killed (SIGKILL). A notices (its socket closes),
   fails over to the next closest live node (HCM) and joins there. Reported: the time from
   the kill until A decodes B again and B decodes A's new tracks.

Keys: `link_cut_media_gap_s` (the worse direction), `node_kill_media_back_s`, plus the
detail (`link_cut_gap_s` per direction, `*_recovered`, the failovers and the lab's own count
of packets it cut). Runs in a private network namespace (re-executes itself in one).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import secrets
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from mesh.closest import pick_node
from mesh.process import ServiceError
from node.bench.harness import ranked_first, sign_up
from node.bench.report import rounded, say, write_report
from node.lab.cluster import LabCluster
from node.lab.namespaces import LabError, namespace_problem
from node.local.netns import NetnsError, in_private_netns, reexec_in_private_netns
from node.local.participant import FailoverParticipant, until
from node.log import setup_logging

CUT_LINKS = ("sg->hcm", "hcm->sg")
#: how often the decoded frame counts are read (the gap's resolution)
SAMPLE_S = 0.05
#: frames of new media (each direction, each kind) that count as back after a node kill
FRAMES_BACK = 3

# The shipped topology's Singapore and HCM (node/lab/topologies/default.toml: the sg-hcm
# figures, Redis and the store beside the Singapore node), and a peers host near both.
TOPOLOGY = """\
[lab]
seed = 13

[regions.sg]
description = "Singapore"

[regions.hcm]
description = "Ho Chi Minh City"

[regions.peers]
description = "both participants, near both nodes"

[hosts.sg-node]
region = "sg"
role = "node"

[hosts.redis]
region = "sg"
role = "redis"

[hosts.store]
region = "sg"
role = "store"

[hosts.hcm-node]
region = "hcm"
role = "node"

[hosts.peers]
region = "peers"
role = "client"

[core.sg.hcm]
delay_ms = 17.5
jitter_ms = 2
loss = 0.001

[core.sg.sg]
delay_ms = 0.25

[core.peers.sg]
delay_ms = 10

[core.peers.hcm]
delay_ms = 5
"""


@dataclass
class Faults:
    cut_s: float
    link_cut_gap_s: dict[str, float | None] = field(default_factory=dict)
    link_cut_recovered: bool = False
    node_kill_media_back_s: float | None = None
    node_kill_recovered: bool = False
    failovers: list[dict[str, Any]] = field(default_factory=list)
    packets_cut: int = 0

    def report(self) -> dict[str, Any]:
        gaps = [g for g in self.link_cut_gap_s.values() if g is not None]
        worst = max(gaps) if self.link_cut_recovered and gaps else None
        return {
            "link_cut_media_gap_s": rounded(worst),
            "node_kill_media_back_s": rounded(self.node_kill_media_back_s),
            "link_cut_s": self.cut_s,
            "link_cut_gap_s": {k: rounded(v) for k, v in self.link_cut_gap_s.items()},
            "link_cut_recovered": self.link_cut_recovered,
            "node_kill_recovered": self.node_kill_recovered,
            "failovers": self.failovers,
            "packets_cut": self.packets_cut,
        }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("faults (a link cut and a node kill in the WAN lab)")
    group.add_argument("--cut", type=float, default=10.0, help="faults: link cut length, s")


class Sampler:
    """Times at which each side decoded more of the other's video (every SAMPLE_S)."""

    def __init__(self, a: FailoverParticipant, b: FailoverParticipant) -> None:
        self.sides = {"sg->hcm": (b, a), "hcm->sg": (a, b)}  # direction: (receiver, sender)
        self.rises: dict[str, list[float]] = {d: [] for d in self.sides}
        self._last = dict.fromkeys(self.sides, 0)
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            now = time.monotonic()
            for direction, (receiver, sender) in self.sides.items():
                frames = receiver.frames_from(sender.session_id)
                if frames > self._last[direction]:
                    self.rises[direction].append(now)
                    self._last[direction] = frames
            await asyncio.sleep(SAMPLE_S)

    def back_after(self, moment: float) -> bool:
        return all(any(t > moment for t in rises) for rises in self.rises.values())

    def gap(self, direction: str, start: float, restored: float) -> float | None:
        """The longest time without a new frame from `start` until the first frame after
        `restored` (None: none came after it)."""
        rises = self.rises[direction]
        after = [t for t in rises if t > restored]
        if not after:
            return None
        window = [t for t in rises if start <= t <= after[0]]
        before = [t for t in rises if t < start]
        if before:
            window.insert(0, before[-1])
        return max((b - a for a, b in itertools.pairwise(window)), default=0.0)

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def _new_media(receiver: FailoverParticipant, owner: str, before: set[int]) -> bool:
    peer = receiver.peer
    if peer is None:
        return False
    return all(
        any(
            id(r) not in before and r.frames >= FRAMES_BACK and not r.ended.is_set()
            for r in peer.from_(owner, kind)
        )
        for kind in ("video", "audio")
    )


async def _faults(cluster: LabCluster, figures: Faults, timeout_s: float) -> None:
    sg, hcm = cluster.urls["sg-node"], cluster.urls["hcm-node"]
    async with httpx.AsyncClient(timeout=30) as http:
        ranking = await pick_node(http, sg)
        owner = await sign_up(http, sg, f"x{secrets.token_hex(5)}")
        slug = f"faults-{secrets.token_hex(3)}"
        reply = await http.post(
            f"{sg}/api/rooms", json={"slug": slug}, headers={"Authorization": f"Bearer {owner}"}
        )
        reply.raise_for_status()
        a = FailoverParticipant(http, owner, slug, ranked_first(ranking, "sg-node"), "A")
        b = FailoverParticipant(
            http,
            await sign_up(http, hcm, f"x{secrets.token_hex(5)}"),
            slug,
            ranked_first(ranking, "hcm-node"),
            "B",
        )
        sampler: Sampler | None = None
        try:
            await a.start()
            await b.start()
            await until(
                lambda: a.frames_from(b.session_id) > 20 and b.frames_from(a.session_id) > 20,
                "A and B to decode each other across the relay",
                within_s=timeout_s,
            )
            sampler = Sampler(a, b)
            await asyncio.sleep(1.0)

            # 1. the sg-hcm link cut for `cut_s`
            cut_at = time.monotonic()
            cluster.lab.cut(CUT_LINKS)
            try:
                await asyncio.sleep(figures.cut_s)
            finally:
                cluster.lab.cut(CUT_LINKS, cut=False)
            restored = time.monotonic()
            try:
                await until(
                    lambda: sampler.back_after(restored + 0.5),
                    "media after the cut",
                    within_s=timeout_s,
                )
                figures.link_cut_recovered = True
            except AssertionError as error:
                say(f"sfumesh bench faults: {error}", err=True)
            for direction in sampler.rises:
                figures.link_cut_gap_s[direction] = sampler.gap(direction, cut_at, restored)
            links = cluster.lab.stats()["links"]
            figures.packets_cut = sum(int(links[name]["drops"]["cut"]) for name in CUT_LINKS)

            # 2. the Singapore node killed
            await until(
                lambda: a.peer is not None and b.peer is not None,
                "both connected before the kill",
                within_s=timeout_s,
            )
            assert b.peer is not None
            before = {id(r) for r in b.peer.received}
            pid = cluster.nodes["sg-node"].local.process.pid
            assert pid is not None
            killed_at = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            try:
                await until(
                    lambda: (
                        bool(a.failovers)
                        and _new_media(a, b.session_id, set())
                        and _new_media(b, a.session_id, before)
                    ),
                    "media back after the kill",
                    within_s=timeout_s,
                    describe=lambda: f"failovers {a.failovers}",
                )
                figures.node_kill_media_back_s = time.monotonic() - killed_at
                figures.node_kill_recovered = True
            except AssertionError as error:
                say(f"sfumesh bench faults: {error}", err=True)
            figures.failovers = [
                {
                    "client": p.name,
                    "from": f.dead,
                    "to": f.reached,
                    "rejoined_s": round(f.joined_at - f.detected_at, 2),
                }
                for p in (a, b)
                for f in p.failovers
            ]
        finally:
            if sampler is not None:
                await sampler.stop()
            await a.close()
            await b.close()


def run_faults(data_dir: Path, cut_s: float = 10.0, timeout_s: float = 40.0) -> Faults:
    figures = Faults(cut_s)
    with LabCluster(TOPOLOGY, "faults", data_dir) as cluster:
        cluster.wait_converged(timeout=60)
        cluster.run("peers", lambda: _faults(cluster, figures, timeout_s))
    return figures


def print_table(figures: Faults) -> None:
    out = figures.report()
    say("sfumesh bench faults: the WAN lab (Singapore, Ho Chi Minh City), one relayed call")
    say(f"{'sg-hcm link cut (s)':<34}{figures.cut_s:g}  ({out['packets_cut']} packets cut)")
    for direction, gap in out["link_cut_gap_s"].items():
        say(f"{'  media gap ' + direction + ' (s)':<34}{gap}")
    say(f"{'  media back after the cut':<34}{'yes' if figures.link_cut_recovered else 'NO'}")
    say(f"{'sg node killed: media back (s)':<34}{out['node_kill_media_back_s']}")
    for failover in figures.failovers:
        say(
            f"{'  failover ' + failover['client']:<34}{failover['from']} -> {failover['to']}"
            f", rejoined {failover['rejoined_s']} s after noticing"
        )


def run(args: argparse.Namespace) -> int:
    if args.cut <= 0:
        say("sfumesh bench faults: --cut must be > 0", err=True)
        return 2
    problem = namespace_problem()
    if problem is not None:
        say(f"sfumesh bench faults: no lab here: {problem}", err=True)
        return 2
    if not in_private_netns():
        try:
            reexec_in_private_netns()
        except NetnsError as error:
            say(f"sfumesh bench faults: {error}", err=True)
            return 2
    setup_logging("WARNING")
    try:
        with tempfile.TemporaryDirectory(prefix="sfumesh-bench-faults-") as tmp:
            figures = run_faults(Path(tmp), args.cut)
    except (LabError, ServiceError) as error:
        say(f"sfumesh bench faults: {error}", err=True)
        return 1
    print_table(figures)
    if args.json is not None and not write_report(args.json, figures.report()):
        return 1
    return 0 if figures.link_cut_recovered and figures.node_kill_recovered else 1
