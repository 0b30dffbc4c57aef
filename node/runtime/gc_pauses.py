"""The garbage collector's pauses: measured per generation, exported, and kept short.

Why (issue 18): in `bench scale` a node failed the latency bound (p99 over 50 ms) with its
core only 64% busy. CPython's cyclic collector stops the event loop while it runs, and a
full (generation 2) collection walks every tracked object of the process: the imported
libraries (aiortc, PyAV, Quart, pydantic, Beanie ...) and the start-up's own structures
alike, hundreds of thousands of objects that never become garbage. Every forwarded packet
waits out such a pause.

* `GcPauses` times each collection from `gc.callbacks` (no locks taken in the callback:
  the collector may run inside any allocation, including one holding a metrics lock) and
  `GcCollector` exports them: `sfumesh_gc_collections_total`,
  `sfumesh_gc_pause_seconds_total`, `sfumesh_gc_pause_max_seconds`, by generation.
* `freeze_after_start` (called once the node is ready, in the node process only) moves every
  object alive then out of the collector's reach (`gc.freeze`, what the CPython docs advise
  for long-lived servers' start-up state): later full collections walk only what the node
  made since. Frozen objects are never collected, so it runs once, after start-up.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

GENERATIONS = (0, 1, 2)


class GcPauses:
    """Collections and their pauses per generation, since installed."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self.max_s = [0.0, 0.0, 0.0]
        self._started: float | None = None

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        started, self._started = self._started, None
        if started is None:
            return
        generation = int(info.get("generation", 0))
        if generation not in GENERATIONS:
            return
        pause = time.perf_counter() - started
        self.collections[generation] += 1
        self.seconds[generation] += pause
        if pause > self.max_s[generation]:
            self.max_s[generation] = pause


_installed: GcPauses | None = None


def gc_pauses() -> GcPauses:
    """The process's one `GcPauses`, installed in `gc.callbacks` on first use."""
    global _installed
    if _installed is None:
        _installed = GcPauses()
        gc.callbacks.append(_installed)
    return _installed


class GcCollector(Collector):
    """The collector's pauses for /metrics, read when scraped."""

    def __init__(self, pauses: GcPauses) -> None:
        self.pauses = pauses

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        pauses = self.pauses
        collections = CounterMetricFamily(
            "sfumesh_gc_collections",
            "Cyclic garbage collections of this node's process, by generation",
            labels=["generation"],
        )
        seconds = CounterMetricFamily(
            "sfumesh_gc_pause_seconds",
            "Time the event loop stood still in cyclic garbage collections, by generation",
            labels=["generation"],
        )
        longest = GaugeMetricFamily(
            "sfumesh_gc_pause_max_seconds",
            "The longest cyclic garbage collection so far, by generation",
            labels=["generation"],
        )
        for generation in GENERATIONS:
            label = [str(generation)]
            collections.add_metric(label, pauses.collections[generation])
            seconds.add_metric(label, pauses.seconds[generation])
            longest.add_metric(label, pauses.max_s[generation])
        yield from (collections, seconds, longest)


def freeze_after_start() -> int:
    """Collect once, then freeze what is alive (see the module docstring). Returns how many
    objects the collector no longer walks."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info(
        "node.gc_frozen",
        extra={"objects": frozen, "ms": round((time.perf_counter() - started) * 1000, 1)},
    )
    return frozen
