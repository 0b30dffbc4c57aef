"""The client side of "connect to the closest node" (N4), for Python clients and tools.

`pick_node(http, seed_url)`: read the live nodes from any node, time `GET /api/ping` on 3
of them at random, ask `POST /api/nodes/rank`, time the (up to 2) nodes the answer says to
probe next, ask again, and return the ranking (nearest first). Each RTT is the best of a
few pings: the first may pay for a new TCP connection. The browser client does the same.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

import httpx

FIRST_PROBES = 3
PINGS_PER_NODE = 3


@dataclass(frozen=True)
class RankedNode:
    name: str
    url: str
    ws_url: str
    region: str
    rtt_ms: float | None
    measured: bool


async def time_ping(http: httpx.AsyncClient, url: str, pings: int = PINGS_PER_NODE) -> float | None:
    """Best round trip (ms) of `pings` GET /api/ping to a node; None if it never answered."""
    best: float | None = None
    for _ in range(pings):
        started = time.perf_counter()
        try:
            reply = await http.get(f"{url}/api/ping")
        except httpx.HTTPError:
            continue
        if reply.status_code == 200:
            elapsed = (time.perf_counter() - started) * 1000
            best = elapsed if best is None else min(best, elapsed)
    return best


async def _rank(
    http: httpx.AsyncClient, seed_url: str, samples: dict[str, float]
) -> dict[str, Any]:
    body = {"samples": [{"node": n, "rtt_ms": max(rtt, 0.001)} for n, rtt in samples.items()]}
    reply = await http.post(f"{seed_url}/api/nodes/rank", json=body)
    reply.raise_for_status()
    ranking: dict[str, Any] = reply.json()
    return ranking


async def pick_node(
    http: httpx.AsyncClient, seed_url: str, rng: random.Random | None = None
) -> list[RankedNode]:
    """Every live node, nearest first, as measured and estimated from this client."""
    reply = await http.get(f"{seed_url}/api/nodes")
    reply.raise_for_status()
    nodes = {n["name"]: n for n in reply.json()["nodes"]}
    if not nodes:
        return []
    chooser = rng or random.SystemRandom()
    samples: dict[str, float] = {}
    for name in chooser.sample(sorted(nodes), min(FIRST_PROBES, len(nodes))):
        rtt = await time_ping(http, nodes[name]["url"])
        if rtt is not None:
            samples[name] = rtt
    if not samples:
        raise httpx.ConnectError("no node answered /api/ping")
    ranking = await _rank(http, seed_url, samples)
    follow_ups = [n for n in ranking.get("probe_next", []) if n in nodes and n not in samples]
    for name in follow_ups:
        rtt = await time_ping(http, nodes[name]["url"])
        if rtt is not None:
            samples[name] = rtt
    if follow_ups:
        ranking = await _rank(http, seed_url, samples)
    return [
        RankedNode(
            name=n["name"],
            url=n["url"],
            ws_url=n["ws_url"],
            region=n["region"],
            rtt_ms=n["rtt_ms"],
            measured=n["measured"],
        )
        for n in ranking["nodes"]
    ]
