"""`sfumesh bench forward --plot FILE`: the windows and their fits as one PNG.

What the bench's figures are made of, for a reader: each SFU's CPU in every fan-out window
against the packets it forwarded per second, and the line fitted through them (its slope is
the marginal CPU per forwarded packet, the figure the table quotes). Systems whose
subscribers take different layers (simulcast) sit on the same axes, so a sparser stream's
steeper line shows as such. Ingest windows, when there are any, get a panel of their own:
CPU against the packets passing through the SFU.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from node.bench.forward.run import Window, packet_fit
from node.bench.report import plot as report_plot


def write_plot(path: Path, windows: Sequence[Window]) -> bool:
    """Draw the windows that kept up (points) and each system's fit (a line) to `path`;
    False (said on stderr) when it cannot be written."""
    kinds = [kind for kind in ("fanout", "ingest") if any(w.kind == kind for w in windows)]
    kinds = kinds or ["fanout"]

    def draw(axes: Any) -> None:
        for axis, kind in zip(axes[0], kinds, strict=True):
            _panel(axis, kind, windows)

    return report_plot(
        path,
        "sfumesh bench forward: SFU CPU against packets (the slope: CPU per packet)",
        (1, len(kinds)),
        (7.0 * len(kinds), 5.0),
        draw,
    )


def _panel(axis: Any, kind: str, windows: Sequence[Window]) -> None:
    used = [w for w in windows if w.kind == kind and w.kept_up]
    for system in sorted({w.system for w in used}):
        mine = [w for w in used if w.system == system]
        xs = [w.packets_per_s for w in mine]
        fit = packet_fit(windows, system, kind)
        label = system if fit is None else f"{system}: {fit.slope:.1f} us/packet"
        points = axis.plot(xs, [w.cpu_pct for w in mine], "o", label=label, alpha=0.8)
        if fit is not None:
            ends = [0.0, max(xs)]
            line = [(fit.intercept + fit.slope * x) / 1e4 for x in ends]  # us/s -> % of a core
            axis.plot(ends, line, "-", color=points[0].get_color(), linewidth=1)
    axis.set_xlabel(
        "packets forwarded per second (all subscribers)"
        if kind == "fanout"
        else "packets per second through the SFU (P publishers, one subscriber each)"
    )
    axis.set_ylabel("SFU CPU, % of one core")
    axis.set_title("fan-out: one publisher, K subscribers" if kind == "fanout" else "ingest")
    axis.set_xlim(left=0)
    axis.set_ylim(bottom=0)
    axis.grid(alpha=0.3)
    if used:
        axis.legend(fontsize=8)
