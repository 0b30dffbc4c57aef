"""`sfumesh bench failover`: `kill -9` of a node with N clients on it; how long until each
has its media back on another node, and how many never get it back.

Embedded services and three node processes with their Serf agents (default liveness
settings: nothing tuned for the bench). Each of the N clients is a `FailoverParticipant`
(node/local/participant.py: the web client's procedure, in aiortc) on node-1, in a room of
its own with a partner on node-3 that stays; both publish video and audio and decode each
other. Then node-1 is killed (SIGKILL: no drain, no `reconnect`). A client's media is back
when it decodes its partner's video and audio again on its new node and its partner decodes
the client's new tracks (a few frames of each); the time is from the kill. A client not back
within `--timeout` is lost. Rounds repeat the whole thing on fresh nodes.
"""

from __future__ import annotations

import argparse
import asyncio
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
from node.bench.harness import no_interrupts, ranked_first, sign_up
from node.bench.report import percentile, rounded, say, write_report
from node.config import new_key
from node.local.launch import LocalNode, start_nodes
from node.local.participant import FailoverParticipant, MediaPeer, Received, until
from node.log import setup_logging
from node.media import adapter
from node.runtime.services import BackingServices

#: frames of the new media (each kind, each direction) that count as "back"
FRAMES_BACK = 3
POLL_S = 0.05
DEFAULT_CLIENTS = 4


@dataclass
class FailoverRun:
    clients: int
    rounds: int
    timeout_s: float
    media_back_s: list[float] = field(default_factory=list)
    detect_s: list[float] = field(default_factory=list)
    rejoin_s: list[float] = field(default_factory=list)
    clients_lost: int = 0
    landed: dict[str, int] = field(default_factory=dict)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("failover (kill -9 of a node with clients on it)")
    # --clients (default 4) and --rounds (kills on fresh nodes, default 1) are shared with
    # other benches (node/cli/main.py)
    group.add_argument(
        "--timeout", type=float, default=60.0, help="failover: a client not back by then is lost"
    )


def _new(peer: MediaPeer | None, owner: str, before: set[int], kind: str) -> bool:
    """`peer` decodes media of `owner` on tracks it did not have before the kill."""
    if peer is None:
        return False
    tracks: list[Received] = peer.from_(owner, kind)
    return any(
        id(r) not in before and r.frames >= FRAMES_BACK and not r.ended.is_set() for r in tracks
    )


def _back(client: FailoverParticipant, partner: FailoverParticipant, before: set[int]) -> bool:
    if not client.failovers or partner.peer is None:
        return False
    return all(
        _new(client.peer, partner.session_id, set(), kind)
        and _new(partner.peer, client.session_id, before, kind)
        for kind in ("video", "audio")
    )


async def _round(nodes: list[LocalNode], run: FailoverRun) -> None:
    node1, _, node3 = nodes
    async with httpx.AsyncClient(timeout=30) as http:
        ranking = await pick_node(http, node1.url)
        clients: list[FailoverParticipant] = []
        partners: list[FailoverParticipant] = []
        try:
            for index in range(run.clients):
                slug = f"failover-{secrets.token_hex(4)}"
                owner = await sign_up(http, node1.url, f"x{secrets.token_hex(5)}")
                reply = await http.post(
                    f"{node1.url}/api/rooms",
                    json={"slug": slug, "capacity": 2},
                    headers={"Authorization": f"Bearer {owner}"},
                )
                reply.raise_for_status()
                partner = FailoverParticipant(
                    http,
                    await sign_up(http, node1.url, f"x{secrets.token_hex(5)}"),
                    slug,
                    ranked_first(ranking, node3.name),
                    f"P{index}",
                )
                client = FailoverParticipant(
                    http, owner, slug, ranked_first(ranking, node1.name), f"C{index}"
                )
                partners.append(partner)
                clients.append(client)
                await partner.start()
                await client.start()
            pairs = list(zip(clients, partners, strict=True))
            await until(
                lambda: all(
                    c.peer is not None
                    and p.peer is not None
                    and c.peer.decodes(p.session_id, 10)
                    and p.peer.decodes(c.session_id, 10)
                    for c, p in pairs
                ),
                "every client and partner to decode each other",
            )
            before = {id(r) for p in partners if p.peer is not None for r in p.peer.received}
            assert node1.process.pid is not None
            killed_at = time.monotonic()
            os.kill(node1.process.pid, signal.SIGKILL)
            back: dict[int, float] = {}
            while len(back) < len(pairs) and time.monotonic() - killed_at < run.timeout_s:
                for index, (c, p) in enumerate(pairs):
                    if index not in back and _back(c, p, before):
                        back[index] = time.monotonic() - killed_at
                await asyncio.sleep(POLL_S)
            run.media_back_s += back.values()
            run.clients_lost += len(pairs) - len(back)
            for c in clients:
                for failover in c.failovers[:1]:
                    run.detect_s.append(failover.detected_at - killed_at)
                    run.rejoin_s.append(failover.joined_at - killed_at)
                    run.landed[failover.reached] = run.landed.get(failover.reached, 0) + 1
        finally:
            for participant in clients + partners:
                await participant.close()


def _round_on_fresh_nodes(data_dir: Path, services: BackingServices, run: FailoverRun) -> None:
    env = {
        "SFUMESH_DATABASE": f"bench_{secrets.token_hex(4)}",
        "SFUMESH_BCRYPT_COST": "4",
        "SFUMESH_MEDIA_HOST_ADDRESSES": '["127.0.0.1"]',
        "SFUMESH_LOG_LEVEL": "WARNING",
        "SFUMESH_LOGIN_LIMIT_PER_ADDRESS": "100000",
    }
    nodes: list[LocalNode] = []
    try:
        nodes = start_nodes(
            services, {"bench": new_key()}, count=3, data_dir=data_dir, extra_env=env
        )
        asyncio.run(_round(nodes, run))
    finally:
        with no_interrupts():
            for node in nodes:
                node.stop()


def report(run: FailoverRun) -> dict[str, Any]:
    back = sorted(run.media_back_s)
    return {
        "media_back_s_p50": rounded(percentile(back, 0.5)),
        "media_back_s_p95": rounded(percentile(back, 0.95)),
        "clients_lost": run.clients_lost,
        "clients": run.clients * run.rounds,
        "rounds": run.rounds,
        "media_back_s": [rounded(v) for v in back],
        "detect_s_p50": rounded(percentile(sorted(run.detect_s), 0.5)),
        "rejoin_s_p50": rounded(percentile(sorted(run.rejoin_s), 0.5)),
        "landed_on": run.landed,
        "target_media_back_s_p95": 10,
    }


def print_table(run: FailoverRun) -> None:
    figures = report(run)
    say(
        f"sfumesh bench failover: kill -9 of a node with {run.clients} clients, "
        f"{run.rounds} round(s), 3 nodes on loopback, {os.cpu_count()} CPUs"
    )
    say(f"{'media back p50 (s)':<28}{figures['media_back_s_p50']}")
    say(f"{'media back p95 (s)':<28}{figures['media_back_s_p95']}  (target <= 10)")
    say(f"{'death noticed p50 (s)':<28}{figures['detect_s_p50']}")
    say(f"{'rejoined p50 (s)':<28}{figures['rejoin_s_p50']}")
    say(f"{'clients lost':<28}{figures['clients_lost']} of {figures['clients']}")
    say(f"{'landed on':<28}{figures['landed_on']}")


def run(args: argparse.Namespace) -> int:
    clients = DEFAULT_CLIENTS if args.clients is None else args.clients
    rounds = 1 if args.rounds is None else args.rounds
    if clients < 1 or rounds < 1:
        say("sfumesh bench failover: --clients and --rounds must be at least 1", err=True)
        return 2
    setup_logging("WARNING")
    failover_run = FailoverRun(clients, rounds, args.timeout)
    adapter.set_host_addresses(["127.0.0.1"])  # the participants in this process
    try:
        with tempfile.TemporaryDirectory(prefix="sfumesh-bench-failover-") as tmp:
            data_dir = Path(tmp)
            try:
                services = BackingServices.start(
                    os.environ.get("REDIS_URL", ""), "", data_dir / "services"
                )
            except ServiceError as error:
                say(f"sfumesh bench failover: {error}", err=True)
                return 1
            try:
                for index in range(rounds):
                    _round_on_fresh_nodes(data_dir / f"round-{index}", services, failover_run)
            finally:
                with no_interrupts():
                    services.stop()
    finally:
        adapter.set_host_addresses(None)
    print_table(failover_run)
    if args.json is not None and not write_report(args.json, report(failover_run)):
        return 1
    return 0 if failover_run.media_back_s and failover_run.clients_lost == 0 else 1
