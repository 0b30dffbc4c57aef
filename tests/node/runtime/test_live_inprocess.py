"""Sessions on one in-process node: hello, two-step join, chat, leave, replacement."""

from __future__ import annotations

import asyncio
import json
from contextlib import AsyncExitStack
from typing import Any

import pytest

from node.state import keys
from node.store.models import Message
from tests.conftest import Api, bearer

# Redis paths: ./scripts/test runs these on a Redis Cluster too (SFUMESH_TEST_REDIS=cluster).
pytestmark = pytest.mark.redis_paths

TIMEOUT = 5.0


class Peer:
    def __init__(self, api: Api, ws: Any, session_token: str) -> None:
        self.api = api
        self.ws = ws
        self.session_token = session_token
        self.seen: list[dict[str, Any]] = []
        self._next_id = 0
        self.session_id = ""

    async def next(self, type_: str, session_id: str | None = None) -> dict[str, Any]:
        """The first message of this type (about this session, if given), seen or coming."""

        def matches(message: dict[str, Any]) -> bool:
            about = message.get("participant", message).get("session_id")
            return message["type"] == type_ and session_id in (None, about)

        for message in self.seen:
            if matches(message):
                self.seen.remove(message)
                return message
        while True:
            received: dict[str, Any] = json.loads(
                await asyncio.wait_for(self.ws.receive(), TIMEOUT)
            )
            if matches(received):
                return received
            self.seen.append(received)

    async def request(self, type_: str, **fields: Any) -> dict[str, Any]:
        self._next_id += 1
        frame_id = f"r{self._next_id}"
        await self.ws.send(json.dumps({"type": type_, "id": frame_id, **fields}))
        while True:
            message: dict[str, Any] = json.loads(await asyncio.wait_for(self.ws.receive(), TIMEOUT))
            if message.get("id") == frame_id:
                return message
            self.seen.append(message)

    async def http_join(self, slug: str) -> Any:
        return await self.api.client.post(
            f"/api/rooms/{slug}/join", headers=bearer(self.session_token)
        )

    async def join(self, slug: str) -> dict[str, Any]:
        response = await self.http_join(slug)
        assert response.status_code == 200, await response.get_data(as_text=True)
        grant = await response.get_json()
        ack = await self.request("join", room_token=grant["room_token"])
        assert ack["type"] == "ack", ack
        return await self.next("joined")


async def connect(stack: AsyncExitStack, api: Api, session_token: str) -> Peer:
    context: Any = api.client.websocket(f"/ws?session_token={session_token}")
    ws = await stack.enter_async_context(context)
    peer = Peer(api, ws, session_token)
    hello = await peer.next("hello")
    assert hello["node"] == "node-1"
    peer.session_id = hello["session_id"]
    return peer


@pytest.fixture
async def room_and_tokens(api: Api) -> tuple[str, list[str], str]:
    owner = await api.user_token("owner")
    await api.create_room(owner, "lobby", capacity=3)
    users = [owner] + [await api.user_token(f"user{i}") for i in range(4)]
    return "lobby", users, owner


async def test_join_chat_leave_between_two_sessions(api: Api, redis: Any) -> None:
    alice = await api.user_token("alice")
    bob = await api.user_token("bob")
    await api.create_room(alice, "lobby")
    async with AsyncExitStack() as stack:
        a = await connect(stack, api, await api.session_token(alice))
        b = await connect(stack, api, await api.session_token(bob))
        joined = await a.join("lobby")
        assert [p["display_name"] for p in joined["participants"]] == ["Alice"]
        joined = await b.join("lobby")
        assert sorted(p["display_name"] for p in joined["participants"]) == ["Alice", "Bob"]
        arrival = await a.next("participant-joined")
        assert arrival["participant"]["display_name"] == "Bob"

        ack = await b.request("chat", text="hi alice")
        assert ack["type"] == "ack"
        for peer in (a, b):
            chat = await peer.next("chat")
            assert chat["text"] == "hi alice" and chat["from"]["display_name"] == "Bob"
            assert chat["id"] == ack["message_id"]
        assert await Message.find_all().count() == 1

        room = await (await api.client.get("/api/rooms/lobby")).get_json()
        assert room["occupancy"] == {"people": 2, "sessions": 2}
        assert (await b.request("leave"))["type"] == "ack"
        left = await a.next("participant-left")
        assert left["reason"] == "leave" and left["user_id"] == joined["self"]["user_id"]
        room = await (await api.client.get("/api/rooms/lobby")).get_json()
        assert room["occupancy"] == {"people": 1, "sessions": 1}


async def test_join_before_websocket_is_409(api: Api) -> None:
    alice = await api.user_token("alice")
    await api.create_room(alice, "lobby")
    session = await api.session_token(alice)
    response = await api.client.post("/api/rooms/lobby/join", headers=bearer(session))
    assert response.status_code == 409
    assert (await response.get_json())["error"]["code"] == "not_connected"


async def test_capacity_counts_people_and_refresh_gets_back_in(
    api: Api, room_and_tokens: tuple[str, list[str], str]
) -> None:
    slug, users, _ = room_and_tokens
    async with AsyncExitStack() as stack:
        peers = [await connect(stack, api, await api.session_token(u)) for u in users[:3]]
        for peer in peers:
            await peer.join(slug)
        # A fourth person is refused: capacity 3.
        fourth = await connect(stack, api, await api.session_token(users[3]))
        response = await fourth.http_join(slug)
        assert response.status_code == 409
        assert (await response.get_json())["error"]["code"] == "room_full"
        # The third user "refreshes": a new session of the same user gets back in, and
        # replaces the old one (policy "replace"), which is told and closed.
        again = await connect(stack, api, await api.session_token(users[2]))
        await again.join(slug)
        replaced = await peers[2].next("session-replaced")
        assert replaced["session_id"] == peers[2].session_id
        note = await peers[0].next("participant-replaced")
        assert (note["session_id"], note["by_session_id"]) == (
            peers[2].session_id,
            again.session_id,
        )
        arrival = await peers[0].next("participant-joined", again.session_id)
        assert arrival["participant"]["session_id"] == again.session_id
        assert arrival["participant"]["user_id"] == note["user_id"]
        room = await (await api.client.get(f"/api/rooms/{slug}")).get_json()
        assert room["occupancy"] == {"people": 3, "sessions": 3}
        # Nobody was reported gone: the replaced user never produced participant-left.
        assert not [m for m in peers[0].seen + peers[1].seen if m["type"] == "participant-left"]
    # Everyone has gone: the room is empty, exactly once each.
    await asyncio.sleep(0.2)
    room = await (await api.client.get(f"/api/rooms/{slug}")).get_json()
    assert room["occupancy"] == {"people": 0, "sessions": 0}


async def test_bad_frames_get_errors_and_change_nothing(api: Api, redis: Any) -> None:
    alice = await api.user_token("alice")
    await api.create_room(alice, "lobby")
    async with AsyncExitStack() as stack:
        a = await connect(stack, api, await api.session_token(alice))
        frames = {
            "not json": "bad_frame",
            "[1]": "bad_frame",
            json.dumps({"type": "ping", "id": ["x"]}): "bad_frame",
            json.dumps({"type": 5}): "unknown_type",
            json.dumps({"no": "type"}): "unknown_type",
        }
        for frame, code in frames.items():
            await a.ws.send(frame)
            assert (await a.next("error"))["code"] == code, frame
        assert (await a.request("dance"))["code"] == "unknown_type"
        assert (await a.request("chat", text="hello"))["code"] == "not_in_room"
        assert (await a.request("leave"))["code"] == "not_in_room"
        assert (await a.request("join", room_token="garbage"))["code"] == "bad_token"
        assert (await a.request("join"))["code"] == "bad_frame"
        assert (await a.request("join", room_token=await api.session_token(alice)))[
            "code"
        ] == "bad_token"
        await a.ws.send("x" * (64 * 1024 + 1))
        assert (await a.next("error"))["code"] == "frame_too_large"
        assert (await a.request("ping"))["type"] == "pong"
    assert not await redis.exists(keys.room_members("lobby"))


async def test_websocket_refuses_bad_tokens(api: Api) -> None:
    alice = await api.user_token("alice")
    for token in ("", "garbage", alice):
        with pytest.raises(Exception):  # noqa: B017 - the handshake is refused
            async with api.client.websocket(f"/ws?session_token={token}") as ws:
                await ws.receive()


async def test_duplicate_policy_reject_and_allow(make_app: Any) -> None:
    for policy, second_status in (("reject", 409), ("allow", 200)):
        test_app = await make_app(live__duplicate_policy=policy)
        api = Api(test_app.test_client())
        name = f"dup{policy}"
        token = await api.user_token(name)
        await api.create_room(token, f"room-{policy}", capacity=1)
        async with AsyncExitStack() as stack:
            first = await connect(stack, api, await api.session_token(token))
            await first.join(f"room-{policy}")
            second = await connect(stack, api, await api.session_token(token))
            response = await second.http_join(f"room-{policy}")
            assert response.status_code == second_status
            if policy == "reject":
                assert (await response.get_json())["error"]["code"] == "already_joined"
            else:
                # Two devices of one person in a room for one: capacity counts people.
                ack = await second.request(
                    "join", room_token=(await response.get_json())["room_token"]
                )
                assert ack["type"] == "ack"
                room = await (await api.client.get(f"/api/rooms/room-{policy}")).get_json()
                assert room["occupancy"] == {"people": 1, "sessions": 2}


async def test_media_failure_leaves_the_room_once(make_app: Any) -> None:
    test_app = await make_app()
    api = Api(test_app.test_client())
    alice = await api.user_token("alice")
    bob = await api.user_token("bob")
    await api.create_room(alice, "lobby")
    live = test_app.app.extensions["sfumesh"].live
    async with AsyncExitStack() as stack:
        a = await connect(stack, api, await api.session_token(alice))
        b = await connect(stack, api, await api.session_token(bob))
        await a.join("lobby")
        await b.join("lobby")
        generation = live.hub.connections[b.session_id].generation
        await asyncio.gather(*(live.media_failed(b.session_id, generation) for _ in range(3)))
        assert (await b.next("left"))["reason"] == "media-failed"
        left = await a.next("participant-left", b.session_id)
        assert left["reason"] == "media-failed"
        # A stale generation does nothing, and the session itself stays connected.
        await live.media_failed(a.session_id, generation + 99)
        assert (await b.request("ping"))["type"] == "pong"
        assert (await a.request("chat", text="still here"))["type"] == "ack"
        # Its own chat comes after every earlier room event: no second participant-left.
        await a.next("chat")
        assert [m for m in a.seen if m["type"] == "participant-left"] == []


async def test_nodes_lists_this_node(api: Api) -> None:
    nodes = (await (await api.client.get("/api/nodes")).get_json())["nodes"]
    assert [(n["name"], n["url"]) for n in nodes] == [("node-1", "https://rooms.example.org")]


async def test_pending_seat_expires_with_its_room_token(make_app: Any) -> None:
    test_app = await make_app(tokens__room_ttl_s=1)
    api = Api(test_app.test_client())
    first = await api.user_token("first")
    second = await api.user_token("second")
    await api.create_room(first, "tiny", capacity=1)
    async with AsyncExitStack() as stack:
        a = await connect(stack, api, await api.session_token(first))
        b = await connect(stack, api, await api.session_token(second))
        # The first user is admitted over HTTP but never sends the WebSocket join.
        assert (await a.http_join("tiny")).status_code == 200
        full = await b.http_join("tiny")
        assert (await full.get_json())["error"]["code"] == "room_full"
        await asyncio.sleep(1.2)
        assert (await b.http_join("tiny")).status_code == 200
        assert not [m for m in a.seen + b.seen if m["type"] == "participant-left"]


async def test_metrics_count_frames_errors_chats_and_ends(api: Api) -> None:
    alice = await api.user_token("alice")
    await api.create_room(alice, "lobby")
    async with AsyncExitStack() as stack:
        a = await connect(stack, api, await api.session_token(alice))
        await a.join("lobby")
        await a.request("chat", text="one")
        await a.request("dance")
        text = await (await api.client.get("/metrics")).get_data(as_text=True)
        assert "sfumesh_ws_connections 1.0" in text and "sfumesh_rooms_local 1.0" in text
        assert 'sfumesh_ws_frames_total{type="chat"} 1.0' in text
        assert 'sfumesh_ws_frames_total{type="unknown"} 1.0' in text
        assert 'sfumesh_ws_errors_total{code="unknown_type"} 1.0' in text
        assert "sfumesh_chat_messages_total 1.0" in text
    await asyncio.sleep(0.2)
    text = await (await api.client.get("/metrics")).get_data(as_text=True)
    assert 'sfumesh_sessions_ended_total{reason="closed"} 1.0' in text


async def test_events_during_activation_reach_the_joiner(
    make_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The joiner's `participant-joined` is appended before its snapshot is read and before
    it enters this node's room; an event the reader hands out in between must still reach
    it (from the stream's backlog), once."""
    test_app = await make_app()
    api = Api(test_app.test_client())
    live = test_app.app.extensions["sfumesh"].live
    alice, bob = await api.user_token("alice"), await api.user_token("bob")
    await api.create_room(alice, "lobby")
    async with AsyncExitStack() as stack:
        a = await connect(stack, api, await api.session_token(alice))
        await a.join("lobby")  # this node now reads the room's stream
        b = await connect(stack, api, await api.session_token(bob))
        grant = await (await b.http_join("lobby")).get_json()

        read_members = live.sessions.members

        async def slow_members(slug: str) -> Any:
            members = await read_members(slug)
            await asyncio.sleep(0.3)  # widen the gap after the activation event
            return members

        monkeypatch.setattr(live.sessions, "members", slow_members)
        joining = asyncio.create_task(b.request("join", room_token=grant["room_token"]))
        await asyncio.sleep(0.1)
        assert (await a.request("chat", text="during the join"))["type"] == "ack"
        assert (await joining)["type"] == "ack"
        monkeypatch.setattr(live.sessions, "members", read_members)
        assert (await a.request("chat", text="after the join"))["type"] == "ack"
        chats: list[str] = []
        while len(chats) < 2:
            chats.append((await b.next("chat"))["text"])
        assert chats == ["during the join", "after the join"]


async def test_http_chat_is_the_room_s_and_reaches_the_live_room(make_app: Any) -> None:
    """One write path (node/runtime/chat.py): an HTTP post is checked like a WebSocket chat
    (only the room's people, the same per-session limit) and shows up live in the room."""
    api = Api((await make_app(live__chat_per_s=2)).test_client())
    alice = await api.user_token("alice")
    bob = await api.user_token("bob")
    await api.create_room(alice, "lobby")
    bob_session = await api.session_token(bob)
    history = "/api/rooms/lobby/messages"
    # Bob has never joined: neither the history nor posting is his.
    for response in (
        await api.client.get(history, headers=bearer(bob_session)),
        await api.client.post(history, json={"text": "hi"}, headers=bearer(bob_session)),
    ):
        assert response.status_code == 403
        assert (await response.get_json())["error"]["code"] == "not_joined"
    assert await Message.find_all().count() == 0
    async with AsyncExitStack() as stack:
        a = await connect(stack, api, await api.session_token(alice))
        b = await connect(stack, api, bob_session)
        await a.join("lobby")
        await b.join("lobby")
        assert (await b.request("leave"))["type"] == "ack"
        # Joined once: one of the room's people, even while not in it now.
        posted = await api.client.post(
            history, json={"text": "from the web"}, headers=bearer(bob_session)
        )
        assert posted.status_code == 201, await posted.get_data(as_text=True)
        chat = await a.next("chat")
        assert chat["text"] == "from the web" and chat["from"]["display_name"] == "Bob"
        assert chat["id"] == (await posted.get_json())["id"]
        # The limit is the session's, whichever way its messages come.
        codes = []
        for _ in range(6):
            response = await api.client.post(
                history, json={"text": "again"}, headers=bearer(bob_session)
            )
            codes.append(response.status_code)
        # 2 a second: 7 posts spanning less than two windows cannot all pass
        assert 429 in codes and set(codes) <= {201, 429}
        assert await Message.find_all().count() == 1 + codes.count(201)
    page = await api.client.get(history, headers=bearer(bob_session))
    assert page.status_code == 200
