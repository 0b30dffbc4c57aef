"""`sfumesh bench relay`: how fast a room spans two nodes, and what relaying costs.

Embedded services and two node processes, each with its own Serf agent, start as in the
demo (media on 127.0.0.1, relays lingering 0 s so that every trial opens a fresh relay).
Participant A (aiortc, in this process) publishes video and audio on node-1 and stays.
Per trial, participant B joins the same room on node-2 and publishes; the setup time is from
the start of B's join (the HTTP join, then the WebSocket join) to the first frame of B's
video that A decodes, which went B -> node-2 -> relay -> node-1 -> A. B then leaves and the
next trial waits until the relay is closed on both nodes. Run once per signalling carrier:
"inline" (the ORTC description in the Serf query, the default) and "redis" (the message in a
short-lived Redis key, the query carrying its name).

CPU: A and B both publishing, first on two nodes (one relay, two tracks each way), then B
on node-1 as well (no relay), a window each. `cpu_us_per_relayed_packet` is both node
processes' CPU in the first window minus theirs in the second, per packet that crossed the
relay: the relay's own cost (send over the link on one node, receive on the other), since
ingest from the publishers and delivery to the subscribers happen in both windows. Also per
node, an upper bound: its CPU in the first window, minus its idle CPU (an equal window before
anyone joined), per packet it relayed (out + in). The Serf agents and the participants run
in other processes; the machine is shared, so differences of small numbers are noisy.

Signalling: the largest Serf message any node sent (`signalling_bytes_max`) and the bytes
both ends sent to set up one relay (offer, answer, tracks updates, replies), per trial.
For comparison, the size of an SDP offer aiortc makes for a relay-like connection with 2
and with 8 tracks (what would have to go through Redis with the pointer design).

Lossy path (`--paths lossy`, issue 22 item 3): the same trials with the first carrier, but
in the WAN lab (`node.lab.cluster.LabCluster`): node-1 (with Redis and the store) and node-2
in two regions `--lossy-delay-ms` apart one way (default 17.5: a 35 ms RTT) with
`--lossy-loss` random loss (default 2%) on that path, the participants on a client host 1 ms
from both. The figures: setup p50/p95, the link's phases (signalling, ICE, DTLS) and the
signalling attempts sent again (`sfumesh_relay_events_total{event="retried"}`, both nodes)
per trial. The bench re-executes itself in a private network namespace for it.

Slope (issue 19, `--relay-tracks 1,4,16`): on the first carrier's two nodes, T relayed
video tracks per window, each node's CPU fitted against the packets per second, beside the
local path's slope of the same run (`node.bench.relay_cost`, handed in by the CLI as
`slope`: its clients are the forward bench's, which this bench may not import). Keys
`relay_us_per_packet_slope` ({sending, receiving, sum}), `local_us_per_packet_slope`,
`relay_own_us_per_packet_slope`, `relay_over_local`, and the fan-out marginal of the same
run, `local_forward_us_per_packet_slope`, with `relay_to_local_forward_ratio` (the relay's sum
over it); `--relay-profile DIR` adds py-spy's top frames of both nodes per window
(`relay_slope_profiles`). `cpu_us_per_relayed_packet` is the old two-window figure, kept for
comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import httpx
from aiortc import RTCPeerConnection
from redis.asyncio import Redis

from mesh.process import ServiceError
from node.bench.harness import no_interrupts, no_relay, sign_up, within
from node.bench.report import (
    metric_sum,
    ms,
    percentile,
    process_cpu_s,
    rounded,
    say,
    write_report,
)
from node.config import new_key
from node.lab.cluster import LabCluster
from node.lab.namespaces import namespace_problem
from node.local.launch import LocalNode, start_nodes
from node.local.netns import in_private_netns, reexec_in_private_netns
from node.local.participant import MediaPeer, Socket, open_socket, until
from node.log import setup_logging
from node.media import adapter
from node.relay.manager import read_relays
from node.runtime.services import BackingServices

CARRIERS = ("inline", "redis")
PATHS = ("loopback", "lossy")
DEFAULT_SLOPE_TRACKS = (1, 4, 16)
#: how long a trial waits for the previous relay to close
NO_RELAY_S = 20.0
# Bounds on steps that have hung once in CI (a 900 s test timeout, the loop idle): a step
# past its bound logs where every task waits (bench.stuck) and fails (a trial) or is left
# behind (a close), instead of hanging the run.
TRIAL_LIMIT_S = 120.0
CLOSE_LIMIT_S = 30.0
CPU_PHASE_LIMIT_S = 2 * (NO_RELAY_S + 120.0)


class SlopeProbe(Protocol):
    """Measures the relay's slope figures on the two running nodes (node-1, node-2)."""

    def __call__(
        self,
        nodes: list[LocalNode],
        services: BackingServices,
        workdir: Path,
        window_s: float,
        tracks: list[int],
        *,
        profile_dir: Path | None = None,
    ) -> dict[str, Any]: ...


#: the lossy path: node-1 with Redis and the store, node-2 one lossy link away, the
#: participants 1 ms from both (only the relay's path loses packets)
LOSSY_TOPOLOGY = """\
[lab]
seed = 22

[regions.one]
[regions.two]
[regions.clients]

[hosts.node-1]
region = "one"
role = "node"

[hosts.redis]
region = "one"
role = "redis"

[hosts.store]
region = "one"
role = "store"

[hosts.node-2]
region = "two"
role = "node"

[hosts.client]
region = "clients"
role = "client"

[core.one.two]
delay_ms = {delay_ms}
loss = {loss}

[core.clients.one]
delay_ms = 1

[core.clients.two]
delay_ms = 1
"""


@dataclass
class CarrierRun:
    carrier: str
    setup_ms: list[float] = field(default_factory=list)
    link_setup_ms: list[float] = field(default_factory=list)
    #: per phase (signalling, ice, dtls): the link's setup time spent in it, ms
    phases_ms: dict[str, list[float]] = field(default_factory=dict)
    signalling_bytes: list[int] = field(default_factory=list)
    #: signalling attempts sent again (no reply in time), both nodes, per trial
    retries: list[int] = field(default_factory=list)
    message_bytes_max: float = 0.0
    failures: int = 0
    #: "loopback", or "lossy" (the WAN lab's lossy path)
    path: str = "loopback"


@dataclass
class RelayRun:
    trials: int
    window_s: float
    carriers: list[CarrierRun] = field(default_factory=list)
    cpu_us: dict[str, float] = field(default_factory=dict)
    #: each node process's CPU (cores) with nobody in a room: subtracted from the window
    idle_cores: dict[str, float] = field(default_factory=dict)
    relayed_packets: dict[str, int] = field(default_factory=dict)
    #: both nodes' CPU with A and B on two nodes, minus node CPU with both on one node,
    #: per packet crossing the relay
    marginal_us: float | None = None
    crossing_packets: int = 0
    cpu_relayed_s: float = 0.0
    cpu_local_s: float = 0.0
    sdp_bytes: dict[int, int] = field(default_factory=dict)
    #: the lossy path's run (None: not asked for), its one-way delay and loss
    lossy: CarrierRun | None = None
    lossy_delay_ms: float = 17.5
    lossy_loss: float = 0.02
    #: why the lossy path was not run, when it was asked for but cannot be
    lossy_problem: str | None = None
    #: relayed track counts of the slope (empty: none), and its figures
    slope_tracks: list[int] = field(default_factory=list)
    slope: dict[str, Any] = field(default_factory=dict)
    #: where py-spy's profiles of the slope windows go (None: not profiled)
    profile_dir: Path | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("relay (rooms spanning two nodes)")
    group.add_argument("--joins", type=int, default=20, help="relay: joins timed per carrier")
    group.add_argument("--carriers", default=",".join(CARRIERS), help="relay: inline and/or redis")
    group.add_argument(
        "--cpu-window", type=float, default=10.0, help="relay: CPU measuring window, s"
    )
    group.add_argument(
        "--paths",
        default=",".join(PATHS),
        help="relay: loopback (both carriers) and/or lossy (the WAN lab, first carrier)",
    )
    group.add_argument(
        "--lossy-delay-ms", type=float, default=17.5, help="relay: lossy path, one-way delay"
    )
    group.add_argument(
        "--lossy-loss", type=float, default=0.02, help="relay: lossy path, random loss (0-1)"
    )
    group.add_argument(
        "--relay-tracks",
        default=",".join(map(str, DEFAULT_SLOPE_TRACKS)),
        help="relay: relayed track counts of the CPU slope (0: no slope)",
    )
    group.add_argument(
        "--relay-profile",
        type=Path,
        metavar="DIR",
        help="relay: py-spy record both nodes over each slope window (raw stacks in DIR, "
        "top frames in the table and JSON)",
    )


async def _join(http: httpx.AsyncClient, url: str, user_token: str, slug: str) -> Socket:
    auth = {"Authorization": f"Bearer {user_token}"}
    session = await http.post(f"{url}/api/sessions", headers=auth)
    session.raise_for_status()
    sock = await open_socket(url, session.json()["session_token"])
    joined = await http.post(
        f"{url}/api/rooms/{slug}/join",
        headers={"Authorization": f"Bearer {sock.session_token}"},
    )
    joined.raise_for_status()
    ack = await sock.request("join", room_token=joined.json()["room_token"])
    if ack.get("type") != "ack":
        raise RuntimeError(f"join refused: {ack}")
    return sock


async def _metric(http: httpx.AsyncClient, node: LocalNode, name: str, label: str = "") -> float:
    return metric_sum((await http.get(f"{node.url}/metrics")).text, name, label)


async def _retried(http: httpx.AsyncClient, nodes: list[LocalNode]) -> float:
    """Signalling attempts sent again so far, both nodes."""
    return sum(
        [
            await _metric(http, node, "sfumesh_relay_events_total", 'event="retried"')
            for node in nodes
        ]
    )


@dataclass
class _Carrier:
    """What a carrier's trials and CPU phase share: the two nodes and the clients that
    reach them, participant A (who stays on node-1), and where the figures go."""

    http: httpx.AsyncClient
    redis: Redis
    nodes: list[LocalNode]
    a: MediaPeer
    result: CarrierRun


async def _drive(
    nodes: list[LocalNode], services: BackingServices, run: RelayRun, result: CarrierRun
) -> None:
    node1, node2 = nodes
    redis = Redis.from_url(services.redis_url)
    async with httpx.AsyncClient(timeout=30) as http:
        stamp = secrets.token_hex(3)
        a_token = await sign_up(http, node1.url, f"a{stamp}")
        b_token = await sign_up(http, node1.url, f"b{stamp}")
        slug = f"relay-bench-{stamp}"
        created = await http.post(
            f"{node1.url}/api/rooms",
            json={"slug": slug, "capacity": 8},
            headers={"Authorization": f"Bearer {a_token}"},
        )
        created.raise_for_status()
        if run.window_s > 0 and not run.idle_cores:
            await _idle_cpu(nodes, run)
        a_sock = await _join(http, node1.url, a_token, slug)
        a = MediaPeer(a_sock, "A")
        await a.start_publishing()
        carrier = _Carrier(http, redis, nodes, a, result)
        try:
            for trial in range(run.trials):
                await no_relay(redis, NO_RELAY_S)
                retried = await _retried(http, nodes)
                started = time.monotonic()
                b_sock = await _join(http, node2.url, b_token, slug)
                b = MediaPeer(b_sock, "B")
                try:
                    what = f"relay bench trial {trial + 1}"
                    trial_run = _trial(carrier, b, started, retried)
                    await within(trial_run, TRIAL_LIMIT_S, what)
                except (AssertionError, RuntimeError, TimeoutError, httpx.HTTPError) as error:
                    result.failures += 1
                    say(
                        f"sfumesh bench relay: trial {trial + 1} failed: "
                        f"{type(error).__name__}: {error}",
                        err=True,
                    )
                finally:
                    await _close(b, "B")
            if run.window_s > 0 and run.marginal_us is None:
                cpu_phase = _cpu_phase(carrier, run, b_token, slug)
                await within(cpu_phase, CPU_PHASE_LIMIT_S + 2 * run.window_s, "relay bench CPU")
            result.message_bytes_max = max(
                [
                    await _metric(http, node, "sfumesh_relay_signalling_message_bytes_max")
                    for node in nodes
                ]
            )
        finally:
            await _close(a, "A")
            await redis.aclose()


async def _trial(carrier: _Carrier, b: MediaPeer, started: float, retried: float) -> None:
    """One join of B on node-2, timed from `started` to A's first decoded frame of B."""
    a, redis, result = carrier.a, carrier.redis, carrier.result
    await b.start_publishing()
    b_id = b.sock.session_id
    await until(lambda: any(r.first_frame_at for r in a.from_(b_id, "video")), "A to decode B")
    first = min(r.first_frame_at or 0 for r in a.from_(b_id, "video") if r.first_frame_at)
    result.setup_ms.append((first - started) * 1000)
    await asyncio.sleep(0.6)  # one report period: both ends' figures
    ends = [await read_relays(redis, "node-1"), await read_relays(redis, "node-2")]
    one, two = ends[0].get("node-2", {}), ends[1].get("node-1", {})
    if one.get("setup_ms") is not None:
        result.link_setup_ms.append(float(one["setup_ms"]))
    for phase, value in (one.get("setup_phases_ms") or {}).items():
        result.phases_ms.setdefault(phase, []).append(float(value))
    result.signalling_bytes.append(
        int(one.get("signalling_bytes", 0)) + int(two.get("signalling_bytes", 0))
    )
    result.retries.append(int(await _retried(carrier.http, carrier.nodes) - retried))


async def _close(peer: MediaPeer, name: str) -> None:
    """Close a participant's connections, then its socket (which ends its session: the next
    trial waits for the relay to close); either that will not close is logged (where it
    waits: bench.stuck) and left behind, so that the run goes on."""
    with contextlib.suppress(TimeoutError):
        await within(peer.close(), CLOSE_LIMIT_S, f"closing {name}'s connections")
    with contextlib.suppress(TimeoutError):
        await within(peer.sock.close(), CLOSE_LIMIT_S, f"closing {name}'s socket")


async def _idle_cpu(nodes: list[LocalNode], run: RelayRun) -> None:
    """Each node's CPU use with no media at all (heartbeats, gossip, reports)."""
    pids = {node.name: node.process.pid for node in nodes}
    before = {name: process_cpu_s(pid) for name, pid in pids.items() if pid is not None}
    await asyncio.sleep(run.window_s)
    for name, pid in pids.items():
        if pid is not None:
            run.idle_cores[name] = (process_cpu_s(pid) - before[name]) / run.window_s


async def _window(
    http: httpx.AsyncClient, nodes: list[LocalNode], seconds: float
) -> dict[str, tuple[float, float, float]]:
    """Per node: (CPU seconds, relayed packets out, relayed packets in) over `seconds`."""

    async def sample() -> dict[str, tuple[float, float, float]]:
        out = {}
        for node in nodes:
            assert node.process.pid is not None
            sent = await _metric(http, node, "sfumesh_relay_packets_total", 'direction="out"')
            got = await _metric(http, node, "sfumesh_relay_packets_total", 'direction="in"')
            out[node.name] = (process_cpu_s(node.process.pid), sent, got)
        return out

    before = await sample()
    await asyncio.sleep(seconds)
    after = await sample()
    return {
        name: tuple(b - a for a, b in zip(before[name], after[name], strict=True))  # type: ignore[misc]
        for name in after
    }


async def _cpu_phase(carrier: _Carrier, run: RelayRun, b_token: str, slug: str) -> None:
    """The same two participants, first on two nodes (relayed), then both on node-1."""
    http, redis, nodes, a = carrier.http, carrier.redis, carrier.nodes, carrier.a
    a_id = a.sock.session_id
    windows: dict[str, dict[str, tuple[float, float, float]]] = {}
    for label, node in (("relayed", nodes[1]), ("local", nodes[0])):
        await no_relay(redis, NO_RELAY_S)
        b_sock = await _join(http, node.url, b_token, slug)
        b = MediaPeer(b_sock, "B")
        try:
            await b.start_publishing()
            b_id = b_sock.session_id
            await until(lambda: a.decodes(b_id) and b.decodes(a_id), f"A and B ({label})")  # noqa: B023
            await asyncio.sleep(2.0)  # past the start: keyframes, bitrate ramp
            windows[label] = await _window(http, nodes, run.window_s)
            if not (a.decodes(b_id) and b.decodes(a_id)):
                raise RuntimeError(f"A and B stopped decoding each other ({label})")
        finally:
            await _close(b, "B")
    relayed, local = windows["relayed"], windows["local"]
    crossing = sum(sent for _, sent, _ in relayed.values())
    for name, (cpu, sent, got) in relayed.items():
        run.relayed_packets[name] = int(sent + got)
        busy = cpu - run.idle_cores.get(name, 0.0) * run.window_s
        if sent + got:
            run.cpu_us[name] = max(busy, 0.0) * 1e6 / (sent + got)
    run.cpu_relayed_s = sum(cpu for cpu, _, _ in relayed.values())
    run.cpu_local_s = sum(cpu for cpu, _, _ in local.values())
    if crossing:
        run.crossing_packets = int(crossing)
        run.marginal_us = (run.cpu_relayed_s - run.cpu_local_s) * 1e6 / crossing


async def _sdp_sizes(run: RelayRun) -> None:
    for tracks in (2, 8):
        pc = RTCPeerConnection()
        for index in range(tracks):
            pc.addTransceiver("video" if index % 2 == 0 else "audio", direction="sendrecv")
        await pc.setLocalDescription(await pc.createOffer())
        run.sdp_bytes[tracks] = len(pc.localDescription.sdp.encode())
        await pc.close()


def _node_env(carrier: str) -> dict[str, str]:
    many = "1000"  # the slope's publishers: a user each, all from this machine
    return {
        "SFUMESH_DATABASE": f"bench_{secrets.token_hex(4)}",
        "SFUMESH_BCRYPT_COST": "4",
        "SFUMESH_SIGNUP_LIMIT_PER_ADDRESS": many,
        "SFUMESH_SIGNUP_LIMIT_TOTAL": many,
        "SFUMESH_LOGIN_ATTEMPTS_PER_ADDRESS": many,
        "SFUMESH_WS_MAX_PER_ADDRESS": many,
        "SFUMESH_RELAY_LINGER_S": "0",
        "SFUMESH_RELAY_CARRIER": carrier,
        "SFUMESH_RELAY_REPORT_PERIOD_S": "0.5",
        "SFUMESH_LOG_LEVEL": "WARNING",
    }


def _run_carrier(
    data_dir: Path,
    services: BackingServices,
    run: RelayRun,
    carrier: str,
    slope: SlopeProbe | None = None,
) -> None:
    result = CarrierRun(carrier)
    run.carriers.append(result)
    env = {**_node_env(carrier), "SFUMESH_MEDIA_HOST_ADDRESSES": '["127.0.0.1"]'}
    nodes: list[LocalNode] = []
    try:
        nodes = start_nodes(
            services, {"bench": new_key()}, count=2, data_dir=data_dir / carrier, extra_env=env
        )
        asyncio.run(_drive(nodes, services, run, result))
        if slope is not None and run.slope_tracks and run.window_s > 0 and not run.slope:
            run.slope = slope(
                nodes,
                services,
                data_dir / carrier / "slope",
                run.window_s,
                run.slope_tracks,
                profile_dir=run.profile_dir,
            )
    finally:
        with no_interrupts():
            for node in nodes:
                node.stop()


def _run_lossy(data_dir: Path, run: RelayRun, carrier: str) -> None:
    """The trials over the WAN lab's lossy path (no CPU windows: the emulator shares the
    machine); the participants run on the lab's client host."""
    result = CarrierRun(carrier, path="lossy")
    run.lossy = result
    topology = LOSSY_TOPOLOGY.format(delay_ms=run.lossy_delay_ms, loss=run.lossy_loss)
    trials = RelayRun(trials=run.trials, window_s=0.0)
    with LabCluster(
        topology, "bench-relay-lossy", data_dir / "lab", node_env=_node_env(carrier)
    ) as cluster:
        cluster.wait_converged(timeout=60)
        nodes = [cluster.nodes["node-1"].local, cluster.nodes["node-2"].local]
        services = cluster.services
        assert services is not None
        adapter.set_host_addresses([str(cluster.lab.address("client"))])

        async def drive() -> None:
            await _drive(nodes, services, trials, result)

        cluster.run("client", drive)


def print_table(run: RelayRun) -> None:
    say(
        f"sfumesh bench relay: 2 nodes on loopback, {run.trials} trials per carrier "
        f"(and per path), {os.cpu_count()} CPUs"
    )
    header = (
        f"{'carrier':<8} {'ok':>4} {'fail':>5} {'setup p50':>10} {'p95':>8} "
        f"{'link p50':>9} {'bytes/relay':>12} {'max msg':>8}"
    )
    say(header)
    for result in run.carriers:
        ordered = sorted(result.setup_ms)
        links = sorted(result.link_setup_ms)
        per_relay = sorted(float(b) for b in result.signalling_bytes)
        say(
            f"{result.carrier:<8} {len(ordered):>4} {result.failures:>5} "
            f"{ms(percentile(ordered, 0.5)):>10} {ms(percentile(ordered, 0.95)):>8} "
            f"{ms(percentile(links, 0.5)):>9} "
            f"{int(percentile(per_relay, 0.5) or 0):>12} {int(result.message_bytes_max):>8}"
        )
    lossy = run.lossy
    if lossy is not None:
        ordered = sorted(lossy.setup_ms)
        links = sorted(lossy.link_setup_ms)
        say(
            f"{'lossy':<8} {len(ordered):>4} {lossy.failures:>5} "
            f"{ms(percentile(ordered, 0.5)):>10} {ms(percentile(ordered, 0.95)):>8} "
            f"{ms(percentile(links, 0.5)):>9} "
            f"{int(percentile(sorted(map(float, lossy.signalling_bytes)), 0.5) or 0):>12} "
            f"{int(lossy.message_bytes_max):>8}"
        )
    for result in [*run.carriers, *([lossy] if lossy is not None else [])]:
        name = "lossy" if result.path == "lossy" else result.carrier
        phases = ", ".join(
            f"{phase} {ms(percentile(sorted(values), 0.5))}/{ms(percentile(sorted(values), 0.95))}"
            for phase, values in result.phases_ms.items()
        )
        say(f"{name:<8} link phases p50/p95 (ms): {phases or '-'}")
    if lossy is not None:
        say(
            f"lossy: {lossy.carrier} carrier, {run.lossy_delay_ms:g} ms one way "
            f"({2 * run.lossy_delay_ms:g} ms RTT) with {run.lossy_loss:.1%} random loss between "
            f"the nodes (WAN lab); signalling attempts sent again: {sum(lossy.retries)} in "
            f"{len(lossy.retries)} relays"
        )
    elif run.lossy_problem is not None:
        say(f"lossy: not run ({run.lossy_problem})")
    say("")
    say("setup: B's join starts -> A decodes B's first relayed video frame (ms);")
    say("link: relay offer -> ICE and DTLS up, on the offering node (ms)")
    if run.marginal_us is not None:
        say(
            f"relay's own CPU: {run.marginal_us:.1f} µs per packet crossing the relay "
            f"(both nodes {run.cpu_relayed_s:.2f} s with A and B on two nodes, "
            f"{run.cpu_local_s:.2f} s with both on one node, {run.window_s:g} s each, "
            f"{run.crossing_packets} packets crossed)"
        )
        local_us = run.cpu_local_s * 1e6 / run.crossing_packets
        say(
            f"for scale, at the same packet rate: {local_us:.1f} µs of node CPU per packet "
            "taken in from a publisher and handed to a local subscriber"
        )
    for name, cpu in sorted(run.cpu_us.items()):
        say(
            f"{name}: {cpu:.1f} µs node CPU per relayed packet, upper bound "
            f"({run.relayed_packets[name]} packets in {run.window_s:g} s; idle use "
            f"{run.idle_cores.get(name, 0.0):.3f} cores subtracted)"
        )
    for tracks, size in sorted(run.sdp_bytes.items()):
        say(f"an aiortc SDP offer with {tracks} tracks: {size} bytes (ORTC description: < 1000)")
    print_slopes(run.slope)


def print_slopes(figures: dict[str, Any]) -> None:
    windows = figures.get("relay_slope_windows") or []
    if not windows:
        return
    say("")
    say("relay cost as a slope (T video tracks; CPU of each node against packets/s):")
    say(f"{'path':<8} {'T':>3} {'pkt/s':>8} {'lost':>6} {'node-1 %':>9} {'node-2 %':>9}")
    for w in windows:
        if w["error"]:
            say(f"{w['path']:<8} {w['tracks']:>3} error: {w['error'].splitlines()[0][:120]}")
            continue
        seconds = w["seconds"] or 1.0
        say(
            f"{w['path']:<8} {w['tracks']:>3} {w['packets_per_s'] or 0:>8.0f} {w['lost']:>6} "
            f"{100 * w['cpu_s'].get('node-1', 0.0) / seconds:>9.2f} "
            f"{100 * w['cpu_s'].get('node-2', 0.0) / seconds:>9.2f}"
        )
    slope = figures["relay_us_per_packet_slope"]

    def num(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    say(
        f"relayed packet: {num(slope['sending'])} us sending (node-2: in from the publisher, "
        f"out over the relay) + {num(slope['receiving'])} us receiving (node-1: in from the "
        f"relay, out to the subscriber) = {num(slope['sum'])} us"
    )
    say(
        f"local path of the same run: {num(figures['local_us_per_packet_slope'])} us per packet "
        f"(in from the publisher, out to the subscriber, one node); relaying adds "
        f"{num(figures['relay_own_us_per_packet_slope'])} us"
    )
    say(
        f"local forward (one publisher, T subscribers, one node): "
        f"{num(figures.get('local_forward_us_per_packet_slope'))} us per copy"
    )
    target = figures["relay_slope_target"]

    def verdict(met: bool | None, ratio: float | None) -> str:
        said = "not measured" if met is None else ("met" if met else "NOT met")
        return f"{said} ({'-' if ratio is None else f'{ratio:.2f}'}x)"

    say(
        f"target: both sides <= {target['relay_over_local_max']:g}x the local path: "
        f"{verdict(target['met'], figures['relay_over_local'])}; <= "
        f"{target['relay_to_local_forward_max']:g}x the local forward cost: "
        f"{verdict(target['local_forward_met'], figures['relay_to_local_forward_ratio'])}"
    )
    for label, profile in (figures.get("relay_slope_profiles") or {}).items():
        for node, summary in sorted(profile.items()):
            frames = ", ".join(f"{name} {pct:g}%" for name, pct in summary["self_pct"][:8])
            say(f"py-spy {label} {node} ({summary['samples']} samples, self): {frames}")


def report(run: RelayRun) -> dict[str, Any]:
    main = run.carriers[0] if run.carriers else CarrierRun("none")
    ordered = sorted(main.setup_ms)
    figures: dict[str, Any] = {
        "bench": "relay",
        "carrier": main.carrier,
        "setup_ms_p50": rounded(percentile(ordered, 0.5)),
        "setup_ms_p95": rounded(percentile(ordered, 0.95)),
        "cpu_us_per_relayed_packet": rounded(run.marginal_us),
        "cpu_us_per_relayed_packet_upper_bound_by_node": {
            k: rounded(v) for k, v in run.cpu_us.items()
        },
        "crossing_packets_in_window": run.crossing_packets,
        "cpu_s_both_nodes_relayed": rounded(run.cpu_relayed_s, 3),
        "cpu_s_both_nodes_local": rounded(run.cpu_local_s, 3),
        "cpu_us_per_local_packet": rounded(
            run.cpu_local_s * 1e6 / run.crossing_packets if run.crossing_packets else None
        ),
        "relayed_packets_in_window": run.relayed_packets,
        "idle_cores_subtracted": {k: rounded(v, 4) for k, v in run.idle_cores.items()},
        "signalling_bytes_max": max((c.message_bytes_max for c in run.carriers), default=0),
        "sdp_offer_bytes": {str(k): v for k, v in run.sdp_bytes.items()},
        "trials": run.trials,
        "cpu_window_s": run.window_s,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **run.slope,
    }
    if run.lossy is not None:
        figures["lossy"] = {
            **_carrier_figures(run.lossy),
            "carrier": run.lossy.carrier,
            "one_way_delay_ms": run.lossy_delay_ms,
            "loss": run.lossy_loss,
        }
    for result in run.carriers:
        figures[result.carrier] = _carrier_figures(result)
    return figures


def _carrier_figures(result: CarrierRun) -> dict[str, Any]:
    setup = sorted(result.setup_ms)
    links = sorted(result.link_setup_ms)
    return {
        "setup_ms_p50": rounded(percentile(setup, 0.5)),
        "setup_ms_p95": rounded(percentile(setup, 0.95)),
        "link_setup_ms_p50": rounded(percentile(links, 0.5)),
        "link_setup_ms_p95": rounded(percentile(links, 0.95)),
        "link_phases_ms_p50": {
            phase: rounded(percentile(sorted(values), 0.5))
            for phase, values in result.phases_ms.items()
        },
        "link_phases_ms_p95": {
            phase: rounded(percentile(sorted(values), 0.95))
            for phase, values in result.phases_ms.items()
        },
        "signalling_bytes_per_relay_p50": percentile(
            sorted(float(b) for b in result.signalling_bytes), 0.5
        ),
        "signalling_bytes_max": result.message_bytes_max,
        "signalling_retries": sum(result.retries),
        "signalling_retries_per_relay_max": max(result.retries, default=0),
        "trials_ok": len(setup),
        "failures": result.failures,
    }


def parse_tracks(text: str) -> list[int]:
    """`--relay-tracks`: relayed track counts of the slope; "0" or "": none."""
    values = [int(part) for part in text.split(",") if part.strip()]
    if values in ([], [0]):
        return []
    if any(v < 1 or v > 64 for v in values):
        raise ValueError("--relay-tracks takes a comma-separated list of 1..64 (0: none)")
    return values


def run(args: argparse.Namespace, slope: SlopeProbe | None = None) -> int:
    """`sfumesh bench relay`; `slope` measures the slope figures (the CLI hands in
    `node.bench.relay_cost.measure_relay_slope`; None: no slope)."""
    carriers = [c.strip() for c in args.carriers.split(",") if c.strip()]
    if not carriers or any(c not in CARRIERS for c in carriers):
        say(f"sfumesh bench relay: --carriers takes {', '.join(CARRIERS)}", err=True)
        return 2
    if args.joins < 1:
        say("sfumesh bench relay: --joins must be at least 1", err=True)
        return 2
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if not paths or any(p not in PATHS for p in paths):
        say(f"sfumesh bench relay: --paths takes {', '.join(PATHS)}", err=True)
        return 2
    if not 0 <= args.lossy_loss < 1 or args.lossy_delay_ms < 0:
        say("sfumesh bench relay: --lossy-loss is 0 to 1, --lossy-delay-ms >= 0", err=True)
        return 2
    try:
        slope_tracks = parse_tracks(args.relay_tracks)
    except ValueError as error:
        say(f"sfumesh bench relay: {error}", err=True)
        return 2
    if "lossy" in paths and not in_private_netns():
        reexec_in_private_netns()  # the same command, in a namespace of its own (the lab)
    setup_logging("WARNING")
    relay_run = RelayRun(
        trials=args.joins,
        window_s=args.cpu_window,
        lossy_delay_ms=args.lossy_delay_ms,
        lossy_loss=args.lossy_loss,
        slope_tracks=slope_tracks if slope is not None and "loopback" in paths else [],
        profile_dir=args.relay_profile,
    )
    adapter.set_host_addresses(["127.0.0.1"])  # the participants in this process
    try:
        return _run(args, relay_run, carriers, paths, slope)
    finally:
        adapter.set_host_addresses(None)


def _run(
    args: argparse.Namespace,
    relay_run: RelayRun,
    carriers: list[str],
    paths: list[str],
    slope: SlopeProbe | None = None,
) -> int:
    asyncio.run(_sdp_sizes(relay_run))
    with tempfile.TemporaryDirectory(prefix="sfumesh-bench-relay-") as tmp:
        data_dir = Path(tmp)
        if "lossy" in paths:
            relay_run.lossy_problem = namespace_problem()
            if relay_run.lossy_problem is None:
                _run_lossy(data_dir, relay_run, carriers[0])
                adapter.set_host_addresses(["127.0.0.1"])
            else:
                say(f"sfumesh bench relay: lossy path: {relay_run.lossy_problem}", err=True)
        if "loopback" in paths:
            try:
                services = BackingServices.start(
                    os.environ.get("REDIS_URL", ""), "", data_dir / "services"
                )
            except ServiceError as error:
                say(f"sfumesh bench relay: {error}", err=True)
                return 1
            try:
                for carrier in carriers:
                    _run_carrier(data_dir, services, relay_run, carrier, slope)
            finally:
                with no_interrupts():
                    services.stop()
    print_table(relay_run)
    if args.json is not None and not write_report(args.json, report(relay_run)):
        return 1
    ran = [*relay_run.carriers, *([relay_run.lossy] if relay_run.lossy is not None else [])]
    ok = bool(ran) and all(c.setup_ms and not c.failures for c in ran)
    slope_ok = not relay_run.slope_tracks or not any(
        w.get("error") for w in relay_run.slope.get("relay_slope_windows") or [{"error": "none"}]
    )
    return 0 if ok and slope_ok else 1
