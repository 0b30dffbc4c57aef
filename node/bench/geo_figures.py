"""`bench geo`'s figures: from what two peers recorded (every painted counter sent, every
frame decoded with the counter read back, WebRTC stats once a second) and the emulator's
ground truth, the figures of one direction of one scenario run (`direction_figures`);
runs pooled per variant, scenario and direction (`aggregate`); the table; and the answer to
the seed's question per variant (`verdicts`), computed from the rows.

Definitions:
* glass-to-glass latency: decode time minus the capture time painted into the frame (one
  clock for every lab host); frames whose stamp did not read back are not counted.
* a freeze: a gap between decoded frames longer than max(3 x the median frame interval,
  200 ms) (the WebRTC stats definition); the window's edges count as frames' boundaries.
* loss before repair: the fraction of packets the emulator dropped on the path's links
  (its ground truth, per host pair, over the window; the media is most of those packets);
  loss after repair: the fraction of frames the sender painted in the window (less the last
  second, still in flight) that the receiver never decoded, after NACK/RTX and keyframes.
* video Mbit/s: the subscribe connection's bytes (video, its RTX, RTP/SRTP headers) less
  the sender's Opus payload bytes, over the window.
* jitter: RFC 3550 interarrival jitter of the video stream (the receiver's RTCP figure),
  and `frame_delay_spread_ms`, the standard deviation of the inter-frame delay as felt.
* RTT per hop: the sender's publish connection (RTCP RR), the relay (the node's
  `sfumesh_relay_rtt_seconds`), the receiver's publish connection (the same path as its
  subscribe connection); `rtt_ms` is their sum, the round trip of the media's path.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from node.bench.report import percentile, rounded

WRAP: Final = 1 << 32
#: frames painted this close to the window's end may still be in flight
IN_FLIGHT_MS: Final = 1000
FREEZE_MIN_MS: Final = 200.0
VIDEO_CLOCK_HZ: Final = 90_000

SCENARIO_NAMES: Final = {
    1: "relayed (each on its closest node)",
    2: "both on the HCM node",
    3: "both on the Singapore node",
}


def _unwrap(value: int, ref: int) -> int:
    """A 32-bit millisecond counter as the full clock value nearest `ref`."""
    return ref + ((value - ref + WRAP // 2) % WRAP) - WRAP // 2


@dataclass
class Direction:
    """One direction of one scenario run: its figures and the raw series for the report."""

    variant: str
    scenario: int
    direction: str
    figures: dict[str, Any]
    latencies_ms: list[float] = field(default_factory=list)
    series: dict[str, list[float | None]] = field(default_factory=dict)


def _in_window(samples: Sequence[dict[str, Any]], start: int, end: int) -> list[dict[str, Any]]:
    return [s for s in samples if start <= _unwrap(int(s["t_ms"]), start) <= end]


def _delta(samples: list[dict[str, Any]], key: str) -> float | None:
    values = [s[key] for s in samples if s.get(key) is not None]
    return float(values[-1] - values[0]) if len(values) >= 2 else None


def _median_of(samples: list[dict[str, Any]], key: str) -> float | None:
    values = [float(s[key]) for s in samples if s.get(key) is not None]
    return statistics.median(values) if values else None


def wire_loss(
    stats: tuple[dict[str, Any], dict[str, Any]], paths: Sequence[tuple[str, str]]
) -> float | None:
    """1 - the product over `paths` (host pairs) of (1 - drops / packets in), from the
    emulator's per-path ground truth at the window's start and end."""
    before, after = (s.get("paths", {}) for s in stats)
    kept = 1.0
    for src, dst in paths:
        name = f"{src}->{dst}"
        if name not in after:
            return None
        start = before.get(name, {"packets_in": 0, "drops": {}})
        sent = after[name]["packets_in"] - start["packets_in"]
        dropped = sum(after[name]["drops"].values()) - sum(start["drops"].values())
        if sent <= 0:
            return None
        kept *= 1 - dropped / sent
    return 1 - kept


def direction_figures(
    variant: str,
    scenario: int,
    direction: str,
    sender: dict[str, Any],
    receiver: dict[str, Any],
    hosts: tuple[str, str],
    window_ms: tuple[int, int],
    emulator: tuple[dict[str, Any], dict[str, Any]],
    relay_rtt_ms: float | None,
) -> Direction:
    start, end = window_ms
    seconds = (end - start) / 1000
    frames = [
        (_unwrap(int(at), start), None if counter is None else _unwrap(int(counter), start))
        for at, counter in receiver["frames"]
    ]
    shown = sorted(((at, c) for at, c in frames if start <= at <= end), key=lambda f: f[0])
    times = [at for at, _ in shown]
    latencies = [float(at - c) for at, c in shown if c is not None]
    intervals = [float(b - a) for a, b in itertools.pairwise(times)]
    edges = [float(times[0] - start), float(end - times[-1])] if times else [float(end - start)]
    median = statistics.median(intervals) if intervals else 1000 / 30
    threshold = max(3 * median, FREEZE_MIN_MS)
    freezes = [gap for gap in [*intervals, *edges] if gap > threshold]

    decoded = {c for _, c in frames if c is not None}
    painted = [_unwrap(int(c), start) for c in sender["painted"]]
    expected = [c for c in painted if start <= c <= end - IN_FLIGHT_MS]
    missing = [c for c in expected if c not in decoded]

    got = _in_window(receiver["samples"], start, end)
    sent = _in_window(sender["samples"], start, end)
    received_bytes = _delta(got, "bytes_received")
    audio_bytes = _delta(sent, "audio_bytes_sent") or 0.0
    span_s = (
        (_unwrap(int(got[-1]["t_ms"]), start) - _unwrap(int(got[0]["t_ms"]), start)) / 1000
        if len(got) >= 2
        else 0.0
    )
    video_mbps = (
        (received_bytes - audio_bytes) * 8 / span_s / 1e6
        if received_bytes is not None and span_s > 0
        else None
    )
    jitter_ts = [float(s["video_jitter_ts"]) for s in got if s.get("video_jitter_ts") is not None]
    lost = _delta(got, "video_packets_lost")
    arrived = _delta(got, "video_packets_received")
    last_leg = lost / (lost + arrived) if lost is not None and arrived and lost >= 0 else None

    sender_node, receiver_node = str(sender.get("node", "")), str(receiver.get("node", ""))
    hops: dict[str, float | None] = {}
    up = _median_of(sent, "rtt_s")
    hops["sender-node"] = None if up is None else up * 1000
    if sender_node != receiver_node:
        hops["relay"] = relay_rtt_ms
    down = _median_of(got, "rtt_s")
    hops["node-receiver"] = None if down is None else down * 1000
    known = [v for v in hops.values() if v is not None]
    paths = [(hosts[0], sender_node)]
    if sender_node != receiver_node:
        paths.append((sender_node, receiver_node))
    paths.append((receiver_node, hosts[1]))

    figures: dict[str, Any] = {
        "variant": variant,
        "scenario": scenario,
        "direction": direction,
        "video_mbps": rounded(video_mbps, 3),
        "fps": rounded(len(shown) / seconds if seconds > 0 else None),
        "latency_ms_p50": rounded(percentile(sorted(latencies), 0.5), 1),
        "latency_ms_p95": rounded(percentile(sorted(latencies), 0.95), 1),
        "rtt_ms": rounded(sum(known), 1) if len(known) == len(hops) else None,
        "rtt_hops_ms": {k: rounded(v, 1) for k, v in hops.items()},
        "jitter_ms": rounded(statistics.fmean(jitter_ts) / VIDEO_CLOCK_HZ * 1000, 2)
        if jitter_ts
        else None,
        "frame_delay_spread_ms": rounded(statistics.pstdev(intervals), 1) if intervals else None,
        "loss_before_repair": rounded(wire_loss(emulator, paths), 4),
        "loss_after_repair": rounded(len(missing) / len(expected), 4) if expected else None,
        "loss_last_leg_rtcp": rounded(last_leg, 4),
        "freezes": len(freezes),
        "freeze_s": round(sum(freezes) / 1000, 2),
        "longest_gap_s": round(max([*intervals, *edges]) / 1000, 2),
        "nodes": list(dict.fromkeys([sender_node, receiver_node])),
        "frames_decoded": len(shown),
        "stamps_read": len(latencies),
        "stamps_misread": int(receiver.get("misread", 0)),
        "frames_painted": len(expected),
        "window_s": round(seconds, 2),
    }
    return Direction(
        variant,
        scenario,
        direction,
        figures,
        latencies,
        _series(start, end, shown, got, expected, missing),
    )


def _series(
    start: int,
    end: int,
    shown: list[tuple[int, int | None]],
    samples: list[dict[str, Any]],
    expected: list[int],
    missing: list[int],
) -> dict[str, list[float | None]]:
    """Per second of the window: latency p50, fps, Mbit/s (the whole subscribe
    connection), frames lost after repair (fraction)."""
    seconds = max(1, (end - start) // 1000)
    latency: list[list[float]] = [[] for _ in range(seconds)]
    fps = [0.0] * seconds
    for at, counter in shown:
        index = min(seconds - 1, (at - start) // 1000)
        fps[index] += 1
        if counter is not None:
            latency[index].append(float(at - counter))
    painted = [0] * seconds
    lost = [0] * seconds
    for counter in expected:
        painted[min(seconds - 1, (counter - start) // 1000)] += 1
    for counter in missing:
        lost[min(seconds - 1, (counter - start) // 1000)] += 1
    mbps: list[float | None] = [None] * seconds
    for a, b in itertools.pairwise(samples):
        if a.get("bytes_received") is None or b.get("bytes_received") is None:
            continue
        t_a, t_b = _unwrap(int(a["t_ms"]), start), _unwrap(int(b["t_ms"]), start)
        if t_b > t_a:
            index = min(seconds - 1, max(0, (t_b - start) // 1000))
            mbps[index] = (b["bytes_received"] - a["bytes_received"]) * 8 / (t_b - t_a) / 1000
    return {
        "latency_ms_p50": [percentile(sorted(v), 0.5) for v in latency],
        "fps": list(fps),
        "mbps": mbps,
        "loss_after_repair": [lost[i] / painted[i] if painted[i] else None for i in range(seconds)],
    }


MEANS: Final = (
    "video_mbps",
    "fps",
    "rtt_ms",
    "jitter_ms",
    "frame_delay_spread_ms",
    "loss_before_repair",
    "loss_after_repair",
    "loss_last_leg_rtcp",
)
SUMS: Final = ("freezes", "freeze_s", "frames_decoded", "stamps_read", "stamps_misread")


def aggregate(directions: Sequence[Direction]) -> list[dict[str, Any]]:
    """One row per (variant, scenario, direction), runs pooled: latency percentiles over
    every frame, means of rates and fractions, sums of freezes, the longest gap."""
    groups: dict[tuple[str, int, str], list[Direction]] = {}
    for d in directions:
        groups.setdefault((d.variant, d.scenario, d.direction), []).append(d)
    rows = []
    for (variant, scenario, direction), runs in groups.items():
        latencies = sorted(x for d in runs for x in d.latencies_ms)
        row: dict[str, Any] = {
            "variant": variant,
            "scenario": scenario,
            "direction": direction,
            "runs": len(runs),
            "latency_ms_p50": rounded(percentile(latencies, 0.5), 1),
            "latency_ms_p95": rounded(percentile(latencies, 0.95), 1),
        }
        for key in MEANS:
            values = [d.figures[key] for d in runs if d.figures.get(key) is not None]
            row[key] = rounded(statistics.fmean(values), 4) if values else None
        for key in SUMS:
            row[key] = round(sum(d.figures[key] for d in runs), 2)
        row["longest_gap_s"] = max(d.figures["longest_gap_s"] for d in runs)
        row["nodes"] = list(dict.fromkeys(n for d in runs for n in d.figures["nodes"]))
        row["rtt_hops_ms"] = [d.figures["rtt_hops_ms"] for d in runs]
        row["series"] = [d.series for d in runs]
        rows.append(row)
    return rows


def _mean_of(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.fmean(values) if values else None


def scenario_summary(rows: list[dict[str, Any]], variant: str, scenario: int) -> dict[str, Any]:
    """Both directions of one scenario of one variant, averaged."""
    mine = [r for r in rows if r["variant"] == variant and r["scenario"] == scenario]
    keys = ("latency_ms_p50", "latency_ms_p95", "fps", "video_mbps", "loss_after_repair")
    summary: dict[str, Any] = {key: _mean_of(mine, key) for key in keys}
    summary["freeze_s"] = sum(r["freeze_s"] for r in mine) if mine else None
    summary["longest_gap_s"] = max((r["longest_gap_s"] for r in mine), default=None)
    return summary


def verdicts(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Per variant, one sentence: does relaying through the nearby nodes (scenario 1) beat
    both peers on one far node (2 and 3)? Better = a lower glass-to-glass p50 (mean of both
    directions) with no more freezing (seconds frozen, both directions)."""
    answers: dict[str, str] = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        s1, s2, s3 = (scenario_summary(rows, variant, n) for n in (1, 2, 3))
        lat = [s["latency_ms_p50"] for s in (s1, s2, s3)]
        frz = [s["freeze_s"] for s in (s1, s2, s3)]
        if None in lat or None in frz:
            answers[variant] = f"{variant}: not every scenario ran, no answer."
            continue
        l1, l2, l3 = (float(x) for x in lat)
        f1, f2, f3 = (float(x) for x in frz)
        faster = l1 < l2 and l1 < l3
        steadier = f1 <= min(f2, f3) + 0.5
        if faster and steadier:
            verdict = "yes: relaying through the nearby nodes beats both peers on one far node"
        elif faster:
            verdict = "partly: relaying is faster but freezes more than a single node"
        elif l1 < max(l2, l3):
            best = "HCM" if l2 < l3 else "Singapore"
            verdict = f"no: both peers on the {best} node beat relaying"
        else:
            verdict = "no: either single node beats relaying"
        answers[variant] = (
            f"{variant}: {verdict} (glass-to-glass p50 {l1:.0f} ms relayed vs {l2:.0f} ms on "
            f"HCM and {l3:.0f} ms on Singapore; frozen {f1:.1f} s vs {f2:.1f} s and {f3:.1f} s)."
        )
    return answers


#: the lab's own target (issue 13): beyond it the emulator, and so every figure, is late
EMULATOR_P99_TARGET_MS: Final = 1.0
#: camera frames per second; a run far below it was short of CPU, not of network
CAMERA_FPS: Final = 30.0


def caveat(report: dict[str, Any]) -> str | None:
    """Why the run's figures may measure the machine more than the network (None: no
    sign of it): the emulator's delay error beyond its target, or the peers decoding far
    fewer frames than the cameras make even where the network lost nothing."""
    reasons = []
    p99 = report.get("emulator", {}).get("delay_error_ms_p99")
    if p99 is not None and p99 > EMULATOR_P99_TARGET_MS:
        reasons.append(
            f"the emulator's delay error p99 was {p99:.1f} ms (target "
            f"<= {EMULATOR_P99_TARGET_MS:g} ms on an idle machine)"
        )
    fps = [r["fps"] for r in report.get("scenarios", []) if r.get("fps") is not None]
    if fps and max(fps) < CAMERA_FPS * 2 / 3:
        reasons.append(f"no direction decoded more than {max(fps):.0f} of {CAMERA_FPS:g} fps")
    load = report.get("machine", {}).get("after", {})
    if load.get("loadavg_5m") is not None and load.get("cpus"):
        if load["loadavg_5m"] > load["cpus"]:
            reasons.append(f"the load average was {load['loadavg_5m']:.1f} on {load['cpus']} CPUs")
    if not reasons:
        return None
    return (
        "Caveat: this run was short of CPU (" + "; ".join(reasons) + "): its latencies and "
        "freezes measure the machine as much as the network; rerun on an idle machine."
    )


def _cell(value: Any, digits: int = 1, scale: float = 1.0) -> str:
    if value is None:
        return "-"
    return f"{value * scale:.{digits}f}"


def print_table(report: dict[str, Any]) -> None:
    """The table on stdout, the mesh's and the emulator's figures, the answers."""
    header = (
        f"{'variant':<10} {'sc':>2} {'dir':<7} {'Mbit/s':>6} {'fps':>5} {'g2g p50':>7} "
        f"{'p95':>6} {'rtt':>6} {'jit':>5} {'loss%':>6} {'after%':>6} {'frz':>4} "
        f"{'frz s':>5} {'gap s':>5}  nodes"
    )
    print(header)
    print("-" * len(header))
    for r in report["scenarios"]:
        print(
            f"{r['variant']:<10} {r['scenario']:>2} {r['direction']:<7} "
            f"{_cell(r['video_mbps'], 2):>6} {_cell(r['fps']):>5} "
            f"{_cell(r['latency_ms_p50'], 0):>7} {_cell(r['latency_ms_p95'], 0):>6} "
            f"{_cell(r['rtt_ms'], 0):>6} {_cell(r['jitter_ms']):>5} "
            f"{_cell(r['loss_before_repair'], 2, 100):>6} "
            f"{_cell(r['loss_after_repair'], 2, 100):>6} {r['freezes']:>4} "
            f"{r['freeze_s']:>5.1f} {r['longest_gap_s']:>5.2f}  {'+'.join(r['nodes'])}"
        )
    mesh, emulator = report["mesh"], report["emulator"]
    print(
        f"mesh: join p50 {_cell(mesh['join_ms_p50'], 0)} ms, p95 {_cell(mesh['join_ms_p95'], 0)}"
        f" ms; relay setup p50 {_cell(mesh['relay_setup_ms_p50'], 0)} ms; closest node correct "
        f"{_cell(mesh['closest_node_correct'], 0, 100)}%; Serf failure detected in "
        f"{_cell(mesh['serf_failure_detect_s'], 2)} s"
    )
    by_peer = mesh.get("join_ms_by_peer") or {}
    if by_peer:
        joins = "; ".join(
            f"{peer} p50 {_cell(j['p50'], 0)} p95 {_cell(j['p95'], 0)} max {_cell(j['max'], 0)} ms"
            for peer, j in by_peer.items()
        )
        print(f"joins to the other peer's first frame: {joins}")
    picks = ", ".join(f"{p['peer']} -> {p['picked']}" for p in mesh["picks"])
    print(f"closest-node picks: {picks or '-'}")
    print(
        f"emulator: delay error p50 {_cell(emulator['delay_error_ms_p50'], 3)} ms, p99 "
        f"{_cell(emulator['delay_error_ms_p99'], 3)} ms, "
        f"{_cell(emulator['cpu_us_per_packet'])} us CPU/packet"
    )
    for sentence in verdicts(report["scenarios"]).values():
        print(sentence)
    warning = caveat(report)
    if warning is not None:
        print(warning)
