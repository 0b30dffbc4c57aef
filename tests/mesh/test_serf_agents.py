"""mesh/agent.py: the agent's config file, and clusters of real agents on loopback
(convergence, tags, kill -9, graceful leave, restarts, snapshot rejoin, Vivaldi vs `serf rtt`)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import signal
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from mesh.agent import SerfAgent, SerfAgentConfig, serf_keygen
from mesh.process import ServiceError
from mesh.serf import Event
from tests.mesh.test_serf_rpc import WAIT_S, eventually, next_item, serf_agents

# -- the config file ------------------------------------------------------------------------


def test_keygen_makes_keys_serf_accepts() -> None:
    key = serf_keygen()
    assert len(base64.b64decode(key)) == 32
    assert serf_keygen() != key
    for size in (16, 24, 32):
        SerfAgentConfig(node_name="n", encrypt_key=base64.b64encode(b"k" * size).decode())


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("not base64!", "must be base64"),
        (base64.b64encode(b"short").decode(), "16, 24 or 32 bytes"),
        ("", "encrypt_key is required"),
    ],
)
def test_bad_or_missing_encrypt_key_is_refused(key: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        SerfAgentConfig(node_name="n", encrypt_key=key)


def test_demo_may_go_without_encryption() -> None:
    config = SerfAgentConfig(node_name="demo", require_encryption=False)
    assert "encrypt_key" not in config.serf_json()


def test_tags_must_fit_serfs_limit() -> None:
    with pytest.raises(ValidationError, match="Serf allows 512"):
        SerfAgentConfig(node_name="n", require_encryption=False, tags={"ws": "x" * 600})


def test_config_file_merges_template_and_is_private(tmp_path: Path) -> None:
    key = serf_keygen()
    config = SerfAgentConfig(
        node_name="eu-1",
        bind="127.0.0.1:17946",
        rpc_addr="127.0.0.1:17373",
        rpc_auth="rpc-secret",
        encrypt_key=key,
        tags={"region": "eu", "http": "https://eu.example.org"},
        snapshot_path=tmp_path / "snap" / "eu-1.snapshot",
        query_response_size_limit=2048,
    )
    path = config.write(tmp_path / "cfg" / "serf.json")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    written = json.loads(path.read_text())
    template = json.loads(Path("serf.json").read_text())
    assert written["user_event_size_limit"] == template["user_event_size_limit"]
    assert written["node_name"] == "eu-1" and written["tags"] == config.tags
    assert written["encrypt_key"] == key and written["rpc_auth"] == "rpc-secret"
    assert written["query_response_size_limit"] == 2048
    assert written["snapshot_path"] == str(tmp_path / "snap" / "eu-1.snapshot")
    assert "rpc-secret" not in repr(config) and key not in repr(config)


@pytest.mark.parametrize("rpc_addr", ["0.0.0.0:7373", "10.1.2.3:7373", "[::]:7373", "serf:7373"])
async def test_an_agent_off_loopback_needs_rpc_auth(tmp_path: Path, rpc_addr: str) -> None:
    # anyone reaching the RPC could send queries as any node and make the agent leave
    config = SerfAgentConfig(node_name="n", rpc_addr=rpc_addr, encrypt_key=serf_keygen())
    agent = SerfAgent(config, tmp_path, binary="serf-is-never-run")
    with pytest.raises(ServiceError, match="rpc_auth is required"):
        await agent.start()
    assert agent.process is None and not (tmp_path / "serf-n.json").exists()


def test_unknown_template_key_is_refused(tmp_path: Path) -> None:
    template = tmp_path / "serf.json"
    template.write_text(json.dumps({"log_level": "info", "not_a_serf_key": 1}))
    config = SerfAgentConfig(node_name="n", require_encryption=False, template=template)
    with pytest.raises(ValueError, match="not_a_serf_key"):
        config.serf_json()


# -- clusters of real agents ----------------------------------------------------------------


async def statuses(agent: SerfAgent) -> dict[str, str]:
    async with agent.client(reconnect=False) as serf:
        return {m.name: m.status for m in await serf.members()}


async def all_see(agents: Sequence[SerfAgent], expected: dict[str, str]) -> bool:
    return all([await statuses(agent) == expected for agent in agents])


async def wait_event(events: Any, kind: str, node: str) -> Event:
    while True:
        event: Event = await next_item(events)
        if event.event == kind and node in {m.name for m in event.members}:
            return event


@pytest.mark.slow
async def test_three_agents_converge_and_tags_propagate(tmp_path: Path) -> None:
    async with serf_agents(tmp_path, ["a", "b", "c"]) as agents:
        a, b, c = agents
        alive = {"a": "alive", "b": "alive", "c": "alive"}
        await eventually(lambda: all_see(agents, alive), "3 agents see each other alive")

        async with a.client() as serf_a, serf_a.stream("member-update") as updates:
            async with c.client() as serf_c:
                await serf_c.tags(set={"load": "0.75", "version": "0.1.0"})

            async def tagged() -> bool:
                for agent in (a, b):
                    async with agent.client() as serf:
                        (member,) = await serf.members_filtered(name="c")
                        if member.tags != {
                            "region": "region-c",
                            "load": "0.75",
                            "version": "0.1.0",
                        }:
                            return False
                return True

            await eventually(tagged, "c's new tags on a and b")
            event = await wait_event(updates, "member-update", "c")
            assert event.members[0].tags["load"] == "0.75"


@pytest.mark.slow
async def test_kill_9_marks_failed_everywhere_and_restart_rejoins_by_snapshot(
    tmp_path: Path,
) -> None:
    async with serf_agents(tmp_path, ["a", "b", "c"], restart=False) as agents:
        a, b, c = agents
        alive = {"a": "alive", "b": "alive", "c": "alive"}
        await eventually(lambda: all_see(agents, alive), "3 agents see each other alive")
        snapshot = c.config.snapshot_path
        assert snapshot is not None

        async def peers_in_snapshot() -> bool:
            # Serf flushes its snapshot only on a later write >0.5 s after the previous flush:
            # an event gives it that write. Killed before, c would not know whom to rejoin.
            async with a.client() as serf:
                await serf.event("flush", b"", coalesce=False)
            text = snapshot.read_text()
            return "alive: a " in text and "alive: b " in text

        await eventually(peers_in_snapshot, "c's snapshot holds a and b")
        async with a.client() as serf_a, serf_a.stream("member-failed,member-join") as events:
            assert c.pid is not None
            os.kill(c.pid, signal.SIGKILL)
            await wait_event(events, "member-failed", "c")
            failed = {"a": "alive", "b": "alive", "c": "failed"}
            await eventually(lambda: all_see([a, b], failed), "c failed on a and b")

            await c.start()  # no join: the snapshot knows the cluster
            await wait_event(events, "member-join", "c")
            await eventually(lambda: all_see(agents, alive), "c rejoined everywhere")
        assert "Re-joined to previously known node" in c.log_path.read_text()


@pytest.mark.slow
async def test_graceful_leave_is_seen_as_left(tmp_path: Path) -> None:
    async with serf_agents(tmp_path, ["a", "b", "c"]) as agents:
        a, b, c = agents
        alive = {"a": "alive", "b": "alive", "c": "alive"}
        await eventually(lambda: all_see(agents, alive), "3 agents see each other alive")
        await c.stop(leave=True)
        assert c.process is not None and c.process.exit_code() is not None
        left = {"a": "alive", "b": "alive", "c": "left"}
        await eventually(lambda: all_see([a, b], left), "c left on a and b")


@pytest.mark.slow
async def test_dead_agent_is_restarted_rejoins_and_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mesh.agent")
    changes: list[bool] = []

    async def on_change(ready: bool) -> None:
        changes.append(ready)

    # No snapshot here: the supervisor itself must bring the restarted agent back.
    async with serf_agents(
        tmp_path,
        ["a", "b"],
        snapshot=False,
        backoff_initial_s=0.2,
        peer_refresh_s=0.3,
        on_change=on_change,
    ) as agents:
        b = agents[1]
        both = {"a": "alive", "b": "alive"}
        await eventually(lambda: all_see(agents, both), "2 agents see each other")

        async def knows_a() -> bool:
            return b.peers == [agents[0].config.bind]

        await eventually(knows_a, "b's supervisor remembers a")
        old_pid = b.pid
        assert old_pid is not None
        os.kill(old_pid, signal.SIGKILL)

        async def restarted() -> bool:
            return b.ready and b.restarts == 1

        await eventually(restarted, "b restarted by its supervisor")
        assert b.pid != old_pid and not b.gave_up
        assert False in changes and changes[-1] is True
        await eventually(lambda: all_see(agents, both), "b rejoined")
        events = [r.getMessage() for r in caplog.records if r.name == "mesh.agent"]
        assert {"serf.agent_died", "serf.agent_restarted", "serf.agent_rejoined"} <= set(events)


@pytest.mark.slow
async def test_dead_agent_without_restart_leaves_the_node_not_ready(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mesh.agent")
    async with serf_agents(tmp_path, ["solo"], restart=False) as (agent,):
        assert agent.ready and agent.pid is not None
        os.kill(agent.pid, signal.SIGKILL)

        async def gave_up() -> bool:
            return agent.gave_up

        await eventually(gave_up, "the supervisor reports the dead agent")
        assert not agent.ready
        events = {r.getMessage() for r in caplog.records if r.name == "mesh.agent"}
        assert {"serf.agent_died", "serf.agent_gave_up"} <= events


_RTT = re.compile(r"Estimated (\S+) <-> (\S+) rtt: ([0-9.]+) ms")


async def serf_rtt(agent: SerfAgent, a: str, b: str) -> str:
    process = await asyncio.create_subprocess_exec(
        "serf",
        "rtt",
        f"-rpc-addr={agent.rpc_addr}",
        f"-rpc-auth={agent.config.rpc_auth.get_secret_value()}",
        a,
        b,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), WAIT_S)
    match = _RTT.search(out.decode())
    assert match is not None, out
    return match.group(3)


@pytest.mark.slow
async def test_vivaldi_estimates_equal_serf_rtt(tmp_path: Path) -> None:
    vivaldi = pytest.importorskip("mesh.vivaldi")
    async with serf_agents(tmp_path, ["a", "b", "c"]) as agents, agents[0].client() as serf:

        async def coordinates() -> dict[str, Any]:
            return {name: await serf.get_coordinate(name) for name in ("a", "b", "c")}

        async def all_moved() -> bool:  # every node has left the origin: real samples
            coords = await coordinates()
            return all(c is not None and any(c["Vec"]) for c in coords.values())

        await eventually(all_moved, "coordinates from real RTT samples")
        compared = 0
        for x, y in (("a", "b"), ("a", "c"), ("b", "c")):
            for _ in range(20):  # coordinates move; compare only over a quiet moment
                before = await coordinates()
                printed = await serf_rtt(agents[0], x, y)
                if await coordinates() != before:
                    continue
                ours = vivaldi.estimate_rtt(
                    vivaldi.Coordinate.from_rpc(before[x]), vivaldi.Coordinate.from_rpc(before[y])
                )
                assert f"{ours * 1000:.3f}" == printed, (x, y, before)
                compared += 1
                break
        assert compared == 3
