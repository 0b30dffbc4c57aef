"""sfumesh in the WAN lab (node/lab/cluster.py, `sfumesh lab`, `sfumesh lab shell`): Redis,
the store and two nodes on their hosts, the nodes' Serf agents joined over the emulated
links; what the mesh measures agrees with the configured delays; tear-down leaves no
process, namespace, device or file outside the data dir; a bad topology starts nothing.

Runs inside the private namespace ./scripts/test makes (SFUMESH_PRIVATE_NETNS=1).
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest

from node.cli.main import main
from node.lab.cluster import STATE_FILE, LabCluster, running_hosts
from node.lab.namespaces import Lab, LabError, namespace_problem
from node.local.participant import MediaPeer, until
from tests.node.lab.test_emulator import lab_links, wait_gone
from tests.node.live_client import create_room, sign_up

pytestmark = pytest.mark.skipif(
    namespace_problem() is not None, reason=f"no lab here: {namespace_problem()}"
)

# Two node regions 20 ms apart (one way: 40 ms RTT), the client 30 ms from `a` and 10 ms
# from `b`; Redis and the store beside node-a.
TOPOLOGY = """\
[lab]
seed = 3

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
delay_ms = 20

[core.a.c]
delay_ms = 30

[core.b.c]
delay_ms = 10
"""
#: configured RTT from the client to each node, and between the nodes (ms)
SFUMESH = [sys.executable, "-m", "node.cli"]
CLIENT_RTT_MS = {"node-a": 60.0, "node-b": 20.0}
NODES_RTT_MS = 40.0


def netns_ids(pids: Iterable[int]) -> set[str]:
    return {os.readlink(f"/proc/{pid}/ns/net") for pid in pids}


def processes_in(namespaces: set[str]) -> list[str]:
    """Every process (PID and command line) still in one of `namespaces`."""
    left = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "ns" / "net") in namespaces:
                left.append(f"{entry.name}: {(entry / 'cmdline').read_bytes()!r}")
        except OSError:
            continue
    return left


def timed_ping(url: str) -> float:
    """One GET /api/ping on a fresh connection (connect + request: two round trips)."""
    started = time.monotonic()
    with httpx.Client(timeout=10.0) as client:
        reply = client.get(f"{url}/api/ping")
    assert reply.status_code == 200
    return time.monotonic() - started


async def two_participants(url_a: str, url_b: str) -> list[str]:
    """One person on each node in one room (the store has their accounts, Redis the room),
    each publishing video and audio and decoding the other's (the nodes relay it between
    them, ICE on their 198.18 addresses): the nodes their hellos named."""
    async with httpx.AsyncClient(timeout=30.0) as http, AsyncExitStack() as stack:
        first, second = await sign_up(http, url_a, "a"), await sign_up(http, url_b, "b")
        slug = f"lab-{secrets.token_hex(3)}"
        await create_room(first, url_a, slug)
        peers = []
        for user, url in ((first, url_a), (second, url_b)):
            sock = await user.connect(url)
            stack.push_async_callback(sock.close)
            await user.join(sock, slug, url)
            peer = MediaPeer(sock, user.username)
            stack.push_async_callback(peer.close)
            await peer.start_publishing()
            peers.append((peer, sock))
        (a, sock_a), (b, sock_b) = peers
        await until(
            lambda: a.decodes(sock_b.session_id) and b.decodes(sock_a.session_id),
            "media both ways across the lab",
            describe=lambda: f"{a.describe()}; {b.describe()}",
        )
        return [sock_a.node, sock_b.node]


def test_call_runs_inside_the_host_and_raises_its_errors() -> None:
    """`Lab.call`, which every cluster check uses: the function sees the host's namespace
    and its exception reaches the caller."""
    topology = TOPOLOGY.split("[hosts.node-a]")[0] + '[hosts.h]\nregion = "a"\nrole = "client"\n'
    topology += "[core.a.b]\ndelay_ms = 1\n[core.a.c]\ndelay_ms = 1\n[core.b.c]\ndelay_ms = 1\n"
    with Lab(topology, "call") as lab:
        seen = lab.call("h", lambda: os.readlink("/proc/thread-self/ns/net"))
        assert seen == os.readlink(lab.netns_path("h"))
        assert seen != os.readlink("/proc/thread-self/ns/net")

        def fail() -> None:
            raise ValueError("inside")

        with pytest.raises(ValueError, match="inside"):
            lab.call("h", fail)


@pytest.mark.slow
def test_a_lab_cluster_meshes_over_the_emulated_links_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    links_before = lab_links()
    with LabCluster(TOPOLOGY, "two-regions", tmp_path) as cluster:
        pids = list(cluster.lab.pids.values())
        namespaces = netns_ids(p for k, p in cluster.lab.pids.items() if k.startswith("host:"))
        assert set(cluster.urls) == {"node-a", "node-b"}
        assert cluster.urls["node-a"] == f"http://{cluster.lab.address('node-a')}:8080"
        state = tmp_path / STATE_FILE
        assert state.stat().st_mode & 0o777 == 0o600
        assert set(running_hosts(tmp_path)) == set(cluster.topology.hosts)

        convergence = cluster.wait_converged(timeout=60)
        for host in ("node-a", "node-b"):
            members = {m.name: m.status for m in cluster.serf_members(host)}
            assert members == {"node-a": "alive", "node-b": "alive"}
            # the agents gossip over the lab's addresses, not loopback
            addresses = {m.addr for m in cluster.serf_members(host)}
            assert addresses == {str(cluster.lab.address(n)) for n in ("node-a", "node-b")}

        # Serf's Vivaldi estimate settles near the emulated RTT (one probe a second)
        estimates: list[float | None] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            estimates.append(cluster.serf_rtt_ms("node-a", "node-b"))
            latest = estimates[-1]
            if latest is not None and 0.6 * NODES_RTT_MS <= latest <= 1.6 * NODES_RTT_MS:
                break
            time.sleep(1)
        assert estimates[-1] is not None
        assert 0.6 * NODES_RTT_MS <= estimates[-1] <= 1.6 * NODES_RTT_MS, estimates

        for host, rtt_ms in CLIENT_RTT_MS.items():
            url = cluster.urls[host]
            elapsed = cluster.call("client", functools.partial(timed_ping, url))
            # TCP's handshake, then the request: at least two round trips of the path
            assert elapsed * 1000 >= 2 * rtt_ms, (host, elapsed)
        # participants run from the client host: one on each node, media both ways
        seen = cluster.run(
            "client", lambda: two_participants(cluster.urls["node-a"], cluster.urls["node-b"])
        )
        assert seen == ["node-a", "node-b"]

        stats = cluster.lab.stats()["links"]
        assert stats["c->a"]["packets_in"] > 0 and stats["c->b"]["packets_in"] > 0
        # Redis and the store were reached over the emulated links (node-b is in region b)
        assert stats["b->a"]["packets_in"] > 0

        child_pids = [p for n in cluster.nodes.values() if (p := n.local.process.pid)]
        services = cluster.services.children if cluster.services else []
        child_pids += [p for c in services if (p := c.pid)]
        print(f"\nlab cluster (two regions 20 ms apart): {json.dumps(convergence.as_dict())}")
    assert wait_gone(pids + child_pids) == []
    assert processes_in(namespaces) == []
    assert lab_links() == links_before
    assert not state.exists()
    with pytest.raises(LabError, match="no lab is running"):
        running_hosts(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_sfumesh_lab_runs_until_stopped_and_lab_shell_enters_a_host(
    tmp_path: Path, how: str
) -> None:
    """The command as a person runs it: the URLs printed, `lab shell` reaches a node from
    the client host over the emulated path; SIGTERM or Ctrl-C (SIGINT to the terminal's
    whole process group) tears everything down, the nodes first while the links still
    carry their goodbyes (none killed, each deregistered from Redis)."""
    topology = tmp_path / "two.toml"
    topology.write_text(TOPOLOGY)
    data_dir = tmp_path / "lab"
    lab = subprocess.Popen(
        [*SFUMESH, "lab", "--topology", str(topology), "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert lab.stdout is not None
        printed: list[str] = []
        while not printed or "Ctrl-C stops it" not in printed[-1]:
            line = lab.stdout.readline()
            assert line, f"sfumesh lab exited: {lab.wait()} {lab.stderr and lab.stderr.read()}"
            printed.append(line)
        text = "".join(printed)
        hosts = running_hosts(data_dir)
        namespaces = netns_ids(hosts.values())
        node_b = json.loads((data_dir / STATE_FILE).read_text())["nodes"]["node-b"]
        assert f"{node_b}/" in text
        fetch = (
            "import json, urllib.request; "
            f"print(json.load(urllib.request.urlopen('{node_b}/api/ping')))"
        )
        python = [sys.executable, "-c", fetch]
        shell = subprocess.run(
            [*SFUMESH, "lab", "shell", "--data-dir", str(data_dir), "client", "--", *python],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert shell.returncode == 0, shell.stderr
        assert "'node': 'node-b'" in shell.stdout
        # an unknown host: the hosts named
        unknown = subprocess.run(
            [*SFUMESH, "lab", "shell", "--data-dir", str(data_dir), "x"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert unknown.returncode == 2 and "hosts: client, node-a" in unknown.stderr
        # a second lab on the same data dir is refused (it would take over the state file)
        second = subprocess.run(
            [*SFUMESH, "lab", "--topology", str(topology), "--data-dir", str(data_dir)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert second.returncode == 2 and "already running" in second.stderr
    finally:
        if how == "ctrl-c":
            os.killpg(lab.pid, signal.SIGINT)
        else:
            lab.send_signal(signal.SIGTERM)
        code = lab.wait(60)
    assert code == 0
    assert lab.stderr is not None
    assert "service.kill" not in lab.stderr.read()
    for node in ("node-a", "node-b"):
        log = (data_dir / "nodes" / f"{node}.log").read_text()
        assert '"event": "node.exit"' in log
        assert "deregister_failed" not in log
    assert processes_in(namespaces) == []
    assert not (data_dir / STATE_FILE).exists()


def test_a_bad_topology_names_the_line_and_field_and_starts_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(TOPOLOGY.replace("[core.b.c]\ndelay_ms = 10", "[core.b.c]\ndelay_ms = -1"))
    data_dir = tmp_path / "lab"
    children_before = _children()
    assert main(["lab", "--topology", str(bad), "--data-dir", str(data_dir)]) == 2
    error = capsys.readouterr().err
    assert f"{bad}:" in error and "delay_ms" in error
    line = int(error.split(f"{bad}:")[1].split(":")[0])
    assert bad.read_text().splitlines()[line - 1].startswith("delay_ms")
    assert not data_dir.exists()
    assert _children() == children_before


def _children() -> set[int]:
    """This process's child PIDs."""
    me = str(os.getpid())
    children = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == me:
                children.add(int(entry.name))
    return children
