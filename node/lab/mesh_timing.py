"""The mesh's own timings across the emulated links (issue 13, item 6): Serf join and
failure detection, measured on a running `LabCluster`.

* `serf_join_s`: how long one agent's `join` to another takes (the RPC returns once the
  TCP push/pull of the member lists is done: what a node does when it starts), a few times.
* `serf_failure_detection`: a node host crashes (its node frozen so it cannot restart the
  agent, the agent SIGKILLed: no graceful leave); how long until another agent marks it
  `failed` (memberlist's probes, then the suspicion timeout); then the node resumes,
  restarts its agent and rejoins: how long until it is `alive` again there.

Both are measured from inside the observer's host with one RPC connection polling
`members` (every `POLL_S`), so the figures carry up to one poll of error. Reported, not
tuned: the defaults (Serf's `lan` profile) are what item 6 asks to check on 300 ms paths.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from mesh.serf import SerfClient
from node.lab.cluster import LabCluster
from node.lab.namespaces import LabError

#: how often the observer's member list is read
POLL_S: Final = 0.02


@dataclass(frozen=True)
class FailureDetection:
    """`detect_s`: the crash until the observer saw `failed`; `recover_s`: the node resumed
    until the observer saw it `alive` again (None: not within the timeout)."""

    victim: str
    observer: str
    detect_s: float
    recover_s: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def serf_join_s(cluster: LabCluster, joiner: str, target: str, repeats: int = 5) -> list[float]:
    """Seconds each `serf join` of `joiner`'s agent to `target`'s took (they may already be
    members of one cluster: a join still does the full push/pull)."""
    serf = cluster.nodes[target].local.serf
    if serf is None:
        raise LabError(f"{target} runs without Serf")
    address = serf.bind

    async def joins(client: SerfClient) -> list[float]:
        times = []
        for _ in range(repeats):
            started = time.monotonic()
            joined = await client.join([address])
            times.append(time.monotonic() - started)
            if joined != 1:
                raise LabError(f"{joiner} could not join {target} ({address})")
        return times

    return cluster.serf(joiner, joins)


def _agent_pid(node_pid: int) -> int:
    """The node's Serf agent: its child running `serf`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == node_pid and command and os.path.basename(command[0]) == b"serf":
            return int(entry.name)
    raise LabError(f"no Serf agent under node process {node_pid}")


def serf_failure_detection(
    cluster: LabCluster, victim: str, observer: str, timeout: float = 60.0
) -> FailureDetection:
    """Crash `victim`'s host (node frozen, agent killed), time `observer` marking it
    failed; resume the node (it restarts its agent, which rejoins), time it alive again."""
    node_pid = cluster.nodes[victim].local.process.pid
    if node_pid is None:
        raise LabError(f"{victim} is not running")
    agent_pid = _agent_pid(node_pid)

    async def status(client: SerfClient) -> str:
        for member in await client.members():
            if member.name == victim:
                return member.status
        return "absent"

    async def until(client: SerfClient, wanted: str, since: float) -> float | None:
        while time.monotonic() - since < timeout:
            if await status(client) == wanted:
                return time.monotonic() - since
            await asyncio.sleep(POLL_S)
        return None

    async def measure(client: SerfClient) -> FailureDetection:
        if await status(client) != "alive":
            raise LabError(f"{observer} does not see {victim} alive before the crash")
        # frozen first, so its supervisor cannot restart the agent it is about to lose
        os.kill(node_pid, signal.SIGSTOP)
        try:
            crashed = time.monotonic()
            os.kill(agent_pid, signal.SIGKILL)
            detect = await until(client, "failed", crashed)
        finally:
            os.kill(node_pid, signal.SIGCONT)
        if detect is None:
            raise LabError(f"{observer} did not mark {victim} failed within {timeout:g} s")
        recover = await until(client, "alive", time.monotonic())
        return FailureDetection(victim, observer, detect, recover)

    return cluster.serf(observer, measure)
