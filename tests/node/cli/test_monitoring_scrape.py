"""Issue 18 item 4: Debian's real Prometheus scrapes a running local mesh (the demo's
launcher) through the file_sd targets `sfumesh cluster targets --watch` writes from Serf
membership; a node joining and leaving changes the targets with no config edited; every
metric the shipped dashboard and rules name exists in a node's /metrics, and Prometheus
accepts every expression. A call across the two nodes runs meanwhile, so the media and
relay series have values.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh.process import ManagedProcess, free_port
from node.config import new_key
from node.local.launch import LocalNode, local_serf, start_node, start_nodes
from node.local.participant import MediaPeer, until
from node.media import adapter
from node.runtime.monitoring import TARGETS_FILE, shipped_file
from node.runtime.services import BackingServices
from tests.node.live_client import User, create_room, sign_up

pytestmark = pytest.mark.slow

ENV = {
    "SFUMESH_MEDIA_HOST_ADDRESSES": '["127.0.0.1"]',
    "SFUMESH_RELAY_REPORT_PERIOD_S": "0.5",
    "SFUMESH_BCRYPT_COST": "4",
}


@pytest.fixture(autouse=True)
def loopback_candidates() -> Iterator[None]:
    adapter.set_host_addresses(["127.0.0.1"])
    yield
    adapter.set_host_addresses(None)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


def exprs_of_dashboard() -> list[str]:
    board = json.loads(shipped_file("grafana-dashboard.json"))
    return [t["expr"] for p in board["panels"] for t in p["targets"]]


def exprs_of_rules() -> tuple[list[str], set[str]]:
    """The rules' expressions and the names they record (promtool checked the YAML; here
    only `expr:` and `record:` are read, folded scalars joined)."""
    exprs, records = [], set()
    lines = shipped_file("sfumesh.rules.yml").splitlines()
    for index, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("- record:"):
            records.add(stripped.split(":", 1)[1].strip())
        if stripped.startswith("expr:"):
            value = stripped.split(":", 1)[1].strip()
            if value == ">":
                indent = len(lines[index + 1]) - len(lines[index + 1].lstrip())
                parts = []
                for follow in lines[index + 1 :]:
                    if len(follow) - len(follow.lstrip()) < indent or not follow.strip():
                        break
                    parts.append(follow.strip())
                value = " ".join(parts)
            exprs.append(value)
    return exprs, records


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_NAMES = re.compile(r"(?<![\w:$])([a-z_]+:[a-z0-9_]+:[a-z0-9_]+|sfumesh_[a-z0-9_]+)")


def metric_names(expr: str) -> set[str]:
    """The sfumesh series and recording rules an expression names (string literals, such as
    label values and regexes, left out)."""
    return set(_NAMES.findall(_STRINGS.sub('""', expr)))


def exposed_names(text: str) -> set[str]:
    """Every series name a /metrics text offers, including the suffixes of counters,
    summaries and histograms that have no sample yet (a labelled counter before its first
    increment)."""
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        suffixes = {
            "counter": ("_total",),
            "summary": ("_count", "_sum"),
            "histogram": ("_count", "_sum", "_bucket"),
        }.get(family.type, ())
        names.update(family.name + suffix for suffix in suffixes)
    return names


def for_prometheus(expr: str) -> str:
    """A dashboard expression as Grafana sends it with every node selected."""
    return expr.replace("$__rate_interval", "1m").replace("$node", ".*")


async def query(http: httpx.AsyncClient, base: str, expr: str) -> list[dict[str, Any]]:
    reply = await http.get(f"{base}/api/v1/query", params={"query": expr})
    body = reply.json()
    assert reply.status_code == 200 and body["status"] == "success", (expr, body)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


async def wait_series(
    http: httpx.AsyncClient, base: str, expr: str, check: Any, what: str, within_s: float = 60
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + within_s
    while True:
        result = await query(http, base, expr)
        if check(result):
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {result}"
        await asyncio.sleep(0.5)


def by_node(result: list[dict[str, Any]]) -> dict[str, float]:
    return {r["metric"].get("node", ""): float(r["value"][1]) for r in result}


def targets_in(path: Path) -> list[str]:
    try:
        return sorted(g["labels"]["node"] for g in json.loads(path.read_text()))
    except (OSError, ValueError):
        return []


async def until_file(path: Path, nodes: list[str], within_s: float = 40) -> None:
    deadline = time.monotonic() + within_s
    while targets_in(path) != nodes:
        assert time.monotonic() < deadline, f"targets {targets_in(path)}, wanted {nodes}"
        await asyncio.sleep(0.2)


async def test_prometheus_scrapes_the_mesh_through_generated_targets(
    backing: BackingServices, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    assert shutil.which("prometheus"), "Debian's prometheus (scripts/setup installs it)"
    keys = {"k1": new_key()}
    env = {**ENV, "SFUMESH_DATABASE": f"mon_{secrets.token_hex(4)}"}
    nodes = start_nodes(backing, keys, count=2, data_dir=tmp_path / "nodes", extra_env=env)
    extra: list[LocalNode] = []
    processes: list[ManagedProcess] = []
    first = nodes[0].serf
    assert first is not None
    cli_env = {"SFUMESH_SERF_RPC_ADDR": first.rpc_addr, "SFUMESH_SERF_RPC_AUTH": first.rpc_auth}
    monitoring = tmp_path / "monitoring"
    targets = monitoring / TARGETS_FILE
    try:
        # The files as an operator gets them, then the targets kept from Serf membership.
        writer = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "node.cli",
            "cluster",
            "monitoring-files",
            "--out",
            str(monitoring),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, errors = await writer.communicate()
        assert writer.returncode == 0, errors
        watch = ManagedProcess(
            "targets-watch",
            [
                sys.executable,
                "-m",
                "node.cli",
                "cluster",
                "targets",
                "--watch",
                "--out",
                str(targets),
            ],
            tmp_path / "targets-watch.log",
            env={**os.environ, **cli_env},
        )
        processes.append(watch)
        watch.start()
        await until_file(targets, ["node-1", "node-2"])

        # Only the intervals are shortened for the test; the rest is the shipped file.
        config = monitoring / "prometheus.yml"
        text = config.read_text()
        assert "scrape_interval: 15s" in text and "evaluation_interval: 15s" in text
        config.write_text(
            text.replace("scrape_interval: 15s", "scrape_interval: 1s")
            .replace("evaluation_interval: 15s", "evaluation_interval: 1s")
            .replace("refresh_interval: 1m", "refresh_interval: 1s")
        )
        port = free_port()
        prometheus = ManagedProcess(
            "prometheus",
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            tmp_path / "prometheus.log",
        )
        processes.append(prometheus)
        prometheus.start()
        prometheus.wait_port("127.0.0.1", port, timeout=30)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while (await http.get(f"{base}/-/ready")).status_code != 200:
            assert time.monotonic() < deadline, prometheus.log_tail()
            await asyncio.sleep(0.2)

        up = await wait_series(
            http,
            base,
            'up{job="sfumesh"}',
            lambda r: by_node(r) == {"node-1": 1.0, "node-2": 1.0},
            "both nodes up",
        )
        assert {r["metric"]["region"] for r in up} == {"eu-west", "ap-southeast"}

        async with AsyncExitStack() as stack:
            # A call across the nodes: media forwarded on both, relayed between them.
            users = [await sign_up(http, nodes[0].url, p) for p in ("a", "b")]
            slug = f"mon-{secrets.token_hex(3)}"
            await create_room(users[0], nodes[0].url, slug)
            a, a_id = await _join(stack, users[0], nodes[0], slug, "A")
            b, b_id = await _join(stack, users[1], nodes[1], slug, "B")
            await until(lambda: a.decodes(b_id) and b.decodes(a_id), "A and B decode")

            def both(result: list[dict[str, Any]]) -> bool:
                values = by_node(result)
                return set(values) == {"node-1", "node-2"} and all(v > 0 for v in values.values())

            # Every name the dashboard and the rules use is a series a node exposes (or a
            # rule records), and Prometheus takes every expression as it stands.
            texts = [(await http.get(f"{n.url}/metrics")).text for n in nodes]
            exposed = set().union(*(exposed_names(t) for t in texts))
            rule_exprs, recorded = exprs_of_rules()
            named = set().union(*(metric_names(e) for e in exprs_of_dashboard() + rule_exprs))
            assert len(named) > 20, named
            assert named - exposed - recorded == set()
            for expr in exprs_of_dashboard() + rule_exprs:
                await query(http, base, for_prometheus(expr))
            rules = (await http.get(f"{base}/api/v1/rules")).json()["data"]["groups"]
            assert {g["name"] for g in rules} == {"sfumesh.recording", "sfumesh.alerts"}
            assert all(r["health"] == "ok" for g in rules for r in g["rules"]), rules

        # A node joins the mesh: it becomes a target, scraped, with nothing edited.
        assert first is not None
        serf = local_serf(first.rpc_auth, first.encrypt_key, first.relay_key)
        third = start_node(
            backing,
            keys,
            name="node-3",
            data_dir=tmp_path / "nodes",
            extra_env={**env, "SFUMESH_REGION": "ap-vn"},
            serf=serf,
            join=[first.bind],
        )
        extra.append(third)
        await until_file(targets, ["node-1", "node-2", "node-3"])
        await wait_series(
            http,
            base,
            'up{job="sfumesh"}',
            lambda r: by_node(r) == {"node-1": 1.0, "node-2": 1.0, "node-3": 1.0},
            "node-3 scraped",
        )
        # ... and leaves (SIGTERM: it leaves Serf): it is no target any more.
        third.stop()
        await until_file(targets, ["node-1", "node-2"])
        assert watch.exit_code() is None, watch.log_tail()
    finally:
        for node in [*extra, *nodes]:
            node.stop()
        for process in reversed(processes):
            process.stop()
    assert "targets -> " in watch.log_path.read_text()


async def _join(
    stack: AsyncExitStack, user: User, node: LocalNode, slug: str, name: str
) -> tuple[MediaPeer, str]:
    sock = await user.connect(node.url)
    stack.push_async_callback(sock.close)
    await user.join(sock, slug, node.url)
    peer = MediaPeer(sock, name)
    stack.push_async_callback(peer.close)
    await peer.start_publishing()
    return peer, sock.session_id
