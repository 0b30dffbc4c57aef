"""Sessions across 3 real `sfumesh node` processes sharing one redis-server and the store."""

from __future__ import annotations

import asyncio
import json
import random
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from redis.asyncio import Redis

from node.config import new_key
from node.local.launch import LocalNode, start_nodes
from node.runtime.services import BackingServices
from node.state import keys
from node.state.sessions import Membership
from tests.conftest import suite_redis
from tests.node.live_client import Socket, User, create_room, sign_up

pytestmark = pytest.mark.slow

FAST_LIVENESS = {
    "SFUMESH_BCRYPT_COST": "4",
    "SFUMESH_NODE_TTL_S": "2",
    "SFUMESH_REAPER_PERIOD_S": "0.5",
    # Tests log in a hundred users at once from one address, and the refresh race reuses
    # one session for many quick marker chats.
    "SFUMESH_LOGIN_LIMIT_PER_ADDRESS": "100000",
    "SFUMESH_CHAT_PER_S": "100000",
}


def mesh_of(
    services: BackingServices,
    data_dir: Path,
    count: int = 3,
    extra_env: dict[str, str] | None = None,
) -> list[LocalNode]:
    env = {
        **FAST_LIVENESS,
        "SFUMESH_DATABASE": f"mesh_{secrets.token_hex(4)}",
        **(extra_env or {}),
    }
    return start_nodes(services, {"k1": new_key()}, count=count, data_dir=data_dir, extra_env=env)


@pytest.fixture(scope="module")
def mesh(backing: BackingServices, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    nodes = mesh_of(backing, tmp_path_factory.mktemp("mesh"))
    try:
        yield [node.url for node in nodes]
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


@pytest.fixture
async def state(backing: BackingServices) -> AsyncIterator[Redis]:
    # Not the `redis` fixture: that one empties Redis, and these nodes live in it.
    client = suite_redis(backing)
    yield client
    await client.aclose()


async def members_of(state: Redis, slug: str) -> list[Membership]:
    raw = await state.hgetall(keys.room_members(slug))
    return [Membership.decode(value) for value in raw.values()]


@pytest.mark.redis_paths
async def test_events_and_chat_cross_nodes_in_one_order(
    mesh: list[str], http: httpx.AsyncClient, state: Redis
) -> None:
    users = [await sign_up(http, mesh[0]) for _ in range(3)]
    await create_room(users[0], mesh[0], "cross")
    sockets: list[Socket] = []
    for index, user in enumerate(users):
        sock = await user.connect(mesh[index])
        # The HTTP join goes to another node than the one holding the WebSocket.
        await user.join(sock, "cross", mesh[(index + 1) % 3])
        sockets.append(sock)
    assert sorted(s.node for s in sockets) == ["node-1", "node-2", "node-3"]
    for sock in sockets:
        for other in sockets:
            if other is not sock and other.session_id not in {
                p["session_id"] for p in (await sock.wait_for("joined"))["participants"]
            }:
                await sock.wait_for("participant-joined", session_id=other.session_id)

    # Chats sent at once from all three nodes arrive in one order everywhere.
    await asyncio.gather(
        *(
            sock.request("chat", text=f"{index}-{n}")
            for n in range(5)
            for index, sock in enumerate(sockets)
        )
    )
    # Wait for every chat (the last one sent is not necessarily the last in room order).
    for sock in sockets:
        for index in range(len(sockets)):
            for n in range(5):
                await sock.wait_for("chat", text=f"{index}-{n}")
    orders = [[m["id"] for m in sock.messages if m["type"] == "chat"] for sock in sockets]
    assert len(orders[0]) == 15 and orders[0] == orders[1] == orders[2]

    assert (await sockets[1].request("leave"))["type"] == "ack"
    await sockets[0].close()
    for sock in (sockets[2],):
        left = await sock.wait_for("participant-left", session_id=sockets[1].session_id)
        assert left["reason"] == "leave"
        closed = await sock.wait_for("participant-left", session_id=sockets[0].session_id)
        assert closed["reason"] == "closed"
    assert [m.session_id for m in await members_of(state, "cross")] == [sockets[2].session_id]
    await sockets[2].close()


async def test_capacity_4_refresh_20_times_then_fifth_is_refused(
    mesh: list[str], http: httpx.AsyncClient, state: Redis
) -> None:
    users = [await sign_up(http, mesh[0]) for _ in range(5)]
    await create_room(users[0], mesh[0], "four", capacity=4)
    sockets = []
    for index, user in enumerate(users[:4]):
        sock = await user.connect(mesh[index % 3])
        await user.join(sock, "four", mesh[(index + 2) % 3])
        sockets.append(sock)
    refresher = users[3]
    current = sockets[3]
    for _ in range(20):
        node = random.choice(mesh)
        fresh = await refresher.connect(node)
        await refresher.join(fresh, "four", random.choice(mesh))
        await current.wait_for("session-replaced")
        current = fresh
    members = await members_of(state, "four")
    assert len({m.user_id for m in members}) == 4 and len(members) == 4
    assert current.session_id in {m.session_id for m in members}
    fifth = await users[4].connect(mesh[1])
    refused = await users[4].http_join(fifth, "four", mesh[2])
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "room_full"
    for sock in [*sockets[:3], current, fifth]:
        await sock.close()


@pytest.mark.redis_paths
async def test_100_users_at_once_into_capacity_8(
    mesh: list[str], http: httpx.AsyncClient, state: Redis
) -> None:
    users = await asyncio.gather(*(sign_up(http, mesh[i % 3]) for i in range(100)))
    await create_room(users[0], mesh[0], "rush", capacity=8)
    sockets = await asyncio.gather(*(u.connect(mesh[i % 3]) for i, u in enumerate(users)))
    replies = await asyncio.gather(
        *(
            u.http_join(s, "rush", mesh[(i + 1) % 3])
            for i, (u, s) in enumerate(zip(users, sockets, strict=True))
        )
    )
    statuses = [reply.status_code for reply in replies]
    assert statuses.count(200) == 8 and statuses.count(409) == 92, statuses
    assert {reply.json()["error"]["code"] for reply in replies if reply.status_code == 409} == {
        "room_full"
    }
    admitted = [s for s, reply in zip(sockets, replies, strict=True) if reply.status_code == 200]
    acks = await asyncio.gather(
        *(
            s.request("join", room_token=r.json()["room_token"])
            for s, r in zip(sockets, replies, strict=True)
            if r.status_code == 200
        )
    )
    assert all(ack["type"] == "ack" for ack in acks)
    members = await members_of(state, "rush")
    assert sorted(m.session_id for m in members) == sorted(s.session_id for s in admitted)
    assert len({m.user_id for m in members}) == 8 and all(m.state == "active" for m in members)
    room = (await http.get(f"{mesh[2]}/api/rooms/rush")).json()
    assert room["occupancy"] == {"people": 8, "sessions": 8}
    await asyncio.gather(*(s.close() for s in sockets))


class PresenceModel:
    """What one observer believes about who is in the room, from its messages alone."""

    def __init__(self) -> None:
        self.sessions: dict[str, str] = {}  # session -> user

    def apply(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "joined":
            self.sessions = {p["session_id"]: p["user_id"] for p in message["participants"]}
        elif kind == "participant-joined":
            participant = message["participant"]
            self.sessions[participant["session_id"]] = participant["user_id"]
        elif kind in ("participant-left", "participant-replaced"):
            self.sessions.pop(message["session_id"], None)

    def of_user(self, user_id: str) -> set[str]:
        return {s for s, u in self.sessions.items() if u == user_id}


async def _refresh_once(user: User, old: Socket, mesh: list[str], slug: str) -> Socket:
    """The browser refresh: the old page leaves and/or closes while the new one joins."""
    same_session = random.random() < 0.3
    old_action = random.choice(["leave-and-close", "close", "close-late"])

    async def old_page() -> None:
        await asyncio.sleep(random.uniform(0, 0.03))
        try:
            if old_action == "leave-and-close":
                await old.ws.send(json.dumps({"type": "leave"}))
            if old_action == "close-late":
                await asyncio.sleep(random.uniform(0.02, 0.06))
            await old.close()
        except (OSError, websockets.exceptions.WebSocketException):
            pass  # the server may have closed it first (replaced)

    async def new_page() -> Socket:
        await asyncio.sleep(random.uniform(0, 0.03))
        fresh = await user.connect(random.choice(mesh), old.session_token if same_session else None)
        await user.join(fresh, slug, random.choice(mesh))
        return fresh

    _, fresh = await asyncio.gather(old_page(), new_page())
    return fresh


@pytest.mark.redis_paths
async def test_refresh_race_never_loses_the_new_session(
    mesh: list[str], http: httpx.AsyncClient, state: Redis
) -> None:
    """>= 500 refreshes with random timing; after each, the room holds exactly the new
    session and an observer on another node sees the user present."""
    users = [await sign_up(http, mesh[i % 3]) for i in range(5)]
    owner = users[0]
    await create_room(owner, mesh[0], "refresh", capacity=8)
    observer_user = await sign_up(http, mesh[0])
    observer = await observer_user.connect(mesh[2])
    await observer_user.join(observer, "refresh", mesh[1])
    current = {}
    for index, user in enumerate(users):
        sock = await user.connect(mesh[index % 3])
        await user.join(sock, "refresh", mesh[(index + 1) % 3])
        current[user.user_id] = sock

    async def refresher(user: User, rounds: int) -> None:
        for round_ in range(rounds):
            fresh = await _refresh_once(user, current[user.user_id], mesh, "refresh")
            current[user.user_id] = fresh
            # Room order: once the observer sees this marker, it has seen everything before.
            marker = f"{user.username}:{round_}"
            ack = await fresh.request("chat", text=marker)
            assert ack["type"] == "ack", (ack, round_, user.username)
            await observer.wait_for("chat", text=marker)
            model = PresenceModel()
            for message in list(observer.messages):
                model.apply(message)
            assert model.of_user(user.user_id) == {fresh.session_id}, (round_, user.username)
            mine = [m for m in await members_of(state, "refresh") if m.user_id == user.user_id]
            assert [(m.session_id, m.state) for m in mine] == [(fresh.session_id, "active")]

    # Chat is limited per session per second; fresh sessions each round keep under it.
    await asyncio.gather(*(refresher(user, 100) for user in users))
    members = await members_of(state, "refresh")
    assert sorted(m.session_id for m in members) == sorted(
        [observer.session_id, *(s.session_id for s in current.values())]
    )
    await asyncio.gather(observer.close(), *(s.close() for s in current.values()))


@pytest.mark.redis_paths
async def test_joining_mid_flood_misses_nothing(
    mesh: list[str], http: httpx.AsyncClient, state: Redis
) -> None:
    """A session joining a busy room on a node that already reads that room gets every
    event after its `joined` snapshot exactly once: no gap, no repeat."""
    users = [await sign_up(http, mesh[0]) for _ in range(6)]
    talker_users, resident_user, joiner_user = users[:4], users[4], users[5]
    await create_room(users[0], mesh[0], "flood")
    talkers = []
    for index, user in enumerate(talker_users):
        sock = await user.connect(mesh[index % 3])
        await user.join(sock, "flood", mesh[0])
        talkers.append(sock)
    resident = await resident_user.connect(mesh[1])  # node-2 already reads the room
    await resident_user.join(resident, "flood", mesh[1])
    for round_ in range(12):
        stop = asyncio.Event()
        sent: list[str] = []

        async def flood(
            talker: Socket, tag: str, stop: asyncio.Event = stop, sent: list[str] = sent
        ) -> None:
            count = 0
            while not stop.is_set():
                text = f"{tag}:{count}"
                ack = await talker.request("chat", text=text)
                assert ack["type"] == "ack", ack
                sent.append(text)
                count += 1
                await asyncio.sleep(0.025)  # under the 50 frames/s a connection may send

        flooding = [asyncio.create_task(flood(t, f"{round_}.{i}")) for i, t in enumerate(talkers)]
        await asyncio.sleep(random.uniform(0.01, 0.05))
        joiner = await joiner_user.connect(mesh[1])
        await joiner_user.join(joiner, "flood", mesh[2])
        await asyncio.sleep(random.uniform(0.05, 0.1))
        stop.set()
        await asyncio.gather(*flooding)
        # The resident saw every chat of the round, in room order; the joiner must have
        # exactly the tail of that order from some point on: no gap, no repeat.
        for text in sent:
            await resident.wait_for("chat", text=text)
        texts = set(sent)
        room_order = [
            m["id"] for m in resident.messages if m["type"] == "chat" and m["text"] in texts
        ]
        await joiner.wait_for("chat", id=room_order[-1])
        got = [m["id"] for m in joiner.messages if m["type"] == "chat" and m["text"] in texts]
        assert got and got == room_order[len(room_order) - len(got) :], round_
        await joiner.close()
    for sock in [*talkers, resident]:
        await sock.close()
