"""`sfumesh bench forward`: what forwarding costs sfumesh, beside aiortc's MediaRelay and Janus.

One publisher sends pre-encoded VP8 (~1.5 Mbit/s, 30 fps) and Opus (`node.bench.forward.
media`); K subscribers in other processes receive it through the system under test
(`node.bench.forward.peers`; identical clients for every system, only the signalling
differs). Per system and K the driver measures, over a fixed window after a warm-up:

* the SFU process's CPU (user + sys of all its threads, `/proc/<pid>/stat`) per forwarded
  packet, where forwarded packets = RTP packets all subscribers received in the window;
* packets/s (all subscribers together), loss (lost / expected over every subscriber's
  streams, from sequence numbers), retransmissions (packets that filled a gap, duplicates,
  and the publisher's answers to NACKs);
* the latency the SFU adds: subscriber first-packet arrival minus publisher first-packet send
  per video frame (same monotonic clock, one machine), frames matched by RTP timestamp
  (each subscriber's offset found from the irregular timestamp steps, `estimate_offset`);
  p50/p99 over every subscriber's frames in the window. This includes both aiortc stacks
  (SRTP, the clients' event loops), not only the SFU.

A window is *clean* when it saw no loss and no retransmission. Everything runs in one
private network namespace (re-executed into one when needed) on a veth address, systems one
after another; the order alternates between rounds (A B C D, then D C B A). Per system the
CPU (us per second) is fitted by least squares against K over the windows where the system
kept up with the stream (>= 95 % of the publisher's frames reached the subscribers): the
slope is the CPU per added subscriber, and divided by the packets per second one subscriber
receives it is the marginal cost per forwarded packet.

Ingest (issue 19): what taking media in costs, fitted the same way. For P = 1, 2, 4, 8
(`--publishers`) the SFU carries P independent publishers with one subscriber each (a room
each on sfumesh, a feed each in Janus's room), sfumesh and Janus with `event_loops = 1` side
by side with the same clients (`--ingest-systems`). CPU (us/s) fitted against P, divided by
the packets one publisher sends per second (what its subscriber receives), is the CPU per
ingested packet: taken in, and handed to its one subscriber (`ingest_us_per_packet` in
`fits`); minus the system's marginal forward cost of the same run it is the ingest alone
(`ingest_only_us_per_packet`).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import importlib
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from node.bench.forward import media as bench_media
from node.bench.forward.peers import SUBSCRIBERS_PER_PROCESS
from node.bench.forward.systems import System
from node.bench.report import ms, percentile, process_cpu_s, rounded, say, write_report
from node.local.netns import NetnsError, ensure_veth, in_private_netns, reexec_in_private_netns

DEFAULT_SUBSCRIBERS: Final = (1, 4, 16, 32)
#: sfumesh with the synthetic simulcast publisher (three encodings) and subscribers whose
#: tiles choose their layers (issue 14): `simulcast_comparison`
SIMULCAST_SYSTEM: Final = "sfumesh-simulcast"
#: compared against Janus with one event loop (single-encoding publisher, same subscribers)
SIMULCAST_REFERENCE: Final = "janus-event-loops-1"
#: and against Janus with one event loop doing the same work: the simulcast publisher's
#: three loops published as three single-encoding feeds, subscriber n on feed n % 3, the
#: layer its tile takes in SIMULCAST_SYSTEM. A forwarded packet costs more the sparser its
#: stream (on this machine every copy wakes a client process; one run of one 150 kbit/s
#: loop, 81 packets/s per subscriber: sfumesh 54.8 and Janus-1 25.6 us per forwarded packet,
#: against 27.6 and 14.3 with the default 1.5 Mbit/s stream), so only equal streams compare
#: the forwarding
SIMULCAST_JANUS_LAYERS: Final = "janus-layers-event-loops-1"
#: the simulcast system's warm-up is at least this: each subscriber first switches to its
#: tile's layer at that layer's next keyframe (work that belongs to joining, not to
#: forwarding), which the window should not hold
SIMULCAST_WARMUP_MIN_S: Final = 10.0
DEFAULT_ROUNDS: Final = 2
DEFAULT_WINDOW_S: Final = 10.0
DEFAULT_WARMUP_S: Final = 3.0
SYSTEM_NAMES: Final = (
    "sfumesh",
    "mediarelay",
    "janus",
    "janus-event-loops-1",
    SIMULCAST_SYSTEM,
    SIMULCAST_JANUS_LAYERS,
)
DEFAULT_PUBLISHERS: Final = (1, 2, 4, 8)
#: the systems whose ingest is fitted by default (issue 19: sfumesh beside Janus-1)
INGEST_SYSTEMS: Final = ("sfumesh", "janus-event-loops-1")
#: publishers per client process in ingest runs
PUBLISHERS_PER_PROCESS: Final = 4
#: issue 19: sfumesh's CPU per ingested packet at most this many times Janus-1's
TARGET_INGEST_RATIO: Final = 2.0
INGEST_BASELINE: Final = "janus-event-loops-1"
JANUS_MODULE: Final = "node.bench.forward.janus"
TS_MASK: Final = 0xFFFFFFFF
#: timestamps within this many ticks of a publisher frame's are that frame (frame steps
#: differ by far more: 90000 / fps +/- media.TS_JITTER)
TS_TOLERANCE: Final = 2
#: a subscriber frame is matched against publisher frames sent up to this long before it
MAX_LATENCY_S: Final = 15.0
#: subscriber frames used to find the timestamp offset
ALIGN_SAMPLE: Final = 60
#: a system "kept up" in a window when its subscribers got this share of the frames sent
KEPT_UP: Final = 0.95
SYSTEM_START_TIMEOUT_S: Final = 90.0
CLIENT_STOP_TIMEOUT_S: Final = 30.0
STREAM_LIMIT: Final = 64 * 1024 * 1024
TARGET_RATIO: Final = 10.0
TARGET_MARGINAL_US: Final = 30.0


class ForwardBenchError(RuntimeError):
    """A run of one system could not be set up or measured."""


# --------------------------------------------------------------------------- pure analysis


def estimate_offset(
    publisher: Sequence[tuple[int, float]],
    subscriber: Sequence[tuple[int, float]],
    *,
    max_latency_s: float = MAX_LATENCY_S,
    sample: int = ALIGN_SAMPLE,
) -> int | None:
    """The constant `ts_sub - ts_pub` (mod 2**32) that maps the subscriber's frames onto the
    publisher's, or None when no offset matches at least half of the sampled frames.

    Both sequences are (RTP timestamp, monotonic time) per video frame, the publisher's in
    sending order. For a sample of subscriber frames, every publisher frame sent up to
    `max_latency_s` before its arrival is a candidate; the most common difference wins.
    Frame timestamp steps are irregular (`media.video_ts_step`), so a wrong offset matches
    only by chance, while the right one matches every frame (within TS_TOLERANCE ticks).
    """
    if not publisher or not subscriber:
        return None
    times = [t for _, t in publisher]
    step = max(1, len(subscriber) // sample)
    sampled = subscriber[::step]
    votes: Counter[int] = Counter()
    for ts_sub, arrived in sampled:
        low = bisect.bisect_left(times, arrived - max_latency_s)
        high = bisect.bisect_right(times, arrived + 0.001)
        for ts_pub, _ in publisher[low:high]:
            votes[(ts_sub - ts_pub) & TS_MASK] += 1
    if not votes:
        return None
    # Count near misses too: a decoder/re-encoder (MediaRelay) may round a timestamp by a
    # tick on its way through time-base conversions.
    tolerance = range(-TS_TOLERANCE, TS_TOLERANCE + 1)
    scored = {
        candidate: sum(votes.get((candidate + e) & TS_MASK, 0) for e in tolerance)
        for candidate in votes
    }
    offset = max(scored, key=lambda candidate: (scored[candidate], votes[candidate]))
    if scored[offset] < max(2, math.ceil(len(sampled) / 2)):
        return None
    return offset


def frame_latencies(
    publisher: Sequence[tuple[int, float]],
    subscriber: Sequence[tuple[int, float]],
    *,
    max_latency_s: float = MAX_LATENCY_S,
) -> list[float] | None:
    """Seconds from each frame's first packet sent to its first packet received, for the
    subscriber's frames found at the publisher; None when the streams cannot be aligned."""
    offset = estimate_offset(publisher, subscriber, max_latency_s=max_latency_s)
    if offset is None:
        return None
    sent = dict(publisher)
    nearest = sorted(range(-TS_TOLERANCE, TS_TOLERANCE + 1), key=abs)
    latencies = []
    for ts_sub, arrived in subscriber:
        ts_pub = (ts_sub - offset) & TS_MASK
        for error in nearest:
            at = sent.get((ts_pub + error) & TS_MASK)
            if at is not None:
                latencies.append(arrived - at)
                break
    return latencies


@dataclass(frozen=True)
class Fit:
    """Least-squares line y = intercept + slope * x."""

    slope: float
    intercept: float
    points: int
    r2: float | None


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> Fit | None:
    """Least squares over the points; None with fewer than two distinct x."""
    if len(xs) != len(ys) or len(set(xs)) < 2:
        return None
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    slope = sxy / sxx
    intercept = mean_y - slope * mean_x
    total = sum((y - mean_y) ** 2 for y in ys)
    residual = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys, strict=True))
    r2 = 1 - residual / total if total > 0 else None
    return Fit(slope, intercept, len(xs), r2)


# --------------------------------------------------------------------------- measurements


@dataclass
class Window:
    """One measuring window of one system with K subscribers (one round)."""

    system: str
    subscribers: int
    round: int
    position: int
    error: str | None = None
    #: "fanout" (one publisher, K subscribers) or "ingest" (P publishers, one subscriber each)
    kind: str = "fanout"
    publishers: int = 1
    window_s: float = 0.0
    cpu_s: float = 0.0
    clients_cpu_s: float = 0.0
    machine_busy: float | None = None
    packets: int = 0
    bytes: int = 0
    packets_per_s: float = 0.0
    expected: int = 0
    lost: int = 0
    late: int = 0
    duplicates: int = 0
    publisher_nacked: int = 0
    publisher_retransmitted: int = 0
    publisher_keyframe_requests: int = 0
    publisher_restarts: int = 0
    publisher_frames: int = 0
    publisher_packets: int = 0
    frames_received: float = 0.0
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    latency_frames: int = 0
    unaligned: int = 0
    failed_connections: int = 0
    setup_s: float = 0.0
    rcvbuf: int | None = None

    @property
    def completed(self) -> bool:
        return self.error is None

    @property
    def loss(self) -> float | None:
        return self.lost / self.expected if self.expected else None

    @property
    def retransmissions(self) -> int:
        return self.late + self.duplicates + self.publisher_retransmitted

    @property
    def clean(self) -> bool:
        return (
            self.completed
            and self.lost == 0
            and self.retransmissions == 0
            and self.failed_connections == 0
        )

    @property
    def cpu_pct(self) -> float:
        return 100 * self.cpu_s / self.window_s if self.window_s else 0.0

    @property
    def cpu_us_per_s(self) -> float:
        return 1e6 * self.cpu_s / self.window_s if self.window_s else 0.0

    @property
    def cpu_us_per_packet(self) -> float | None:
        if not self.packets_per_s:
            return None
        return self.cpu_us_per_s / self.packets_per_s

    @property
    def frame_delivery(self) -> float | None:
        if not self.publisher_frames:
            return None
        return self.frames_received / self.publisher_frames

    @property
    def by_channel(self) -> bool:
        """Whether subscriber n takes channel n (modulo the channels) rather than every
        subscriber the one publisher: ingest runs, and SIMULCAST_JANUS_LAYERS's feeds."""
        return self.kind == "ingest" or self.system == SIMULCAST_JANUS_LAYERS

    @property
    def kept_up(self) -> bool:
        delivery = self.frame_delivery
        return self.completed and delivery is not None and delivery >= KEPT_UP

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("window_s", "cpu_s", "clients_cpu_s", "packets_per_s", "setup_s"):
            data[key] = round(data[key], 3)
        data["machine_busy"] = rounded(self.machine_busy, 3)
        data["frames_received"] = round(self.frames_received, 1)
        data.update(
            cpu_pct=round(self.cpu_pct, 2),
            cpu_us_per_packet=rounded(self.cpu_us_per_packet),
            loss=rounded(self.loss, 6),
            retransmissions=self.retransmissions,
            clean=self.clean,
            frame_delivery=rounded(self.frame_delivery, 4),
            kept_up=self.kept_up,
        )
        return data


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    with open("/proc/stat") as stat:
        values = [float(v) for v in stat.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0.0)
    return sum(values) - idle, sum(values)


def split_evenly(total: int, per_group: int) -> list[int]:
    """`total` in ceil(total / per_group) groups of sizes differing by at most one."""
    groups = max(1, math.ceil(total / per_group))
    base, extra = divmod(total, groups)
    return [base + (1 if n < extra else 0) for n in range(groups)]


class ClientProcess:
    """A `node.bench.forward.peers` process: JSON lines on stdin/stdout, stopped by PID."""

    def __init__(self, label: str, argv: list[str], log_path: Path) -> None:
        self.label = label
        self.argv = argv
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        if self.process is None:
            raise ForwardBenchError(f"{self.label} is not running")
        return self.process.pid

    async def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                limit=STREAM_LIMIT,
                start_new_session=True,
            )

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    async def event(self, limit_s: float) -> dict[str, Any]:
        process = self.process
        if process is None or process.stdout is None:
            raise ForwardBenchError(f"{self.label} is not running")
        try:
            line = await asyncio.wait_for(process.stdout.readline(), limit_s)
        except TimeoutError as error:
            raise ForwardBenchError(f"{self.label}: no answer within {limit_s:g} s") from error
        if not line:
            code = await process.wait()
            raise ForwardBenchError(f"{self.label} exited with {code}:\n{self.log_tail()}")
        event: dict[str, Any] = json.loads(line)
        if event.get("event") == "error":
            raise ForwardBenchError(f"{self.label}: {event.get('message')}")
        return event

    async def expect(self, name: str, limit_s: float) -> dict[str, Any]:
        event = await self.event(limit_s)
        if event.get("event") != name:
            raise ForwardBenchError(f"{self.label}: expected {name!r}, got {event}")
        return event

    async def send(self, command: str) -> None:
        process = self.process
        if process is None or process.stdin is None:
            raise ForwardBenchError(f"{self.label} is not running")
        process.stdin.write(json.dumps({"cmd": command}).encode() + b"\n")
        await process.stdin.drain()

    async def stop(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(Exception):
            await self.send("stop")
        try:
            await asyncio.wait_for(process.wait(), CLIENT_STOP_TIMEOUT_S)
        except TimeoutError:
            process.kill()
            await process.wait()


@dataclass
class BenchConfig:
    subscribers: list[int]
    rounds: int = DEFAULT_ROUNDS
    window_s: float = DEFAULT_WINDOW_S
    warmup_s: float = DEFAULT_WARMUP_S
    systems: list[str] = field(default_factory=lambda: list(SYSTEM_NAMES))
    max_mediarelay: int | None = None
    per_process: int = SUBSCRIBERS_PER_PROCESS
    #: ingest runs: publisher counts (empty: none) and the systems measured
    publishers: list[int] = field(default_factory=lambda: list(DEFAULT_PUBLISHERS))
    ingest_systems: list[str] = field(default_factory=lambda: list(INGEST_SYSTEMS))
    media: bench_media.MediaParams = field(default_factory=bench_media.MediaParams)

    def setup_timeout(self, subscribers: int) -> float:
        return 60.0 + 3.0 * subscribers


def make_system(name: str, address: str, workdir: Path, channels: int = 1) -> System:
    """System `name`; `channels` independent publisher/subscriber pairs (ingest runs)."""
    if name == "sfumesh":
        from node.bench.forward.sfumesh import SfumeshSystem

        return SfumeshSystem(address, workdir, channels=channels)
    if name == SIMULCAST_SYSTEM:
        from node.bench.forward.sfumesh import SfumeshSystem

        return SfumeshSystem(address, workdir, simulcast=True)
    if name == "mediarelay":
        from node.bench.forward.mediarelay import MediaRelaySystem

        if channels != 1:
            raise ValueError("mediarelay carries one publisher only")
        return MediaRelaySystem(address, workdir)
    if name == SIMULCAST_JANUS_LAYERS:
        from node.bench.forward.simulcast import LAYERS

        return make_system(SIMULCAST_REFERENCE, address, workdir, channels=len(LAYERS))
    if name == "janus" or name.startswith("janus-event-loops-"):
        janus = importlib.import_module(JANUS_MODULE)
        loops = None if name == "janus" else int(name.rsplit("-", 1)[1])
        system: System = janus.JanusSystem(loops, address, workdir, channels=channels)
        return system
    raise ValueError(f"unknown system {name!r}")


def janus_module_available() -> bool:
    try:
        importlib.import_module(JANUS_MODULE)
    except ImportError:
        return False
    return True


class Runner:
    """Runs one system with K subscribers and measures one window."""

    def __init__(
        self,
        config: BenchConfig,
        address: str,
        media_path: Path,
        workdir: Path,
        say: Callable[[str], None],
    ) -> None:
        self.config = config
        self.address = address
        self.media_path = media_path
        self.workdir = workdir
        self.say = say
        #: the simulcast publisher's layers, lowest first (SIMULCAST_SYSTEM, and each a
        #: feed of its own for SIMULCAST_JANUS_LAYERS)
        self.layer_media: list[Path] = []

    def _publishers_argv(
        self, window: Window, spec: dict[str, Any], timeout: float
    ) -> list[list[str]]:
        """Each publisher process's command line: P publishers split over processes, or
        (SIMULCAST_JANUS_LAYERS) one process per layer loop, publisher n on channel n."""
        if window.system == SIMULCAST_JANUS_LAYERS:
            if not self.layer_media:
                raise ForwardBenchError("the simulcast publisher's layer media are missing")
            return [
                [
                    *self._client_argv("publisher", spec, timeout),
                    *("--media", str(path), "--count", "1", "--first", str(channel)),
                ]
                for channel, path in enumerate(self.layer_media)
            ]
        argvs = []
        first = 0
        for count in split_evenly(window.publishers, PUBLISHERS_PER_PROCESS):
            argvs.append(
                [*self._publisher_argv(spec, timeout), "--count", str(count), "--first", str(first)]
            )
            first += count
        return argvs

    def _publisher_argv(self, spec: dict[str, Any], timeout: float) -> list[str]:
        """The single-encoding publisher, or the simulcast one when the spec asks for it."""
        if not spec.get("simulcast"):
            return [*self._client_argv("publisher", spec, timeout), "--media", str(self.media_path)]
        if not self.layer_media:
            raise ForwardBenchError("the simulcast publisher's layer media are missing")
        layers = [part for path in self.layer_media for part in ("--layer-media", str(path))]
        return [*self._client_argv("simulcast-publisher", spec, timeout), *layers]

    def _client_argv(self, role: str, spec: dict[str, Any], timeout: float) -> list[str]:
        return [
            sys.executable,
            "-m",
            "node.bench.forward.peers",
            role,
            "--spec",
            json.dumps(spec),
            "--address",
            self.address,
            "--timeout",
            str(timeout),
        ]

    async def run(
        self, name: str, subscribers: int, round_no: int, position: int, publishers: int = 0
    ) -> Window:
        """One window: K subscribers of one publisher, or (`publishers` P > 0, an ingest
        run) P publishers with one subscriber each."""
        if publishers:
            window = Window(name, publishers, round_no, position, kind="ingest")
            window.publishers = publishers
            workdir = self.workdir / f"{name}-p{publishers}-r{round_no}"
        else:
            window = Window(name, subscribers, round_no, position)
            workdir = self.workdir / f"{name}-k{subscribers}-r{round_no}"
        system = make_system(name, self.address, workdir, channels=window.publishers)
        clients: list[ClientProcess] = []
        began = time.monotonic()
        try:
            await asyncio.wait_for(system.start(), SYSTEM_START_TIMEOUT_S)
            await self._measure(system, window, workdir, clients, began)
        except Exception as error:  # one failed run is reported; the bench goes on
            window.error = f"{type(error).__name__}: {error}"
        finally:
            await asyncio.gather(*(c.stop() for c in clients), return_exceptions=True)
            try:
                await system.stop()
            except Exception as error:
                window.error = window.error or f"stopping {name}: {error}"
        return window

    async def _measure(
        self,
        system: System,
        window: Window,
        workdir: Path,
        clients: list[ClientProcess],
        began: float,
    ) -> None:
        config = self.config
        k = window.subscribers
        timeout = config.setup_timeout(k)
        spec = system.spec()
        publishers: list[ClientProcess] = []
        for number, argv in enumerate(self._publishers_argv(window, spec, timeout)):
            label = "publisher" if number == 0 else f"publisher-{number}"
            process = ClientProcess(label, argv, workdir / f"{label}.log")
            clients.append(process)
            publishers.append(process)
        await asyncio.gather(*(p.start() for p in publishers))
        readies = await asyncio.gather(*(p.expect("ready", timeout + 10) for p in publishers))
        window.rcvbuf = readies[0].get("rcvbuf")
        groups: list[ClientProcess] = []
        first = 0
        for number, count in enumerate(split_evenly(k, config.per_process)):
            argv = [
                *self._client_argv("subscribers", spec, timeout),
                "--count",
                str(count),
                "--first",
                str(first),
                *(["--channels"] if window.by_channel else []),
            ]
            first += count
            group = ClientProcess(f"subscribers-{number}", argv, workdir / f"subs-{number}.log")
            clients.append(group)
            groups.append(group)
        await asyncio.gather(*(g.start() for g in groups))
        await asyncio.gather(*(g.expect("ready", timeout + 10) for g in groups))
        window.setup_s = time.monotonic() - began
        warmup_s = config.warmup_s
        if window.system == SIMULCAST_SYSTEM:
            warmup_s = max(warmup_s, SIMULCAST_WARMUP_MIN_S)
        await asyncio.sleep(warmup_s)

        sfu = system.pid
        start = await self._mark(publishers, groups, sfu, clients)
        await asyncio.sleep(config.window_s)
        end = await self._mark(publishers, groups, sfu, clients)
        self._analyse(window, start, end)

    async def _mark(
        self,
        publishers: list[ClientProcess],
        groups: list[ClientProcess],
        sfu: int,
        clients: list[ClientProcess],
    ) -> dict[str, Any]:
        everyone = [*publishers, *groups]
        await asyncio.gather(*(c.send("mark") for c in everyone))
        at = time.monotonic()
        cpu = process_cpu_s(sfu)
        clients_cpu = sum(process_cpu_s(c.pid) for c in clients)
        machine = machine_cpu()
        replies = await asyncio.gather(*(c.expect("marked", 60.0) for c in everyone))
        return {
            "t": at,
            "cpu": cpu,
            "clients_cpu": clients_cpu,
            "machine": machine,
            "publishers": [
                report for reply in replies[: len(publishers)] for report in reply["publishers"]
            ],
            "groups": replies[len(publishers) :],
        }

    def _analyse(self, window: Window, start: dict[str, Any], end: dict[str, Any]) -> None:
        window.window_s = end["t"] - start["t"]
        window.cpu_s = end["cpu"] - start["cpu"]
        window.clients_cpu_s = end["clients_cpu"] - start["clients_cpu"]
        busy = end["machine"][0] - start["machine"][0]
        total = end["machine"][1] - start["machine"][1]
        window.machine_busy = busy / total if total > 0 else None

        # publisher n (channel n) sent what subscriber n received in an ingest run (channel
        # n % 3 with SIMULCAST_JANUS_LAYERS); every subscriber receives publisher 0 in a
        # fan-out run
        published_by_channel = []
        for before, during in zip(start["publishers"], end["publishers"], strict=True):
            frames = before["frames"] + during["frames"]
            published_by_channel.append([(int(ts), float(t)) for ts, t in frames])
            window.publisher_frames += during["video"]["frames"]
            window.publisher_packets += during["video"]["packets"] + during["audio"]["packets"]
            window.publisher_nacked += during["nacked"]
            window.publisher_retransmitted += during["retransmitted"]
            window.publisher_keyframe_requests += during["keyframe_requests"]
            window.publisher_restarts += during["restarts"]
        # frames per publisher: what one subscriber should receive
        window.publisher_frames = round(window.publisher_frames / max(1, len(start["publishers"])))

        latencies: list[float] = []
        frames_received = 0
        subscribers = 0
        for group_start, group_end in zip(start["groups"], end["groups"], strict=True):
            elapsed = float(group_end["t"]) - float(group_start["t"])
            group_packets = 0
            for report in group_end["subscribers"]:
                subscribers += 1
                for stream in report["streams"].values():
                    group_packets += stream["packets"]
                    window.bytes += stream["bytes"]
                    window.expected += stream["expected"]
                    window.lost += stream["lost"]
                    window.late += stream["late"]
                    window.duplicates += stream["duplicates"]
                window.failed_connections += 1 if report["failed"] else 0
                received = [(int(ts), float(t)) for ts, t in report["frames"]]
                frames_received += len(received)
                channels = len(published_by_channel)
                channel = int(report["number"]) % channels if window.by_channel and channels else 0
                published = published_by_channel[channel] if channel < channels else []
                matched = frame_latencies(published, received)
                if matched is None:
                    window.unaligned += 1
                else:
                    latencies.extend(matched)
            window.packets += group_packets
            if elapsed > 0:
                window.packets_per_s += group_packets / elapsed
        window.frames_received = frames_received / subscribers if subscribers else 0.0
        ordered = sorted(latencies)
        window.latency_frames = len(ordered)
        p50, p99 = percentile(ordered, 0.50), percentile(ordered, 0.99)
        window.latency_p50_ms = None if p50 is None else p50 * 1000
        window.latency_p99_ms = None if p99 is None else p99 * 1000


# --------------------------------------------------------------------------- aggregation


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def aggregate(windows: Sequence[Window], kind: str = "fanout") -> list[dict[str, Any]]:
    """One row per (system, K) of the windows of `kind`: medians over the completed rounds
    (ingest rows: K = P, one subscriber per publisher)."""
    rows = []
    windows = [w for w in windows if w.kind == kind]
    keys = sorted({(w.system, w.subscribers) for w in windows}, key=_row_order)
    for system, k in keys:
        mine = [w for w in windows if w.system == system and w.subscribers == k]
        done = [w for w in mine if w.completed]
        rows.append(
            {
                "system": system,
                "subscribers": k,
                "publishers": k if kind == "ingest" else 1,
                "cpu_us_per_packet": rounded(_median([w.cpu_us_per_packet for w in done])),
                "packets_per_s": rounded(_median([w.packets_per_s for w in done]), 1),
                "added_latency_ms_p50": rounded(_median([w.latency_p50_ms for w in done])),
                "added_latency_ms_p99": rounded(_median([w.latency_p99_ms for w in done])),
                "loss": rounded(_median([w.loss for w in done]), 6),
                "rounds": len(done),
                "clean_windows": sum(1 for w in done if w.clean),
                "retransmissions": sum(w.retransmissions for w in done),
                "lost_packets": sum(w.lost for w in done),
                "cpu_pct": rounded(_median([w.cpu_pct for w in done])),
                "frame_delivery": rounded(_median([w.frame_delivery for w in done]), 4),
                "unaligned_subscribers": sum(w.unaligned for w in done),
                "kept_up": bool(done) and all(w.kept_up for w in done),
                "errors": [w.error for w in mine if w.error is not None],
            }
        )
    return rows


def _row_order(key: tuple[str, int]) -> tuple[int, str, int]:
    system, k = key
    index = SYSTEM_NAMES.index(system) if system in SYSTEM_NAMES else len(SYSTEM_NAMES)
    return index, system, k


def fits(windows: Sequence[Window], systems: Sequence[str]) -> list[dict[str, Any]]:
    """Per system: CPU (us/s) against K, least squares over the windows that kept up; and,
    for systems with ingest windows, CPU against P (`ingest_fit`)."""
    out = []
    ingest_systems = {w.system for w in windows if w.kind == "ingest"}
    fanout = [w for w in windows if w.kind == "fanout"]
    for system in [*systems, *sorted(ingest_systems - set(systems))]:
        mine = [w for w in fanout if w.system == system and w.completed]
        used = [w for w in mine if w.kept_up]
        excluded = sorted({w.subscribers for w in mine if not w.kept_up})
        line = fit_line([w.subscribers for w in used], [w.cpu_us_per_s for w in used])
        per_subscriber = [w.packets_per_s / w.subscribers for w in used if w.subscribers]
        packets_per_subscriber = statistics.fmean(per_subscriber) if per_subscriber else None
        marginal = None
        if line is not None and packets_per_subscriber:
            marginal = line.slope / packets_per_subscriber
        ingest = ingest_fit([w for w in windows if w.kind == "ingest" and w.system == system])
        if ingest["ingest_us_per_packet"] is not None and marginal is not None:
            ingest["ingest_only_us_per_packet"] = rounded(ingest["ingest_us_per_packet"] - marginal)
        out.append(
            {
                "system": system,
                **ingest,
                "marginal_us_per_packet": rounded(marginal),
                "intercept_cpu_pct": rounded(None if line is None else line.intercept / 1e4),
                "cpu_pct_per_subscriber": rounded(None if line is None else line.slope / 1e4, 3),
                "packets_per_s_per_subscriber": rounded(packets_per_subscriber, 1),
                "r2": rounded(None if line is None else line.r2, 4),
                "points": 0 if line is None else line.points,
                "subscribers_used": sorted({w.subscribers for w in used}),
                "subscribers_excluded": excluded,
            }
        )
    return out


def ingest_fit(windows: Sequence[Window]) -> dict[str, Any]:
    """CPU (us/s) against P over one system's ingest windows that kept up, per packet one
    publisher sends (its subscriber's packets/s): the `ingest_*` keys of its fit."""
    done = [w for w in windows if w.completed]
    used = [w for w in done if w.kept_up]
    line = fit_line([w.publishers for w in used], [w.cpu_us_per_s for w in used])
    per_publisher = [w.packets_per_s / w.publishers for w in used if w.publishers]
    packets = statistics.fmean(per_publisher) if per_publisher else None
    per_packet = None if line is None or not packets else line.slope / packets
    return {
        "ingest_us_per_packet": rounded(per_packet),
        "ingest_only_us_per_packet": None,
        "ingest_cpu_pct_per_publisher": rounded(None if line is None else line.slope / 1e4, 3),
        "ingest_intercept_cpu_pct": rounded(None if line is None else line.intercept / 1e4),
        "ingest_packets_per_s_per_publisher": rounded(packets, 1),
        "ingest_r2": rounded(None if line is None else line.r2, 4),
        "ingest_points": 0 if line is None else line.points,
        "ingest_publishers_used": sorted({w.publishers for w in used}),
        "ingest_publishers_excluded": sorted({w.publishers for w in done if not w.kept_up}),
    }


def ratios(fitted: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-subscriber CPU and marginal per-packet cost of each system over sfumesh's."""
    by_name = {f["system"]: f for f in fitted}
    base = by_name.get("sfumesh")
    per_subscriber: dict[str, float | None] = {}
    per_packet: dict[str, float | None] = {}
    if base is not None:
        for name, other in by_name.items():
            if name == "sfumesh":
                continue
            key = f"{name}/sfumesh"
            per_subscriber[key] = _ratio(
                other["cpu_pct_per_subscriber"], base["cpu_pct_per_subscriber"]
            )
            per_packet[key] = _ratio(
                other["marginal_us_per_packet"], base["marginal_us_per_packet"]
            )
    marginal = base["marginal_us_per_packet"] if base is not None else None
    if marginal is not None and marginal <= 0:
        marginal = None  # a flat or falling line: noise, not a cost
    versus_relay = per_subscriber.get("mediarelay/sfumesh")
    ingest: dict[str, float | None] = {}
    if base is not None:
        for name, other in by_name.items():
            if name != "sfumesh" and other.get("ingest_us_per_packet") is not None:
                ingest[f"sfumesh/{name}"] = _ratio(
                    base.get("ingest_us_per_packet"), other["ingest_us_per_packet"]
                )
    versus_janus = ingest.get(f"sfumesh/{INGEST_BASELINE}")
    return {
        "cpu_per_subscriber": per_subscriber,
        "marginal_per_packet": per_packet,
        "ingest_per_packet": ingest,
        "targets": {
            "sfumesh_ingest_over_janus1_max": TARGET_INGEST_RATIO,
            "sfumesh_ingest_over_janus1": versus_janus,
            "ingest_ratio_met": None
            if versus_janus is None
            else versus_janus <= TARGET_INGEST_RATIO,
            "mediarelay_over_sfumesh_per_subscriber_min": TARGET_RATIO,
            "mediarelay_over_sfumesh_per_subscriber": versus_relay,
            "mediarelay_ratio_met": None if versus_relay is None else versus_relay >= TARGET_RATIO,
            "sfumesh_marginal_us_per_packet_max": TARGET_MARGINAL_US,
            "sfumesh_marginal_us_per_packet": marginal,
            "sfumesh_marginal_met": None if marginal is None else marginal <= TARGET_MARGINAL_US,
        },
    }


def _ratio(value: float | None, base: float | None) -> float | None:
    """value / base, when both slopes are positive (a non-positive slope is noise)."""
    if value is None or base is None or value <= 0 or base <= 0:
        return None
    return rounded(value / base)


# --------------------------------------------------------------------------- output


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(
    config: BenchConfig,
    media: bench_media.PreEncoded,
    windows: list[Window],
    rows: list[dict[str, Any]],
    fitted: list[dict[str, Any]],
    compared: dict[str, Any],
    elapsed_s: float,
) -> None:
    params = media.params
    warmup = f"{config.warmup_s:g} s warm-up"
    if SIMULCAST_SYSTEM in config.systems and config.warmup_s < SIMULCAST_WARMUP_MIN_S:
        warmup += f" ({SIMULCAST_SYSTEM}: {SIMULCAST_WARMUP_MIN_S:g} s)"
    say(
        f"sfumesh bench forward: 1 publisher ({params.width}x{params.height} VP8 "
        f"{media.video_bitrate / 1e6:.2f} Mbit/s {params.fps} fps + Opus), "
        f"{config.rounds} round(s), {warmup} + {config.window_s:g} s "
        f"window, {os.cpu_count() or '?'} CPUs, {elapsed_s / 60:.1f} min"
    )
    say(
        "CPU = SFU process user+sys (all threads); us/pkt = CPU per packet received by all "
        "subscribers; latency = first packet sent -> first packet received per video frame"
    )
    header = (
        f"{'system':<20} {'K':>3} {'rnd':>3} {'clean':>5} {'CPU %':>7} {'us/pkt':>7} "
        f"{'pkt/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'loss':>8} {'rtx':>5} {'frames':>6}"
    )
    say(header)
    say("-" * len(header))
    for row in rows:
        loss = row["loss"]
        delivery = row["frame_delivery"]
        say(
            f"{row['system']:<20} {row['subscribers']:>3} {row['rounds']:>3} "
            f"{row['clean_windows']:>5} {_num(row['cpu_pct']):>7} "
            f"{_num(row['cpu_us_per_packet']):>7} {_num(row['packets_per_s'], 0):>8} "
            f"{ms(row['added_latency_ms_p50']):>7} {ms(row['added_latency_ms_p99']):>7} "
            f"{'-' if loss is None else f'{loss:.2%}':>8} {row['retransmissions']:>5} "
            f"{'-' if delivery is None else f'{delivery:.0%}':>6}"
        )
        for error in row["errors"]:
            say(f"    error: {error.splitlines()[0][:160]}")
    say("(clean = windows without loss or retransmission; frames = share of the publisher's")
    say(" video frames each subscriber received; medians over rounds)")
    busy = [w.machine_busy for w in windows if w.machine_busy is not None]
    if busy:
        say(
            f"whole machine busy during the windows (bench and anything else running): median "
            f"{statistics.median(busy):.0%}, max {max(busy):.0%}"
        )
    say()
    say("cost slope over K (least squares of SFU CPU against K, windows that kept up):")
    for fit in fitted:
        if fit["system"] not in config.systems:
            continue  # measured for its ingest only
        excluded = fit["subscribers_excluded"]
        note = f"; K={','.join(map(str, excluded))} left out (fell behind)" if excluded else ""
        say(
            f"  {fit['system']:<20} {_num(fit['marginal_us_per_packet']):>6} us per forwarded "
            f"packet, {_num(fit['cpu_pct_per_subscriber'], 2)} % CPU per subscriber "
            f"({_num(fit['packets_per_s_per_subscriber'], 0)} pkt/s each), base "
            f"{_num(fit['intercept_cpu_pct'])} %, {fit['points']} windows{note}"
        )
    print_ingest(windows, fitted, compared)
    targets = compared["targets"]
    say()
    for key, value in compared["cpu_per_subscriber"].items():
        per_packet = compared["marginal_per_packet"].get(key)
        say(
            f"  {key:<30} {_num(value, 2)}x CPU per subscriber, "
            f"{_num(per_packet, 2)}x per forwarded packet"
        )
    say(
        f"target: >= {TARGET_RATIO:g}x less CPU per subscriber than MediaRelay: "
        f"{_verdict(targets['mediarelay_ratio_met'])} "
        f"({_num(targets['mediarelay_over_sfumesh_per_subscriber'], 1)}x)"
    )
    say(
        f"target: marginal cost <= {TARGET_MARGINAL_US:g} us per forwarded packet: "
        f"{_verdict(targets['sfumesh_marginal_met'])} "
        f"({_num(targets['sfumesh_marginal_us_per_packet'])} us)"
    )


def print_ingest(
    windows: Sequence[Window], fitted: Sequence[dict[str, Any]], compared: dict[str, Any]
) -> None:
    rows = aggregate(windows, "ingest")
    if not rows:
        return
    say()
    say("ingest: P publishers, one subscriber each (CPU per packet a publisher sends):")
    header = (
        f"{'system':<20} {'P':>3} {'rnd':>3} {'clean':>5} {'CPU %':>7} {'us/pkt':>7} "
        f"{'pkt/s':>8} {'p50 ms':>7} {'loss':>8} {'frames':>6}"
    )
    say(header)
    say("-" * len(header))
    for row in rows:
        loss = row["loss"]
        delivery = row["frame_delivery"]
        say(
            f"{row['system']:<20} {row['publishers']:>3} {row['rounds']:>3} "
            f"{row['clean_windows']:>5} {_num(row['cpu_pct']):>7} "
            f"{_num(row['cpu_us_per_packet']):>7} {_num(row['packets_per_s'], 0):>8} "
            f"{ms(row['added_latency_ms_p50']):>7} "
            f"{'-' if loss is None else f'{loss:.2%}':>8} "
            f"{'-' if delivery is None else f'{delivery:.0%}':>6}"
        )
        for error in row["errors"]:
            say(f"    error: {error.splitlines()[0][:160]}")
    say("ingest slope over P (least squares of SFU CPU against P, windows that kept up):")
    for fit in fitted:
        if not fit.get("ingest_points"):
            continue
        excluded = fit["ingest_publishers_excluded"]
        note = f"; P={','.join(map(str, excluded))} left out (fell behind)" if excluded else ""
        say(
            f"  {fit['system']:<20} {_num(fit['ingest_us_per_packet']):>6} us per ingested "
            f"packet (taken in + one copy out; ingest alone "
            f"{_num(fit['ingest_only_us_per_packet'])} us), "
            f"{_num(fit['ingest_cpu_pct_per_publisher'], 2)} % CPU per publisher "
            f"({_num(fit['ingest_packets_per_s_per_publisher'], 0)} pkt/s each), base "
            f"{_num(fit['ingest_intercept_cpu_pct'])} %, {fit['ingest_points']} windows{note}"
        )
    for key, value in compared["ingest_per_packet"].items():
        say(f"  {key:<30} {_num(value, 2)}x CPU per ingested packet")
    targets = compared["targets"]
    say(
        f"target: ingest per packet <= {TARGET_INGEST_RATIO:g}x {INGEST_BASELINE}'s: "
        f"{_verdict(targets['ingest_ratio_met'])} "
        f"({_num(targets['sfumesh_ingest_over_janus1'], 2)}x)"
    )


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else ("met" if met else "NOT met")


def report(
    config: BenchConfig,
    media: bench_media.PreEncoded,
    windows: list[Window],
    rows: list[dict[str, Any]],
    fitted: list[dict[str, Any]],
    compared: dict[str, Any],
    elapsed_s: float,
) -> dict[str, Any]:
    return {
        "bench": "forward",
        "results": rows,
        "ingest": aggregate(windows, "ingest"),
        "fits": fitted,
        "ratios": compared,
        "windows": [w.summary() for w in windows],
        "config": {
            "subscribers": config.subscribers,
            "rounds": config.rounds,
            "window_s": config.window_s,
            "warmup_s": config.warmup_s,
            "systems": config.systems,
            "max_mediarelay": config.max_mediarelay,
            "subscribers_per_process": config.per_process,
            "publishers": config.publishers,
            "ingest_systems": config.ingest_systems,
        },
        "media": {
            **asdict(media.params),
            "video_bitrate": round(media.video_bitrate),
            "video_packets_per_s": round(media.video_packets_per_s, 1),
            "audio_packets_per_s": round(1 / bench_media.AUDIO_PTIME_S),
        },
        "elapsed_s": round(elapsed_s, 1),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------- entry point


def plan(config: BenchConfig) -> list[tuple[int, int, list[str]]]:
    """(K, round, systems in order) per step; the order alternates step by step."""
    steps = []
    index = 0
    for k in config.subscribers:
        limit = config.max_mediarelay
        systems = [s for s in config.systems if s != "mediarelay" or limit is None or k <= limit]
        for round_no in range(config.rounds):
            order = systems if index % 2 == 0 else list(reversed(systems))
            steps.append((k, round_no, order))
            index += 1
    return steps


def plan_ingest(config: BenchConfig) -> list[tuple[int, int, list[str]]]:
    """(P, round, systems in order) per ingest step; the order alternates step by step."""
    steps = []
    for index, (p, round_no) in enumerate(
        (p, r) for p in config.publishers for r in range(config.rounds)
    ):
        systems = list(config.ingest_systems)
        steps.append((p, round_no, systems if index % 2 == 0 else list(reversed(systems))))
    return steps


async def run_all(
    config: BenchConfig,
    address: str,
    media_path: Path,
    workdir: Path,
    layer_media: Sequence[Path] = (),
) -> list[Window]:
    runner = Runner(config, address, media_path, workdir, say)
    runner.layer_media = list(layer_media)
    windows: list[Window] = []
    steps = [(k, 0, round_no, order) for k, round_no, order in plan(config)]
    steps += [(0, p, round_no, order) for p, round_no, order in plan_ingest(config)]
    for k, p, round_no, order in steps:
        for position, name in enumerate(order):
            began = time.monotonic()
            window = await runner.run(name, k, round_no, position, publishers=p)
            windows.append(window)
            outcome = (
                f"error: {(window.error or '').splitlines()[0][:200]}"
                if window.error
                else (
                    f"CPU {window.cpu_pct:.1f} %, {window.packets_per_s:.0f} pkt/s, "
                    f"{_num(window.cpu_us_per_packet)} us/pkt, p50 "
                    f"{ms(window.latency_p50_ms)} ms, loss {window.lost}, rtx "
                    f"{window.retransmissions}{'' if window.clean else ' (unclean)'}"
                )
            )
            size = f"P={p}" if p else f"K={k}"
            say(
                f"[{name} {size} round {round_no + 1}] {outcome} "
                f"({time.monotonic() - began:.0f} s)",
                err=True,
            )
    return windows


def parse_subscribers(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or any(v < 1 or v > 256 for v in values):
        raise ValueError("--subscribers takes a comma-separated list of 1..256")
    return values


def parse_publishers(text: str) -> list[int]:
    """`--publishers`: P values for the ingest fit; "0" or "" runs none."""
    values = [int(part) for part in text.split(",") if part.strip()]
    if values == [0]:
        return []
    if any(v < 1 or v > 64 for v in values):
        raise ValueError("--publishers takes a comma-separated list of 1..64 (0: none)")
    return values


def parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height)


def run_forward_bench(
    *,
    subscribers: Sequence[int] = DEFAULT_SUBSCRIBERS,
    rounds: int = DEFAULT_ROUNDS,
    window_s: float = DEFAULT_WINDOW_S,
    warmup_s: float = DEFAULT_WARMUP_S,
    systems: Sequence[str] | None = None,
    json_path: Path | None = None,
    max_mediarelay: int | None = None,
    video_size: tuple[int, int] = (640, 360),
    workdir: Path | None = None,
    publishers: Sequence[int] = DEFAULT_PUBLISHERS,
    ingest_systems: Sequence[str] | None = None,
    plot_path: Path | None = None,
) -> int:
    """`sfumesh bench forward`: 0 when every run completed, 1 when one failed, 2 on bad
    arguments or a missing system. Re-executes itself in a private network namespace.
    `plot_path`: also draw the windows and fits there (PNG, `node.bench.forward.plot`)."""
    chosen = list(systems) if systems else None
    if chosen is None:
        chosen = [s for s in SYSTEM_NAMES if not s.startswith("janus") or janus_module_available()]
        if len(chosen) < len(SYSTEM_NAMES):
            say(f"sfumesh bench: {JANUS_MODULE} is not available; Janus left out", err=True)
    ingest = list(ingest_systems) if ingest_systems is not None else None
    if ingest is None:
        ingest = [s for s in INGEST_SYSTEMS if s == "sfumesh" or janus_module_available()]
    if not publishers:
        ingest = []
    unknown = [s for s in [*chosen, *ingest] if s not in SYSTEM_NAMES]
    if "mediarelay" in ingest:
        unknown.append("mediarelay (carries one publisher: no ingest runs)")
    if unknown or not subscribers or rounds < 1 or window_s <= 0 or warmup_s < 0:
        say(
            f"sfumesh bench: systems are {', '.join(SYSTEM_NAMES)}; --rounds >= 1, "
            "--window > 0, --warmup >= 0",
            err=True,
        )
        return 2
    if any(s.startswith("janus") for s in [*chosen, *ingest]):
        if not janus_module_available():
            say(f"sfumesh bench: {JANUS_MODULE} is not available", err=True)
            return 2
        if shutil.which("janus") is None:
            say(
                "sfumesh bench: `janus` is not installed (Debian: apt-get install janus); "
                "leave it out with --systems sfumesh,mediarelay",
                err=True,
            )
            return 2
    try:
        params = bench_media.MediaParams(width=video_size[0], height=video_size[1])
    except ValueError as error:
        say(f"sfumesh bench: {error}", err=True)
        return 2
    if not in_private_netns():
        reexec_in_private_netns()  # the same command, in a namespace of its own
    config = BenchConfig(
        subscribers=list(subscribers),
        rounds=rounds,
        window_s=window_s,
        warmup_s=warmup_s,
        systems=chosen,
        max_mediarelay=max_mediarelay,
        media=params,
        publishers=list(publishers) if ingest else [],
        ingest_systems=ingest,
    )
    try:
        address = ensure_veth()
    except NetnsError as error:
        say(f"sfumesh bench: {error}", err=True)
        return 1
    began = time.monotonic()
    media, media_path = bench_media.load_or_encode(params)
    layered = {SIMULCAST_SYSTEM, SIMULCAST_JANUS_LAYERS}
    layer_media = simulcast_media() if layered & set(chosen) else []
    try:
        with contextlib.ExitStack() as stack:
            if workdir is None:
                workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sfu-fwd-")))
            windows = asyncio.run(run_all(config, address, media_path, workdir, layer_media))
    except KeyboardInterrupt:
        say("sfumesh bench: interrupted; every process stopped", err=True)
        return 130
    elapsed = time.monotonic() - began
    rows = aggregate(windows)
    fitted = fits(windows, config.systems)
    compared = ratios(fitted)
    print_table(config, media, windows, rows, fitted, compared, elapsed)
    figures = report(config, media, windows, rows, fitted, compared, elapsed)
    if layered & set(config.systems):
        figures["simulcast"] = simulcast_comparison(windows)
        print_simulcast(figures["simulcast"])
    if plot_path is not None:
        from node.bench.forward.plot import write_plot

        if not write_plot(plot_path, windows):
            return 1
    if json_path is not None and not write_report(json_path, figures):
        return 1
    return 1 if any(not w.completed for w in windows) else 0


# --------------------------------------------------------------------------- simulcast (issue 14)


def simulcast_media() -> list[Path]:
    """The simulcast publisher's three loops (encoded once, cached), lowest first."""
    from node.bench.forward.simulcast import load_or_encode_layers

    return [path for _, path in load_or_encode_layers()]


def packet_fit(windows: Sequence[Window], system: str, kind: str = "fanout") -> Fit | None:
    """SFU CPU (us/s) against packets forwarded per second, over `system`'s windows that
    kept up: the slope is the marginal CPU per forwarded packet. With layers chosen by tile
    size the subscribers do not all receive the same packet rate, so the slope over K
    divided by an average rate (`fits`) would mix the two; against packets it does not (and
    for a single encoding it is the same figure). Only windows of `kind`: a system fitted for
    ingest too has windows of both kinds, on other lines."""
    used = [w for w in windows if w.system == system and w.kind == kind and w.kept_up]
    return fit_line([w.packets_per_s for w in used], [w.cpu_us_per_s for w in used])


def simulcast_comparison(windows: Sequence[Window]) -> dict[str, Any]:
    """Issue 14's last benchmark: sfumesh forwarding a simulcast publisher's layers to
    subscribers whose tiles choose them (layer selection on), against Janus with one event
    loop, in the same run: forwarding a single encoding to the same subscribers
    (SIMULCAST_REFERENCE: `janus_event_loops_1_us_per_packet` and the issue's ratio
    `simulcast_over_janus_event_loops_1`, target <= 1), and forwarding the same layers to
    the same tiles as plain feeds (SIMULCAST_JANUS_LAYERS: `janus_layers_us_per_packet`,
    `simulcast_over_janus_layers`: the same streams leave both, so this ratio is what the
    forwarding costs, the stream's shape left out). `target_met` is on the issue's ratio."""
    from node.bench.forward.sfumesh import SIMULCAST_TILES

    mine = packet_fit(windows, SIMULCAST_SYSTEM)
    theirs = packet_fit(windows, SIMULCAST_REFERENCE)
    same = packet_fit(windows, SIMULCAST_JANUS_LAYERS)
    ours = None if mine is None else mine.slope
    reference = None if theirs is None else theirs.slope
    same_work = None if same is None else same.slope
    ratio = _ratio(ours, reference)
    return {
        "simulcast_us_per_packet": rounded(ours),
        "janus_event_loops_1_us_per_packet": rounded(reference),
        "simulcast_over_janus_event_loops_1": ratio,
        "janus_layers_us_per_packet": rounded(same_work),
        "simulcast_over_janus_layers": _ratio(ours, same_work),
        "target_ratio_max": 1.0,
        "target_met": None if ratio is None else ratio <= 1.0,
        "simulcast_r2": rounded(None if mine is None else mine.r2, 4),
        "simulcast_windows": 0 if mine is None else mine.points,
        "janus_r2": rounded(None if theirs is None else theirs.r2, 4),
        "janus_layers_r2": rounded(None if same is None else same.r2, 4),
        "tiles": [f"{w}x{h}" for w, h in SIMULCAST_TILES],
    }


def print_simulcast(compared: dict[str, Any]) -> None:
    say()
    say(
        f"simulcast (3 encodings, subscribers' tiles {', '.join(compared['tiles'])} in turn, "
        "layer selection on): CPU against forwarded packets/s"
    )
    say(
        f"  {SIMULCAST_SYSTEM:<20} {_num(compared['simulcast_us_per_packet']):>6} us per "
        f"forwarded packet; {SIMULCAST_REFERENCE} (one encoding) "
        f"{_num(compared['janus_event_loops_1_us_per_packet'])} us"
    )
    say(
        f"  {SIMULCAST_JANUS_LAYERS} (the same layers as plain feeds, to the same tiles) "
        f"{_num(compared['janus_layers_us_per_packet'])} us: simulcast "
        f"{_num(compared['simulcast_over_janus_layers'], 2)}x of it"
    )
    say(
        f"target: simulcast <= Janus event_loops=1 per forwarded packet: "
        f"{_verdict(compared['target_met'])} "
        f"({_num(compared['simulcast_over_janus_event_loops_1'], 2)}x)"
    )
