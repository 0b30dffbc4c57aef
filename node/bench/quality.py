"""`sfumesh bench quality`: one weak link must not drag the room down (issue 14), in the
WAN lab.

Placement, on the default topology's nodes (`node/lab/topologies/default.toml`) with two
client hosts added in Ho Chi Minh City (`EXTRA_HOSTS`): everyone is in one room on the HCM
node (`hcm-node`). The publisher (`vn-peer`, HCM fiber) sends the synthetic simulcast
publisher's three encodings (`node.bench.forward.simulcast`: 320x180 / 640x360 / 1280x720
at ~150 / 500 / 1500 kbit/s, 30 fps, pre-encoded, never encoding while it runs). Two strong
subscribers, `eu-peer` (Amsterdam fiber, ~230 ms RTT to the node) and `vn-strong` (HCM
fiber), and one weak one, `vn-weak` (HCM, its access downlink limited to `--weak-kbps`, 300
kbit/s, in the emulator, drop-tail queue of 100 ms). Every subscriber shows the video in a
1280x720 tile (`view`), so only bandwidth decides its layer. Subscribers are
`node.bench.quality_peer` processes: received video measured from RTP, never decoded
(decodable frames by sequence numbers and VP8 keyframes; keyframe sizes say the layer).

1. **Simulcast**: after `--warmup` (15 s), a `--duration` window (30 s): the strong
   subscribers' video kbit/s and decoded frames/s, the weak one's kbit/s, its freezes (gaps
   between decoded frames over `FREEZE_S`, 1 s) from `FREEZE_GRACE_S` (10 s) after it
   started until the lift. Then the weak downlink's limit is lifted at run time
   (`Lab.set_rate`, back to the fiber profile's 300 Mbit/s) and `recovery_s` is the time
   until the weak subscriber's layer is the top one again (a keyframe of the strong
   subscribers' height decoded) or its rate over one second reaches 90% of the strong
   subscribers' (at most `--recovery-limit`, 30 s; None: not within).
   With `--outage S`, the weak downlink is cut for S seconds at the window's start (a
   Wi-Fi dropout): `weak_longest_freeze_after_outage_s` is the longest gap from the
   restore on (the picture should come back within a keyframe's wait, the layer kept).
2. **Baseline**, in the same run and lab, the limit back in place: the same publisher as a
   single encoding whose sender follows the REMB it gets (`--ladder`: the best pre-encoded
   loop the REMB covers, as an encoder would), which the node caps by the slowest
   subscriber: today's behaviour for a publisher without simulcast.

Keys (the issue's): `strong_video_kbps`, `strong_fps`, `weak_video_kbps`, `weak_freeze_s`
(seconds frozen), `recovery_s`, `baseline_strong_video_kbps`; besides them
`weak_longest_freeze_s`, the heights each got, the baseline's other figures, the targets
and the time series. A table on stdout, `--json FILE` and FILE.png beside it (each
subscriber's kbit/s over time, both phases).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import httpx

from node.bench.report import plot as report_plot
from node.bench.report import rounded, say, write_report
from node.lab.cluster import LabCluster
from node.lab.namespaces import LabError, namespace_problem
from node.lab.topology import PROFILES, read_topology
from node.local.netns import NetnsError, in_private_netns, reexec_in_private_netns
from node.log import setup_logging

if TYPE_CHECKING:
    # (imported when the bench runs: they pull in aiortc and PyAV, which `sfumesh`'s other
    # commands need not load)
    from node.bench.forward.run import ClientProcess

NODE_HOST: Final = "hcm-node"
PUBLISHER_HOST: Final = "vn-peer"
STRONG_HOSTS: Final = ("eu-peer", "vn-strong")
WEAK_HOST: Final = "vn-weak"
WEAK_LINK: Final = f"{WEAK_HOST}/down"
#: the fiber profile's downlink: what the weak subscriber gets once its limit is lifted
LIFTED_MBPS: Final = PROFILES["fiber"].downlink_mbps
DEFAULT_WEAK_KBPS: Final = 300
EXTRA_HOSTS: Final = """
# added by `sfumesh bench quality`: a second subscriber on HCM fiber, and a weak one
[hosts.vn-strong]
region = "hcm"
role = "client"
access = "fiber"

[hosts.vn-weak]
region = "hcm"
role = "client"
access = {{ profile = "fiber", downlink_mbps = {weak_mbps} }}
"""
TILE: Final = (1280, 720)
PASSWORD: Final = "bench quality password"  # noqa: S105 (throwaway users in a throwaway lab)
DEFAULT_WARMUP_S: Final = 15.0
DEFAULT_DURATION_S: Final = 30.0
DEFAULT_RECOVERY_LIMIT_S: Final = 30.0
#: a gap between decoded frames longer than this is a freeze (the issue's target)
FREEZE_S: Final = 1.0
#: freezes count from this long after the subscriber started (the issue: "after the first
#: 10 s"; shorter when the warm-up is)
FREEZE_GRACE_S: Final = 10.0
#: recovered once its rate over one second reaches this share of the strong subscribers'
RECOVERED_RATE_SHARE: Final = 0.9
SETUP_TIMEOUT_S: Final = 90.0
MARK_TIMEOUT_S: Final = 30.0
#: the issue's targets
TARGET_STRONG_KBPS: Final = 1000.0
TARGET_STRONG_FPS: Final = 25.0
TARGET_RECOVERY_S: Final = 15.0


@dataclass(frozen=True)
class QualityConfig:
    warmup_s: float = DEFAULT_WARMUP_S
    duration_s: float = DEFAULT_DURATION_S
    recovery_limit_s: float = DEFAULT_RECOVERY_LIMIT_S
    weak_kbps: int = DEFAULT_WEAK_KBPS
    baseline: bool = True
    #: the weak downlink is cut this long at the window's start (0: not)
    outage_s: float = 0.0


# --------------------------------------------------------------------------- figures (pure)


@dataclass
class Received:
    """What one subscriber reported: payload bytes per bin (by arrival time) and decoded
    frames (time, bytes, keyframe height or None)."""

    bin_s: float = 0.25
    bins: dict[int, int] = field(default_factory=dict)
    frames: list[tuple[float, int, int | None]] = field(default_factory=list)
    keyframe_requests: int = 0
    started: float = 0.0

    def add(self, report: dict[str, Any]) -> None:
        self.bin_s = float(report["bin_s"])
        for key, value in report["bins"]:
            self.bins[int(key)] = self.bins.get(int(key), 0) + int(value)
        self.frames.extend(
            (float(t), int(b), None if h is None else int(h)) for t, b, h in report["frames"]
        )
        self.frames.sort()
        self.keyframe_requests = int(report["keyframe_requests"])


def kbps(received: Received, start: float, end: float) -> float:
    """Video payload kbit/s that arrived in [start, end) (whole bins)."""
    if end <= start:
        return 0.0
    low, high = int(start / received.bin_s), int(end / received.bin_s)
    total = sum(v for k, v in received.bins.items() if low <= k < high)
    span = (high - low) * received.bin_s
    return total * 8 / 1000 / span if span > 0 else 0.0


def fps(received: Received, start: float, end: float) -> float:
    """Decoded frames per second in [start, end)."""
    count = sum(1 for t, _, _ in received.frames if start <= t < end)
    return count / (end - start) if end > start else 0.0


def freezes(received: Received, start: float, end: float, limit: float = FREEZE_S) -> list[float]:
    """Gaps longer than `limit` between decoded frames within [start, end), the edges
    included (no frame from `start` on is a gap from `start`)."""
    times = [start] + [t for t, _, _ in received.frames if start <= t < end] + [end]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return [gap for gap in gaps if gap > limit]


def heights(received: Received, start: float, end: float) -> list[int]:
    """The height of each decoded frame in [start, end): its keyframe's, carried forward."""
    current: int | None = None
    out: list[int] = []
    for t, _, height in received.frames:
        if height is not None:
            current = height
        if start <= t < end and current is not None:
            out.append(current)
    return out


def typical_height(received: Received, start: float, end: float) -> int | None:
    seen = heights(received, start, end)
    return int(statistics.median_low(seen)) if seen else None


def recovery(
    received: Received, lifted: float, top_height: int | None, top_kbps: float, until: float
) -> float | None:
    """Seconds from `lifted` until a keyframe of `top_height` is decoded or the rate over
    one second reaches RECOVERED_RATE_SHARE of `top_kbps`; None when neither by `until`."""
    moments: list[float] = []
    if top_height is not None:
        moments += [t for t, _, h in received.frames if t >= lifted and h == top_height]
    if top_kbps > 0:
        step = received.bin_s
        per_second = round(1.0 / step)
        first = int(lifted / step)
        last = int(until / step)
        for key in range(first, last - per_second + 1):
            total = sum(received.bins.get(k, 0) for k in range(key, key + per_second))
            if total * 8 / 1000 >= RECOVERED_RATE_SHARE * top_kbps:
                moments.append((key + per_second) * step)
                break
    done = [m for m in moments if m <= until]
    return min(done) - lifted if done else None


def series(received: Received, origin: float, end: float) -> list[tuple[float, float]]:
    """(seconds since `origin`, kbit/s over that second) for each whole second."""
    out = []
    second = 0
    while origin + second + 1 <= end:
        out.append((float(second), kbps(received, origin + second, origin + second + 1)))
        second += 1
    return out


# --------------------------------------------------------------------------- the run


def quality_topology(weak_kbps: int) -> tuple[str, str]:
    """The default topology with the two added client hosts (see the module doc)."""
    text, source = read_topology(None)
    return text + EXTRA_HOSTS.format(weak_mbps=weak_kbps / 1000), f"{source} + bench quality"


async def _sign_up(http: httpx.AsyncClient, url: str, name: str) -> str:
    body = {"username": name, "email": f"{name}@example.org", "password": PASSWORD}
    reply = await http.post(f"{url}/api/users", json={**body, "display_name": name})
    reply.raise_for_status()
    login = await http.post(f"{url}/api/auth/login", json={"login": name, "password": PASSWORD})
    login.raise_for_status()
    token: str = login.json()["user_token"]
    return token


async def _prepare(url: str, rooms: int) -> tuple[list[str], list[str]]:
    """Four users (publisher, then the subscribers) and `rooms` rooms."""
    async with httpx.AsyncClient(timeout=60.0) as http:
        stamp = secrets.token_hex(3)
        tokens = [await _sign_up(http, url, f"q{n}{stamp}") for n in range(4)]
        slugs = []
        for number in range(rooms):
            slug = f"quality-{stamp}-{number}"
            created = await http.post(
                f"{url}/api/rooms",
                json={"slug": slug, "capacity": 8},
                headers={"Authorization": f"Bearer {tokens[0]}"},
            )
            created.raise_for_status()
            slugs.append(slug)
        return tokens, slugs


@dataclass
class Phase:
    """One phase's subscribers' reports and its moments (monotonic)."""

    name: str
    received: dict[str, Received] = field(default_factory=dict)
    started: float = 0.0
    window: tuple[float, float] = (0.0, 0.0)
    lifted: float | None = None
    #: when the weak downlink was cut and restored (`--outage`)
    outage: tuple[float, float] | None = None
    ended: float = 0.0
    publisher: dict[str, Any] = field(default_factory=dict)


class QualityRun:
    def __init__(self, cluster: LabCluster, config: QualityConfig, logs: Path) -> None:
        self.cluster = cluster
        self.config = config
        self.logs = logs
        from node.bench.forward.simulcast import load_or_encode_layers

        self.media = [path for _, path in load_or_encode_layers()]

    def _spec(self, token: str, slug: str) -> dict[str, Any]:
        url = self.cluster.urls[NODE_HOST]
        return {"system": "sfumesh", "url": url, "user_token": token, "room": slug}

    def _address(self, host: str) -> str:
        return str(self.cluster.lab.address(host))

    def _process(self, label: str, host: str, argv: list[str]) -> ClientProcess:
        from node.bench.forward.run import ClientProcess

        command = self.cluster.lab.command(host, [sys.executable, "-m", *argv])
        return ClientProcess(label, command, self.logs / f"{label}.log")

    async def phase(
        self, name: str, tokens: Sequence[str], slug: str, *, ladder: bool, lift: bool
    ) -> Phase:
        config = self.config
        result = Phase(name)
        began = time.monotonic()
        publisher = self._process(
            f"{name}-publisher",
            PUBLISHER_HOST,
            [
                "node.bench.forward.peers",
                "simulcast-publisher",
                "--spec",
                json.dumps(self._spec(tokens[0], slug)),
                "--address",
                self._address(PUBLISHER_HOST),
                "--timeout",
                str(SETUP_TIMEOUT_S),
                *[part for path in self.media for part in ("--layer-media", str(path))],
                *(["--ladder"] if ladder else []),
            ],
        )
        hosts = [*STRONG_HOSTS, WEAK_HOST]
        subscribers = {
            host: self._process(
                f"{name}-{host}",
                host,
                [
                    "node.bench.quality_peer",
                    "--spec",
                    json.dumps(self._spec(token, slug)),
                    "--address",
                    self._address(host),
                    "--tile",
                    f"{TILE[0]}x{TILE[1]}",
                    "--timeout",
                    str(SETUP_TIMEOUT_S),
                ],
            )
            for host, token in zip(hosts, tokens[1:], strict=True)
        }
        everyone = [publisher, *subscribers.values()]
        try:
            await publisher.start()
            await publisher.expect("ready", SETUP_TIMEOUT_S + 10)
            await asyncio.gather(*(s.start() for s in subscribers.values()))
            await asyncio.gather(
                *(s.expect("ready", SETUP_TIMEOUT_S + 10) for s in subscribers.values())
            )
            result.started = time.monotonic()
            say(f"  {name}: everyone receives ({result.started - began:.0f} s)", err=True)
            for host in hosts:
                result.received[host] = Received(started=result.started)
            await asyncio.sleep(config.warmup_s)
            start = time.monotonic()
            if lift and config.outage_s > 0:
                self.cluster.lab.cut([WEAK_LINK])
                try:
                    await asyncio.sleep(config.outage_s)
                finally:
                    self.cluster.lab.cut([WEAK_LINK], False)
                result.outage = (start, time.monotonic())
            await asyncio.sleep(max(0.0, start + config.duration_s - time.monotonic()))
            result.window = (start, time.monotonic())
            if lift:
                await self._collect(subscribers, result)
                result.lifted = time.monotonic()
                self.cluster.lab.set_rate([WEAK_LINK], LIFTED_MBPS)
                await self._watch_recovery(subscribers, result)
            await self._collect(subscribers, result)
            result.ended = time.monotonic()
            await publisher.send("mark")
            result.publisher = (await publisher.expect("marked", MARK_TIMEOUT_S))["publishers"][0]
        finally:
            stopping = time.monotonic()
            await asyncio.gather(*(c.stop() for c in everyone), return_exceptions=True)
            say(f"  {name}: clients stopped ({time.monotonic() - stopping:.0f} s)", err=True)
            if lift:
                self.cluster.lab.set_rate([WEAK_LINK], self.config.weak_kbps / 1000)
        return result

    async def _collect(self, subscribers: dict[str, ClientProcess], result: Phase) -> None:
        await asyncio.gather(*(s.send("mark") for s in subscribers.values()))
        replies = await asyncio.gather(
            *(s.expect("marked", MARK_TIMEOUT_S) for s in subscribers.values())
        )
        for host, reply in zip(subscribers, replies, strict=True):
            result.received[host].add(reply)

    async def _watch_recovery(self, subscribers: dict[str, ClientProcess], result: Phase) -> None:
        """Until the weak subscriber has recovered (checked every second) or the limit."""
        assert result.lifted is not None
        deadline = result.lifted + self.config.recovery_limit_s
        top_height, top_kbps = _top(result)
        while time.monotonic() < deadline:
            await asyncio.sleep(1.0)
            await self._collect(subscribers, result)
            weak = result.received[WEAK_HOST]
            if recovery(weak, result.lifted, top_height, top_kbps, time.monotonic()) is not None:
                await asyncio.sleep(1.0)  # a little of the recovered stream in the plot
                return


def _top(phase: Phase) -> tuple[int | None, float]:
    """The strong subscribers' layer height and kbit/s in the window: what recovery means."""
    start, end = phase.window
    strong = [phase.received[h] for h in STRONG_HOSTS]
    tops = [typical_height(r, start, end) for r in strong]
    present = [t for t in tops if t is not None]
    rate = statistics.fmean(kbps(r, start, end) for r in strong)
    return (max(present) if present else None), rate


def phase_figures(phase: Phase, config: QualityConfig) -> dict[str, Any]:
    start, end = phase.window
    strong = [phase.received[h] for h in STRONG_HOSTS]
    weak = phase.received[WEAK_HOST]
    grace = min(FREEZE_GRACE_S, config.warmup_s)
    freeze_end = phase.lifted if phase.lifted is not None else end
    weak_freezes = freezes(weak, phase.started + grace, freeze_end)
    top_height, top_kbps = _top(phase)
    out: dict[str, Any] = {
        "strong_video_kbps": rounded(statistics.fmean(kbps(r, start, end) for r in strong), 1),
        "strong_fps": rounded(statistics.fmean(fps(r, start, end) for r in strong), 1),
        "strong_min_fps": rounded(min(fps(r, start, end) for r in strong), 1),
        "weak_video_kbps": rounded(kbps(weak, start, end), 1),
        "weak_fps": rounded(fps(weak, start, end), 1),
        "weak_freeze_s": rounded(float(sum(weak_freezes)), 2),
        "weak_longest_freeze_s": rounded(max(weak_freezes, default=0.0), 2),
        "weak_freezes": len(weak_freezes),
        "strong_height": top_height,
        "weak_height": typical_height(weak, start, end),
        "per_subscriber": {
            host: {
                "video_kbps": rounded(kbps(r, start, end), 1),
                "fps": rounded(fps(r, start, end), 1),
                "height": typical_height(r, start, end),
                "longest_freeze_s": rounded(
                    max(freezes(r, phase.started + grace, freeze_end), default=0.0), 2
                ),
                "keyframe_requests": r.keyframe_requests,
            }
            for host, r in phase.received.items()
        },
        "series": {
            host: series(r, phase.started, phase.ended) for host, r in phase.received.items()
        },
        "lifted_at_s": None if phase.lifted is None else rounded(phase.lifted - phase.started, 2),
        "publisher_switches": phase.publisher.get("switches"),
        "publisher_keyframe_requests": phase.publisher.get("keyframe_requests"),
    }
    if phase.lifted is not None:
        out["recovery_s"] = rounded(
            recovery(weak, phase.lifted, top_height, top_kbps, phase.ended), 2
        )
    if phase.outage is not None:
        restored = phase.outage[1]
        out["weak_longest_freeze_after_outage_s"] = rounded(
            max(freezes(weak, restored, freeze_end), default=0.0), 2
        )
        out["weak_height_after_outage"] = typical_height(weak, restored, end)
    return out


def figures(simulcast: Phase, baseline: Phase | None, config: QualityConfig) -> dict[str, Any]:
    from node.bench.forward.simulcast import LAYERS

    main = phase_figures(simulcast, config)
    base = phase_figures(baseline, config) if baseline is not None else None
    recovered = main.get("recovery_s")
    longest = main["weak_longest_freeze_s"]
    return {
        "bench": "quality",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "strong_video_kbps": main["strong_video_kbps"],
        "strong_fps": main["strong_fps"],
        "weak_video_kbps": main["weak_video_kbps"],
        "weak_freeze_s": main["weak_freeze_s"],
        "recovery_s": recovered,
        "baseline_strong_video_kbps": None if base is None else base["strong_video_kbps"],
        "weak_longest_freeze_s": longest,
        "weak_longest_freeze_after_outage_s": main.get("weak_longest_freeze_after_outage_s"),
        "weak_height_after_outage": main.get("weak_height_after_outage"),
        "strong_height": main["strong_height"],
        "weak_height": main["weak_height"],
        "weak_lower_layer": (
            main["weak_height"] is not None
            and main["strong_height"] is not None
            and main["weak_height"] < main["strong_height"]
        ),
        "targets": {
            "strong_video_kbps_min": TARGET_STRONG_KBPS,
            "strong_fps_min": TARGET_STRONG_FPS,
            "weak_longest_freeze_s_max": FREEZE_S,
            "recovery_s_max": TARGET_RECOVERY_S,
            "strong_met": (main["strong_video_kbps"] or 0) >= TARGET_STRONG_KBPS
            and (main["strong_min_fps"] or 0) >= TARGET_STRONG_FPS,
            "weak_met": longest is not None and longest <= FREEZE_S,
            "recovery_met": recovered is not None and recovered <= TARGET_RECOVERY_S,
        },
        "simulcast": main,
        "baseline": base,
        "placement": {
            "node": NODE_HOST,
            "publisher": PUBLISHER_HOST,
            "strong": list(STRONG_HOSTS),
            "weak": WEAK_HOST,
            "weak_downlink_kbps": config.weak_kbps,
            "lifted_to_mbps": LIFTED_MBPS,
            "weak_outage_s": config.outage_s,
        },
        "layers": [
            {
                "rid": layer.rid,
                "size": f"{layer.width}x{layer.height}",
                "kbps": layer.bitrate // 1000,
            }
            for layer in LAYERS
        ],
        "config": {
            "warmup_s": config.warmup_s,
            "duration_s": config.duration_s,
            "recovery_limit_s": config.recovery_limit_s,
            "tile": f"{TILE[0]}x{TILE[1]}",
        },
        "machine": {"cpus": os.cpu_count(), "loadavg_1m": os.getloadavg()[0]},
    }


def run_quality(config: QualityConfig, data_dir: Path) -> dict[str, Any]:
    text, source = quality_topology(config.weak_kbps)
    logs = data_dir / "peers"
    logs.mkdir(parents=True, exist_ok=True)
    env = {"SFUMESH_BCRYPT_COST": "4"}
    began = time.monotonic()
    with LabCluster(text, source, data_dir / "lab", node_env=env) as cluster:
        say(f"lab ready ({time.monotonic() - began:.0f} s)", err=True)
        url = cluster.urls[NODE_HOST]
        tokens, slugs = cluster.run(PUBLISHER_HOST, lambda: _prepare(url, 2))
        run = QualityRun(cluster, config, logs)

        async def both() -> tuple[Phase, Phase | None]:
            say("simulcast: the publisher sends 3 encodings ...")
            simulcast = await run.phase("simulcast", tokens, slugs[0], ladder=False, lift=True)
            if not config.baseline:
                return simulcast, None
            say("baseline: one encoding following REMB (today's behaviour) ...")
            baseline = await run.phase("baseline", tokens, slugs[1], ladder=True, lift=False)
            return simulcast, baseline

        simulcast, baseline = asyncio.run(both())
        stopping = time.monotonic()
    say(f"lab stopped ({time.monotonic() - stopping:.0f} s)", err=True)
    return figures(simulcast, baseline, config)


# --------------------------------------------------------------------------- output


def _num(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(report: dict[str, Any]) -> None:
    placement = report["placement"]
    say(
        f"sfumesh bench quality: WAN lab, room on {placement['node']}; publisher "
        f"{placement['publisher']} (3 encodings); strong {', '.join(placement['strong'])}; "
        f"weak {placement['weak']} (downlink {placement['weak_downlink_kbps']} kbit/s, "
        "then lifted)"
    )
    header = (
        f"{'phase':<10} {'subscriber':<11} {'kbit/s':>8} {'fps':>6} {'height':>6} {'freeze':>7}"
    )
    say(header)
    say("-" * len(header))
    for name in ("simulcast", "baseline"):
        phase = report.get(name)
        if not phase:
            continue
        for host, row in phase["per_subscriber"].items():
            say(
                f"{name:<10} {host:<11} {_num(row['video_kbps']):>8} {_num(row['fps']):>6} "
                f"{(row['height'] if row['height'] is not None else '-'):>6} "
                f"{_num(row['longest_freeze_s'], 2):>7}"
            )
    say("(freeze = the longest gap between decoded frames, from 10 s after the start)")
    targets = report["targets"]
    say(
        f"strong: {_num(report['strong_video_kbps'])} kbit/s, {_num(report['strong_fps'])} "
        f"fps (target >= {TARGET_STRONG_KBPS:g} kbit/s and {TARGET_STRONG_FPS:g} fps: "
        f"{'met' if targets['strong_met'] else 'NOT met'}); baseline (single encoding) "
        f"{_num(report['baseline_strong_video_kbps'])} kbit/s"
    )
    say(
        f"weak: {_num(report['weak_video_kbps'])} kbit/s, height {report['weak_height']} "
        f"(strong {report['strong_height']}), frozen {_num(report['weak_freeze_s'], 2)} s, "
        f"longest {_num(report['weak_longest_freeze_s'], 2)} s (target <= {FREEZE_S:g} s: "
        f"{'met' if targets['weak_met'] else 'NOT met'})"
    )
    if placement.get("weak_outage_s"):
        say(
            f"outage: the weak downlink cut for {placement['weak_outage_s']:g} s at the "
            f"window's start; after it, longest freeze "
            f"{_num(report['weak_longest_freeze_after_outage_s'], 2)} s, height "
            f"{report['weak_height_after_outage']}"
        )
    say(
        f"recovery after the limit is lifted: {_num(report['recovery_s'], 2)} s (target <= "
        f"{TARGET_RECOVERY_S:g} s: {'met' if targets['recovery_met'] else 'NOT met'})"
    )


def plot(report: dict[str, Any], path: Path) -> bool:
    """Each subscriber's kbit/s over time, one panel per phase."""
    phases = [name for name in ("simulcast", "baseline") if report.get(name)]

    def draw(axes: Any) -> None:
        for axis, name in zip(axes[:, 0], phases, strict=True):
            phase = report[name]
            for host, points in phase["series"].items():
                style = "--" if host == WEAK_HOST else "-"
                axis.plot([p[0] for p in points], [p[1] for p in points], style, label=host)
            if phase.get("lifted_at_s") is not None:
                axis.axvline(
                    phase["lifted_at_s"], color="grey", linestyle=":", label="limit lifted"
                )
            axis.set(title=name, xlabel="s since every subscriber received", ylabel="video kbit/s")
            axis.legend(loc="upper right")

    return report_plot(
        path,
        f"sfumesh bench quality ({report['when']})",
        (len(phases), 1),
        (10, 3.6 * len(phases)),
        draw,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("quality (simulcast against one weak link, WAN lab)")
    group.add_argument(
        "--weak-kbps",
        type=int,
        default=DEFAULT_WEAK_KBPS,
        help=f"quality: the weak subscriber's downlink, kbit/s (default {DEFAULT_WEAK_KBPS})",
    )
    group.add_argument(
        "--recovery-limit",
        type=float,
        default=DEFAULT_RECOVERY_LIMIT_S,
        help="quality: longest wait for the weak subscriber to recover, s (default 30)",
    )
    group.add_argument(
        "--no-baseline", action="store_true", help="quality: skip the single-encoding baseline"
    )
    group.add_argument(
        "--outage",
        type=float,
        default=0.0,
        metavar="S",
        help="quality: cut the weak downlink for S seconds at the window's start (default 0)",
    )


def run(args: argparse.Namespace) -> int:
    """`sfumesh bench quality` (re-executes itself in a private network namespace)."""
    duration = DEFAULT_DURATION_S if args.duration is None else args.duration
    warmup = DEFAULT_WARMUP_S if args.warmup is None else args.warmup
    if (
        duration <= 0
        or warmup < 0
        or args.recovery_limit <= 0
        or not 50 <= args.weak_kbps
        or not 0 <= args.outage < duration
    ):
        say(
            "sfumesh bench quality: --duration > 0, --warmup >= 0, --recovery-limit > 0, "
            "--weak-kbps >= 50, 0 <= --outage < --duration",
            err=True,
        )
        return 2
    problem = namespace_problem()
    if problem is not None and in_private_netns():
        say(f"sfumesh bench quality: no lab here: {problem}", err=True)
        return 2
    if not in_private_netns():
        try:
            reexec_in_private_netns()
        except NetnsError as error:
            say(f"sfumesh bench quality: {error}", err=True)
            return 2
    setup_logging("WARNING")
    from node.bench.forward.run import ForwardBenchError

    config = QualityConfig(
        warmup_s=warmup,
        duration_s=duration,
        recovery_limit_s=args.recovery_limit,
        weak_kbps=args.weak_kbps,
        baseline=not args.no_baseline,
        outage_s=args.outage,
    )
    with contextlib.ExitStack() as stack:
        if args.workdir is not None:
            # (kept: the node's log has every `media.layer_target`, the peers' logs theirs)
            workdir = str(args.workdir)
            Path(workdir).mkdir(parents=True, exist_ok=True)
        else:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="sfumesh-quality-"))
        try:
            report = run_quality(config, Path(workdir))
        except (LabError, ForwardBenchError, OSError, httpx.HTTPError) as error:
            say(f"sfumesh bench quality: {error}", err=True)
            with contextlib.suppress(OSError):
                for log in sorted((Path(workdir) / "peers").glob("*.log")):
                    tail = log.read_text(errors="replace")[-1500:]
                    say(f"--- {log.name}\n{tail}", err=True)
            return 1
        except KeyboardInterrupt:
            say("sfumesh bench quality: interrupted", err=True)
            return 130
    print_table(report)
    if args.json is not None:
        if not write_report(args.json, report):
            return 1
        plot(report, args.json.with_suffix(".png"))
    return 0
