"""What every bench shares to report: quantiles, rounding, CPU seconds, Prometheus sums, the
phase table, and the `--json` file. Here, not in one bench, so that benches import it and not
each other."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_ERROR_SAMPLES = 5


@dataclass
class Phase:
    """Outcome of one kind of request in one phase."""

    key: str
    label: str
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def ok(self) -> int:
        return len(self.latencies_ms)

    @property
    def per_s(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def percentile_ms(self, q: float) -> float | None:
        return percentile(sorted(self.latencies_ms), q)

    def record_error(self, detail: str) -> None:
        self.errors += 1
        if len(self.error_samples) < MAX_ERROR_SAMPLES:
            self.error_samples.append(detail)

    def summary(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "ok": self.ok,
            "errors": self.errors,
            "elapsed_s": round(self.elapsed_s, 3),
            "per_s": round(self.per_s, 2),
            "p50_ms": rounded(self.percentile_ms(0.50)),
            "p99_ms": rounded(self.percentile_ms(0.99)),
            "max_ms": rounded(max(self.latencies_ms, default=None)),
            "error_samples": self.error_samples,
        }


def percentile(sorted_values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) with linear interpolation between ranks; None without values."""
    if not sorted_values:
        return None
    rank = (len(sorted_values) - 1) * q
    low = int(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


def rounded(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """user + sys CPU seconds of process `pid`, all its threads (not its children)."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def metric_sum(text: str, name: str, label: str = "") -> float:
    """The sum of a metric's samples in Prometheus text (those whose labels contain
    `label`, e.g. 'direction="out"')."""
    pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", re.MULTILINE)
    return sum(float(value) for labels, value in pattern.findall(text) if label in labels)


def say(text: str = "", *, err: bool = False) -> None:
    """One line of a bench's output (stdout is its report; errors go to stderr)."""
    print(text, file=sys.stderr if err else sys.stdout, flush=True)


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def write_report(path: Path, figures: dict[str, Any]) -> bool:
    """The figures as JSON at `path`; False (said on stderr) when it cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(figures, indent=2) + "\n")
    except OSError as error:
        print(f"sfumesh bench: cannot write {path}: {error}", file=sys.stderr)
        return False
    print(f"written: {path}")
    return True


def plot(
    path: Path,
    title: str,
    grid: tuple[int, int],
    size: tuple[float, float],
    draw: Callable[[Any], None],
) -> bool:
    """A bench's PNG at `path`: `draw` fills the axes (matplotlib's rows x columns array,
    always 2-D), `title` goes above them. False (said on stderr) when matplotlib is missing
    or the file cannot be written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("sfumesh bench: matplotlib is not installed; no plot", err=True)
        return False
    fig, axes = plt.subplots(*grid, figsize=size, squeeze=False)
    try:
        draw(axes)
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path)
    except OSError as error:
        say(f"sfumesh bench: cannot write {path}: {error}", err=True)
        return False
    finally:
        plt.close(fig)
    say(f"written: {path}")
    return True


def print_phases(rows: list[tuple[int, Phase]]) -> None:
    """The table every bench prints: one line per (phase number, phase)."""
    header = f"{'phase':<48} {'ok':>7} {'errors':>7} {'per s':>9} {'p50 ms':>9} {'p99 ms':>9}"
    print(header)
    print("-" * len(header))
    for number, phase in rows:
        print(
            f"{number} {phase.label:<46} {phase.ok:>7} {phase.errors:>7} {phase.per_s:>9.1f} "
            f"{ms(phase.percentile_ms(0.50)):>9} {ms(phase.percentile_ms(0.99)):>9}"
        )


def print_errors(phases: list[Phase]) -> None:
    errors = sum(phase.errors for phase in phases)
    if not errors:
        print("errors: none")
        return
    print(f"ERRORS: {errors} failed requests")
    for phase in phases:
        for sample in phase.error_samples:
            print(f"  {phase.key}: {sample}")
