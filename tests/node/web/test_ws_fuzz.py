"""Property test of the WebSocket: whatever frames a client sends, the node answers in kind.

Each example is a short run of steps on one connection (alice's, in the room "lobby"):
random text and bytes, random JSON values, objects whose `type` is a real message type or
a random string with random fields, near-valid frames of each real type (a real room
token now and then, so joins get past the token check too), and HTTP joins, so that a
later WebSocket `join` can succeed and move rooms. After every step the socket must still
answer `ping`, every message it got must be well-formed, a frame must get exactly one
reply (with its `id` when it had a valid one), no `error` may be `internal` or
`unavailable`, the node must log no exception, and chat must be stored exactly when it was
acknowledged. Between examples alice is put back into the lobby.
Derandomized, so a run is repeatable; a failure shrinks to a small example.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from quart.testing.connections import WebsocketDisconnectError
from redis.asyncio import Redis

from node.state import keys
from node.store.models import Message
from node.web.ws import HANDLERS
from tests.conftest import Api
from tests.node.runtime.test_live_inprocess import connect
from tests.node.web.test_fuzz import json_values, surrogate_text, texts, tricky_text
from tests.node.web.test_ws_bad_input import MAX_FRAME, Scene, node_context, open_scene

FUZZ = settings(
    max_examples=1000,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
TIMEOUT = 5.0
PING_ID = "\x00fuzz-ping"  # no generated frame uses it (checked below)

# Codes the node may answer bad input with: refusals, never its own failure.
CLIENT_CODES = {
    "bad_frame",
    "unknown_type",
    "frame_too_large",
    "bad_token",
    "wrong_token",
    "not_admitted",
    "already_joined",
    "not_in_room",
    "invalid_text",
    "rate_limited",
    "unsupported",
}

# --- strategies --------------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    value: Any  # the JSON value the node will read, or None if the frame is not JSON
    frame: str | bytes


@dataclass(frozen=True)
class HttpJoin:
    room: str


Step = Send | HttpJoin


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, each as often as its weight says (one_of draws evenly)."""
    pool = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(pool) - 1).flatmap(lambda index: pool[index])


def encoded(value: Any, ascii_only: bool = True) -> Send:
    return Send(value, json.dumps(value, ensure_ascii=ascii_only))


def text_frame(text: str) -> Send:
    """Random text as it is; if it happens to be JSON, the node reads it as such."""
    try:
        return Send(json.loads(text), text)
    except (ValueError, RecursionError):
        return Send(None, text)


SERVER_TYPES = ["hello", "joined", "ack", "error", "pong", "participant-left"]
types = st.one_of(
    st.sampled_from(sorted(HANDLERS)),
    st.sampled_from(SERVER_TYPES),
    st.text(max_size=12),
    tricky_text,
    json_values,
)
good_ids = st.one_of(st.integers(-(10**63), 10**63), st.text(max_size=64))
ids = weighted(
    (4, good_ids),
    (1, st.text(min_size=60, max_size=70)),
    (1, surrogate_text),
    (1, st.one_of(st.booleans(), st.integers(), st.floats())),
    (1, json_values),
)
# Stand-ins for tokens only the running node can mint (see `Run.token_for`).
TOKEN_NAMES = [
    "own:lobby",
    "own:den",
    "own:nowhere",
    "dave-grant",
    "carol:lobby",
    "expired",
    "other-node",
]
real_tokens = st.sampled_from([f"<{name}>" for name in TOKEN_NAMES])
room_tokens = weighted(
    (4, real_tokens),
    (1, texts),
    (1, surrogate_text),
    (1, json_values),
    (1, st.lists(st.text("abcXYZ09-_", max_size=30), min_size=1, max_size=4).map(".".join)),
)
plain_text = st.text("abc xyz🎉\n", min_size=1, max_size=20)
chat_texts = weighted(
    (3, plain_text), (1, texts), (1, st.text(max_size=30)), (1, surrogate_text), (1, json_values)
)
# The fields each type reads, and what may be in them.
FIELDS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "join": {"room_token": room_tokens},
    "chat": {"text": chat_texts},
    "offer": {"sdp": st.one_of(texts, json_values)},
    "answer": {"sdp": st.one_of(texts, json_values)},
    "candidate": {"candidate": json_values},
    "leave": {},
    "ping": {},
}
all_fields = {name: value for fields in FIELDS.values() for name, value in fields.items()}
extras = st.dictionaries(st.text(max_size=8), json_values, max_size=3)


def _merge(pair: tuple[dict[str, Any], dict[str, Any]]) -> dict[str, Any]:
    return {**pair[1], **pair[0]}


# Near-valid frames of one real type: its fields usually there, a good id usually there.
frame_types = weighted(
    (3, st.just("join")),
    (3, st.just("chat")),
    (1, st.sampled_from(["leave", "ping"])),
    (1, st.sampled_from(["offer", "answer", "candidate"])),
)
typed_objects = frame_types.flatmap(
    lambda type_: st.tuples(
        st.fixed_dictionaries(
            {"type": st.just(type_), **FIELDS[type_]},
            optional={"id": ids},
        ),
        st.one_of(st.just({}), extras),
    ).map(_merge)
)
random_objects = st.tuples(
    st.fixed_dictionaries({"type": types}, optional={"id": ids, **all_fields}), extras
).map(_merge)
objects = st.one_of(typed_objects, random_objects)

# Frames around the size limit, which counts bytes: "€" is three of them in UTF-8.
padded = st.tuples(typed_objects, st.integers(MAX_FRAME // 3 - 300, MAX_FRAME // 3 + 100)).map(
    lambda t: encoded({**t[0], "pad": "€" * t[1]}, ascii_only=False)
)
sends = weighted(
    (6, typed_objects.map(encoded)),
    (1, padded),
    (2, st.tuples(objects, st.booleans()).map(lambda t: encoded(*t))),
    (1, st.tuples(json_values, st.booleans()).map(lambda t: encoded(*t))),
    (1, st.text(max_size=200).map(text_frame)),
    # Not empty: Quart's test client cannot send an empty binary frame the way servers do
    # (see test_ws_bad_input.test_empty_binary_frame).
    (
        1,
        st.one_of(
            st.binary(min_size=1, max_size=200), objects.map(lambda o: json.dumps(o).encode())
        ).map(lambda data: Send(None, data)),
    ),
    # Valid JSON cut short, or with a stray character after it.
    (
        1,
        st.tuples(objects, st.integers(0, 60), st.text(max_size=2)).map(
            lambda t: text_frame(json.dumps(t[0])[: t[1]] + t[2])
        ),
    ),
)
steps = weighted((6, sends), (1, st.sampled_from(["lobby", "den"]).map(HttpJoin)))

# --- the run -----------------------------------------------------------------------------


class Run:
    """The scene, and what the examples so far did to it."""

    def __init__(self, scene: Scene, stack: AsyncExitStack) -> None:
        self.scene = scene
        self.stack = stack
        self.pings = 0
        self.chats_acked = 0
        self.tokens: dict[str, str] = {}

    def __repr__(self) -> str:  # hypothesis prints it with every failure
        return f"Run(pings={self.pings}, chats_acked={self.chats_acked})"

    def token_for(self, name: str) -> str:
        scene = self.scene
        if name not in self.tokens:
            if name == "dave-grant":
                self.tokens[name] = scene.dave_grant
            elif name == "expired":
                self.tokens[name] = scene.token("alice", "den", ttl_s=-60)
            elif name == "other-node":
                self.tokens[name] = scene.token("alice", "den", node="node-2")
            else:
                who, _, room = name.partition(":")
                self.tokens[name] = scene.token("alice" if who == "own" else who, room)
        return self.tokens[name]

    def resolve(self, send: Send) -> Send:
        """The frame with a stand-in room token replaced by the real one."""
        value = send.value
        token = value.get("room_token") if isinstance(value, dict) else None
        if isinstance(token, str) and token[1:-1] in TOKEN_NAMES and token[0] + token[-1] == "<>":
            value = {**value, "room_token": self.token_for(token[1:-1])}
            return Send(value, json.dumps(value) if isinstance(send.frame, str) else send.frame)
        return send

    async def reset(self) -> None:
        """Alice active in the lobby, here and in Redis, with nothing left unread; by a new
        connection if need be (a step may have left her pending, see test_ws_bad_input's
        known bugs, or a failed example may have left the socket closed)."""
        scene, alice = self.scene, self.scene.peers["alice"]
        raw = await scene.redis.hget(keys.room_members("lobby"), alice.session_id)
        conn = node_context(scene.api).live.hub.connections.get(alice.session_id)
        in_lobby = conn is not None and conn.room == "lobby" and conn.close_code is None
        if in_lobby and raw is not None and json.loads(raw)["state"] == "active":
            try:
                await alice.request("ping")  # all before its pong is read and dropped
                alice.seen.clear()
                return
            except (WebsocketDisconnectError, TimeoutError):
                pass
        alice = await connect(self.stack, scene.api, alice.session_token)
        scene.peers["alice"] = alice
        await alice.join("lobby")
        alice.seen.clear()


@pytest.fixture
async def run(make_app: Callable[..., Any], redis: Redis) -> AsyncIterator[Run]:
    # Rate limits out of the way: the frames are what is tested, not their pace.
    test_app = await make_app(live__ws_frames_per_s=100_000, live__chat_per_s=100_000)
    api = Api(test_app.test_client())
    async with AsyncExitStack() as stack:
        yield Run(await open_scene(stack, api, redis), stack)


def _expected_id(send: Send) -> Any:
    """The id the reply must carry back, or None when the frame has none it can."""
    value, frame = send.value, send.frame
    if not isinstance(value, dict) or isinstance(frame, bytes):
        return None
    if len(frame.encode("utf-8", "surrogatepass")) > MAX_FRAME:
        return None
    # What the node reads: a surrogate *pair* in `value` arrives as one astral character.
    decoded = json.loads(frame)
    frame_id = decoded.get("id") if isinstance(decoded, dict) else None
    if isinstance(frame_id, bool) or not isinstance(frame_id, str | int):
        return None
    text = str(frame_id)
    if len(text) > 64 or any("\ud800" <= char <= "\udfff" for char in text):
        return None
    return frame_id


def _failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.exc_info
        or r.levelno >= logging.ERROR
        or (r.name.startswith("node.web.ws") and r.levelno >= logging.WARNING)
    ]


async def _send(run: Run, send: Send, caplog: pytest.LogCaptureFixture) -> None:
    alice = run.scene.peers["alice"]
    assert not (isinstance(send.frame, str) and PING_ID in send.frame)
    expected_id = _expected_id(send)
    run.pings += 1
    ping_id = f"{PING_ID}-{run.pings}"

    stored = await Message.find_all().count()
    await alice.ws.send(send.frame)
    await alice.ws.send(json.dumps({"type": "ping", "id": ping_id}))
    received: list[dict[str, Any]] = []
    try:
        while True:
            message = json.loads(await asyncio.wait_for(alice.ws.receive(), TIMEOUT))
            if message.get("id") == ping_id:
                assert message["type"] == "pong", message
                break
            received.append(message)
    except WebsocketDisconnectError as closed:
        raise AssertionError(f"socket closed ({closed}); logged: {_failures(caplog)}") from None

    for message in received:
        assert isinstance(message, dict) and isinstance(message.get("type"), str), message
        if message["type"] == "error":
            assert message["code"] in CLIENT_CODES, message
            assert isinstance(message["message"], str), message
    replies = [m for m in received if m["type"] in ("ack", "error", "pong")]
    assert len(replies) == 1, received
    reply = replies[0]
    assert reply.get("id") == expected_id, (reply, expected_id)
    event(f"{reply['type']} {reply.get('code', 'chat' if 'message_id' in reply else '')}")
    acked = reply["type"] == "ack" and "message_id" in reply
    run.chats_acked += acked
    assert await Message.find_all().count() == stored + acked


@FUZZ
@given(run_steps=st.lists(steps, min_size=1, max_size=3))
async def test_random_frames(
    run: Run, run_steps: list[Step], caplog: pytest.LogCaptureFixture
) -> None:
    await run.reset()
    caplog.set_level(logging.WARNING)
    caplog.clear()
    alice = run.scene.peers["alice"]
    for step in run_steps:
        if isinstance(step, HttpJoin):
            response = await alice.http_join(step.room)
            assert response.status_code == 200, await response.get_data(as_text=True)
        else:
            await _send(run, run.resolve(step), caplog)
        assert not _failures(caplog)

    await run.reset()
    assert not _failures(caplog)
