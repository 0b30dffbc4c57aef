"""Reminders across real node processes (issue 16, R8 item 4): one node is killed (SIGKILL)
right at the due second and started again, round after round; every reminder reaches the
room exactly once, none twice, none lost."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from node.local.launch import LocalNode
from node.state import keys
from node.store.happenings import reminder_id

pytestmark = pytest.mark.slow

FAST = {"SFUMESH_REMINDER_LEASE_S": "1", "SFUMESH_REMINDER_POLL_S": "0.05"}
PASSWORD = "correct horse battery"


async def reminder_events(redis: Redis, room: str) -> Counter[str]:
    entries: Any = await redis.xrange(keys.room_events(room))
    counts: Counter[str] = Counter()
    for _, fields in entries:
        data = json.loads(fields[b"data"])
        if fields[b"type"] == b"chat" and "reminder" in data:
            counts[data["reminder"]["id"]] += 1
    return counts


async def owner_session(http: httpx.AsyncClient, room: str) -> dict[str, str]:
    body = {"username": "planner", "email": "p@example.org", "password": PASSWORD}
    assert (await http.post("/api/users", json={**body, "display_name": "P"})).status_code == 201
    login = await http.post("/api/auth/login", json={"login": "planner", "password": PASSWORD})
    user = {"Authorization": f"Bearer {login.json()['user_token']}"}
    assert (await http.post("/api/rooms", json={"slug": room}, headers=user)).status_code == 201
    session = (await http.post("/api/sessions", headers=user)).json()["session_token"]
    return {"Authorization": f"Bearer {session}"}


def kill(node: LocalNode) -> None:
    pid = node.process.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    if node.process.popen is not None:
        node.process.popen.wait(10)


async def test_reminders_once_with_a_node_killed_at_the_due_second(
    node_processes: Callable[..., LocalNode], redis: Redis
) -> None:
    nodes = [node_processes(f"node-{i}", extra_env=FAST) for i in range(1, 4)]
    expected: list[str] = []
    async with httpx.AsyncClient(base_url=nodes[0].url, timeout=30) as http:
        auth = await owner_session(http, "picnic")
        for round_ in range(3):
            due = datetime.now(UTC) + timedelta(seconds=2)
            for index in range(8):
                # spread over the second around the kill: before, at and after it
                start = due + timedelta(milliseconds=150 * index - 500)
                response = await http.post(
                    "/api/rooms/picnic/happenings",
                    json={"title": f"r{round_}-{index}", "start": start.isoformat(), "zone": "UTC"},
                    headers=auth,
                )
                assert response.status_code == 201, response.text
                expected.append(reminder_id(response.json()["id"], "start", start))
            await asyncio.sleep(max(0.0, (due - datetime.now(UTC)).total_seconds()))
            victim = 1 + round_ % 2  # node-2, node-3, node-2: never the one we talk to
            kill(nodes[victim])
            nodes[victim] = node_processes(f"node-{victim + 1}", extra_env=FAST)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if await redis.zcard(keys.REMINDERS_DUE) + await redis.zcard(keys.REMINDERS_CLAIMED) == 0:
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.5)  # a lease's length: a duplicate would show by now
    sent = await reminder_events(redis, "picnic")
    assert sorted(sent) == sorted(expected), "missed"
    assert set(sent.values()) == {1}, "doubled"
