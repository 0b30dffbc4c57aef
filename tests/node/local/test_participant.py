"""Issue 22, item 4: the shared participant (`node.local.participant`) keeps its socket alive.

A bench or test client that runs longer than the node's `ws_idle_timeout_s` was dropped as
idle: it never sent `ping` (the web client pings every 20 s). Here the idle timeout is 1 s
and the participant pings every 0.25 s; one socket that never pings shows the node's side.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import pytest

from node.local.launch import LocalNode
from node.local.participant import open_socket
from tests.node.live_client import sign_up


@pytest.mark.slow
async def test_a_pinging_participant_outlives_the_idle_timeout(
    node_processes: Callable[..., LocalNode],
) -> None:
    node = node_processes(extra_env={"SFUMESH_WS_IDLE_TIMEOUT_S": "1.0"})
    async with httpx.AsyncClient(timeout=30) as http:
        user = await sign_up(http, node.url)
        pinging = await open_socket(node.url, await user.new_session(node.url), 0.25)
        silent = await open_socket(node.url, await user.new_session(node.url), None)
        try:
            await asyncio.sleep(3.0)  # three idle timeouts
            assert silent.closed
            assert any(m.get("code") == "idle_timeout" for m in silent.messages), silent.messages
            assert not pinging.closed, pinging.messages[-3:]
            pongs = sum(1 for m in pinging.messages if m.get("type") == "pong")
            assert pinging.pings >= 8 and pongs >= 8, (pinging.pings, pongs)
            assert not any(m.get("type") == "error" for m in pinging.messages)
        finally:
            await pinging.close()
            await silent.close()
