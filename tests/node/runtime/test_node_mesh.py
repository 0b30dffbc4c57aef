"""Node processes beside their own Serf agents (gossip encrypted, RPC auth on): the mesh
as `/api/nodes` shows it, load tags, ranking, and a killed node reaped through Serf long
before its Redis record would expire."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from mesh.closest import pick_node
from node.config import new_key
from node.local.launch import LocalNode, start_nodes
from node.runtime.services import BackingServices
from tests.node.live_client import create_room, sign_up
from tests.node.runtime.test_live_mesh import FAST_LIVENESS

pytestmark = pytest.mark.slow

# Redis would reap a dead node only after a minute: anything sooner is Serf's doing.
SLOW_TTL = {**FAST_LIVENESS, "SFUMESH_NODE_TTL_S": "60", "SFUMESH_SERF_LOAD_TAG_PERIOD_S": "0.5"}


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


def _mesh(services: BackingServices, data_dir: Path) -> list[LocalNode]:
    env = {**SLOW_TTL, "SFUMESH_DATABASE": f"mesh_{secrets.token_hex(4)}"}
    return start_nodes(services, {"k1": new_key()}, count=3, data_dir=data_dir, extra_env=env)


async def _nodes(http: httpx.AsyncClient, url: str) -> dict[str, dict[str, Any]]:
    reply = await http.get(f"{url}/api/nodes")
    assert reply.status_code == 200
    return {n["name"]: n for n in reply.json()["nodes"]}


def _cluster_run(
    services: BackingServices, rpc_addr: str, rpc_auth: str, what: str
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "node.cli", "cluster", what, "--json"]
    # "=" form: a key may start with "-"
    argv += [f"--rpc-addr={rpc_addr}", f"--rpc-auth={rpc_auth}", "--redis-url", services.redis_url]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SFUMESH_")}
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, check=False)


def _cluster(services: BackingServices, rpc_addr: str, rpc_auth: str, what: str) -> Any:
    result = _cluster_run(services, rpc_addr, rpc_auth, what)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


async def _eventually(
    check: Callable[[], Any], what: str, within_s: float = 30, every_s: float = 0.3
) -> Any:
    deadline = time.monotonic() + within_s
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(every_s)


async def test_mesh_converges_publishes_load_ranks_and_reaps_a_killed_node(
    backing: BackingServices, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    nodes = _mesh(backing, tmp_path)
    try:
        urls = [node.url for node in nodes]

        # Every node sees all three alive in Serf, each with a coordinate; ready includes Serf.
        for url in urls:

            async def converged(url: str = url) -> bool:
                seen = await _nodes(http, url)
                return len(seen) == 3 and all(
                    n["serf_status"] == "alive" and n["coordinate"] is not None
                    for n in seen.values()
                )

            await _eventually(converged, f"{url} to see the mesh")
            ready = (await http.get(f"{url}/readyz")).json()
            assert ready["checks"]["serf"] == "ok", ready

        # A session on node-2 shows in node-2's load tag, as node-1 sees it.
        users = [await sign_up(http, urls[0]) for _ in range(2)]
        await create_room(users[0], urls[0], "meshroom")
        watcher = await users[0].connect(urls[0])
        await users[0].join(watcher, "meshroom", urls[0])
        doomed = await users[1].connect(urls[2])
        await users[1].join(doomed, "meshroom", urls[1])

        async def loaded() -> bool:
            seen = await _nodes(http, urls[0])
            return bool(seen["node-3"]["load"]["sessions"] == 1)

        await _eventually(loaded, "node-3's load tag at node-1")

        # Ranking: measured figures are kept, the unmeasured node gets an estimate from its
        # coordinate (the nodes' real coordinates: all on this host, so no order among them
        # is asserted beyond the measurements).
        samples = [{"node": "node-1", "rtt_ms": 40}, {"node": "node-2", "rtt_ms": 2}]
        reply = await http.post(f"{urls[0]}/api/nodes/rank", json={"samples": samples})
        ranked = {n["name"]: n for n in reply.json()["nodes"]}
        order = [n["name"] for n in reply.json()["nodes"]]
        assert order.index("node-2") < order.index("node-1")
        assert (ranked["node-1"]["rtt_ms"], ranked["node-1"]["measured"]) == (40, True)
        assert (ranked["node-2"]["rtt_ms"], ranked["node-2"]["measured"]) == (2, True)
        assert ranked["node-3"]["measured"] is False and ranked["node-3"]["rtt_ms"] > 0
        assert reply.json()["probe_next"] == ["node-3"]  # the one left to measure

        # The client helper: pings, ranks, follows the suggestions; every node is ranked and
        # the first is the one it measured fastest (all three measured: only three exist).
        picked = await pick_node(http, urls[1])
        assert sorted(n.name for n in picked) == ["node-1", "node-2", "node-3"]
        assert all(n.measured and n.rtt_ms is not None for n in picked)
        assert picked[0].rtt_ms == min(n.rtt_ms for n in picked if n.rtt_ms is not None)
        assert picked[0].url in urls

        # The operator's view, through node-1's agent and the cluster's Redis.
        serf = nodes[0].serf
        assert serf is not None
        members = _cluster(backing, serf.rpc_addr, serf.rpc_auth, "members")
        assert sorted((m["name"], m["status"]) for m in members) == [
            ("node-1", "alive"),
            ("node-2", "alive"),
            ("node-3", "alive"),
        ]
        assert {m["region"] for m in members} == {"eu-west", "ap-southeast", "ap-vn"}
        assert all(m["coordinate_error"] is not None for m in members)
        matrix = _cluster(backing, serf.rpc_addr, serf.rpc_auth, "rtt")
        assert sorted(matrix) == ["node-1", "node-2", "node-3"]
        assert all(matrix[a][a] >= 0 and matrix[a]["node-2"] >= 0 for a in matrix)
        rooms = _cluster(backing, serf.rpc_addr, serf.rpc_auth, "rooms")
        room = next(r for r in rooms if r["room"] == "meshroom")
        assert (room["people"], room["nodes"]) == (2, ["node-1", "node-3"])
        sessions = _cluster(backing, serf.rpc_addr, serf.rpc_auth, "sessions")
        mine = {r["session_id"]: r for r in sessions}
        assert mine[doomed.session_id]["node"] == "node-3"
        assert mine[doomed.session_id]["room"] == "meshroom"
        assert _cluster(backing, serf.rpc_addr, serf.rpc_auth, "relays") == []
        # A wrong RPC key is a clear error, not a traceback.
        wrong = _cluster_run(backing, serf.rpc_addr, "wrong-key", "members")
        assert wrong.returncode == 1 and "auth" in wrong.stderr.lower(), wrong.stderr

        # kill -9 node-3 (its agent dies with it): Serf declares it failed and the room
        # hears its participant leave, while its Redis record still had most of a minute.
        pid = nodes[2].process.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        # (40 s is well inside the record's 60 s: only the Serf path can be this quick)
        left = await watcher.wait_for("participant-left", within_s=40, session_id=doomed.session_id)
        assert left["reason"] == "node-gone"

        async def forgotten() -> bool:
            return all(["node-3" not in await _nodes(http, url) for url in urls[:2]])

        await _eventually(forgotten, "node-3 gone from /api/nodes")
        await watcher.close()
    finally:
        for node in nodes:
            node.stop()
