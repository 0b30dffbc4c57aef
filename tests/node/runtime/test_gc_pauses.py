"""The collector's pauses are measured and exported; a node freezes its start-up state
(`node.runtime.gc_pauses`, issue 18)."""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import Callable

import httpx
import pytest

from node.bench.report import metric_sum
from node.local.launch import LocalNode
from node.runtime.gc_pauses import GcCollector, GcPauses, gc_pauses


def test_each_collection_is_timed_by_generation() -> None:
    pauses = GcPauses()
    gc.callbacks.append(pauses)
    try:
        gc.collect(2)
        gc.collect(0)
    finally:
        gc.callbacks.remove(pauses)
    assert pauses.collections[2] >= 1 and pauses.collections[0] >= 1
    assert pauses.seconds[2] > 0 and 0 < pauses.max_s[2] <= pauses.seconds[2]
    families = {family.name: family for family in GcCollector(pauses).collect()}
    assert set(families) == {
        "sfumesh_gc_collections",
        "sfumesh_gc_pause_seconds",
        "sfumesh_gc_pause_max_seconds",
    }
    by_generation = {
        sample.labels["generation"]: sample.value
        for sample in families["sfumesh_gc_collections"].samples
    }
    assert by_generation["2"] == pauses.collections[2]


def test_the_process_has_one_watcher() -> None:
    assert gc_pauses() is gc_pauses()
    assert sum(1 for callback in gc.callbacks if isinstance(callback, GcPauses)) == 1


@pytest.mark.slow
async def test_a_node_freezes_its_start_up_and_exports_its_pauses(
    node_processes: Callable[..., LocalNode],
) -> None:
    node = await asyncio.to_thread(node_processes)
    async with httpx.AsyncClient(timeout=10) as http:
        text = (await http.get(f"{node.url}/metrics")).text
    # the freeze's own collection at least, counted in generation 2
    assert metric_sum(text, "sfumesh_gc_collections_total", 'generation="2"') >= 1
    assert metric_sum(text, "sfumesh_gc_pause_max_seconds", 'generation="2"') > 0
    frozen = [
        json.loads(line)
        for line in node.process.log_path.read_text().splitlines()
        if '"node.gc_frozen"' in line
    ]
    # aiortc, PyAV, Quart, pydantic ...: far more objects than the node makes per call
    assert len(frozen) == 1 and frozen[0]["objects"] > 50_000, frozen


@pytest.mark.slow
async def test_a_node_told_not_to_freeze_does_not(
    node_processes: Callable[..., LocalNode],
) -> None:
    node = await asyncio.to_thread(node_processes, extra_env={"SFUMESH_GC_FREEZE": "0"})
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.get(f"{node.url}/api/ping")).status_code == 200
    assert '"node.gc_frozen"' not in node.process.log_path.read_text()
