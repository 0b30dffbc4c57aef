"""node/bench/harness.py: a bounded step that hangs says where it waits, then fails."""

from __future__ import annotations

import asyncio
import logging

import pytest

from node.bench.harness import within


async def test_a_step_past_its_bound_logs_where_it_waits_and_fails(
    caplog: pytest.LogCaptureFixture,
) -> None:
    never = asyncio.Event()
    cancelled = asyncio.Event()

    async def stuck_deep_inside() -> None:
        try:
            await never.wait()
        finally:
            cancelled.set()

    async def step() -> int:
        await stuck_deep_inside()
        return 1

    assert await within(asyncio.sleep(0, result=7), 5.0, "quick") == 7
    with caplog.at_level(logging.ERROR), pytest.raises(TimeoutError, match="hung step"):
        await within(step(), 0.2, "hung step")
    assert cancelled.is_set()  # the step was cancelled, not left running
    [record] = [r for r in caplog.records if r.getMessage() == "bench.stuck"]
    assert record.step == "hung step"  # type: ignore[attr-defined]
    # the step's whole chain of awaits, down to the one it hangs in
    [where] = [t for t in record.tasks if " step > " in t]  # type: ignore[attr-defined]
    chain = [link.rsplit(" ", 1)[1] for link in where.split(" > ")]
    assert chain == ["step", "stuck_deep_inside", "wait"], where
