"""Bad input on the WebSocket: an `error`, a socket that still answers, and no state change.

Every case runs on an in-process node with four connected sessions: alice and bob in the
room "lobby", carol in no room, and dave admitted to the room "den" (HTTP join done, his
WebSocket `join` not yet sent). The case sends one bad frame as alice (or carol) and then
checks the reply (`error` with a fitting code, and the frame's `id` when it had a valid
one), that `ping` still gets `pong`, and that the room state in Redis and the stored
messages are exactly what they were.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import pytest
from pydantic import SecretStr
from quart.testing.connections import WebsocketDisconnectError
from redis.asyncio import Redis

from node.config import Settings, TokenSettings, new_key
from node.errors import LEGACY_CODES
from node.state import keys
from node.store.models import Message
from node.web.context import EXTENSION, NodeContext
from node.web.tokens import Purpose, TokenService
from tests.conftest import Api
from tests.node.runtime.test_live_inprocess import Peer, connect

MAX_FRAME = 64 * 1024  # settings.live.ws_max_frame_bytes, the default the fixtures keep
CHAT_MAX = 4000
# Keys that change without any client doing anything (heartbeat, locks, event wake-ups)
# or that count on purpose (rate limits); everything else under the prefix is state.
VOLATILE = (
    ":lock",
    ":fence",
    ":chat-limit:",
    ":room-lookups:",
    f"{keys.PREFIX}:node:",
    keys.NODES,
    keys.node_urls(),  # stamped by every heartbeat
    ":node-inbox:",
    ":loginlimit",
    ":signuplimit",
)


def node_context(api: Api) -> NodeContext:
    context: NodeContext = api.client.app.extensions[EXTENSION]
    return context


@dataclass
class Scene:
    api: Api
    redis: Redis
    settings: Settings
    tokens: TokenService  # minted with the node's own settings, as the node would
    peers: dict[str, Peer]
    user_ids: dict[str, str]
    dave_grant: str  # dave's room token for "den", from his HTTP join, not yet used

    def token(self, peer: str, room: str, **changes: Any) -> str:
        """A room token for `peer`'s session, with session_id/user/node/ttl_s overridden."""
        claims: dict[str, Any] = {
            "session_id": self.peers[peer].session_id,
            "room": room,
            "node": self.settings.node_name,
            **changes,
        }
        user = claims.pop("user", self.user_ids[peer])
        return self.tokens.issue(Purpose.ROOM, user, **claims).token


async def room_state(redis: Any) -> dict[str, Any]:
    """The live state (sessions, memberships, room events) and the stored messages."""
    state: dict[str, Any] = {}
    for raw_key in sorted(await redis.keys(f"{keys.PREFIX}:*")):
        key = raw_key.decode()
        if any(part in key for part in VOLATILE):
            continue
        kind = (await redis.type(raw_key)).decode()
        if kind == "hash":
            state[key] = await redis.hgetall(raw_key)
        elif kind == "stream":
            state[key] = await redis.xrange(raw_key)
        elif kind == "set":
            state[key] = await redis.smembers(raw_key)
        elif kind == "zset":
            state[key] = await redis.zrange(raw_key, 0, -1, withscores=True)
        else:
            state[key] = await redis.get(raw_key)
    state["messages"] = [(m.id, m.text) for m in await Message.find_all().to_list()]
    return state


async def open_scene(stack: AsyncExitStack, api: Api, redis: Redis) -> Scene:
    names = ("alice", "bob", "carol", "dave")
    user_tokens = {name: await api.user_token(name) for name in names}
    user_ids = {}
    for name, token in user_tokens.items():
        me = await api.client.get("/api/users/me", headers={"Authorization": f"Bearer {token}"})
        user_ids[name] = (await me.get_json())["id"]
    await api.create_room(user_tokens["alice"], "lobby")
    await api.create_room(user_tokens["alice"], "den")
    peers = {
        name: await connect(stack, api, await api.session_token(token))
        for name, token in user_tokens.items()
    }
    await peers["alice"].join("lobby")
    await peers["bob"].join("lobby")
    await peers["alice"].next("participant-joined", peers["bob"].session_id)
    admitted = await peers["dave"].http_join("den")
    assert admitted.status_code == 200, await admitted.get_data(as_text=True)
    dave_token = (await admitted.get_json())["room_token"]
    settings = node_context(api).settings
    return Scene(api, redis, settings, TokenService(settings.tokens), peers, user_ids, dave_token)


@pytest.fixture
async def scene(api: Api, redis: Redis) -> AsyncIterator[Scene]:
    async with AsyncExitStack() as stack:
        scene = await open_scene(stack, api, redis)
        assert scene.settings.live.ws_max_frame_bytes == MAX_FRAME
        yield scene


async def still_answers(peer: Peer) -> None:
    reply = await peer.request("ping")
    assert reply["type"] == "pong", reply


# --- the cases -----------------------------------------------------------------------

Frame = str | bytes | dict[str, Any]


@dataclass(frozen=True)
class Case:
    frame: Callable[[Scene], Frame]
    code: str
    who: str = "alice"
    # A dict frame gets `"id": "case-id"` added unless it names an id itself; the error
    # must carry it back. Raw frames, and dicts with a bad id, get an error without one.


def raw(value: Frame) -> Callable[[Scene], Frame]:
    return lambda scene: value


def nested(depth: int, inner: str = "0") -> str:
    return "[" * depth + inner + "]" * depth


def other_key_token(scene: Scene, kid: str) -> str:
    settings = TokenSettings(keys={kid: SecretStr(new_key())}, signing_key_id=kid)
    issued = TokenService(settings).issue(
        Purpose.ROOM,
        scene.user_ids["alice"],
        session_id=scene.peers["alice"].session_id,
        room="den",
        node=scene.settings.node_name,
    )
    return issued.token


CANDIDATE = "candidate:1 1 UDP 2130706431 127.0.0.1 50000 typ host"
NO_CODEC_SDP = (
    "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
    "a=group:BUNDLE 0\r\n"
    "m=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=sendonly\r\n"
    "a=rtpmap:96 NOTACODEC/90000\r\na=rtcp-mux\r\n"
    "a=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\n"
    "a=fingerprint:sha-256 " + ":".join(["AB"] * 32) + "\r\na=setup:actpass\r\n"
)

CASES: dict[str, Case] = {
    # Not JSON objects.
    "not-json": Case(raw("not json"), "bad_frame"),
    "empty-text": Case(raw(""), "bad_frame"),
    "truncated-json": Case(raw('{"type": "ping", "id": "x"'), "bad_frame"),
    "binary-garbage": Case(raw(b"\x00\xff\xfe"), "bad_frame"),
    "binary-json": Case(raw(b'{"type": "ping", "id": "bin"}'), "bad_frame"),
    "json-list": Case(raw('[{"type": "ping"}]'), "bad_frame"),
    "json-string": Case(raw('"ping"'), "bad_frame"),
    "json-number": Case(raw("1"), "bad_frame"),
    "json-null": Case(raw("null"), "bad_frame"),
    "json-true": Case(raw("true"), "bad_frame"),
    "deep-list": Case(raw(nested(30_000)), "bad_frame"),
    "deep-object": Case(raw('{"a":' * 10_000 + "1" + "}" * 10_000), "bad_frame"),
    "deep-field": Case(raw('{"type": "ping", "x": ' + nested(20_000) + "}"), "bad_frame"),
    # Type and id.
    "missing-type": Case(raw({"text": "hi"}), "unknown_type"),
    "type-number": Case(raw({"type": 5}), "unknown_type"),
    "type-null": Case(raw({"type": None}), "unknown_type"),
    "type-list": Case(raw({"type": ["ping"]}), "unknown_type"),
    "type-object": Case(raw({"type": {"ping": 1}}), "unknown_type"),
    "type-nested": Case(lambda s: json.loads(f'{{"type": {nested(900)}}}'), "unknown_type"),
    "type-unknown": Case(raw({"type": "dance"}), "unknown_type"),
    "type-case": Case(raw({"type": "PING"}), "unknown_type"),
    "type-empty": Case(raw({"type": ""}), "unknown_type"),
    "type-server-only": Case(raw({"type": "hello"}), "unknown_type"),
    "type-huge": Case(raw({"type": "x" * 60_000}), "unknown_type"),
    "id-list": Case(raw({"type": "ping", "id": ["x"]}), "bad_frame"),
    "id-object": Case(raw({"type": "ping", "id": {"x": 1}}), "bad_frame"),
    "id-float": Case(raw({"type": "ping", "id": 1.5}), "bad_frame"),
    "id-bool": Case(raw({"type": "ping", "id": True}), "bad_frame"),
    "id-too-long": Case(raw({"type": "ping", "id": "i" * 65}), "bad_frame"),
    "id-huge-number": Case(raw({"type": "ping", "id": 10**70}), "bad_frame"),
    "id-lone-surrogate": Case(raw({"type": "ping", "id": "\ud800"}), "bad_frame"),
    "id-bad-type-too": Case(raw({"type": "dance", "id": ["x"]}), "bad_frame"),
    # Size: the limit counts bytes (UTF-8), not characters.
    "too-large-ascii": Case(raw("x" * (MAX_FRAME + 1)), "frame_too_large"),
    "too-large-json": Case(
        raw(json.dumps({"type": "ping", "pad": "x" * MAX_FRAME})), "frame_too_large"
    ),
    "too-large-multibyte": Case(
        raw(json.dumps({"type": "ping", "pad": "ā" * (MAX_FRAME // 2)}, ensure_ascii=False)),
        "frame_too_large",
    ),
    "too-large-binary": Case(raw(b"x" * (MAX_FRAME + 1)), "frame_too_large"),
    "too-large-chat": Case(
        raw(json.dumps({"type": "chat", "text": "€" * 30_000}, ensure_ascii=False)),
        "frame_too_large",
    ),
    # join: the room token.
    "join-no-token": Case(raw({"type": "join"}), "bad_frame"),
    "join-token-number": Case(raw({"type": "join", "room_token": 123}), "bad_frame"),
    "join-token-list": Case(raw({"type": "join", "room_token": ["a.b.c"]}), "bad_frame"),
    "join-token-empty": Case(raw({"type": "join", "room_token": ""}), "bad_frame"),
    "join-token-too-long": Case(raw({"type": "join", "room_token": "a" * 5000}), "bad_frame"),
    "join-token-garbage": Case(raw({"type": "join", "room_token": "garbage"}), "bad_token"),
    "join-token-jwt-like": Case(raw({"type": "join", "room_token": "a.b.c"}), "bad_token"),
    "join-token-surrogate": Case(raw({"type": "join", "room_token": "a.\udcff.c"}), "bad_token"),
    "join-token-non-ascii": Case(raw({"type": "join", "room_token": "ä.ö.ü"}), "bad_token"),
    "join-token-expired": Case(
        lambda s: {"type": "join", "room_token": s.token("alice", "den", ttl_s=-60)},
        "bad_token",
    ),
    "join-session-token": Case(
        lambda s: {"type": "join", "room_token": s.peers["alice"].session_token}, "bad_token"
    ),
    "join-user-token": Case(
        lambda s: {
            "type": "join",
            "room_token": s.tokens.issue(Purpose.USER, s.user_ids["alice"]).token,
        },
        "bad_token",
    ),
    "join-unknown-key": Case(
        lambda s: {"type": "join", "room_token": other_key_token(s, "k9")}, "bad_token"
    ),
    "join-foreign-key-same-kid": Case(
        lambda s: {"type": "join", "room_token": other_key_token(s, "k1")}, "bad_token"
    ),
    "join-tampered": Case(
        lambda s: {"type": "join", "room_token": s.token("alice", "den")[:-4] + "AAAA"},
        "bad_token",
    ),
    # join: a valid token, but not this connection's.
    "join-another-sessions-grant": Case(
        lambda s: {"type": "join", "room_token": s.dave_grant}, "wrong_token"
    ),
    "join-token-for-another-session": Case(
        lambda s: {
            "type": "join",
            "room_token": s.token("alice", "den", session_id=s.peers["carol"].session_id),
        },
        "wrong_token",
    ),
    "join-token-for-another-node": Case(
        lambda s: {"type": "join", "room_token": s.token("alice", "den", node="node-2")},
        "wrong_token",
    ),
    "join-token-for-another-user": Case(
        lambda s: {"type": "join", "room_token": s.token("alice", "den", user=s.user_ids["bob"])},
        "wrong_token",
    ),
    # join: this connection's token, but nothing to join.
    "join-not-admitted": Case(
        lambda s: {"type": "join", "room_token": s.token("alice", "den")}, "not_admitted"
    ),
    "join-not-admitted-no-room": Case(
        lambda s: {"type": "join", "room_token": s.token("carol", "lobby")},
        "not_admitted",
        who="carol",
    ),
    "join-room-that-does-not-exist": Case(
        lambda s: {"type": "join", "room_token": s.token("carol", "nowhere")},
        "not_admitted",
        who="carol",
    ),
    "join-again": Case(
        lambda s: {"type": "join", "room_token": s.token("alice", "lobby")}, "already_joined"
    ),
    # leave and chat outside a room.
    "leave-not-in-room": Case(raw({"type": "leave"}), "not_in_room", who="carol"),
    "chat-not-in-room": Case(raw({"type": "chat", "text": "hi"}), "not_in_room", who="carol"),
    # chat: the text.
    "chat-no-text": Case(raw({"type": "chat"}), "bad_frame"),
    "chat-text-null": Case(raw({"type": "chat", "text": None}), "bad_frame"),
    "chat-text-number": Case(raw({"type": "chat", "text": 5}), "bad_frame"),
    "chat-text-list": Case(raw({"type": "chat", "text": ["hi"]}), "bad_frame"),
    "chat-text-way-too-long": Case(raw({"type": "chat", "text": "x" * 16_001}), "bad_frame"),
    "chat-empty": Case(raw({"type": "chat", "text": ""}), "invalid_text"),
    "chat-blank": Case(raw({"type": "chat", "text": " \n\t\u3000 "}), "invalid_text"),
    "chat-invisible": Case(raw({"type": "chat", "text": "\u200b\u2060\u3164"}), "invalid_text"),
    "chat-control": Case(raw({"type": "chat", "text": "hi\x00there"}), "invalid_text"),
    "chat-bidi": Case(raw({"type": "chat", "text": "hi \u202e there"}), "invalid_text"),
    "chat-surrogate": Case(raw({"type": "chat", "text": "hi \udc00"}), "invalid_text"),
    "chat-too-long": Case(raw({"type": "chat", "text": "x" * (CHAT_MAX + 1)}), "invalid_text"),
    "chat-too-long-after-nfc": Case(
        raw({"type": "chat", "text": "e\u0301" * (CHAT_MAX + 1)}), "invalid_text"
    ),
    # participant-state: known fields of the right types, in a room.
    "state-not-in-room": Case(
        raw({"type": "participant-state", "state": {"mic_muted": True}}), "not_in_room", who="carol"
    ),
    "state-missing": Case(raw({"type": "participant-state"}), "bad_frame"),
    "state-empty": Case(raw({"type": "participant-state", "state": {}}), "bad_frame"),
    "state-list": Case(raw({"type": "participant-state", "state": ["mic_muted"]}), "bad_frame"),
    "state-unknown-field": Case(
        raw({"type": "participant-state", "state": {"mic_muted": True, "admin": True}}),
        "bad_frame",
    ),
    "state-not-bool": Case(
        raw({"type": "participant-state", "state": {"mic_muted": "yes"}}), "bad_frame"
    ),
    "state-number": Case(
        raw({"type": "participant-state", "state": {"hand_raised": 1}}), "bad_frame"
    ),
    "state-null-flag": Case(
        raw({"type": "participant-state", "state": {"camera_off": None}}), "bad_frame"
    ),
    "state-screen-mid-bad": Case(
        raw({"type": "participant-state", "state": {"screen_mid": "a b"}}), "bad_frame"
    ),
    "state-screen-mid-long": Case(
        raw({"type": "participant-state", "state": {"screen_mid": "1" * 17}}), "bad_frame"
    ),
    "state-screen-mid-number": Case(
        raw({"type": "participant-state", "state": {"screen_mid": 2}}), "bad_frame"
    ),
    # Media signalling: which connection, in a room, usable SDP and candidates.
    "offer": Case(raw({"type": "offer", "sdp": "v=0"}), "bad_frame"),
    "offer-for-subscribe": Case(
        raw({"type": "offer", "pc": "subscribe", "sdp": "v=0"}), "bad_frame"
    ),
    "offer-no-sdp": Case(raw({"type": "offer", "pc": "publish"}), "bad_frame"),
    "offer-sdp-number": Case(raw({"type": "offer", "pc": "publish", "sdp": 5}), "bad_frame"),
    "offer-not-in-room": Case(
        raw({"type": "offer", "pc": "publish", "sdp": "v=0"}), "not_in_room", who="carol"
    ),
    "offer-garbage-sdp": Case(
        raw({"type": "offer", "pc": "publish", "sdp": "m=video x\r\nbogus\r\n"}), "bad_sdp"
    ),
    "offer-no-usable-codec": Case(
        raw({"type": "offer", "pc": "publish", "sdp": NO_CODEC_SDP}), "bad_sdp"
    ),
    "answer-for-publish": Case(raw({"type": "answer", "pc": "publish", "sdp": "v=0"}), "bad_frame"),
    "answer-without-offer": Case(
        raw({"type": "answer", "pc": "subscribe", "sdp": "v=0"}), "no_offer"
    ),
    "candidate-no-pc": Case(raw({"type": "candidate", "candidate": "x"}), "bad_frame"),
    "candidate-no-connection": Case(
        raw({"type": "candidate", "pc": "publish", "candidate": CANDIDATE}), "no_connection"
    ),
    "candidate-not-in-room": Case(
        raw({"type": "candidate", "pc": "publish", "candidate": CANDIDATE}),
        "not_in_room",
        who="carol",
    ),
}


def _encode(frame: Frame) -> str | bytes:
    # As a browser's JSON.stringify would not: all ASCII, lone surrogates as \u escapes.
    return json.dumps(frame) if isinstance(frame, dict) else frame


@pytest.mark.parametrize("name", list(CASES))
async def test_bad_frame(scene: Scene, name: str) -> None:
    case = CASES[name]
    peer = scene.peers[case.who]
    frame = case.frame(scene)
    expected_id: str | None = None
    if isinstance(frame, dict) and "id" not in frame:
        expected_id = f"case-{name}"
        frame = {**frame, "id": expected_id}
    before = await room_state(scene.redis)

    await peer.ws.send(_encode(frame))
    error = await peer.next("error")
    assert error["code"] == case.code, error
    # The hyphenated spelling of before rides along for one release (node/errors.py).
    assert error.get("legacy_code") == LEGACY_CODES.get(case.code), error
    assert isinstance(error["message"], str) and error["message"], error
    assert error.get("id") == expected_id, error
    # Media errors say which peer connection they are about.
    if isinstance(frame, dict) and frame.get("pc") in ("publish", "subscribe"):
        if case.code != "bad_frame":
            assert error.get("pc") == frame["pc"], error
    await still_answers(peer)

    assert not [m for m in peer.seen if m["type"] in ("ack", "joined", "pong")], peer.seen
    assert await room_state(scene.redis) == before
    # The others still answer too, and alice and bob are both still in the lobby.
    for other in scene.peers.values():
        await still_answers(other)
    members: Any = await scene.redis.hgetall(keys.room_members("lobby"))
    assert {m.decode() for m in members} == {
        scene.peers["alice"].session_id,
        scene.peers["bob"].session_id,
    }


async def test_empty_binary_frame(scene: Scene) -> None:
    """Hypercorn hands an empty binary frame over as {"bytes": b"", "text": None}, which
    Quart reads as the message None. (The test client sends no "text" key at all, which
    Quart cannot read, so the event goes in as the server would send it.)"""
    alice = scene.peers["alice"]
    before = await room_state(scene.redis)
    event = {"type": "websocket.receive", "bytes": b"", "text": None}
    await alice.ws._send_queue.put(event)
    error = await alice.next("error")
    assert error["code"] == "bad_frame" and "id" not in error, error
    await still_answers(alice)
    assert await room_state(scene.redis) == before


async def test_frame_limit_counts_bytes_and_is_inclusive(scene: Scene) -> None:
    alice = scene.peers["alice"]
    for pad_char, unit in (("x", 1), ("é", 2), ("€", 3), ("🎉", 4)):
        head, tail = f'{{"type":"ping","id":"at-{unit}","pad":"', '"}'
        room = MAX_FRAME - len((head + tail).encode())
        frame = head + pad_char * (room // unit) + "x" * (room % unit) + tail
        assert len(frame.encode()) == MAX_FRAME
        await alice.ws.send(frame)
        assert (await alice.next("pong"))["id"] == f"at-{unit}"


async def test_valid_ids_are_echoed(scene: Scene) -> None:
    alice = scene.peers["alice"]
    for frame_id in ("i" * 64, 0, -7, 10**63, "ünïcødé 🎉", ""):
        await alice.ws.send(json.dumps({"type": "ping", "id": frame_id}))
        reply = await alice.next("pong")
        assert reply["id"] == frame_id and type(reply["id"]) is type(frame_id)


async def test_join_before_hello_with_an_earlier_connections_grant(scene: Scene) -> None:
    """Dave reconnects (a new generation of his session) and, before even reading `hello`,
    presents the grant his replaced connection got: it is not this connection's to use."""
    dave = scene.peers["dave"]
    rooms_before = {k: v for k, v in (await room_state(scene.redis)).items() if "{room:" in k}
    async with scene.api.client.websocket(f"/ws?session_token={dave.session_token}") as ws:
        again = Peer(scene.api, ws, dave.session_token)
        await ws.send(json.dumps({"type": "join", "id": "early", "room_token": scene.dave_grant}))
        hello = json.loads(await asyncio.wait_for(ws.receive(), 5))
        assert hello["type"] == "hello" and hello["session_id"] == dave.session_id, hello
        error = await again.next("error")
        assert (error["code"], error["id"]) == ("not_admitted", "early"), error
        await still_answers(again)
        rooms_after = {k: v for k, v in (await room_state(scene.redis)).items() if "{room:" in k}
        assert rooms_after == rooms_before
    assert (await dave.next("session-replaced"))["session_id"] == dave.session_id


async def test_a_failed_join_leaves_the_pending_grant_usable(scene: Scene) -> None:
    """Alice presenting dave's grant changes nothing: dave can still use it afterwards."""
    alice, dave = scene.peers["alice"], scene.peers["dave"]
    token = scene.dave_grant
    assert (await alice.request("join", room_token=token))["code"] == "wrong_token"
    ack = await dave.request("join", room_token=token)
    assert ack["type"] == "ack" and ack["room"] == "den", ack
    # And it works once: presented again, dave is already there.
    assert (await dave.request("join", room_token=token))["code"] == "already_joined"


# --- floods --------------------------------------------------------------------------


async def test_chat_flood_is_rate_limited(api: Api, redis: Redis) -> None:
    async with AsyncExitStack() as stack:
        scene = await open_scene(stack, api, redis)
        alice, bob = scene.peers["alice"], scene.peers["bob"]
        limit = scene.settings.live.chat_per_s
        sent = 4 * limit
        # All frames first, then the replies: as fast as the node can take them.
        for n in range(sent):
            await alice.ws.send(json.dumps({"type": "chat", "id": f"c{n}", "text": f"m{n}"}))
        replies: dict[str, dict[str, Any]] = {}
        while len(replies) < sent:
            message = json.loads(await asyncio.wait_for(alice.ws.receive(), 5))
            if str(message.get("id", "")).startswith("c"):
                replies[message["id"]] = message
            else:
                alice.seen.append(message)
        acked = [f"m{n}" for n in range(sent) if replies[f"c{n}"]["type"] == "ack"]
        refused = [r for r in replies.values() if r["type"] == "error"]
        assert refused, "a burst of 4x the limit was not limited at all"
        assert {r["code"] for r in refused} == {"rate_limited"}, refused
        assert len(acked) + len(refused) == sent
        # Only what was acknowledged is stored and sent to the room, once, in order.
        stored = [m.text for m in await Message.find(Message.room == "lobby").to_list()]
        assert sorted(stored) == sorted(acked)
        events: Any = await redis.xrange(keys.room_events("lobby"))
        chats = [json.loads(e[b"data"])["text"] for _, e in events if e[b"type"] == b"chat"]
        assert chats == acked
        for peer in (alice, bob):
            received = [(await peer.next("chat"))["text"] for _ in acked]
            assert received == acked
        await still_answers(alice)


async def test_frame_flood_is_rate_limited(make_app: Callable[..., Any], redis: Redis) -> None:
    test_app = await make_app(live__ws_frames_per_s=20)
    api = Api(test_app.test_client())
    async with AsyncExitStack() as stack:
        scene = await open_scene(stack, api, redis)
        alice = scene.peers["alice"]
        sent = 200  # 10 seconds' worth at once; below the send queue, so nobody is cut off
        for n in range(sent):
            frame: dict[str, Any] = {"type": "ping", "id": n}
            if n % 3 == 0:
                frame = {"type": "chat", "id": n, "text": f"flood {n}"}
            await alice.ws.send(json.dumps(frame))
        replies: dict[int, dict[str, Any]] = {}
        while len(replies) < sent:
            message = json.loads(await asyncio.wait_for(alice.ws.receive(), 5))
            if isinstance(message.get("id"), int):
                assert message["id"] not in replies, message
                replies[message["id"]] = message
            else:
                alice.seen.append(message)
        limited = [r for r in replies.values() if r.get("code") == "rate_limited"]
        assert limited, "200 frames at once at 20 a second were not limited"
        assert all(r["type"] == "error" for r in limited)
        assert not [m for m in alice.seen if m["type"] == "error"], alice.seen
        # Answered frames were handled; limited ones changed nothing.
        answered_chats = [n for n, r in replies.items() if r["type"] == "ack"]
        stored = await Message.find(Message.room == "lobby").count()
        assert stored == len(answered_chats)
        # The allowance refills: ping until pong (the rate is what it is; no time asserted).
        for _ in range(200):
            reply = await alice.request("ping")
            if reply["type"] == "pong":
                break
            assert reply["code"] == "rate_limited", reply
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the socket never answered again after the flood")


# --- idle timeout ----------------------------------------------------------------------


async def test_idle_client_times_out_and_leaves_once(
    make_app: Callable[..., Any], redis: Redis
) -> None:
    test_app = await make_app(live__ws_idle_timeout_s=0.5)
    api = Api(test_app.test_client())
    alice_user = await api.user_token("alice")
    bob_user = await api.user_token("bob")
    await api.create_room(alice_user, "lobby")
    alice_session = await api.session_token(alice_user)
    bob_session = await api.session_token(bob_user)
    async with AsyncExitStack() as stack:
        bob = await connect(stack, api, bob_session)
        await bob.join("lobby")
        stop = asyncio.Event()

        async def keep_alive() -> None:
            while not stop.is_set():
                assert (await bob.request("ping"))["type"] == "pong"
                await asyncio.sleep(0.1)

        pinger = asyncio.create_task(keep_alive())
        try:
            alice = await connect(stack, api, alice_session)
            joined = await alice.join("lobby")
            sid = alice.session_id
            scene_user_id = joined["self"]["user_id"]
            assert await redis.exists(keys.session(sid))
            assert await redis.hexists(keys.room_members("lobby"), sid)
            # Alice says nothing more.
            error = await alice.next("error")
            assert error["code"] == "idle_timeout", error
            with pytest.raises(WebsocketDisconnectError) as closed:
                await alice.next("never")
            assert closed.value.args == (4002,)  # hub.CLOSE_IDLE
            # The session's cleanup ran before the socket closed.
            assert not await redis.exists(keys.session(sid))
            assert not await redis.hexists(keys.room_members("lobby"), sid)
            assert sid.encode() not in await redis.smembers(keys.node_sessions("node-1"))
            # Bob, who kept talking, stays (the pinger collects what he is sent meanwhile).
            await asyncio.sleep(1.0)
        finally:
            stop.set()
            await pinger
        await still_answers(bob)
        assert await redis.hexists(keys.room_members("lobby"), bob.session_id)
        assert await redis.exists(keys.session(bob.session_id))
        # Bob heard of alice's leaving exactly once, as a timeout; the room recorded it once.
        lefts = [m for m in bob.seen if m["type"] == "participant-left"]
        assert lefts == [
            {
                "type": "participant-left",
                "room": "lobby",
                "session_id": sid,
                "user_id": scene_user_id,
                "reason": "timeout",
            }
        ], lefts
        events: Any = await redis.xrange(keys.room_events("lobby"))
        recorded = [json.loads(e[b"data"]) for _, e in events if e[b"type"] == b"participant-left"]
        assert recorded == [{"session_id": sid, "user_id": scene_user_id, "reason": "timeout"}]


# --- re-joining and moving between rooms ------------------------------------------------


async def test_http_join_again_keeps_an_active_member_active(scene: Scene) -> None:
    alice, bob = scene.peers["alice"], scene.peers["bob"]
    again = await alice.http_join("lobby")
    assert again.status_code == 200, await again.get_data(as_text=True)
    reply = await alice.request("join", room_token=(await again.get_json())["room_token"])
    assert reply["type"] == "ack" or reply["code"] == "already_joined", reply
    raw: Any = await scene.redis.hget(keys.room_members("lobby"), alice.session_id)
    assert json.loads(raw)["state"] == "active"
    room = await (await scene.api.client.get("/api/rooms/lobby")).get_json()
    assert room["occupancy"] == {"people": 2, "sessions": 2}
    await still_answers(bob)


async def test_moved_session_no_longer_chats_in_the_old_room(scene: Scene) -> None:
    """An HTTP join to another room ends the membership in the old one ("moved")."""
    alice = scene.peers["alice"]
    moved = await alice.http_join("den")
    assert moved.status_code == 200, await moved.get_data(as_text=True)
    assert not await scene.redis.hexists(keys.room_members("lobby"), alice.session_id)
    before = await room_state(scene.redis)
    reply = await alice.request("chat", text="still here?")
    assert reply["code"] == "not_in_room", reply
    assert await room_state(scene.redis) == before
    # The grant for the new room still works.
    ack = await alice.request("join", room_token=(await moved.get_json())["room_token"])
    assert ack["type"] == "ack" and ack["room"] == "den", ack


async def test_moved_session_no_longer_hears_the_old_room(scene: Scene) -> None:
    alice, bob = scene.peers["alice"], scene.peers["bob"]
    moved = await alice.http_join("den")
    assert moved.status_code == 200, await moved.get_data(as_text=True)
    assert (await bob.request("chat", text="alice has gone"))["type"] == "ack"
    await bob.next("chat")
    # The hub queues an event for every local member at once: had alice got it, it would
    # be before this pong.
    await still_answers(alice)
    assert not [m for m in alice.seen if m["type"] == "chat"], alice.seen
