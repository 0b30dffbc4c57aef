"""The relay's CPU per relayed packet, fitted as a slope (issue 19), for `sfumesh bench relay`.

The relay bench's own CPU figure is a difference of two windows at ~160 packets/s: small
against the noise of a shared machine. Here the same two nodes carry T = 1, 4, 16 relayed
tracks (`--relay-tracks`), and each node's CPU is fitted by least squares against the packets
per second, as `sfumesh bench forward` fits fan-out:

* **relayed**: T video-only publishers on node-2, one subscriber of all T on node-1: every
  packet crosses the relay. The slope of node-2's CPU is the sending side (taking the packet
  in from its publisher and sending it over the relay), node-1's the receiving side (taking
  it in from the relay and handing it to the subscriber);
* **local**: the same T publishers and subscriber all on node-1 (no relay): the local path's
  slope (taken in from the publisher, handed to the subscriber) in the same run;
* **fanout**: one publisher on node-1 and T subscribers of it on node-1: the local marginal
  forward cost (one more copy of a packet, what `sfumesh bench forward` fits), in the same
  run.

`relay_us_per_packet_slope` = {sending, receiving, sum}; beside it `local_us_per_packet_slope`,
their difference (`relay_own_us_per_packet_slope`: what relaying adds to a packet's way),
`relay_over_local` (sum / local path), `local_forward_us_per_packet_slope` (fan-out marginal)
and `relay_to_local_forward_ratio` (sum / fan-out marginal: issue 19's target is <= 2).

With `profile_dir`, py-spy samples both node processes over every window (`--nonblocking`,
so the nodes are never paused; py-spy's own CPU is in its own process, not the nodes'): the
raw stacks go to `<path>-t<T>-<node>.txt` and the functions with the most samples of their
own (self time, share of all samples) into `relay_slope_profiles`.

The clients are the forward bench's (`node.bench.forward.peers`, in their own processes:
pre-encoded VP8 sent through tapped senders, raw RTP counted, nothing encoded or decoded), so
only the nodes do media work. This module may use them; `node.bench.relay` may not (benches
never import each other), so the CLI hands `measure_relay_slope` to the relay bench.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
from redis.asyncio import Redis

from node.bench.forward import media as bench_media
from node.bench.forward.run import ClientProcess, fit_line, split_evenly
from node.bench.harness import no_relay, sign_up
from node.bench.report import metric_sum, process_cpu_s, rounded, say
from node.local.launch import LocalNode
from node.runtime.services import BackingServices

DEFAULT_TRACKS: Final = (1, 4, 16)
#: small frames: 1-2 packets each, so 16 tracks stay well within a shared machine
MEDIA: Final = bench_media.MediaParams(width=320, height=180, bitrate=400_000)
PUBLISHERS_PER_PROCESS: Final = 4
#: how long a window waits for the previous window's relay to close
NO_RELAY_S: Final = 60.0
SUBSCRIBERS_PER_PROCESS: Final = 8
#: the order of a T's windows (alternated between Ts, so a drift of load favours none)
PATHS: Final = ("relayed", "local", "fanout")
#: py-spy's sampling rate (per second) and how many functions a profile summary keeps
PROFILE_RATE: Final = 100
PROFILE_TOP: Final = 12
#: the steps of a packet's way whose time with what they call (inclusive) a profile reports
WATCHED: Final = frozenset(
    {
        "_FastReceive.data_received",
        "RtpTap._process",
        "RemoteBitrateEstimator.add",
        "StreamStatistics.add",
        "NackGenerator.add",
        "RtpPacket.parse",
        "Published.on_rtp",
        "Forwarder.forward",
        "SenderTap.write",
        "RTCRtpReceiver._run_rtcp",
        "RTCRtpSender._run_rtcp",
        "RTCRtpSender._handle_rtcp_packet",
    }
)
WARMUP_S: Final = 3.0
#: 16 tracks are 16 subscribe renegotiations: minutes on a loaded 2-core machine
SETUP_TIMEOUT_S: Final = 240.0
#: the target of issue 19: both sides together at most this many times the local path
TARGET_RATIO: Final = 2.0
ADDRESS: Final = "127.0.0.1"


@dataclass
class SlopeWindow:
    """One window: T tracks, relayed (publishers on node-2) or local (all on node-1)."""

    path: str
    tracks: int
    seconds: float = 0.0
    #: node name -> CPU seconds in the window
    cpu_s: dict[str, float] = field(default_factory=dict)
    #: RTP packets the subscriber received (all T tracks), and lost
    packets: int = 0
    lost: int = 0
    #: packets node-2 sent over the relay and node-1 received from it (metrics)
    relayed_out: int = 0
    relayed_in: int = 0
    error: str | None = None
    #: node name -> the functions with most self time ([function, share of samples]), and
    #: the samples taken (`profile_dir` only)
    profile: dict[str, Any] | None = None

    @property
    def packets_per_s(self) -> float:
        return self.packets / self.seconds if self.seconds else 0.0

    def cpu_us_per_s(self, node: str) -> float:
        return 1e6 * self.cpu_s.get(node, 0.0) / self.seconds if self.seconds else 0.0


def slope_figures(windows: list[SlopeWindow]) -> dict[str, Any]:
    """The fitted slopes (us per packet) over the windows that completed."""

    def slope(path: str, node: str) -> float | None:
        used = [w for w in windows if w.path == path and w.error is None and w.packets]
        line = fit_line([w.packets_per_s for w in used], [w.cpu_us_per_s(node) for w in used])
        return None if line is None else line.slope

    sending, receiving = slope("relayed", "node-2"), slope("relayed", "node-1")
    local = slope("local", "node-1")
    forward = slope("fanout", "node-1")
    total = None if sending is None or receiving is None else sending + receiving
    own = None if total is None or local is None else total - local
    ratio = None if total is None or local is None or local <= 0 else total / local
    to_forward = None if total is None or forward is None or forward <= 0 else total / forward
    return {
        "relay_us_per_packet_slope": {
            "sending": rounded(sending),
            "receiving": rounded(receiving),
            "sum": rounded(total),
        },
        "local_us_per_packet_slope": rounded(local),
        "relay_own_us_per_packet_slope": rounded(own),
        "relay_over_local": rounded(ratio),
        "local_forward_us_per_packet_slope": rounded(forward),
        "relay_to_local_forward_ratio": rounded(to_forward),
        "relay_slope_target": {
            "relay_over_local_max": TARGET_RATIO,
            "met": None if ratio is None else ratio <= TARGET_RATIO,
            "relay_to_local_forward_max": TARGET_RATIO,
            "local_forward_met": None if to_forward is None else to_forward <= TARGET_RATIO,
        },
        "relay_slope_tracks": sorted({w.tracks for w in windows}),
        "relay_slope_windows": [
            {
                **{k: v for k, v in asdict(w).items() if k != "profile"},
                "packets_per_s": rounded(w.packets_per_s, 1),
                "cpu_s": {k: round(v, 3) for k, v in w.cpu_s.items()},
            }
            for w in windows
        ],
        "relay_slope_profiles": {
            f"{w.path}-t{w.tracks}": w.profile for w in windows if w.profile is not None
        },
    }


class _Slopes:
    def __init__(
        self,
        nodes: list[LocalNode],
        services: BackingServices,
        workdir: Path,
        window_s: float,
        warmup_s: float,
        profile_dir: Path | None = None,
    ) -> None:
        self.nodes = {node.name: node for node in nodes}
        self.profile_dir = profile_dir
        self.services = services
        self.workdir = workdir
        self.window_s = window_s
        self.warmup_s = warmup_s
        self.stamp = secrets.token_hex(3)
        self.publisher_tokens: list[str] = []
        self.subscriber_token = ""
        self.rooms = 0

    async def users(self, http: httpx.AsyncClient, publishers: int) -> None:
        url = self.nodes["node-1"].url
        # a person publishes a few tracks per room at most: one user per publisher
        self.publisher_tokens = [
            await sign_up(http, url, f"slope{self.stamp}p{n}") for n in range(publishers)
        ]
        self.subscriber_token = await sign_up(http, url, f"slope{self.stamp}s")

    async def room(self, http: httpx.AsyncClient) -> str:
        self.rooms += 1
        slug = f"relay-slope-{self.stamp}-{self.rooms}"
        created = await http.post(
            f"{self.nodes['node-1'].url}/api/rooms",
            json={"slug": slug, "capacity": 100},
            headers={"Authorization": f"Bearer {self.subscriber_token}"},
        )
        created.raise_for_status()
        return slug

    async def window(
        self, http: httpx.AsyncClient, redis: Redis, media_path: Path, path: str, tracks: int
    ) -> SlopeWindow:
        window = SlopeWindow(path, tracks)
        workdir = self.workdir / f"{path}-t{tracks}"
        clients: list[ClientProcess] = []
        try:
            # a relay left from a failed window is that window's failure, not the run's
            await no_relay(redis, NO_RELAY_S)
            slug = await self.room(http)
            clients, subscribers = self._clients(path, tracks, slug, media_path, workdir)
            await asyncio.gather(*(c.start() for c in clients))
            await asyncio.gather(*(c.expect("ready", SETUP_TIMEOUT_S + 10) for c in clients))
            clients.extend(subscribers)
            # subscribers after the publishers: each is ready once every track flows
            await asyncio.gather(*(c.start() for c in subscribers))
            await asyncio.gather(*(c.expect("ready", SETUP_TIMEOUT_S + 10) for c in subscribers))
            await asyncio.sleep(self.warmup_s)
            before = await self._sample(http, clients)
            profiling = self._profile(f"{path}-t{tracks}")
            await asyncio.sleep(self.window_s)
            after = await self._sample(http, clients)
            window.profile = await profiling
            window.seconds = after["t"] - before["t"]
            for name in self.nodes:
                window.cpu_s[name] = after["cpu"][name] - before["cpu"][name]
            window.relayed_out = int(after["out"] - before["out"])
            window.relayed_in = int(after["in"] - before["in"])
            for marked in after["marked"][-len(subscribers) :]:
                for report in marked["subscribers"]:
                    for stream in report["streams"].values():
                        window.packets += int(stream["packets"])
                        window.lost += int(stream["lost"])
        except Exception as error:  # one failed window is reported; the fit goes on
            window.error = f"{type(error).__name__}: {error}"
        finally:
            await asyncio.gather(*(c.stop() for c in clients), return_exceptions=True)
        return window

    def _clients(
        self, path: str, tracks: int, slug: str, media_path: Path, workdir: Path
    ) -> tuple[list[ClientProcess], list[ClientProcess]]:
        """The publisher and the subscriber processes of a window."""
        one = self.nodes["node-1"].url
        publishers: list[ClientProcess] = []
        subscribers: list[ClientProcess] = []
        if path == "fanout":
            # one track, `tracks` subscribers (a user each: subscriber n on channel n)
            spec: dict[str, Any] = {
                "system": "sfumesh",
                "url": one,
                "user_token": self.subscriber_token,
                "room": slug,
            }
            publishers.append(
                ClientProcess(
                    "publisher",
                    [*_argv("publisher", spec), "--media", str(media_path), "--video-only"],
                    workdir / "publisher.log",
                )
            )
            fan = {
                **spec,
                "channels": [{"user_token": token} for token in self.publisher_tokens[:tracks]],
            }
            first = 0
            for number, count in enumerate(split_evenly(tracks, SUBSCRIBERS_PER_PROCESS)):
                # --streams 1: ready once the (video-only) track flows
                argv = [*_argv("subscribers", fan), "--channels", "--streams", "1"]
                argv += ["--count", str(count)]
                subscribers.append(
                    ClientProcess(
                        f"subscribers-{number}",
                        [*argv, "--first", str(first)],
                        workdir / f"s{number}.log",
                    )
                )
                first += count
            return publishers, subscribers
        source = self.nodes["node-2" if path == "relayed" else "node-1"]
        spec = {
            "system": "sfumesh",
            "url": source.url,
            "user_token": self.publisher_tokens[0],
            "room": slug,
            "channels": [{"user_token": token} for token in self.publisher_tokens[:tracks]],
        }
        first = 0
        for number, count in enumerate(split_evenly(tracks, PUBLISHERS_PER_PROCESS)):
            argv = [
                *_argv("publisher", spec),
                "--media",
                str(media_path),
                "--count",
                str(count),
                "--first",
                str(first),
                "--video-only",
            ]
            first += count
            publishers.append(
                ClientProcess(f"publishers-{number}", argv, workdir / f"p{number}.log")
            )
        subscriber_spec = {
            "system": "sfumesh",
            "url": one,
            "user_token": self.subscriber_token,
            "room": slug,
        }
        subscribers.append(
            ClientProcess(
                "subscriber",
                [*_argv("subscribers", subscriber_spec), "--streams", str(tracks)],
                workdir / "subscriber.log",
            )
        )
        return publishers, subscribers

    async def _profile(self, label: str) -> dict[str, Any] | None:
        """py-spy on every node over the window (None without `profile_dir`)."""
        if self.profile_dir is None:
            return None
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        duration = max(1, math.floor(self.window_s))
        runs: dict[str, tuple[asyncio.subprocess.Process, Path]] = {}
        for name, node in self.nodes.items():
            assert node.process.pid is not None
            out = self.profile_dir / f"{label}-{name}.txt"
            argv = [
                py_spy(),
                "record",
                "--pid",
                str(node.process.pid),
                "--duration",
                str(duration),
                "--rate",
                str(PROFILE_RATE),
                "--nonblocking",
                "--format",
                "raw",
                "--output",
                str(out),
            ]
            process = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
            )
            runs[name] = (process, out)
        profiles: dict[str, Any] = {}
        for name, (process, out) in runs.items():
            _, err = await process.communicate()
            if process.returncode != 0 or not out.exists():
                problem = err.decode(errors="replace").strip().splitlines()
                raise RuntimeError(f"py-spy on {name} failed: {problem[-1:] or process.returncode}")
            profiles[name] = top_frames(out.read_text())
        return profiles

    async def _sample(
        self, http: httpx.AsyncClient, clients: list[ClientProcess]
    ) -> dict[str, Any]:
        await asyncio.gather(*(c.send("mark") for c in clients))
        at = time.monotonic()
        cpu = {}
        for name, node in self.nodes.items():
            assert node.process.pid is not None
            cpu[name] = process_cpu_s(node.process.pid)
        replies = await asyncio.gather(*(c.expect("marked", 60.0) for c in clients))
        out = metric_sum(
            (await http.get(f"{self.nodes['node-2'].url}/metrics")).text,
            "sfumesh_relay_packets_total",
            'direction="out"',
        )
        got = metric_sum(
            (await http.get(f"{self.nodes['node-1'].url}/metrics")).text,
            "sfumesh_relay_packets_total",
            'direction="in"',
        )
        return {"t": at, "cpu": cpu, "marked": replies, "out": out, "in": got}


def _argv(role: str, spec: dict[str, Any]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "node.bench.forward.peers",
        role,
        "--spec",
        json.dumps(spec),
        "--address",
        ADDRESS,
        "--timeout",
        str(SETUP_TIMEOUT_S),
    ]


async def _measure(
    nodes: list[LocalNode],
    services: BackingServices,
    workdir: Path,
    window_s: float,
    tracks: list[int],
    warmup_s: float,
    profile_dir: Path | None,
) -> list[SlopeWindow]:
    _, media_path = await asyncio.to_thread(bench_media.load_or_encode, MEDIA)
    slopes = _Slopes(nodes, services, workdir, window_s, warmup_s, profile_dir)
    redis = Redis.from_url(services.redis_url)
    windows: list[SlopeWindow] = []
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            await slopes.users(http, max(tracks))
            for index, count in enumerate(tracks):
                # alternate the order, so that a drift of the machine's load favours neither
                order = list(PATHS) if index % 2 == 0 else list(reversed(PATHS))
                for path in order:
                    window = await slopes.window(http, redis, media_path, path, count)
                    windows.append(window)
                    outcome = window.error or (
                        f"{window.packets_per_s:.0f} pkt/s, node-1 "
                        f"{100 * window.cpu_s['node-1'] / window.seconds:.1f} %, node-2 "
                        f"{100 * window.cpu_s['node-2'] / window.seconds:.1f} %"
                    )
                    say(f"[relay slope {path} T={count}] {outcome}", err=True)
    finally:
        await redis.aclose()
    return windows


def measure_relay_slope(
    nodes: list[LocalNode],
    services: BackingServices,
    workdir: Path,
    window_s: float,
    tracks: list[int],
    warmup_s: float = WARMUP_S,
    *,
    profile_dir: Path | None = None,
) -> dict[str, Any]:
    """The slope figures on the bench's two running nodes (node-1, node-2); with
    `profile_dir`, py-spy profiles of every window (see the module docstring)."""
    if profile_dir is not None:
        py_spy()  # missing: said before any window runs
    windows = asyncio.run(
        _measure(nodes, services, workdir, window_s, tracks, warmup_s, profile_dir)
    )
    return slope_figures(windows)


def py_spy() -> str:
    """The py-spy executable (a dev dependency, beside this interpreter or on PATH)."""
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy: a dev dependency)")
    return found


def top_frames(raw: str, top: int = PROFILE_TOP) -> dict[str, Any]:
    """The functions with most self time in py-spy's raw (collapsed) stacks: each line is
    `frame;frame;...;leaf count`, a frame `function (file:line)`; lines of one function
    are added up. Shares are of the busy samples: the event loop waiting in `select` (which
    `--nonblocking` sampling cannot always tell from work) is counted apart, as `idle`."""
    own: Counter[str] = Counter()
    within: Counter[str] = Counter()
    idle = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = {frame.partition(" (")[0] for frame in stack.split(";")}
        for name in WATCHED & frames:
            within[name] += int(count)
        leaf = stack.rsplit(";", 1)[-1]
        function, _, where = leaf.partition(" (")
        file = where.rsplit(":", 1)[0] if where else ""
        if function.endswith("Selector.select") and file.endswith("selectors.py"):
            idle += int(count)
            continue
        # the last two parts of the path say whose it is (aiortc/rtp.py, media/adapter.py)
        short = "/".join(Path(file).parts[-2:]) if file else "?"
        own[f"{function} ({short})"] += int(count)
    busy = sum(own.values())
    return {
        "samples": busy,
        "idle": idle,
        "self_pct": [[name, round(100 * n / busy, 1)] for name, n in own.most_common(top)]
        if busy
        else [],
        "inclusive_pct": {name: round(100 * n / busy, 1) for name, n in sorted(within.items())}
        if busy
        else {},
    }
