"""`sfumesh bench geo`: the seed's question answered in the WAN lab (issue 13, items 4-5;
issue 20's `longest_gap_s`). Does relaying through the nearby node beat both peers on one
far node?

Three scenarios, on the lab's default topology (or `--topology FILE` with the same four
host names): 1) the EU peer and the VN peer each pick their node by the closest-node
procedure (`mesh.closest.pick_node`, expected: Singapore and Ho Chi Minh City, relayed);
2) both on the HCM node; 3) both on the Singapore node. Variants of the topology, each made
in memory (`VARIANTS`: a variant is a transform of the loaded `Topology`) and run on a
`LabCluster` of its own: the default network, a lossy long haul (2% on every core link of
the EU region), a congested Singapore-HCM link (+80 ms one way, 1% loss). Within a variant
the scenarios alternate 1 2 3 1 2 3 ... (`--repeats`) so machine noise hits all alike.

Each peer is its own process (`node.bench.geo_peer`) inside its client host, publishing
`CameraTrack` VP8 (a moving scene, the capture time painted in every frame) and an Opus
tone, and decoding the other's video. After both decode, a warm-up, then the window
(`--duration`). Per scenario and direction, from what the peers recorded and the lab's
ground truth (`geo_figures`): received video Mbit/s, frames/s, glass-to-glass latency,
RTT per hop, jitter, loss before and after repair, freezes, the longest gap, the nodes.
Also the emulator's selftest, and the mesh's join time, relay setup time, closest-node
picks against the topology's truth and Serf's failure detection (`mesh_timing`).

Output: a table on stdout, `--json FILE`, and next to it FILE.html (`geo_report`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import queue
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final

import httpx
from redis.asyncio import Redis

from node.bench.geo_figures import Direction, aggregate, direction_figures, print_table
from node.bench.harness import sign_up
from node.bench.report import metric_sum, percentile, rounded, say, write_report
from node.lab.cluster import LabCluster
from node.lab.mesh_timing import serf_failure_detection
from node.lab.namespaces import LabError
from node.lab.selftest import SelftestConfig, run_selftest
from node.lab.topology import Role, Topology, load_topology, topology_toml, with_core
from node.relay.manager import read_relays

log = logging.getLogger(__name__)

EU_PEER: Final = "eu-peer"
VN_PEER: Final = "vn-peer"
SG_NODE: Final = "sg-node"
HCM_NODE: Final = "hcm-node"
SCENARIOS: Final = (1, 2, 3)
#: how long both peers may take from their start to decoding each other
MEDIA_TIMEOUT_S: Final = 120.0
#: how long a peer may take to report once asked to stop
RESULT_TIMEOUT_S: Final = 60.0
LOSSY_CORE_LOSS: Final = 0.02
CONGESTED_EXTRA_MS: Final = 80.0
CONGESTED_LOSS: Final = 0.01
DEFAULT_DURATION_S: Final = 30.0
DEFAULT_WARMUP_S: Final = 5.0
#: what each peer's VP8 encoder holds (aiortc's VP8 range is 250-1500 kbit/s)
DEFAULT_BITRATE_KBPS: Final = 1500


def _region(topology: Topology, host: str) -> str:
    return topology.hosts[host].region


def lossy_long_haul(topology: Topology) -> Topology:
    """2% random loss on every core link between the EU peer's region and another."""
    eu = _region(topology, EU_PEER)
    for a, b in list(topology.core):
        if (a == eu) != (b == eu):
            loss = max(topology.core[(a, b)].loss, LOSSY_CORE_LOSS)
            topology = with_core(topology, a, b, loss=loss)
    return topology


def congested_sg_hcm(topology: Topology) -> Topology:
    """The Singapore-HCM link as during a cable cut: +80 ms one way and 1% loss."""
    sg, hcm = _region(topology, SG_NODE), _region(topology, HCM_NODE)
    for a, b in ((sg, hcm), (hcm, sg)):
        link = topology.core[(a, b)]
        topology = with_core(
            topology,
            a,
            b,
            delay_ms=link.delay_ms + CONGESTED_EXTRA_MS,
            loss=max(link.loss, CONGESTED_LOSS),
        )
    return topology


#: name -> (transform of the loaded topology, what it is)
VARIANTS: Final[dict[str, tuple[Callable[[Topology], Topology], str]]] = {
    "default": (lambda topology: topology, "the topology as loaded"),
    "lossy": (lossy_long_haul, "2% loss on the EU-Asia core links"),
    "congested": (congested_sg_hcm, "Singapore-HCM +80 ms one way and 1% loss"),
}


@dataclass(frozen=True)
class GeoConfig:
    duration_s: float = DEFAULT_DURATION_S
    warmup_s: float = DEFAULT_WARMUP_S
    repeats: int = 1
    variants: tuple[str, ...] = tuple(VARIANTS)
    width: int = 640
    height: int = 360
    bitrate_kbps: int = DEFAULT_BITRATE_KBPS
    topology: Path | None = None
    selftest_s: float = 1.0
    serf_failure: bool = True


@dataclass
class ScenarioRun:
    """One scenario run: what each peer reported, and the lab's figures of its window."""

    variant: str
    scenario: int
    repeat: int
    window_ms: tuple[int, int]
    peers: dict[str, dict[str, Any]]
    emulator: tuple[dict[str, Any], dict[str, Any]]
    relay_rtt_ms: float | None
    relay_setup_ms: float | None = None
    directions: list[Direction] = field(default_factory=list)


def check_topology(topology: Topology) -> None:
    """The bench needs the default topology's four host names, with their roles."""
    wanted = {EU_PEER: Role.CLIENT, VN_PEER: Role.CLIENT, SG_NODE: Role.NODE, HCM_NODE: Role.NODE}
    for name, role in wanted.items():
        host = topology.hosts.get(name)
        if host is None or host.role is not role:
            raise LabError(
                f"{topology.source}: bench geo needs a {role.value} host named {name!r} "
                f"(hosts {EU_PEER}, {VN_PEER} are clients; {SG_NODE}, {HCM_NODE} nodes)"
            )


def truly_closest(topology: Topology, client: str) -> str:
    """The node host with the smallest RTT from `client` by the topology's delays."""

    def rtt(node: str) -> float:
        there = sum(p.delay_ms for _, p in topology.path(client, node))
        back = sum(p.delay_ms for _, p in topology.path(node, client))
        return there + back

    return min((h.name for h in topology.hosts_with(Role.NODE)), key=rtt)


# -- one scenario -------------------------------------------------------------------------


async def _prepare_room(url: str) -> tuple[str, str, str]:
    """Two users and a room (made through `url`): their tokens and the room's slug."""
    async with httpx.AsyncClient(timeout=60.0) as http:
        stamp = secrets.token_hex(3)
        eu, vn = await sign_up(http, url, f"eu{stamp}"), await sign_up(http, url, f"vn{stamp}")
        slug = f"geo-{stamp}"
        created = await http.post(
            f"{url}/api/rooms",
            json={"slug": slug, "capacity": 8},
            headers={"Authorization": f"Bearer {eu}"},
        )
        created.raise_for_status()
        return eu, vn, slug


class PeerProcess:
    """A `geo_peer` process in a client host, its stdout read into a queue by a thread."""

    def __init__(self, cluster: LabCluster, host: str, config: dict[str, Any], log_path: Path):
        self.name = str(config["name"])
        self._log_path = log_path
        self._log = log_path.open("ab")
        argv = cluster.lab.command(host, [sys.executable, "-m", "node.bench.geo_peer"])
        self.process = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True
        )
        self.messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"geo-{self.name}", daemon=True)
        self._reader.start()
        self.send(config)

    def _read(self) -> None:
        out: IO[str] | None = self.process.stdout
        assert out is not None
        for line in out:
            with contextlib.suppress(json.JSONDecodeError):
                self.messages.put(json.loads(line))
        self.messages.put(None)

    def send(self, message: dict[str, Any]) -> None:
        if self.process.stdin is not None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self.process.stdin.write(json.dumps(message) + "\n")
                self.process.stdin.flush()

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        """The next message; a LabError if it is not `event` (the peer failed or hung)."""
        try:
            message = self.messages.get(timeout=timeout)
        except queue.Empty:
            tail = self.log_tail()
            raise LabError(f"peer {self.name}: no {event!r} within {timeout:g} s\n{tail}") from None
        if message is None or message.get("event") != event:
            tail = self.log_tail()
            raise LabError(f"peer {self.name}: expected {event!r}, got {message}\n{tail}")
        return message

    def log_tail(self, chars: int = 2000) -> str:
        """The end of what the peer wrote to stderr (its log is in a temporary dir)."""
        self._log.flush()
        try:
            return self._log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Ask it to end; then by PID if it does not."""
        self.send({"cmd": "stop"})
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        try:
            self.process.wait(RESULT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(5.0)
        self._log.close()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _relay_figures(cluster: LabCluster) -> tuple[float | None, float | None]:
    """The relay's RTT (sg-node's /metrics) and its setup time (what sg-node last wrote to
    Redis of its relay to hcm-node), read from inside the lab."""
    text = cluster.request(EU_PEER, "GET", cluster.urls[SG_NODE] + "/metrics").text
    rtt_s = metric_sum(text, "sfumesh_relay_rtt_seconds", f'peer="{HCM_NODE}"')
    services = cluster.services
    setup: float | None = None
    if services is not None:
        redis_url = services.redis_url

        async def read() -> float | None:
            redis = Redis.from_url(redis_url)
            try:
                entry = (await read_relays(redis, SG_NODE)).get(HCM_NODE, {})
            finally:
                await redis.aclose()
            value = entry.get("setup_ms")
            return None if value is None else float(value)

        setup = cluster.run(SG_NODE, read)
    return (rtt_s * 1000 if rtt_s > 0 else None), setup


def run_scenario(
    cluster: LabCluster, variant: str, scenario: int, repeat: int, config: GeoConfig, logs: Path
) -> ScenarioRun:
    urls = cluster.urls
    eu_token, vn_token, slug = cluster.run(EU_PEER, lambda: _prepare_room(urls[SG_NODE]))
    common = {
        "slug": slug,
        "width": config.width,
        "height": config.height,
        "bitrate": config.bitrate_kbps * 1000,
    }
    pinned = {2: urls[HCM_NODE], 3: urls[SG_NODE]}
    peers: dict[str, PeerProcess] = {}
    try:
        for name, host, token, seed in (
            ("eu", EU_PEER, eu_token, 1),
            ("vn", VN_PEER, vn_token, 2),
        ):
            peer_config: dict[str, Any] = {
                **common,
                "name": name,
                "user_token": token,
                "seed": seed,
                "seed_url": urls[SG_NODE],
                "pick": "closest" if scenario == 1 else "pinned",
                "node_url": pinned.get(scenario, ""),
            }
            log_path = logs / f"{variant}-s{scenario}-r{repeat}-{name}.log"
            peers[name] = PeerProcess(cluster, host, peer_config, log_path)
        deadline = time.monotonic() + MEDIA_TIMEOUT_S
        for peer in peers.values():
            peer.expect("media", max(1.0, deadline - time.monotonic()))
        time.sleep(config.warmup_s)
        start_stats, start_ms = cluster.lab.stats(), _now_ms()
        time.sleep(config.duration_s)
        end_stats, end_ms = cluster.lab.stats(), _now_ms()
        relay_rtt, relay_setup = _relay_figures(cluster) if scenario == 1 else (None, None)
        for peer in peers.values():
            peer.send({"cmd": "stop"})
        results = {name: peer.expect("result", RESULT_TIMEOUT_S) for name, peer in peers.items()}
    finally:
        for peer in peers.values():
            peer.stop()
    run = ScenarioRun(
        variant,
        scenario,
        repeat,
        (start_ms, end_ms),
        results,
        (start_stats, end_stats),
        relay_rtt,
        relay_setup,
    )
    hosts = {"eu": EU_PEER, "vn": VN_PEER}
    for sender, receiver in (("eu", "vn"), ("vn", "eu")):
        run.directions.append(
            direction_figures(
                variant,
                scenario,
                f"{sender}->{receiver}",
                results[sender],
                results[receiver],
                (hosts[sender], hosts[receiver]),
                run.window_ms,
                run.emulator,
                relay_rtt,
            )
        )
    return run


# -- the whole bench ----------------------------------------------------------------------


@dataclass
class GeoResult:
    config: GeoConfig
    emulator: dict[str, Any] = field(default_factory=dict)
    runs: list[ScenarioRun] = field(default_factory=list)
    picks: list[dict[str, Any]] = field(default_factory=list)
    serf_failure_detect_s: float | None = None
    load: dict[str, Any] = field(default_factory=dict)
    topology_source: str = ""


def _picks(run: ScenarioRun, topology: Topology) -> list[dict[str, Any]]:
    picks = []
    for name, host in (("eu", EU_PEER), ("vn", VN_PEER)):
        result = run.peers[name]
        if "ranking" not in result:
            continue
        picked = result["ranking"][0]["name"] if result["ranking"] else None
        truth = truly_closest(topology, host)
        picks.append(
            {
                "variant": run.variant,
                "peer": host,
                "picked": picked,
                "truly_closest": truth,
                "correct": picked == truth,
                "pick_ms": rounded(result.get("pick_ms")),
                "ranking": result["ranking"],
            }
        )
    return picks


def run_variant(
    name: str, topology: Topology, config: GeoConfig, data_dir: Path, result: GeoResult
) -> None:
    text = topology_toml(topology)
    logs = data_dir / "peers"
    logs.mkdir(parents=True, exist_ok=True)
    with LabCluster(text, f"{topology.source} ({name})", data_dir / name) as cluster:
        cluster.wait_converged(timeout=90)
        for repeat in range(config.repeats):
            for scenario in SCENARIOS:
                say(f"  {name}: scenario {scenario} (repeat {repeat + 1}/{config.repeats}) ...")
                run = run_scenario(cluster, name, scenario, repeat, config, logs)
                result.runs.append(run)
                result.picks.extend(_picks(run, topology))
        if config.serf_failure and result.serf_failure_detect_s is None:
            detection = serf_failure_detection(cluster, HCM_NODE, SG_NODE)
            result.serf_failure_detect_s = detection.detect_s


def _load() -> dict[str, Any]:
    one, five, fifteen = os.getloadavg()
    return {"cpus": os.cpu_count(), "loadavg_1m": one, "loadavg_5m": five, "loadavg_15m": fifteen}


def run_geo(config: GeoConfig, data_dir: Path) -> GeoResult:
    """Every variant, its scenarios alternating; raises LabError/TopologyError if it cannot."""
    base = load_topology(config.topology)
    check_topology(base)
    result = GeoResult(config, topology_source=base.source, load={"before": _load()})
    say(f"emulator selftest ({config.selftest_s:g} s per phase) ...")
    selftest = run_selftest(SelftestConfig(duration_s=config.selftest_s))
    result.emulator = {
        "delay_error_ms_p50": rounded(selftest.delay_error_ms_p50, 3),
        "delay_error_ms_p99": rounded(selftest.delay_error_ms_p99, 3),
        "cpu_us_per_packet": rounded(selftest.cpu_us_per_packet, 1),
    }
    for name in config.variants:
        transform, _ = VARIANTS[name]
        say(f"variant {name}: {VARIANTS[name][1]}")
        run_variant(name, transform(base), config, data_dir, result)
    result.load["after"] = _load()
    return result


def joins_by_peer(runs: list[ScenarioRun]) -> dict[str, dict[str, float | None]]:
    """Join time (session, WebSocket, ICE, to the other peer's first frame) per peer, so a
    slow region shows as itself and not as the tail of everyone's."""
    per_peer: dict[str, list[float]] = {}
    for run in runs:
        for name, report in run.peers.items():
            if report.get("join_ms") is not None:
                per_peer.setdefault(name, []).append(float(report["join_ms"]))
    return {
        name: {
            "p50": rounded(percentile(sorted(values), 0.5)),
            "p95": rounded(percentile(sorted(values), 0.95)),
            "max": rounded(max(values)),
        }
        for name, values in sorted(per_peer.items())
    }


def figures(result: GeoResult) -> dict[str, Any]:
    """The JSON of the issue (plus the series the report plots, under `series`)."""
    rows = aggregate([d for run in result.runs for d in run.directions])
    joins = sorted(float(r["join_ms"]) for run in result.runs for r in run.peers.values())
    setups = sorted(run.relay_setup_ms for run in result.runs if run.relay_setup_ms is not None)
    picks = result.picks
    config = result.config
    return {
        "bench": "geo",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "topology": result.topology_source,
        "config": {
            "duration_s": config.duration_s,
            "warmup_s": config.warmup_s,
            "repeats": config.repeats,
            "variants": {name: VARIANTS[name][1] for name in config.variants},
            "video": f"{config.width}x{config.height} VP8 30 fps at "
            f"{config.bitrate_kbps} kbit/s + Opus",
        },
        "machine": result.load,
        "emulator": result.emulator,
        "scenarios": rows,
        "mesh": {
            "join_ms_p50": rounded(percentile(joins, 0.5)),
            "join_ms_p95": rounded(percentile(joins, 0.95)),
            "relay_setup_ms_p50": rounded(percentile(setups, 0.5)),
            "closest_node_correct": rounded(
                sum(p["correct"] for p in picks) / len(picks) if picks else None, 3
            ),
            "serf_failure_detect_s": rounded(result.serf_failure_detect_s, 2),
            "join_ms_by_peer": joins_by_peer(result.runs),
            "joins": [
                {
                    "variant": run.variant,
                    "scenario": run.scenario,
                    "peer": name,
                    "node": report.get("node"),
                    "join_ms": rounded(report.get("join_ms")),
                }
                for run in result.runs
                for name, report in sorted(run.peers.items())
            ],
            "picks": picks,
        },
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("geo (the seed's question in the WAN lab)")
    group.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"geo: comma-separated subset of {', '.join(VARIANTS)}",
    )
    group.add_argument("--repeats", type=int, default=1, help="geo: times each scenario runs")
    group.add_argument(
        "--bitrate",
        type=int,
        default=DEFAULT_BITRATE_KBPS,
        help=f"geo: each peer's video bitrate, kbit/s, 250-1500 (default {DEFAULT_BITRATE_KBPS})",
    )
    group.add_argument("--topology", type=Path, help="geo: a topology file (default: the lab's)")
    group.add_argument(
        "--no-serf-failure", action="store_true", help="geo: skip Serf's failure detection"
    )


def parse_config(args: argparse.Namespace) -> GeoConfig:
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f"unknown variants {unknown} (known: {', '.join(VARIANTS)})")
    try:
        width, height = (int(x) for x in args.video_size.lower().split("x"))
    except ValueError:
        raise ValueError(f"--video-size: WxH, not {args.video_size!r}") from None
    if width % 4 or height % 4 or width < 160 or height < 96:
        raise ValueError("--video-size: at least 160x96, each a multiple of 4")
    duration = DEFAULT_DURATION_S if args.duration is None else args.duration
    warmup = DEFAULT_WARMUP_S if args.warmup is None else args.warmup
    if not 250 <= args.bitrate <= 1500:
        raise ValueError("--bitrate: 250-1500 kbit/s (aiortc's VP8 range)")
    if duration <= 0 or warmup < 0 or args.repeats < 1:
        raise ValueError("--duration > 0, --warmup >= 0, --repeats >= 1")
    return GeoConfig(
        duration_s=duration,
        warmup_s=warmup,
        repeats=args.repeats,
        variants=variants,
        width=width,
        height=height,
        bitrate_kbps=args.bitrate,
        topology=args.topology,
        serf_failure=not args.no_serf_failure,
    )


def run(args: argparse.Namespace) -> int:
    """`sfumesh bench geo` (already inside a private network namespace)."""
    from node.bench.geo_report import write_html

    try:
        config = parse_config(args)
    except ValueError as error:
        say(f"sfumesh bench geo: {error}", err=True)
        return 2
    with tempfile.TemporaryDirectory(prefix="sfumesh-geo-") as workdir:
        try:
            result = run_geo(config, Path(workdir))
        except (LabError, OSError, httpx.HTTPError) as error:
            say(f"sfumesh bench geo: {error}", err=True)
            return 1
        except KeyboardInterrupt:
            say("sfumesh bench geo: interrupted", err=True)
            return 130
    report = figures(result)
    print_table(report)
    if args.json is not None:
        if not write_report(args.json, report):
            return 1
        html = args.json.with_suffix(".html")
        write_html(html, report)
        say(f"written: {html}")
    return 0
