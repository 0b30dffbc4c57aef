"""`sfumesh bench scale`: how cost grows, measured (issue 18 item 5), so that the README's
projection to 100 and 1,000 nodes rests on figures, not guesses.

**One node, one core.** Light synthetic participants (`node.bench.forward.peers
participants`: real ICE/DTLS/SRTP, the pre-encoded loop replayed, nothing encoded or decoded
at run time) in rooms of 2, 4 and 8 on one node process pinned to one core
(`os.sched_setaffinity` on every thread). Rooms are added step by step; per step, over a
window after a warm-up, the node's CPU (`/proc/<pid>/stat`) and, on the clients' receive
side, loss (sequence gaps over every received stream) and the frame latency through the node
(first packet sent to first packet received per video frame, `forward.run.frame_latencies`).
A step passes when p99 latency <= 50 ms and loss <= 0.5 %; `participants_per_core` is the
largest passing step, `cpu_ms_per_participant_s` the node's CPU per participant in it.
The clients share the machine with the node: when they, not the node, run out of CPU the
ramp stops early, which the table says (the node's share of its core beside each step).

**The mesh.** N Serf agents started here (gossip encrypted, as in production), each with a
node attached to it (`serf.mode = "attach"`) and no media. The agents send their metrics to
a statsd listener of the bench: memberlist's `udp.sent` counter is incremented once per UDP
packet sent (its value the packet's bytes), so `serf_msgs_per_s` counts the gossip, probe
and ack packets the whole cluster sends per second (idle, after the joins); Serf's own
messages (`serf.msgs.sent`) are given beside. Relay signalling messages are the nodes'
`sfumesh_relay_signalling_messages` counters. Then R rooms of P people join, spread so that
each room spans nodes; `redis_ops_per_join` is the growth of Redis's `INFO commandstats`
calls (INFO itself left out) over those joins, less the idle rate, per join (a person
arriving: session, WebSocket, room join).

Power laws y = a * x^b are fitted by least squares on log-log (`fits`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import httpx

from mesh.agent import DEFAULT_TEMPLATE, NODE_KEYS, SerfAgentConfig
from mesh.process import ManagedProcess, free_port
from node.bench.forward import media as bench_media
from node.bench.forward.run import (
    ClientProcess,
    estimate_offset,
    fit_line,
    frame_latencies,
    split_evenly,
)
from node.bench.report import metric_sum, percentile, process_cpu_s, rounded, say, write_report
from node.bench.report import plot as report_plot
from node.config import new_key
from node.local.launch import ClusterSecrets, LocalNode, spawn_node, wait_ready
from node.local.netns import NetnsError, ensure_veth, in_private_netns, reexec_in_private_netns
from node.runtime.services import BackingServices

DEFAULT_SIZES: Final = (2, 4, 8)
DEFAULT_NODE_COUNTS: Final = (4, 8, 16)
DEFAULT_DURATION_S: Final = 10.0
DEFAULT_WARMUP_S: Final = 3.0
DEFAULT_MAX_PARTICIPANTS: Final = 64
DEFAULT_PEOPLE: Final = 4
LATENCY_LIMIT_MS: Final = 50.0
LOSS_LIMIT: Final = 0.005
#: past a failed step the ramp goes on (the node's CPU per participant is still worth
#: measuring when the clients, not the node, missed the limits) until the node's core is
#: this busy, or this much is lost, or a step cannot be set up
GIVE_UP_CORE_SHARE: Final = 0.9
GIVE_UP_LOSS: Final = 0.05
#: subscriber frames are matched to a publisher's sent up to this long before (a frame
#: later than this fails the 50 ms limit anyway)
MATCH_WINDOW_S: Final = 1.0
#: video tracks per subscriber whose latency is computed (matching costs the driver CPU)
LATENCY_TRACKS: Final = 2
NODE_READY_S: Final = 180.0
CONVERGE_S: Final = 90.0
SETTLE_S: Final = 10.0
MEMBERS_CLOSE_S: Final = 30.0
JOIN_CONCURRENCY: Final = 8
#: rooms whose client processes are set up at once
GROW_BATCH_ROOMS: Final = 2
TARGET_PER_CORE_ROOMS_OF_4: Final = 50
#: participants per client process (a room of 8 is two processes)
PER_PROCESS: Final = 4
VIDEO_SIZE: Final = (320, 180)
VIDEO_BITRATE: Final = 300_000


class ScaleBenchError(RuntimeError):
    """A part of the bench could not be set up."""


# --------------------------------------------------------------------------- pure analysis


@dataclass(frozen=True)
class PowerLaw:
    """y = coefficient * x ** exponent, fitted on log-log."""

    exponent: float
    coefficient: float
    points: int
    r2: float | None


def fit_power_law(xs: Sequence[float], ys: Sequence[float]) -> PowerLaw | None:
    """Least squares of log y against log x over the points with x, y > 0; None with fewer
    than two distinct x."""
    pairs = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
    line = fit_line([p[0] for p in pairs], [p[1] for p in pairs])
    if line is None:
        return None
    return PowerLaw(line.slope, math.exp(line.intercept), line.points, line.r2)


def next_rooms(rooms: int, step_rooms: int | None = None) -> int:
    """The ramp: `step_rooms` more (`--step`); by default one room more at first, then half
    as many again (ends in few steps)."""
    if step_rooms is not None:
        return rooms + max(1, step_rooms)
    return max(rooms + 1, math.ceil(rooms * 1.5))


def rooms_for(participants: int | None, size: int) -> int | None:
    """Whole rooms of `size` for at least `participants` people (at least one room); None
    for None."""
    return None if participants is None else max(1, math.ceil(participants / size))


def step_passes(p99_ms: float | None, loss: float | None) -> bool:
    return (
        p99_ms is not None
        and p99_ms <= LATENCY_LIMIT_MS
        and loss is not None
        and loss <= LOSS_LIMIT
    )


def ramp_over(step: Step) -> bool:
    """Whether the ramp stops after `step` (a failed step alone does not stop it)."""
    return (
        step.error is not None
        or step.core_share >= GIVE_UP_CORE_SHARE
        or (step.loss is not None and step.loss > GIVE_UP_LOSS)
    )


def counts_for_cpu(step: Step) -> bool:
    """A step whose node CPU says what forwarding costs: measured, and not one where the
    clients collapsed (most packets lost: the node had little to forward)."""
    return (
        step.error is None
        and step.window_s > 0
        and step.loss is not None
        and step.loss <= GIVE_UP_LOSS
    )


def cpu_bound(steps: Sequence[Step]) -> tuple[float | None, float | None]:
    """The node's CPU against participants over the measured steps, as a line: (marginal ms
    of CPU per participant-second, participants one core would hold by CPU alone)."""
    measured = [s for s in steps if counts_for_cpu(s)]
    line = fit_line(
        [float(s.participants) for s in measured],
        [s.node_cpu_s * 1000 / s.window_s for s in measured],
    )
    if line is None or line.slope <= 0:
        return None, None
    return line.slope, max(0.0, (1000.0 - line.intercept) / line.slope)


def redis_calls(commandstats: dict[str, Any]) -> int:
    """Commands Redis ran, from `INFO commandstats` (INFO itself left out)."""
    return sum(
        int(stats.get("calls", 0))
        for name, stats in commandstats.items()
        if isinstance(stats, dict) and name.removeprefix("cmdstat_") != "info"
    )


def parse_statsd(datagram: bytes) -> list[tuple[str, str, float]]:
    """(name, type, value) per line of a statsd datagram; malformed lines skipped."""
    found = []
    for line in datagram.decode(errors="replace").splitlines():
        name, _, rest = line.partition(":")
        value, _, kind = rest.partition("|")
        try:
            found.append((name, kind.split("|")[0], float(value)))
        except ValueError:
            continue
    return found


# --------------------------------------------------------------------------- one node


@dataclass
class Step:
    """One step of the ramp: `rooms` rooms of `size` on the node."""

    size: int
    rooms: int
    participants: int
    error: str | None = None
    window_s: float = 0.0
    node_cpu_s: float = 0.0
    core_share: float = 0.0
    cpu_ms_per_participant_s: float | None = None
    expected: int = 0
    lost: int = 0
    loss: float | None = None
    #: what the latency figures above are read from: "kernel" (the subscriber's kernel
    #: received the first packet) or "handler" (it reached the client's RTP handler)
    latency_clock: str | None = None
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    #: the same frames read at the client's handler (includes the client's own backlog)
    latency_p50_ms_handler: float | None = None
    latency_p99_ms_handler: float | None = None
    #: frames whose first packet had no kernel receive stamp
    frames_without_kernel_stamp: int = 0
    latency_frames: int = 0
    unaligned_tracks: int = 0
    machine_busy: float | None = None
    #: the node's cyclic garbage collections in the window: full (generation 2) ones, the
    #: share of the window the event loop stood still in any, and the longest full one so far
    gc_full_collections: int | None = None
    gc_pause_share: float | None = None
    gc_pause_max_ms: float | None = None
    passed: bool = False


def pin(pid: int, cpus: set[int]) -> bool:
    """Every thread of `pid` on `cpus` (threads made later inherit their maker's)."""
    if not hasattr(os, "sched_setaffinity"):
        return False
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(int(task), cpus)
    except OSError:
        return False
    return True


def machine_cpu() -> tuple[float, float]:
    with open("/proc/stat") as stat:
        values = [float(v) for v in stat.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0.0)
    return sum(values) - idle, sum(values)


@dataclass
class MediaConfig:
    sizes: list[int]
    duration_s: float = DEFAULT_DURATION_S
    warmup_s: float = DEFAULT_WARMUP_S
    max_participants: int = DEFAULT_MAX_PARTICIPANTS
    #: participants of the first step (None: one room)
    start: int | None = None
    #: participants added per step (None: the geometric ramp of `next_rooms`)
    step: int | None = None


class NodeRamp:
    """Rooms of one size added to one pinned node until a step fails or the cap is hit."""

    def __init__(
        self, config: MediaConfig, size: int, address: str, media_path: Path, workdir: Path
    ) -> None:
        self.config = config
        self.size = size
        self.address = address
        self.media_path = media_path
        self.workdir = workdir
        self.clients: list[ClientProcess] = []
        #: the room of each client process, in the same order
        self.client_rooms: list[int] = []
        self.core: int | None = None
        #: what each client process reads latency from ("kernel" or "handler")
        self.latency_clocks: list[str] = []
        self.url = ""
        self.service_pids: list[int] = []

    async def run(self) -> list[Step]:
        from node.bench.forward.sfumesh import SfumeshSystem

        system = SfumeshSystem(self.address, self.workdir)
        steps: list[Step] = []
        try:
            await system.start()
            self.url = system.url
            self.service_pids = system.service_pids
            allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
            self.core = allowed[0] if allowed else None
            spec = system.spec()
            # A person may publish at most `media.max_tracks_per_participant` tracks in a
            # room: one user per place in a room, each participant a person of its own.
            spec["user_tokens"] = [spec["user_token"]] + [
                await asyncio.to_thread(_bench_user, system.url, f"benchscale{n}")
                for n in range(1, self.size)
            ]
            rooms = 0
            target = rooms_for(self.config.start, self.size) or 1
            step_rooms = rooms_for(self.config.step, self.size)
            warned = False
            while target * self.size <= max(self.config.max_participants, self.size):
                step = Step(self.size, target, target * self.size)
                steps.append(step)
                try:
                    await self._grow(system, spec, rooms, target)
                    rooms = target
                    if "handler" in self.latency_clocks and not warned:
                        warned = True
                        say("  (no kernel receive stamps: latency read in the clients' handlers)")
                    await self._measure(system.pid, step)
                except Exception as error:  # the step failed: the ramp ends here
                    step.error = f"{type(error).__name__}: {error}"
                say(self._line(step))
                if ramp_over(step):
                    break
                target = next_rooms(target, step_rooms)
        finally:
            await asyncio.gather(*(c.stop() for c in self.clients), return_exceptions=True)
            await system.stop()
        return steps

    async def _grow(self, system: Any, spec: dict[str, Any], rooms: int, target: int) -> None:
        # A ramp that starts high sets up its rooms a few at a time: dozens of peer
        # connections negotiated at once on a busy machine would run out their time limit.
        for first in range(rooms, target, GROW_BATCH_ROOMS):
            await self._add_rooms(system, spec, first, min(target, first + GROW_BATCH_ROOMS))
        await asyncio.sleep(self.config.warmup_s)

    async def _add_rooms(self, system: Any, spec: dict[str, Any], rooms: int, target: int) -> None:
        timeout = 60.0 + 15.0 * self.size
        added = []
        for number in range(rooms, target):
            room = spec["room"] if number == 0 else f"scale-{self.size}-{number}"
            if number:
                await asyncio.to_thread(_create_room, system.url, spec["user_token"], room)
            first = number * self.size
            # A room's people over processes of at most PER_PROCESS, so that one Python
            # client process does not limit a large room.
            for part, count in enumerate(split_evenly(self.size, PER_PROCESS)):
                room_spec = {**spec, "room": room}
                room_spec["user_tokens"] = spec["user_tokens"][first - number * self.size :][:count]
                argv = [
                    sys.executable,
                    "-m",
                    "node.bench.forward.peers",
                    "participants",
                    "--spec",
                    json.dumps(room_spec),
                    "--address",
                    self.address,
                    "--media",
                    str(self.media_path),
                    "--count",
                    str(count),
                    "--room-size",
                    str(self.size),
                    "--first",
                    str(first),
                    "--timeout",
                    str(timeout),
                ]
                first += count
                label = f"room-{number}-{part}"
                client = ClientProcess(label, argv, self.workdir / f"{label}.log")
                self.clients.append(client)
                self.client_rooms.append(number)
                added.append(client)
        await asyncio.gather(*(c.start() for c in added))
        ready = await asyncio.gather(*(c.expect("ready", timeout + 10) for c in added))
        self.latency_clocks.extend(str(event.get("latency_clock", "handler")) for event in ready)

    async def _mark(self, pid: int) -> dict[str, Any]:
        if self.core is not None:
            pin(pid, {self.core})
            # The clients, Redis and the store keep off the node's core: "one core holds"
            # means a core of its own, and processes that float onto it would charge their
            # CPU to its latency (a profile at 56 people: the node runnable but not running
            # ~15% of the time while its core showed 74% busy).
            others = set(os.sched_getaffinity(0)) - {self.core}
            if others:
                for other in [*(c.pid for c in self.clients), *self.service_pids]:
                    pin(other, others)
        await asyncio.gather(*(c.send("mark") for c in self.clients))
        at = time.monotonic()
        cpu = process_cpu_s(pid)
        machine = machine_cpu()
        gc_figures = await asyncio.to_thread(node_gc, self.url)
        replies = await asyncio.gather(*(c.expect("marked", 60.0) for c in self.clients))
        return {
            "t": at,
            "cpu": cpu,
            "machine": machine,
            "gc": gc_figures,
            "rooms": merge_rooms(self.client_rooms, replies),
        }

    async def _measure(self, pid: int, step: Step) -> None:
        start = await self._mark(pid)
        await asyncio.sleep(self.config.duration_s)
        end = await self._mark(pid)
        await asyncio.to_thread(analyse, step, start, end)

    def _line(self, step: Step) -> str:
        verdict = "pass" if step.passed else f"FAIL {step.error or ''}".strip()
        return (
            f"  rooms of {step.size}: {step.rooms:>3} rooms {step.participants:>4} people  "
            f"node core {step.core_share * 100:5.1f} %  "
            f"cpu/participant {_num(step.cpu_ms_per_participant_s, 2)} ms/s  "
            f"loss {_pct(step.loss)}  p99 {_num(step.latency_p99_ms)} ms "
            f"({step.latency_clock or '-'}; handler {_num(step.latency_p99_ms_handler)})  "
            f"gc {_pct(step.gc_pause_share)} full {step.gc_full_collections} "
            f"max {_num(step.gc_pause_max_ms)} ms  "
            f"{verdict}"
        )


def node_gc(url: str) -> tuple[float, float, float] | None:
    """The node's full collections, seconds paused in all collections and longest full
    pause so far (`node.runtime.gc_pauses`), from its /metrics; None if unreadable."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=10.0).text
    except httpx.HTTPError:
        return None
    return (
        metric_sum(text, "sfumesh_gc_collections_total", 'generation="2"'),
        metric_sum(text, "sfumesh_gc_pause_seconds_total"),
        metric_sum(text, "sfumesh_gc_pause_max_seconds", 'generation="2"'),
    )


def merge_rooms(rooms: Sequence[int], replies: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One report per room from its processes' reports (in participant order)."""
    merged: dict[int, dict[str, Any]] = {}
    for room, reply in zip(rooms, replies, strict=True):
        into = merged.setdefault(room, {"publishers": [], "subscribers": []})
        into["publishers"].extend(reply["publishers"])
        into["subscribers"].extend(reply["subscribers"])
    return [merged[room] for room in sorted(merged)]


def analyse(step: Step, start: dict[str, Any], end: dict[str, Any]) -> None:
    """Fill `step` from the marks that bracket its window."""
    step.window_s = end["t"] - start["t"]
    step.node_cpu_s = end["cpu"] - start["cpu"]
    step.core_share = step.node_cpu_s / step.window_s if step.window_s > 0 else 0.0
    if step.participants and step.window_s > 0:
        step.cpu_ms_per_participant_s = step.node_cpu_s * 1000 / step.window_s / step.participants
    busy = end["machine"][0] - start["machine"][0]
    total = end["machine"][1] - start["machine"][1]
    step.machine_busy = busy / total if total > 0 else None
    if start.get("gc") is not None and end.get("gc") is not None:
        full_before, paused_before, _ = start["gc"]
        full, paused, longest = end["gc"]
        step.gc_full_collections = int(full - full_before)
        if step.window_s > 0:
            step.gc_pause_share = (paused - paused_before) / step.window_s
        step.gc_pause_max_ms = longest * 1000
    # (the other publishers' sent frames, the received frames: ts, kernel stamp, handler)
    tracks: list[tuple[list[list[tuple[int, float]]], list[tuple[int, float | None, float]]]] = []
    for before, during in zip(start["rooms"], end["rooms"], strict=False):
        sent = [
            [(int(ts), float(t)) for ts, t in a["frames"] + b["frames"]]
            for a, b in zip(before["publishers"], during["publishers"], strict=True)
        ]
        for index, report in enumerate(during["subscribers"]):
            for stream in report["streams"].values():
                step.expected += stream["expected"]
                step.lost += stream["lost"]
            others = [frames for n, frames in enumerate(sent) if n != index]
            for received in list(report.get("tracks", {}).values())[:LATENCY_TRACKS]:
                frames = [
                    (int(ts), None if kernel is None else float(kernel), float(handled))
                    for ts, kernel, handled in received
                ]
                step.frames_without_kernel_stamp += sum(1 for f in frames if f[1] is None)
                tracks.append((others, frames))
    step.loss = step.lost / step.expected if step.expected > 0 else None
    by_handler = _latencies([(o, [(ts, h) for ts, _, h in f]) for o, f in tracks])
    step.latency_p50_ms_handler, step.latency_p99_ms_handler, _, _ = by_handler
    # The kernel's stamps when every frame has one: what the node adds, without the time
    # a datagram waited for a busy client process. Otherwise the handler's, for all frames.
    if tracks and step.frames_without_kernel_stamp == 0:
        step.latency_clock = "kernel"
        by_kernel = [(o, [(ts, h if k is None else k) for ts, k, h in f]) for o, f in tracks]
        primary = _latencies(by_kernel)
    else:
        step.latency_clock = "handler"
        primary = by_handler
    step.latency_p50_ms, step.latency_p99_ms, step.latency_frames, step.unaligned_tracks = primary
    step.passed = step.error is None and step_passes(step.latency_p99_ms, step.loss)


def _latencies(
    tracks: Sequence[tuple[list[list[tuple[int, float]]], list[tuple[int, float]]]],
) -> tuple[float | None, float | None, int, int]:
    """(p50 ms, p99 ms, frames, unaligned tracks) of received tracks, each matched against
    the frames of the publishers that may have sent it."""
    latencies: list[float] = []
    unaligned = 0
    for others, received in tracks:
        matched = _match(others, received)
        if matched is None:
            unaligned += 1
        else:
            latencies.extend(matched)
    ordered = sorted(latencies)
    p50, p99 = percentile(ordered, 0.50), percentile(ordered, 0.99)
    p50_ms = None if p50 is None else p50 * 1000
    p99_ms = None if p99 is None else p99 * 1000
    if unaligned and p99_ms is not None:
        # a track no publisher's frames match within MATCH_WINDOW_S arrived too late
        p99_ms = max(p99_ms, MATCH_WINDOW_S * 1000)
    return p50_ms, p99_ms, len(ordered), unaligned


def _match(
    publishers: list[list[tuple[int, float]]], received: list[tuple[int, float]]
) -> list[float] | None:
    """The latencies of a received video track against whichever publisher sent it."""
    for sent in publishers:
        if estimate_offset(sent, received, max_latency_s=MATCH_WINDOW_S) is not None:
            return frame_latencies(sent, received, max_latency_s=MATCH_WINDOW_S)
    return None


def _create_room(url: str, token: str, slug: str) -> None:
    with httpx.Client(base_url=url, timeout=30.0) as http:
        response = http.post(
            "/api/rooms",
            json={"slug": slug, "name": slug, "capacity": 100},
            headers={"Authorization": f"Bearer {token}"},
        )
    if response.status_code != 201:
        raise ScaleBenchError(f"creating room {slug}: HTTP {response.status_code}")


# --------------------------------------------------------------------------- the mesh


class StatsdListener(asyncio.DatagramProtocol):
    """Counts the statsd lines the Serf agents send: per metric, lines and summed values
    (whole numbers: the counters read here count packets' bytes)."""

    def __init__(self) -> None:
        self.lines: Counter[str] = Counter()
        self.values: Counter[str] = Counter()

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        for name, _, value in parse_statsd(data):
            self.lines[name] += 1
            self.values[name] += int(value)  # the counters read here count bytes

    def snapshot(self) -> tuple[Counter[str], Counter[str]]:
        return Counter(self.lines), Counter(self.values)


def _metric(counts: Counter[str], suffix: str) -> float:
    return sum(value for name, value in counts.items() if name.endswith(suffix))


@dataclass
class MeshPoint:
    """The mesh at one cluster size."""

    nodes: int
    rooms: int = 0
    people: int = 0
    converge_s: float = 0.0
    window_s: float = 0.0
    udp_packets_per_s: float = 0.0
    udp_bytes_per_s: float = 0.0
    tcp_bytes_per_s: float = 0.0
    serf_messages_per_s: float = 0.0
    relay_signalling_per_s: float = 0.0
    joins: int = 0
    join_s: float = 0.0
    redis_ops_per_join: float | None = None
    redis_idle_ops_per_s: float = 0.0
    udp_packets_per_s_during_joins: float = 0.0
    error: str | None = None


@dataclass
class MeshConfig:
    node_counts: list[int]
    duration_s: float = DEFAULT_DURATION_S
    people: int = DEFAULT_PEOPLE


class Mesh:
    """Serf agents with nodes attached, grown in place from one cluster size to the next."""

    def __init__(self, workdir: Path, statsd_addr: str) -> None:
        self.workdir = workdir
        self.statsd_addr = statsd_addr
        self.cluster = ClusterSecrets.new()
        self.token_keys = {"bench": new_key()}
        self.services: BackingServices | None = None
        self.agents: list[ManagedProcess] = []
        self.rpc: list[str] = []
        self.nodes: list[LocalNode] = []
        self.first_bind = ""
        self.user_token = ""
        self.template = workdir / "serf-template.json"

    def start_services(self) -> None:
        self.services = BackingServices.start("", "", self.workdir / "services")
        shared = json.loads(DEFAULT_TEMPLATE.read_text())
        template = {k: v for k, v in shared.items() if k not in NODE_KEYS}
        template.update(statsd_addr=self.statsd_addr, log_level="warn")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.template.write_text(json.dumps(template))

    def grow(self, count: int) -> None:
        services = self.services
        assert services is not None
        fresh: list[LocalNode] = []
        for index in range(len(self.nodes), count):
            name = f"node-{index + 1}"
            bind, rpc = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
            config = SerfAgentConfig(
                node_name=name,
                bind=bind,
                rpc_addr=rpc,
                rpc_auth=self.cluster.rpc_auth,
                encrypt_key=self.cluster.encrypt_key,
                retry_join=[self.first_bind] if self.first_bind else None,
                template=self.template,
            )
            path = config.write(self.workdir / "serf" / f"{name}.json")
            serf = shutil.which("serf") or "serf"
            agent = ManagedProcess(
                f"serf-{name}",
                [serf, "agent", f"-config-file={path}"],
                self.workdir / "serf" / f"{name}.log",
            )
            agent.start()
            self.agents.append(agent)
            self.rpc.append(rpc)
            host, _, port = rpc.rpartition(":")
            agent.wait_port(host, int(port))
            self.first_bind = self.first_bind or bind
            env = {
                "SFUMESH_SERF_MODE": "attach",
                "SFUMESH_SERF_RPC_ADDR": rpc,
                "SFUMESH_SERF_RPC_AUTH": self.cluster.rpc_auth,
                "SFUMESH_RELAY_KEY": self.cluster.relay_key,
                "SFUMESH_DUPLICATE_POLICY": "allow",
                "SFUMESH_WS_MAX_PER_USER": "100000",
                "SFUMESH_WS_MAX_PER_ADDRESS": "100000",
                "SFUMESH_WS_IDLE_TIMEOUT_S": "600",
                "SFUMESH_BCRYPT_COST": "4",
                "SFUMESH_ROOM_CREATIONS_PER_WINDOW": "100000",
                "SFUMESH_LOG_LEVEL": "WARNING",
                "SFUMESH_DATABASE": "bench_scale",
            }
            node = spawn_node(
                services,
                self.token_keys,
                name=name,
                port=free_port(),
                data_dir=self.workdir / "nodes",
                extra_env=env,
                serf=None,
                join=None,
            )
            self.nodes.append(node)
            fresh.append(node)
        for node in fresh:
            wait_ready(node, NODE_READY_S)
        if not self.user_token:
            self.user_token = _bench_user(self.nodes[0].url)

    def alive_members(self) -> int:
        serf = shutil.which("serf") or "serf"
        result = subprocess.run(
            [serf, "members", f"-rpc-addr={self.rpc[0]}", "-status=alive"],
            env={**os.environ, "SERF_RPC_AUTH": self.cluster.rpc_auth},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return len([line for line in result.stdout.splitlines() if line.strip()])

    def redis_calls(self) -> int:
        import redis

        services = self.services
        assert services is not None
        client = redis.Redis.from_url(services.redis_url)
        try:
            return redis_calls(client.info("commandstats"))
        finally:
            client.close()

    def relay_messages(self) -> float:
        total = 0.0
        for node in self.nodes:
            with contextlib.suppress(httpx.HTTPError):
                text = httpx.get(f"{node.url}/metrics", timeout=10.0).text
                total += metric_sum(text, "sfumesh_relay_signalling_messages_total")
        return total

    def stop(self) -> None:
        # Side by side: a node drains before it exits, sixteen in a row take minutes.
        with ThreadPoolExecutor(max_workers=max(1, len(self.nodes))) as pool:
            list(pool.map(lambda node: node.stop(), self.nodes))
        with ThreadPoolExecutor(max_workers=max(1, len(self.agents))) as pool:
            list(pool.map(lambda agent: agent.stop(), self.agents))
        if self.services is not None:
            self.services.stop()


def _bench_user(url: str, username: str = "benchscale") -> str:
    """A new user's token (signed up and logged in at `url`)."""
    password = secrets.token_urlsafe(16)
    with httpx.Client(base_url=url, timeout=30.0) as http:
        signup = {
            "username": username,
            "email": f"{username}@example.org",
            "password": password,
            "display_name": "Scale",
        }
        created = http.post("/api/users", json=signup)
        if created.status_code != 201:
            raise ScaleBenchError(f"sign-up: HTTP {created.status_code}: {created.text[:200]}")
        login = http.post("/api/auth/login", json={"login": username, "password": password})
        if login.status_code != 200:
            raise ScaleBenchError(f"login: HTTP {login.status_code}")
        return str(login.json()["user_token"])


async def run_mesh(config: MeshConfig, workdir: Path) -> list[MeshPoint]:
    from node.bench.forward.sfumesh import SfumeshSignalling

    loop = asyncio.get_running_loop()
    transport, listener = await loop.create_datagram_endpoint(
        StatsdListener, local_addr=("127.0.0.1", 0)
    )
    host, port = transport.get_extra_info("sockname")[:2]
    mesh = Mesh(workdir, f"{host}:{port}")
    points: list[MeshPoint] = []
    members: list[SfumeshSignalling] = []
    try:
        await asyncio.to_thread(mesh.start_services)
        for count in config.node_counts:
            point = MeshPoint(count)
            points.append(point)
            try:
                began = time.monotonic()
                await asyncio.to_thread(mesh.grow, count)
                while await asyncio.to_thread(mesh.alive_members) < count:
                    if time.monotonic() - began > CONVERGE_S:
                        raise ScaleBenchError(f"Serf did not see {count} members")
                    await asyncio.sleep(0.5)
                point.converge_s = time.monotonic() - began
                # The joins' and tags' broadcasts are still retransmitted for a while after
                # every agent sees every member: the idle window starts after them.
                await asyncio.sleep(min(SETTLE_S, 2 * config.duration_s))
                await _measure_gossip(mesh, listener, point, config.duration_s)
                await _measure_joins(mesh, listener, point, config, members)
            except Exception as error:  # one size failed; the larger ones would too
                point.error = f"{type(error).__name__}: {error}"
                say(f"  mesh of {count}: FAIL {point.error}")
                break
            say(
                f"  mesh of {count:>3} nodes: {point.udp_packets_per_s:8.1f} gossip packets/s "
                f"({point.udp_packets_per_s / count:.1f} per node), "
                f"redis ops/join {_num(point.redis_ops_per_join)}"
            )
    finally:
        # Bounded: whatever a WebSocket does on its way out, the processes are stopped.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(m.close() for m in members), return_exceptions=True),
                MEMBERS_CLOSE_S,
            )
        transport.close()
        await asyncio.to_thread(mesh.stop)
    return points


async def _measure_gossip(
    mesh: Mesh, listener: StatsdListener, point: MeshPoint, duration_s: float
) -> None:
    lines0, values0 = listener.snapshot()
    relay0 = await asyncio.to_thread(mesh.relay_messages)
    began = time.monotonic()
    await asyncio.sleep(duration_s)
    lines1, values1 = listener.snapshot()
    relay1 = await asyncio.to_thread(mesh.relay_messages)
    elapsed = time.monotonic() - began
    lines, values = lines1 - lines0, values1 - values0
    point.window_s = elapsed
    point.udp_packets_per_s = _metric(lines, "memberlist.udp.sent") / elapsed
    point.udp_bytes_per_s = _metric(values, "memberlist.udp.sent") / elapsed
    point.tcp_bytes_per_s = _metric(values, "memberlist.tcp.sent") / elapsed
    point.serf_messages_per_s = _metric(lines, "serf.msgs.sent") / elapsed
    point.relay_signalling_per_s = (relay1 - relay0) / elapsed


async def _measure_joins(
    mesh: Mesh,
    listener: StatsdListener,
    point: MeshPoint,
    config: MeshConfig,
    members: list[Any],
) -> None:
    from node.bench.forward.sfumesh import SfumeshSignalling

    nodes = len(mesh.nodes)
    point.rooms = nodes
    point.people = config.people
    slugs = [f"mesh-{nodes}-{r}" for r in range(nodes)]
    for slug in slugs:
        await asyncio.to_thread(_create_room, mesh.nodes[0].url, mesh.user_token, slug)
    # The idle rate (heartbeats, registry refreshes) is taken out of the joins' count.
    idle0, idle_at = await asyncio.to_thread(mesh.redis_calls), time.monotonic()
    await asyncio.sleep(2.0)
    idle1 = await asyncio.to_thread(mesh.redis_calls)
    calls0 = await asyncio.to_thread(mesh.redis_calls)
    point.redis_idle_ops_per_s = (idle1 - idle0 - 1) / (time.monotonic() - idle_at)
    lines0, _ = listener.snapshot()
    gate = asyncio.Semaphore(JOIN_CONCURRENCY)

    async def join(room: int, person: int) -> None:
        node = mesh.nodes[(room + person) % nodes]
        spec = {"url": node.url, "user_token": mesh.user_token, "room": slugs[room]}
        member = SfumeshSignalling(spec, "member")
        members.append(member)
        async with gate:
            await member.join()

    began = time.monotonic()
    await asyncio.gather(*(join(r, p) for r in range(nodes) for p in range(config.people)))
    point.join_s = time.monotonic() - began
    calls1 = await asyncio.to_thread(mesh.redis_calls)
    lines1, _ = listener.snapshot()
    point.joins = nodes * config.people
    busy = calls1 - calls0 - point.redis_idle_ops_per_s * point.join_s
    point.redis_ops_per_join = busy / point.joins
    point.udp_packets_per_s_during_joins = (
        _metric(lines1 - lines0, "memberlist.udp.sent") / point.join_s if point.join_s else 0.0
    )


# --------------------------------------------------------------------------- report


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.2f} %"


def summarise(
    steps: dict[int, list[Step]], points: list[MeshPoint], elapsed_s: float
) -> dict[str, Any]:
    per_core: dict[str, int] = {}
    cpu_pp: dict[str, float | None] = {}
    marginal: dict[str, float | None] = {}
    by_cpu: dict[str, float | None] = {}
    capped: dict[str, bool] = {}
    for size, ramp in steps.items():
        passed = [s for s in ramp if s.passed]
        best = max(passed, key=lambda s: s.participants, default=None)
        per_core[str(size)] = best.participants if best else 0
        capped[str(size)] = bool(ramp) and ramp[-1].passed
        # the largest step measured: the node's fixed costs spread the most
        measured = [s for s in ramp if counts_for_cpu(s)]
        largest = max(measured, key=lambda s: s.participants, default=None)
        cpu_pp[str(size)] = rounded(largest.cpu_ms_per_participant_s, 3) if largest else None
        slope, holds = cpu_bound(ramp)
        marginal[str(size)] = rounded(slope, 3)
        by_cpu[str(size)] = rounded(holds, 1)
    clocks = {s.latency_clock for ramp in steps.values() for s in ramp if s.latency_frames}
    ok = [p for p in points if p.error is None]
    serf = {str(p.nodes): round(p.udp_packets_per_s, 2) for p in ok}
    redis_ops = {str(p.nodes): rounded(p.redis_ops_per_join) for p in ok}
    fitted: dict[str, Any] = {}

    def add_fit(key: str, xs: list[float], ys: list[float]) -> None:
        law = fit_power_law(xs, ys)
        fitted[key] = None if law is None else {k: rounded(v, 4) for k, v in asdict(law).items()}

    add_fit(
        "cpu_ms_per_participant_s_vs_room_size",
        [float(k) for k, v in cpu_pp.items() if v],
        [v for v in cpu_pp.values() if v],
    )
    xs = [float(p.nodes) for p in ok]
    add_fit("serf_msgs_per_s_vs_nodes", xs, [p.udp_packets_per_s for p in ok])
    add_fit("serf_bytes_per_s_vs_nodes", xs, [p.udp_bytes_per_s for p in ok])
    add_fit(
        "redis_ops_per_join_vs_nodes",
        [float(p.nodes) for p in ok if p.redis_ops_per_join],
        [p.redis_ops_per_join for p in ok if p.redis_ops_per_join],
    )
    return {
        "bench": "scale",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "load_1m": os.getloadavg()[0]},
        "elapsed_s": round(elapsed_s, 1),
        "limits": {"latency_p99_ms": LATENCY_LIMIT_MS, "loss": LOSS_LIMIT},
        # "kernel": every step's latency from the subscribers' kernel receive stamps;
        # "handler": from the time packets reached the clients' handlers (includes their
        # own backlog), when a client could not read kernel stamps
        "latency_clock": "kernel" if clocks == {"kernel"} else "handler",
        "participants_per_core": per_core,
        "participants_per_core_capped": capped,
        "cpu_ms_per_participant_s": cpu_pp,
        "cpu_ms_per_participant_s_marginal": marginal,
        "participants_per_core_cpu_bound": by_cpu,
        "target_rooms_of_4": TARGET_PER_CORE_ROOMS_OF_4,
        "serf_msgs_per_s": serf,
        "serf_msgs_counted": "memberlist UDP packets sent per second, whole cluster, idle",
        "redis_ops_per_join": redis_ops,
        "relay_signalling_msgs_per_s": {
            str(p.nodes): round(p.relay_signalling_per_s, 3) for p in ok
        },
        "fits": fitted,
        "steps": [asdict(s) for ramp in steps.values() for s in ramp],
        "mesh": [asdict(p) for p in points],
    }


def print_table(figures: dict[str, Any], points: list[MeshPoint]) -> None:
    say()
    say(
        f"{'room size':<10} {'participants/core':>18} {'cpu ms/participant/s':>21} "
        f"{'marginal ms':>12} {'by CPU alone':>13}"
    )
    for size, count in figures["participants_per_core"].items():
        more = "+" if figures["participants_per_core_capped"][size] else ""
        cpu = figures["cpu_ms_per_participant_s"][size]
        slope = figures["cpu_ms_per_participant_s_marginal"][size]
        holds = figures["participants_per_core_cpu_bound"][size]
        say(
            f"{size:<10} {str(count) + more:>18} {_num(cpu, 2):>21} {_num(slope, 2):>12} "
            f"{_num(holds, 0):>13}"
        )
    if points:
        say()
        header = (
            f"{'nodes':>5} {'gossip pkt/s':>13} {'per node':>9} {'bytes/s/node':>13} "
            f"{'serf msg/s':>11} {'relay msg/s':>12} {'redis ops/join':>15}"
        )
        say(header)
        say("-" * len(header))
        for p in points:
            if p.error:
                say(f"{p.nodes:>5} FAILED: {p.error}")
                continue
            say(
                f"{p.nodes:>5} {p.udp_packets_per_s:>13.1f} {p.udp_packets_per_s / p.nodes:>9.1f} "
                f"{p.udp_bytes_per_s / p.nodes:>13.0f} {p.serf_messages_per_s:>11.2f} "
                f"{p.relay_signalling_per_s:>12.2f} {_num(p.redis_ops_per_join):>15}"
            )
    say()
    for key, law in figures["fits"].items():
        if law:
            say(f"fit {key}: exponent {law['exponent']} (r2 {law['r2']}, {law['points']} points)")
    rooms_of_4 = figures["participants_per_core"].get("4")
    if rooms_of_4 is not None:
        met = rooms_of_4 >= TARGET_PER_CORE_ROOMS_OF_4
        say(
            f"target >= {TARGET_PER_CORE_ROOMS_OF_4} participants per core in rooms of 4: "
            f"{'met' if met else 'not met'} ({rooms_of_4}; load 1 min "
            f"{figures['machine']['load_1m']:.1f} on {figures['machine']['cpus']} CPUs)"
        )


def plot(figures: dict[str, Any], path: Path) -> bool:
    """A PNG beside the JSON: per-core figures by room size, gossip and Redis by nodes."""

    def draw(grid: Any) -> None:
        axes = grid[0]
        sizes = list(figures["participants_per_core"])
        axes[0].bar(sizes, [figures["participants_per_core"][s] for s in sizes], color="tab:blue")
        axes[0].axhline(TARGET_PER_CORE_ROOMS_OF_4, color="tab:red", linestyle="--", label="target")
        axes[0].set(title="participants per core", xlabel="room size", ylabel="participants")
        axes[0].legend()
        for axis, key, label in (
            (axes[1], "serf_msgs_per_s", "gossip packets/s (cluster)"),
            (axes[2], "redis_ops_per_join", "Redis ops per join"),
        ):
            data = {int(k): v for k, v in figures[key].items() if v}
            if data:
                xs = sorted(data)
                axis.loglog(xs, [data[x] for x in xs], "o-", base=2)
            axis.set(title=label, xlabel="nodes")

    return report_plot(
        path,
        f"sfumesh bench scale ({figures['when']}, load {figures['machine']['load_1m']:.1f})",
        (1, 3),
        (15, 4.5),
        draw,
    )


# --------------------------------------------------------------------------- entry


@dataclass
class ScaleConfig:
    sizes: list[int] = field(default_factory=lambda: list(DEFAULT_SIZES))
    node_counts: list[int] = field(default_factory=lambda: list(DEFAULT_NODE_COUNTS))
    duration_s: float = DEFAULT_DURATION_S
    warmup_s: float = DEFAULT_WARMUP_S
    max_participants: int = DEFAULT_MAX_PARTICIPANTS
    people: int = DEFAULT_PEOPLE
    #: participants of a ramp's first step, and added per step (None: 1 room, geometric)
    start: int | None = None
    step: int | None = None


def node_counts_up_to(max_nodes: int) -> list[int]:
    """4, 8, 16, ... up to `max_nodes` (itself included when it falls between)."""
    counts = [n for n in (2, 4, 8, 16, 32, 64) if n <= max_nodes and n >= 2]
    if max_nodes >= 2 and max_nodes not in counts:
        counts.append(max_nodes)
    return sorted(c for c in counts if c >= min(4, max_nodes))


async def _run(config: ScaleConfig, address: str, media_path: Path, workdir: Path) -> Any:
    media = MediaConfig(
        config.sizes,
        config.duration_s,
        config.warmup_s,
        config.max_participants,
        config.start,
        config.step,
    )
    steps: dict[int, list[Step]] = {}
    for size in config.sizes:
        say(f"one node, rooms of {size}:")
        ramp = NodeRamp(media, size, address, media_path, workdir / f"rooms-of-{size}")
        steps[size] = await ramp.run()
    points: list[MeshPoint] = []
    if config.node_counts:
        say("the mesh (Serf agents, nodes attached, no media):")
        mesh = MeshConfig(config.node_counts, config.duration_s, config.people)
        points = await run_mesh(mesh, workdir / "mesh")
    return steps, points


def run_scale_bench(config: ScaleConfig, json_path: Path | None, workdir: Path | None) -> int:
    """`sfumesh bench scale`: 0 when every part ran, 1 when one failed, 2 on bad arguments.
    Re-executes itself in a private network namespace."""
    if (
        not (config.sizes or config.node_counts)
        or any(s < 2 or s > 16 for s in config.sizes)
        or config.duration_s <= 0
        or config.max_participants < 2
        or config.people < 1
        or (config.start is not None and not 1 <= config.start <= config.max_participants)
        or (config.step is not None and config.step < 1)
    ):
        say(
            "sfumesh bench: --sizes 2..16 (or none, with --max-nodes), --duration > 0, "
            "--max-participants >= 2, --start 1..--max-participants, --step >= 1",
            err=True,
        )
        return 2
    if shutil.which("serf") is None and config.node_counts:
        say("sfumesh bench: `serf` is not installed (leave the mesh out: --max-nodes 0)", err=True)
        return 2
    if not in_private_netns():
        reexec_in_private_netns()
    try:
        address = ensure_veth()
    except NetnsError as error:
        say(f"sfumesh bench: {error}", err=True)
        return 1
    params = bench_media.MediaParams(
        width=VIDEO_SIZE[0], height=VIDEO_SIZE[1], bitrate=VIDEO_BITRATE
    )
    _, media_path = bench_media.load_or_encode(params)
    began = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            if workdir is None:
                workdir = Path(
                    stack.enter_context(tempfile.TemporaryDirectory(prefix="sfu-scale-"))
                )
            steps, points = asyncio.run(_run(config, address, media_path, workdir))
    except KeyboardInterrupt:
        say("sfumesh bench: interrupted; every process stopped", err=True)
        return 130
    figures = summarise(steps, points, time.monotonic() - began)
    print_table(figures, points)
    if json_path is not None:
        if not write_report(json_path, figures):
            return 1
        plot(figures, json_path.with_suffix(".png"))
    failed = any(p.error for p in points) or any(
        not ramp or (ramp[0].error is not None) for ramp in steps.values()
    )
    return 1 if failed else 0
