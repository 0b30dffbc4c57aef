"""Happening reminders are sent exactly once (issue 16, R8 item 4), whoever dies when.

Two reminder loops over one real Redis and store stand for two nodes; each step a node takes
(claim, write the message, publish it, acknowledge) is run by hand, and the node "dies"
between any two of them. The other one must then send it, once.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from quart.typing import TestAppProtocol as RunningApp
from redis.asyncio import Redis

from node.runtime.happenings import ReminderLoop
from node.runtime.live import Live
from node.state import keys
from node.store.happenings import reminder_id, reminder_message_id
from node.store.models import Message
from node.web.context import EXTENSION
from node.web.happenings import REMINDERS_EXTENSION
from tests.conftest import Api, bearer

# Redis paths: ./scripts/test runs these on a Redis Cluster too (SFUMESH_TEST_REDIS=cluster).
pytestmark = pytest.mark.redis_paths

LEASE_MS = 400


async def sent_events(redis: Redis, room: str = "lobby") -> list[dict[str, Any]]:
    entries: Any = await redis.xrange(keys.room_events(room))
    events = [(f[b"type"].decode(), json.loads(f[b"data"])) for _, f in entries]
    return [data for kind, data in events if kind == "chat" and "reminder" in data]


class Scene:
    def __init__(self, app: RunningApp, api: Api, token: str) -> None:
        self.app = app
        self.api = api
        self.token = token
        self.live: Live = app.app.extensions[EXTENSION].live  # type: ignore[attr-defined]

    def node(self) -> ReminderLoop:
        return ReminderLoop(self.live)

    async def plan(self, in_s: float, at: datetime | None = None, **fields: Any) -> tuple[str, str]:
        """A happening starting `in_s` from now (or `at`); its id and its start reminder."""
        start = at or datetime.now(UTC) + timedelta(seconds=in_s)
        response = await self.api.client.post(
            "/api/rooms/lobby/happenings",
            json={"title": "Picnic", "start": start.isoformat(), "zone": "UTC", **fields},
            headers=bearer(self.token),
        )
        assert response.status_code == 201, await response.get_data(as_text=True)
        happening = await response.get_json()
        return happening["id"], reminder_id(happening["id"], "start", start)


@pytest.fixture
async def scene(make_app: Any) -> Scene:
    app = await make_app(**{"happenings.reminder_lease_s": LEASE_MS / 1000})
    # The app's own loop would take the reminders these tests hand out step by step.
    await app.app.extensions.pop(REMINDERS_EXTENSION).stop()
    api = Api(app.test_client())
    user = await api.user_token("alice")
    await api.create_room(user, "lobby")
    return Scene(app, api, await api.session_token(user))


async def claim_when_due(node: ReminderLoop, member: str) -> int:
    for _ in range(100):
        now, claimed = await node.reminders.claim(LEASE_MS)
        if claimed:
            assert [m for m, _ in claimed] == [member]
            return now
        await asyncio.sleep(0.05)
    raise AssertionError("never due")


async def test_a_node_dying_after_its_claim_is_taken_over(scene: Scene, redis: Redis) -> None:
    _, member = await scene.plan(0.2)
    first, second = scene.node(), scene.node()
    await claim_when_due(first, member)  # ... and dies here
    assert (await second.reminders.claim(LEASE_MS))[1] == []  # its lease still holds
    now = await claim_when_due(second, member)
    await second.send(member, now)
    assert [e["reminder"]["id"] for e in await sent_events(redis)] == [member]
    assert await second.reminders.pending() == 0


async def test_dying_after_the_write_or_the_publish_sends_it_once(
    scene: Scene, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    for step in ("publish_once", "done"):
        await redis.delete(keys.room_events("lobby"))
        _, member = await scene.plan(0.2)
        dying, other = scene.node(), scene.node()
        now = await claim_when_due(dying, member)

        async def die(*args: Any, **kwargs: Any) -> Any:
            raise ConnectionError("the node died")

        with monkeypatch.context() as patch:
            patch.setattr(dying.reminders, step, die)
            with pytest.raises(ConnectionError):
                await dying.send(member, now)
        now = await claim_when_due(other, member)
        await other.send(member, now)
        events = await sent_events(redis)
        assert [e["reminder"]["id"] for e in events] == [member], step
        assert events[0]["id"] == str(reminder_message_id(member))
        # (the embedded store cannot count by _id: the room's messages, then by id)
        stored = await Message.find(Message.room == "lobby").to_list()
        reminders = [m for m in stored if m.text.startswith("⏰")]
        assert [m.id for m in reminders].count(reminder_message_id(member)) == 1
        assert await other.reminders.pending() == 0


async def test_racing_nodes_claim_each_reminder_once(scene: Scene, redis: Redis) -> None:
    at = datetime.now(UTC) + timedelta(seconds=4)
    members = [(await scene.plan(0, at=at))[1] for _ in range(20)]
    nodes = [scene.node() for _ in range(4)]
    await asyncio.sleep((at - datetime.now(UTC)).total_seconds() + 0.1)
    claims = await asyncio.gather(*(node.reminders.claim(LEASE_MS, limit=7) for node in nodes))
    claimed = [member for _, got in claims for member, _ in got]
    assert sorted(claimed) == sorted(members)  # each once, none left out


async def test_moved_and_cancelled_happenings_keep_no_old_reminder(
    scene: Scene, redis: Redis
) -> None:
    node = scene.node()
    node.start()
    try:
        moved, old = await scene.plan(0.5)
        later = (datetime.now(UTC) + timedelta(seconds=1.2)).isoformat()
        response = await scene.api.client.patch(
            f"/api/happenings/{moved}", json={"start": later}, headers=bearer(scene.token)
        )
        assert response.status_code == 200
        cancelled, _ = await scene.plan(0.5)
        response = await scene.api.client.delete(
            f"/api/happenings/{cancelled}", headers=bearer(scene.token)
        )
        assert response.status_code == 200
        for _ in range(60):
            if await node.reminders.pending() == 0:
                break
            await asyncio.sleep(0.05)
        events = await sent_events(redis)
        assert [e["happening"] for e in events] == [moved]
        assert events[0]["reminder"]["id"] != old
    finally:
        await node.stop()


async def test_a_late_reminder_of_a_happening_planned_soon_is_not_sent(
    make_app: Any, redis: Redis
) -> None:
    """Planned 10 minutes ahead with a 1 h lead: no "in 1 h" reminder, the start one only."""
    app = await make_app()
    api = Api(app.test_client())
    user = await api.user_token("alice")
    await api.create_room(user, "lobby")
    token = await api.session_token(user)
    start = datetime.now(UTC) + timedelta(minutes=10)
    response = await api.client.post(
        "/api/rooms/lobby/happenings",
        json={"title": "Soon", "start": start.isoformat(), "zone": "UTC"},
        headers=bearer(token),
    )
    assert response.status_code == 201
    due: Any = await redis.zrange(keys.REMINDERS_DUE, 0, -1)
    assert [member.decode().split("|")[1] for member in due] == ["start"]


async def test_a_stopping_node_hands_its_claims_back(scene: Scene, redis: Redis) -> None:
    """A graceful stop (a restart) hands back what it holds: no lease to wait out."""
    _, member = await scene.plan(0.2)
    stopping, other = scene.node(), scene.node()
    await claim_when_due(stopping, member)
    stopping._held.add(member)  # as its loop does, cut short before sending
    await stopping.stop()
    now, claimed = await other.reminders.claim(60_000)
    assert [m for m, _ in claimed] == [member]
    await other.send(member, now)
    assert [e["reminder"]["id"] for e in await sent_events(redis)] == [member]


async def test_reminders_lost_with_redis_are_restored_from_the_store(
    scene: Scene, redis: Redis
) -> None:
    node = scene.node()
    _, sent_member = await scene.plan(0.2)
    now = await claim_when_due(node, sent_member)
    await node.send(sent_member, now)
    later, later_member = await scene.plan(120)  # lead reminder already past: start only
    far, _ = await scene.plan(7200)  # both: the lead one and the start one
    cancelled, _ = await scene.plan(7200)
    await scene.api.client.delete(f"/api/happenings/{cancelled}", headers=bearer(scene.token))
    before: Any = await redis.zrange(keys.REMINDERS_DUE, 0, -1, withscores=True)
    await redis.delete(keys.REMINDERS_DUE, keys.REMINDERS_CLAIMED)  # Redis lost its data

    assert await node.reconcile() == 3
    after: Any = await redis.zrange(keys.REMINDERS_DUE, 0, -1, withscores=True)
    assert sorted(after) == sorted(before)
    assert {m.decode().split("|")[0] for m, _ in after} == {later, far}
    assert later_member.encode() in {m for m, _ in after}
    assert await node.reconcile() == 0  # nothing twice
    assert [e["reminder"]["id"] for e in await sent_events(redis)] == [sent_member]
