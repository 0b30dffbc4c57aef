"""`bench geo`'s report: one self-contained HTML page (PNG plots inlined as base64) next to
the JSON. Per variant: the answer to the seed's question (computed, `verdicts`), the time
series of each scenario and direction (latency, Mbit/s, fps, frames lost after repair) and
the averages side by side; then what to take from it across the variants.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any, Final

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from node.bench.geo_figures import SCENARIO_NAMES, caveat, scenario_summary, verdicts

SERIES: Final = (
    ("latency_ms_p50", "glass-to-glass p50, ms"),
    ("mbps", "received Mbit/s"),
    ("fps", "frames/s decoded"),
    ("loss_after_repair", "frames lost after repair"),
)
AVERAGES: Final = (
    ("latency_ms_p50", "glass-to-glass p50, ms"),
    ("fps", "frames/s"),
    ("video_mbps", "video Mbit/s"),
    ("freeze_s", "seconds frozen"),
)


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _series_plot(rows: list[dict[str, Any]], variant: str) -> str:
    mine = [r for r in rows if r["variant"] == variant]
    figure, axes = plt.subplots(len(SERIES), 1, figsize=(10, 9), sharex=True)
    for row in mine:
        label = f"{row['scenario']} {row['direction']}"
        style = "-" if row["direction"].startswith("eu") else "--"
        for axis, (key, title) in zip(axes, SERIES, strict=True):
            values: list[float | None] = []
            for run in row["series"]:
                values.extend(run.get(key, []))
            points = [(i, v) for i, v in enumerate(values) if v is not None]
            if points:
                axis.plot(*zip(*points, strict=True), style, label=label, linewidth=1)
            axis.set_ylabel(title, fontsize=8)
    axes[0].legend(fontsize=7, ncol=3)
    axes[-1].set_xlabel("seconds of the measured windows (repeats one after another)")
    figure.suptitle(f"{variant}: time series per scenario and direction")
    return _png(figure)


def _averages_plot(rows: list[dict[str, Any]], variant: str) -> str:
    figure, axes = plt.subplots(1, len(AVERAGES), figsize=(12, 3))
    summaries = [scenario_summary(rows, variant, n) for n in (1, 2, 3)]
    for axis, (key, title) in zip(axes, AVERAGES, strict=True):
        values = [s.get(key) or 0.0 for s in summaries]
        axis.bar(["1 relayed", "2 HCM", "3 SG"], values, color=["C0", "C1", "C2"])
        axis.set_title(title, fontsize=9)
        axis.tick_params(labelsize=8)
    figure.suptitle(f"{variant}: averages of both directions", y=1.06)
    return _png(figure)


def _table(rows: list[dict[str, Any]], variant: str) -> str:
    keys = (
        "scenario",
        "direction",
        "video_mbps",
        "fps",
        "latency_ms_p50",
        "latency_ms_p95",
        "rtt_ms",
        "jitter_ms",
        "loss_before_repair",
        "loss_after_repair",
        "freezes",
        "freeze_s",
        "longest_gap_s",
        "nodes",
    )
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = []
    for row in rows:
        if row["variant"] != variant:
            continue
        cells = []
        for key in keys:
            value = row.get(key)
            text = "+".join(value) if isinstance(value, list) else "-" if value is None else value
            cells.append(f"<td>{html.escape(str(text))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def lessons(rows: list[dict[str, Any]]) -> str:
    """What a person should take from the run, from its verdicts."""
    answers = verdicts(rows)
    pays = [v for v, a in answers.items() if ": yes" in a]
    not_pays = [v for v, a in answers.items() if ": no" in a or ": partly" in a]
    parts = []
    if pays:
        parts.append(
            "Relaying through the nodes nearest each peer paid off in: " + ", ".join(pays) + "."
        )
    if not_pays:
        parts.append("It did not (or only partly) in: " + ", ".join(not_pays) + ".")
    parts.append(
        "Relaying pays when each peer's own access to its nearby node is short and clean and "
        "the node-to-node link is no worse than the path a far peer would take to a single "
        "node: loss is then repaired hop by hop over short round trips. It does not pay when "
        "the link between the nodes is the congested or lossy part (a cable cut between "
        "Singapore and HCM): every packet crosses it, plus the relay's own hop, while one "
        "peer on the other's node would avoid it."
    )
    return " ".join(parts)


def write_html(path: Path, report: dict[str, Any]) -> None:
    rows: list[dict[str, Any]] = report["scenarios"]
    answers = verdicts(rows)
    config, mesh, emulator = report["config"], report["mesh"], report["emulator"]
    sections = []
    for variant, description in config["variants"].items():
        if not any(r["variant"] == variant for r in rows):
            continue
        sections.append(
            f"<h2>{html.escape(variant)}: {html.escape(description)}</h2>"
            f"<p class=answer>{html.escape(answers.get(variant, ''))}</p>"
            f"{_table(rows, variant)}"
            f'<img alt="averages" src="data:image/png;base64,{_averages_plot(rows, variant)}">'
            f'<img alt="time series" src="data:image/png;base64,{_series_plot(rows, variant)}">'
        )
    scenarios = "".join(f"<li>{n}: {html.escape(t)}</li>" for n, t in SCENARIO_NAMES.items())
    picks = ", ".join(f"{p['peer']} picked {p['picked']}" for p in mesh["picks"]) or "-"
    machine = report.get("machine", {})
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>sfumesh bench geo</title>
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 1em auto; }}
table {{ border-collapse: collapse; font-size: 12px; margin: .5em 0; }}
td, th {{ border: 1px solid #ccc; padding: 2px 6px; text-align: right; }}
.answer {{ font-weight: bold; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>sfumesh bench geo: relaying through nearby nodes, or one far node?</h1>
<p>{html.escape(report["when"])}; topology {html.escape(str(report["topology"]))};
{html.escape(config["video"])}; {config["duration_s"]:g} s measured per scenario after
{config["warmup_s"]:g} s of warm-up, {config["repeats"]} repeat(s), scenarios alternating.
Machine: {html.escape(str(machine))}.</p>
<ul>{scenarios}</ul>
<h2>The answer</h2>
<ul>{"".join(f"<li>{html.escape(a)}</li>" for a in answers.values())}</ul>
<p class=answer>{html.escape(caveat(report) or "")}</p>
<p>{html.escape(lessons(rows))}</p>
<p>Mesh: join (HTTP + WebSocket + ICE to the first frame) p50 {mesh["join_ms_p50"]} ms,
p95 {mesh["join_ms_p95"]} ms; relay setup p50 {mesh["relay_setup_ms_p50"]} ms; closest-node
picks correct {mesh["closest_node_correct"]} ({html.escape(picks)}); Serf failure detection
{mesh["serf_failure_detect_s"]} s. Emulator: delay error p50
{emulator["delay_error_ms_p50"]} ms, p99 {emulator["delay_error_ms_p99"]} ms,
{emulator["cpu_us_per_packet"]} us CPU per packet.</p>
{"".join(sections)}
</body></html>
"""
    path.write_text(page)
