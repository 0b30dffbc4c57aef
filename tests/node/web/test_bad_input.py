"""Bad input on every endpoint: the contract's 4xx error shape, and nothing stored.

Each case is one request against an in-process node holding one user ("alice"), one room
("lobby") and one message. The case names the status (and error code) it must get; the
documents in the store and the keys in Redis must be the same before and after it.
"""

from __future__ import annotations

import json
import secrets
import time
import unicodedata
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jwt
import pytest
from beanie import init_beanie
from pydantic import SecretStr
from pymongo import AsyncMongoClient
from quart.typing import TestClientProtocol as QuartClient
from redis.asyncio import Redis

from node.config import TokenSettings, load_settings, new_key
from node.runtime.services import BackingServices
from node.state import keys as keys_module
from node.store.models import DOCUMENT_MODELS, Message, Room, User
from node.web.app import create_app
from node.web.context import EXTENSION, NodeContext
from node.web.tokens import Purpose, TokenService
from tests.conftest import GENEROUS_LIMITS, Api, bearer, error_of, running_app, suite_redis

MAX_BODY = 64 * 1024  # settings.max_body_bytes, the default the fixtures keep
ABSENT_ID = "0123456789abcdef01234567"  # a well-formed ObjectId no document has


# --- the world each case runs in --------------------------------------------------------


@dataclass
class World:
    api: Api
    redis: Redis
    database: str
    signing_key: str
    user_id: str
    auth: dict[str, str | None]

    @property
    def client(self) -> QuartClient:
        return self.api.client

    def __repr__(self) -> str:  # the tokens would fill a failure report
        return f"World(database={self.database!r})"


def _context(client: QuartClient) -> NodeContext:
    context: NodeContext = client.app.extensions[EXTENSION]
    return context


def _forged(secret: str, **changes: Any) -> str:
    """A token signed with the node's own key, with claims or header changed."""
    now = datetime.now(UTC).replace(microsecond=0)
    payload: dict[str, Any] = {
        "iss": "sfumesh",
        "aud": "sfumesh",
        "sub": ABSENT_ID,
        "purpose": "user",
        "iat": now,
        "exp": now + timedelta(hours=1),
        "jti": "forged",
    }
    headers: dict[str, Any] = {"kid": "k1"}
    algorithm = changes.pop("alg", "HS256")
    headers.update(changes.pop("headers", {}))
    headers = {name: value for name, value in headers.items() if value is not None}
    for name, value in changes.items():
        if value is None:
            payload.pop(name, None)
        else:
            payload[name] = value
    key: str | None = secret if algorithm != "none" else None
    return jwt.encode(payload, key, algorithm, headers=headers)  # type: ignore[arg-type]


def _tampered(token: str, **claims: Any) -> str:
    """The token with its payload rewritten and the original signature kept."""
    header, payload, signature = token.split(".")
    decoded = json.loads(jwt.utils.base64url_decode(payload))
    decoded.update(claims)
    new_payload = jwt.utils.base64url_encode(json.dumps(decoded).encode()).decode()
    return f"{header}.{new_payload}.{signature}"


def _auth_headers(
    user_token: str, session_token: str, user_id: str, tokens: TokenService, secret: str
) -> dict[str, str | None]:
    """Authorization header values by name; None means no header at all."""
    other_kid = TokenService(TokenSettings(keys={"k2": SecretStr(new_key())}, signing_key_id="k2"))
    same_kid = TokenService(TokenSettings(keys={"k1": SecretStr(new_key())}, signing_key_id="k1"))
    session_id = "s" * 32
    room_token = tokens.issue(
        Purpose.ROOM, user_id, room="lobby", node="node-1", session_id=session_id
    ).token
    values: dict[str, str | None] = {
        "user": f"Bearer {user_token}",
        "session": f"Bearer {session_token}",
        "none": None,
        "empty": "",
        "scheme-only": "Bearer",
        "scheme-blank": "Bearer    ",
        "basic": "Basic YWxpY2U6Y29ycmVjdCBob3JzZQ==",
        "no-scheme": user_token,
        "garbage": "Bearer garbage",
        "dots": "Bearer a.b.c",
        "huge": "Bearer " + "a" * 10_000,
        "non-ascii": "Bearer ☃.☃.☃",
        "two-tokens": f"Bearer {user_token} {user_token}",
        "room": f"Bearer {room_token}",
        "other-kid": "Bearer " + other_kid.issue(Purpose.USER, user_id).token,
        "same-kid-other-secret": "Bearer " + same_kid.issue(Purpose.USER, user_id).token,
        "no-kid": "Bearer " + _forged(secret, sub=user_id, headers={"kid": None}),
        "alg-none": "Bearer " + _forged(secret, sub=user_id, alg="none"),
        "wrong-issuer": "Bearer " + _forged(secret, sub=user_id, iss="elsewhere"),
        "wrong-audience": "Bearer " + _forged(secret, sub=user_id, aud="elsewhere"),
        "no-jti": "Bearer " + _forged(secret, sub=user_id, jti=None),
        "no-purpose": "Bearer " + _forged(secret, sub=user_id, purpose=None),
        "future-iat": "Bearer "
        + _forged(secret, sub=user_id, iat=datetime.now(UTC) + timedelta(hours=1)),
        "absent-user": "Bearer " + tokens.issue(Purpose.USER, ABSENT_ID).token,
        "sub-not-an-id": "Bearer " + tokens.issue(Purpose.USER, "../../etc").token,
        "session-absent-user": "Bearer "
        + tokens.issue(Purpose.SESSION, ABSENT_ID, session_id=session_id).token,
        "session-without-id": "Bearer "
        + _forged(secret, sub=user_id, purpose="session", session_id=None),
        "tampered-purpose": "Bearer " + _tampered(user_token, purpose="session", session_id="x"),
        "tampered-sub": "Bearer " + _tampered(user_token, sub=ABSENT_ID),
    }
    for purpose in (Purpose.USER, Purpose.SESSION):
        expired = tokens.issue(purpose, user_id, ttl_s=-10, session_id=session_id).token
        values[f"expired-{purpose.value}"] = f"Bearer {expired}"
    return values


@asynccontextmanager
async def open_world(backing: BackingServices, data_dir: Path) -> AsyncIterator[World]:
    """A node with alice, her tokens (good and bad) and the room "lobby" with one message."""
    keys = {"k1": new_key()}
    settings = load_settings(
        env={},
        overrides={
            "redis_url": backing.redis_url,
            "mongodb_uri": backing.mongodb_uri,
            "database": f"test_{secrets.token_hex(6)}",
            "data_dir": str(data_dir),
            "bcrypt_cost": 4,
            "tokens.keys": keys,
            "tokens.signing_key_id": "k1",
            "public_base_url": "https://rooms.example.org",
            "serf.mode": "off",  # an in-process node, no Serf agent
            **GENEROUS_LIMITS,
            # Hundreds of cases and fuzz examples from one address and one user share this
            # node: input handling is checked here, the room limits in test_room_limits.
            "rooms.lookups_per_window": 1_000_000,
            "rooms.creations_per_window": 1_000_000,
        },
    )
    test_app = running_app(create_app(settings))
    await test_app.startup()
    redis = suite_redis(backing)
    try:
        api = Api(test_app.test_client())
        user = await api.signup("alice")
        user_token = await api.login("alice")
        session_token = await api.session_token(user_token)
        await api.create_room(user_token, "lobby")
        response = await api.client.post(
            "/api/rooms/lobby/messages", json={"text": "hello"}, headers=bearer(session_token)
        )
        assert response.status_code == 201
        # The seed post's rate-limit counter expires within a second: left in, a slow case
        # would see it vanish and blame the bad input for the change.
        await redis.delete(*await redis.keys(keys_module.chat_limit("*")))
        tokens = _context(api.client).tokens
        auth = _auth_headers(user_token, session_token, user["id"], tokens, keys["k1"])
        yield World(api, redis, settings.database, keys["k1"], user["id"], auth)
    finally:
        await redis.aclose()
        await test_app.shutdown()
        mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(backing.mongodb_uri)
        await mongo.drop_database(settings.database)
        await mongo.close()


async def bind_beanie(world: World) -> None:
    """Point Beanie (one global binding) at the world's store again if a test moved it."""
    store = _context(world.client).store
    try:
        database = User.get_pymongo_collection().database
        bound = database.name == world.database and database.client is store
    except Exception:
        bound = False
    if not bound:
        await init_beanie(database=store[world.database], document_models=DOCUMENT_MODELS)


@pytest.fixture(scope="module")
async def _module_world(
    backing: BackingServices, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[World]:
    """One node for all the cases: they store nothing, so they cannot disturb each other.

    (A node per case, through `make_app`, costs five times as long, nearly all of it in
    store round trips.)
    """
    async with open_world(backing, tmp_path_factory.mktemp("bad_input")) as world:
        yield world


@pytest.fixture
async def world(_module_world: World) -> World:
    await bind_beanie(_module_world)
    return _module_world


VOLATILE = (
    b":room-lookups:",
    b":room-creations:",
    b":loginlimit:",
    b":signuplimit:",
    b":chat-limit:",
)


async def _redis_state(redis: Redis) -> dict[Any, Any]:
    state: dict[Any, Any] = {}
    for key in sorted(await redis.keys("*")):
        if any(part in key for part in VOLATILE):
            # Rate-limit counters: the room look-ups count every look-up on purpose, bad
            # input or not, and other tests' login and sign-up counters in the same Redis
            # decay and expire while a case runs.
            continue
        kind = await redis.type(key)
        if kind == b"none":
            # gone between KEYS and TYPE: expired on its own (a seat hold's TTL), not written
            continue
        if kind == b"string":
            state[key] = await redis.get(key)
        elif kind == b"hash":
            state[key] = await redis.hgetall(key)
        else:
            state[key] = kind
    return state


async def stored(world: World) -> tuple[Any, ...]:
    users = [(u.id, u.username, u.display_name) for u in await User.find_all().to_list()]
    rooms = [(r.id, r.slug, r.name, r.capacity) for r in await Room.find_all().to_list()]
    messages = [(m.id, m.text) for m in await Message.find_all().to_list()]
    return users, rooms, messages, await _redis_state(world.redis)


async def _deadlines(redis: Redis) -> dict[Any, float]:
    """When each key with a TTL expires (monotonic time): such a key (the earlier set-up's
    seat holds, ~10 s) may lapse on its own while a case runs, which is no write."""
    now = time.monotonic()
    deadlines: dict[Any, float] = {}
    for key in await redis.keys("*"):
        left_ms = await redis.pttl(key)
        if left_ms >= 0:
            deadlines[key] = now + left_ms / 1000
    return deadlines


def _lapsed(
    before: tuple[Any, ...], after: tuple[Any, ...], deadlines: dict[Any, float]
) -> tuple[Any, ...]:
    """`before` without the keys that expired on their own since (gone now, and due), and
    without the seat holds that ran out meanwhile (a hold past its `until_ms` is pruned by
    the node's own reads of the room, which is no write of the case's)."""
    due = time.monotonic() + 0.5
    due_ms = time.time() * 1000 + 500
    state = {
        key: value
        for key, value in before[3].items()
        if key in after[3] or deadlines.get(key, float("inf")) > due
    }
    for key, value in list(state.items()):
        if key.endswith(b":seat-holds") and isinstance(value, dict):
            now_held = after[3].get(key) or {}
            held = {
                session: hold
                for session, hold in value.items()
                if session in now_held or float(json.loads(hold)["until_ms"]) > due_ms
            }
            if held or key in after[3]:
                state[key] = held
            else:
                del state[key]  # its last hold ran out: the hash went with it
    return (*before[:3], state)


# --- the cases ---------------------------------------------------------------------------

_NO_JSON = object()


@dataclass(frozen=True)
class Case:
    method: str
    path: str  # may name {user_id}
    status: int
    code: str | None = None
    auth: str = "user"
    json: Any = _NO_JSON
    data: bytes | None = None  # sent as Content-Type: application/json unless headers say
    headers: dict[str, str] = field(default_factory=dict)

    def with_(self, **changes: Any) -> Case:
        return Case(**{**self.__dict__, **changes})


async def _send(world: World, case: Case) -> Any:
    headers = dict(case.headers)
    authorization = world.auth[case.auth]
    if authorization is not None:
        headers["Authorization"] = authorization
    path = case.path.format(user_id=world.user_id)
    kwargs: dict[str, Any] = {"method": case.method, "headers": headers}
    if case.json is not _NO_JSON:
        kwargs["json"] = case.json
    elif case.data is not None:
        kwargs["data"] = case.data
        headers.setdefault("Content-Type", "application/json")
    return await world.client.open(path, **kwargs)


async def _check(world: World, case: Case) -> dict[str, Any]:
    deadlines = await _deadlines(world.redis)
    before = await stored(world)
    response = await _send(world, case)
    body = await response.get_data(as_text=True)
    assert response.status_code == case.status, body
    assert response.content_type == "application/json"
    error = await error_of(response)
    if case.code is not None:
        assert error["code"] == case.code, error
    assert error["message"]
    after = await stored(world)
    assert after == _lapsed(before, after, deadlines), "bad input changed what is stored"
    return error


# The valid bodies every wrong one is a variation of.
SIGNUP = {
    "username": "mallory",
    "email": "mallory@example.org",
    "password": "correct horse battery",
    "display_name": "Mallory",
}
LOGIN = {"login": "alice", "password": "correct horse battery"}
NEW_ROOM = {"slug": "kitchen", "name": "Kitchen", "capacity": 8}
NEW_MESSAGE = {"text": "hi there"}
OPTIONAL_FIELDS = {"name", "capacity"}  # of NEW_ROOM: absent or null is fine

# Endpoints with a JSON body: (method, path, valid body, auth).
BODY_ENDPOINTS: dict[str, tuple[str, dict[str, Any], str]] = {
    "signup": ("/api/users", SIGNUP, "none"),
    "login": ("/api/auth/login", LOGIN, "none"),
    "new-room": ("/api/rooms", NEW_ROOM, "user"),
    "new-message": ("/api/rooms/lobby/messages", NEW_MESSAGE, "session"),
}

MALFORMED: dict[str, tuple[bytes, int, str]] = {
    "truncated-object": (b"{", 400, "malformed_json"),
    "truncated-array": (b"[1,", 400, "malformed_json"),
    "trailing-garbage": (b'{"a": 1} x', 400, "malformed_json"),
    "single-quotes": (b"{'a': 1}", 400, "malformed_json"),
    "not-utf8": (b'{"text": "\xff\xfe\xfd"}', 400, "malformed_json"),
    "latin1-bom": (b"\xff\xfe{\x00}\x00", 400, "malformed_json"),
    "deep-nesting": (b"[" * 20_000 + b"]" * 20_000, 400, "malformed_json"),
    "deep-object": (b'{"a":' * 5_000 + b"1" + b"}" * 5_000, 400, "malformed_json"),
    "empty": (b"", 400, "malformed_json"),
    "null": (b"null", 422, "invalid_input"),
    "array": (b"[1, 2]", 422, "invalid_input"),
    "string": (b'"hello"', 422, "invalid_input"),
    "number": (b"42", 422, "invalid_input"),
    "bool": (b"true", 422, "invalid_input"),
    "nan-field": (b'{"a": NaN}', 422, "invalid_input"),
    "huge-exponent": (b'{"a": 1e999999}', 422, "invalid_input"),
    "lone-surrogate-key": (b'{"\\ud800": 1}', 422, "invalid_input"),
}


def _body_cases() -> dict[str, Case]:
    cases: dict[str, Case] = {}
    for name, (path, valid, auth) in BODY_ENDPOINTS.items():
        post = Case("POST", path, 422, "invalid_input", auth=auth)
        for kind, (data, status, code) in MALFORMED.items():
            cases[f"{name}-{kind}"] = post.with_(data=data, status=status, code=code)
        cases[f"{name}-no-body"] = post.with_(data=None)
        cases[f"{name}-text-plain"] = post.with_(
            data=json.dumps(valid).encode(), headers={"Content-Type": "text/plain"}
        )
        cases[f"{name}-form"] = post.with_(
            data=b"a=1", headers={"Content-Type": "application/x-www-form-urlencoded"}
        )
        cases[f"{name}-empty-object"] = post.with_(json={})
        cases[f"{name}-extra-field"] = post.with_(json={**valid, "is_admin": True})
        cases[f"{name}-extra-id"] = post.with_(json={**valid, "_id": ABSENT_ID})
        cases[f"{name}-operator-field"] = post.with_(json={**valid, "$where": "1"})
        cases[f"{name}-body-in-list"] = post.with_(json=[valid])
        for key in valid:
            optional = key in OPTIONAL_FIELDS
            if not optional:
                rest = {k: v for k, v in valid.items() if k != key}
                cases[f"{name}-missing-{key}"] = post.with_(json=rest)
            for type_name, wrong in {
                "null": None,
                "int": 12345678,
                "float": 1.5,
                "bool": True,
                "list": [valid[key]],
                "object": {"$ne": None},
            }.items():
                if (type_name == "null" and optional) or (key, type_name) == ("capacity", "int"):
                    continue
                cases[f"{name}-{key}-{type_name}"] = post.with_(json={**valid, key: wrong})
        # Over settings.max_body_bytes: refused before it is parsed.
        huge = {**valid, next(iter(valid)): "x" * (MAX_BODY + 1)}
        cases[f"{name}-oversized"] = post.with_(json=huge, status=413, code="body_too_large")
        cases[f"{name}-oversized-garbage"] = post.with_(
            data=b"\x00" * (MAX_BODY * 4), status=413, code="body_too_large"
        )
    return cases


def _field_cases() -> dict[str, Case]:
    """Right types, wrong values: each field's own limits."""
    signup = Case("POST", "/api/users", 422, "invalid_input", auth="none")
    login = Case("POST", "/api/auth/login", 422, "invalid_input", auth="none")
    room = Case("POST", "/api/rooms", 422, "invalid_input")
    message = Case("POST", "/api/rooms/lobby/messages", 422, "invalid_input", auth="session")
    values: dict[str, tuple[Case, dict[str, Any], str, Any]] = {
        "username-short": (signup, SIGNUP, "username", "ab"),
        "username-long": (signup, SIGNUP, "username", "a" * 33),
        "username-10kB": (signup, SIGNUP, "username", "a" * 10_000),
        "username-space": (signup, SIGNUP, "username", "mal lory"),
        "username-nul": (signup, SIGNUP, "username", "mal\x00lory"),
        "username-rtl": (signup, SIGNUP, "username", "mal\u202elory"),
        "username-cyrillic": (signup, SIGNUP, "username", "mаllory"),
        "username-path": (signup, SIGNUP, "username", "../etc"),
        "email-invalid": (signup, SIGNUP, "email", "not-an-email"),
        "email-nul": (signup, SIGNUP, "email", "mal\x00@example.org"),
        "email-long": (signup, SIGNUP, "email", "m" * 250 + "@example.org"),
        "password-short": (signup, SIGNUP, "password", "short"),
        "password-over-72-bytes": (signup, SIGNUP, "password", "é" * 37),
        "password-nul": (signup, SIGNUP, "password", "correct\x00horse"),
        "password-surrogate": (signup, SIGNUP, "password", "correct horse \ud800"),
        "display-name-empty": (signup, SIGNUP, "display_name", ""),
        "display-name-blank": (signup, SIGNUP, "display_name", " \t "),
        "display-name-rtl": (signup, SIGNUP, "display_name", "Mal\u202elory"),
        "display-name-zero-width": (signup, SIGNUP, "display_name", "Mal\u200blory"),
        "display-name-control": (signup, SIGNUP, "display_name", "Mal\x1b[31mlory"),
        "display-name-newline": (signup, SIGNUP, "display_name", "Mal\nlory"),
        "display-name-line-separator": (signup, SIGNUP, "display_name", "Mal\u2028lory"),
        "display-name-hangul-filler": (signup, SIGNUP, "display_name", "\u3164"),
        "display-name-braille-blank": (signup, SIGNUP, "display_name", "\u2800\u2800"),
        "display-name-long": (signup, SIGNUP, "display_name", "m" * 65),
        "login-empty": (login, LOGIN, "login", ""),
        "login-long": (login, LOGIN, "login", "a" * 255),
        "password-empty": (login, LOGIN, "password", ""),
        "login-password-long": (login, LOGIN, "password", "x" * 257),
        "room-name-empty": (room, NEW_ROOM, "name", " "),
        "room-name-rtl": (room, NEW_ROOM, "name", "Kit\u202echen"),
        "room-name-long": (room, NEW_ROOM, "name", "k" * 81),
        "capacity-zero": (room, NEW_ROOM, "capacity", 0),
        "capacity-negative": (room, NEW_ROOM, "capacity", -1),
        "capacity-over-max": (room, NEW_ROOM, "capacity", 101),
        "capacity-huge": (room, NEW_ROOM, "capacity", 10**30),
        "capacity-string": (room, NEW_ROOM, "capacity", "8"),
        "capacity-float": (room, NEW_ROOM, "capacity", 8.0),
        "capacity-bool": (room, NEW_ROOM, "capacity", True),
        "text-empty": (message, NEW_MESSAGE, "text", ""),
        "text-blank": (message, NEW_MESSAGE, "text", " \n\t "),
        "text-long": (message, NEW_MESSAGE, "text", "x" * 4001),
        "text-control": (message, NEW_MESSAGE, "text", "hi\x07"),
        "text-rtl": (message, NEW_MESSAGE, "text", "hi \u202egnp.exe"),
        "text-surrogate": (message, NEW_MESSAGE, "text", "hi \udc80"),
        "text-only-joiners": (message, NEW_MESSAGE, "text", "\u200d\u200d"),
    }
    return {
        name: case.with_(json={**valid, key: value})
        for name, (case, valid, key, value) in values.items()
    }


# Slugs no room may have (each is refused on creation and when looked up).
HOSTILE_SLUGS: dict[str, str] = {
    "nul": "lob\x00by",
    "escape": "lob\x1bby",
    "tab": "lob\tby",
    "newline": "lobby\n",
    "delete": "lob\x7fby",
    "rtl-override": "lob\u202eby",
    "rtl-override-only": "\u202e\u202e",
    "ltr-mark": "lobby\u200e",
    "zero-width-space": "lob\u200bby",
    "zero-width-joiner-end": "lobby\u200d",
    "zero-width-joiner-start": "\u200dlobby",
    "zero-width-joiner-letters": "lob\u200dby",
    "variation-selector-letter": "lobby\ufe0f",
    "combining-grapheme-joiner": "lobby\u034f",
    "hangul-filler": "\u3164\u3164",
    "hangul-choseong-filler": "lobby\u115f",
    "braille-blank": "\u2800\u2800",
    "replacement-char": "\ufffd\ufffd",
    "bom": "\ufefflobby",
    "soft-hyphen": "lob\u00adby",
    "tag-chars": "lobby\U000e0041",
    "private-use": "lobby\ue000",
    "10kB": "a" * 10_000,
    "10kB-multibyte": "é" * 5_000,
    "49-chars": "a" * 49,
    "one-char": "a",
    "dot-dot-etc": "../etc",
    "dot-dot": "..",
    "dot": ".a",
    "slash": "a/b",
    "backslash": "a\\b",
    "percent-encoded-dots": "%2e%2e",
    "query": "lobby?x=1",
    "fragment": "lobby#x",
    "reserved-api": "api",
    "reserved-admin": "admin",
    "reserved-upper": "ADMIN",
    "reserved-ws": "ws",
    "reserved-null": "null",
    "reserved-undefined": "undefined",
    "space": "lob by",
    "leading-space": " lobby",
    "nbsp": "lob\u00a0by",
    "ideographic-space": "lob\u3000by",
    "only-hyphens": "--",
    "leading-hyphen": "-lobby",
    "trailing-underscore": "lobby_",
    "leading-combining": "\u0301lobby",
    "mixed-latin-cyrillic": "pаypal",
    "mixed-latin-greek": "pαypal",
    "fullwidth": "ｐａｙ",
    "math-bold": "𝐩𝐚𝐲",
    "superscript": "lobby²",
    "html": "<script>",
    "quote": "lob'by",
    "dollar": "$where",
    "email-like": "a@b",
}

# How a hostile slug reaches the server in a path: URL-quoted, so that "/" and "?" stay in it.
_PATH_STATUS = {"slash": 404, "dot-dot-etc": 404}


def _slug_cases() -> dict[str, Case]:
    cases: dict[str, Case] = {}
    for name, slug in HOSTILE_SLUGS.items():
        cases[f"create-{name}"] = Case(
            "POST", "/api/rooms", 422, "invalid_input", json={**NEW_ROOM, "slug": slug}
        )
        quoted = quote(slug, safe="")
        status = _PATH_STATUS.get(name, 422)
        code = "invalid_slug" if status == 422 else "not_found"
        for kind, path, auth, body in (
            ("info", f"/api/rooms/{quoted}", "none", _NO_JSON),
            ("qr", f"/api/rooms/{quoted}/qr.svg", "none", _NO_JSON),
            ("history", f"/api/rooms/{quoted}/messages", "session", _NO_JSON),
            ("post", f"/api/rooms/{quoted}/messages", "session", NEW_MESSAGE),
        ):
            method = "POST" if kind == "post" else "GET"
            cases[f"{kind}-{name}"] = Case(method, path, status, code, auth=auth, json=body)
    # Well-formed slugs of rooms that do not exist.
    for kind, suffix, auth in (
        ("info", "", "none"),
        ("qr", "/qr.svg", "none"),
        ("history", "/messages", "session"),
    ):
        cases[f"{kind}-absent"] = Case(
            "GET", f"/api/rooms/kitchen{suffix}", 404, "room_not_found", auth=auth
        )
    cases["post-absent"] = Case(
        "POST", "/api/rooms/kitchen/messages", 404, "room_not_found", "session", NEW_MESSAGE
    )
    cases["info-empty-slug"] = Case("GET", "/api/rooms/", 404, "not_found", auth="none")
    return cases


def _history_cases() -> dict[str, Case]:
    history = Case("GET", "/api/rooms/lobby/messages", 422, "invalid_input", auth="session")
    queries = {
        "limit-zero": "limit=0",
        "limit-101": "limit=101",
        "limit-negative": "limit=-1",
        "limit-word": "limit=abc",
        "limit-float": "limit=1.5",
        "limit-huge": "limit=" + "9" * 400,
        "limit-nul": "limit=%00",
        "before-long": "before=" + "a" * 65,
        "extra-param": "limit=5&admin=1",
        "unknown-param": "page=2",
    }
    cases = {name: history.with_(path=f"{history.path}?{q}") for name, q in queries.items()}
    cursors = {
        "before-not-an-id": "before=not-an-id",
        "before-operator": "before=%7B%22%24gt%22%3A%22%22%7D",
        "before-absent-id": f"before={ABSENT_ID}",
        "before-user-id": "before={user_id}",
        "before-nul": "before=%00",
    }
    for name, q in cursors.items():
        cases[name] = history.with_(path=f"{history.path}?{q}", code="invalid_cursor")
    return cases


def _user_cases() -> dict[str, Case]:
    by_id = Case("GET", "/api/users/", 404, "user_not_found")
    by_name = Case("GET", "/api/users/by-username/", 404, "user_not_found")
    cases: dict[str, Case] = {}
    for name, value in {
        "not-an-id": "not-an-id",
        "absent-id": ABSENT_ID,
        "short-hex": "0123abcd",
        "nul": "\x00",
        "10kB": "a" * 10_000,
        "rtl": "\u202e" + ABSENT_ID,
        "operator": '{"$ne": null}',
        "dot-dot": "..",
    }.items():
        cases[f"by-id-{name}"] = by_id.with_(path=by_id.path + quote(value, safe=""))
        cases[f"by-name-{name}"] = by_name.with_(path=by_name.path + quote(value, safe=""))
    cases["by-name-regex"] = by_name.with_(path=by_name.path + quote(".*", safe=""))
    cases["by-id-path-trick"] = by_id.with_(path="/api/users/..%2Fme", code="not_found")
    return cases


# Endpoints that need a token: (method, path, valid body, purpose the token must have).
TOKEN_ENDPOINTS: dict[str, tuple[str, str, Any, str]] = {
    "me": ("GET", "/api/users/me", _NO_JSON, "user"),
    "by-id": ("GET", "/api/users/{user_id}", _NO_JSON, "user"),
    "by-name": ("GET", "/api/users/by-username/alice", _NO_JSON, "user"),
    "session": ("POST", "/api/sessions", _NO_JSON, "user"),
    "new-room": ("POST", "/api/rooms", NEW_ROOM, "user"),
    "history": ("GET", "/api/rooms/lobby/messages", _NO_JSON, "session"),
    "new-message": ("POST", "/api/rooms/lobby/messages", NEW_MESSAGE, "session"),
}
BAD_TOKENS = [
    "none",
    "empty",
    "scheme-only",
    "scheme-blank",
    "basic",
    "no-scheme",
    "garbage",
    "dots",
    "huge",
    "non-ascii",
    "two-tokens",
    "room",
    "other-kid",
    "same-kid-other-secret",
    "no-kid",
    "alg-none",
    "wrong-issuer",
    "wrong-audience",
    "no-jti",
    "no-purpose",
    "future-iat",
    "tampered-purpose",
    "tampered-sub",
]


def _token_cases() -> dict[str, Case]:
    cases: dict[str, Case] = {}
    for name, (method, path, body, purpose) in TOKEN_ENDPOINTS.items():
        other = "session" if purpose == "user" else "user"
        bad = [*BAD_TOKENS, other, f"expired-{purpose}"]
        bad += ["absent-user", "sub-not-an-id"] if purpose == "user" else ["session-absent-user"]
        if purpose == "session":
            bad.append("session-without-id")
        for token in bad:
            cases[f"{name}-{token}"] = Case(
                method, path, 401, "unauthorized", auth=token, json=body
            )
    return cases


def _method_cases() -> dict[str, Case]:
    cases = {
        "put-users": Case("PUT", "/api/users", 405, "method_not_allowed", "none", SIGNUP),
        "get-login": Case("GET", "/api/auth/login", 405, "method_not_allowed", "none"),
        "delete-me": Case("DELETE", "/api/users/me", 405, "method_not_allowed"),
        "get-sessions": Case("GET", "/api/sessions", 405, "method_not_allowed"),
        "delete-room": Case("DELETE", "/api/rooms/lobby", 405, "method_not_allowed", "none"),
        "post-qr": Case("POST", "/api/rooms/lobby/qr.svg", 405, "method_not_allowed", "none"),
        "patch-messages": Case(
            "PATCH", "/api/rooms/lobby/messages", 405, "method_not_allowed", "session"
        ),
        "unknown-path": Case("GET", "/api/nope", 404, "not_found", "none"),
    }
    return cases


BAD_INPUT: dict[str, Case] = {
    **_body_cases(),
    **_field_cases(),
    **_slug_cases(),
    **_history_cases(),
    **_user_cases(),
    **_token_cases(),
    **_method_cases(),
}


# A session token of a user who no longer exists still reads history: only POST checks.
_KNOWN_BUGS: dict[str, str] = {}


def _bad_input_params() -> list[Any]:
    params = []
    for name, case in BAD_INPUT.items():
        marks = [pytest.mark.xfail(reason=_KNOWN_BUGS[name])] if name in _KNOWN_BUGS else []
        params.append(pytest.param(case, id=name, marks=marks))
    return params


@pytest.mark.parametrize("case", _bad_input_params())
async def test_bad_input_is_refused_and_nothing_stored(world: World, case: Case) -> None:
    error = await _check(world, case)
    # Passwords never come back, not even in a validation error.
    password = case.json.get("password") if isinstance(case.json, dict) else None
    if isinstance(password, str) and len(password) >= 4:
        assert password not in json.dumps(error), error


async def test_the_world_works_with_good_tokens(world: World) -> None:
    """The world's tokens are valid: the 401s above come from the bad ones alone."""
    try:
        for name, (method, path, body, purpose) in TOKEN_ENDPOINTS.items():
            case = Case(method, path, 200, auth=purpose, json=body)
            response = await _send(world, case)
            status = response.status_code
            assert status in (200, 201), (name, await response.get_data(as_text=True))
    finally:
        # What this stored goes again, so that the world stays as the cases expect it.
        await Room.find(Room.slug == NEW_ROOM["slug"]).delete()
        await Message.find(Message.text == NEW_MESSAGE["text"]).delete()


async def test_405_says_what_is_allowed(world: World) -> None:
    response = await _send(world, BAD_INPUT["delete-room"])
    assert response.status_code == 405
    assert "GET" in response.headers.get("Allow", "")


async def test_401_asks_for_a_bearer_token(world: World) -> None:
    response = await _send(world, BAD_INPUT["me-none"])
    assert response.status_code == 401
    assert response.headers.get("WWW-Authenticate", "").startswith("Bearer")


# --- unicode slugs that are fine -------------------------------------------------------

GOOD_SLUGS = [
    "café",
    "🎉🎉",
    "日本語の部屋",
    "tiếng-việt",
    "Ünïcödé_42",
    "ΑΘΗΝΑ",
    "Москва",
    "❤️-love",
]


def _canonical(slug: str) -> str:
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", slug).casefold())


@pytest.mark.parametrize("slug", GOOD_SLUGS)
async def test_unicode_slugs_are_accepted_and_normalised(api: Api, slug: str) -> None:
    user_token = await api.user_token("alice")
    session_token = await api.session_token(user_token)
    room = await api.create_room(user_token, slug)
    canonical = _canonical(slug)
    assert room["slug"] == canonical
    assert room["url"] == "https://rooms.example.org/r/" + quote(canonical, safe="")
    stored = await Room.find_one(Room.slug == canonical)
    assert stored is not None
    # Every spelling of it finds the one room: as typed, NFD, upper case, canonical.
    spellings = {slug, unicodedata.normalize("NFD", slug), slug.upper(), canonical}
    for spelling in spellings:
        for suffix in ("", "/qr.svg", "/messages"):
            found = await api.client.get(
                f"/api/rooms/{quote(spelling, safe='')}{suffix}", headers=bearer(session_token)
            )
            assert found.status_code == 200, (spelling, suffix)
            if not suffix:
                assert (await found.get_json())["slug"] == canonical


COLLISIONS = {
    "case": ("café", "Café"),
    "upper": ("lobby2", "LOBBY2"),
    "nfd-vs-nfc": ("café", "cafe\u0301"),
    "nfc-vs-nfd": ("cafe\u0301", "CAFÉ"),
    "sharp-s": ("straße", "STRASSE"),
    "final-sigma": ("σοφός", "ΣΟΦΌΣ"),
    "vietnamese-nfd": ("tiếng-việt", unicodedata.normalize("NFD", "TIẾNG-VIỆT")),
    "emoji": ("🎉🎉", "🎉🎉"),
}


@pytest.mark.parametrize(("first", "second"), list(COLLISIONS.values()), ids=list(COLLISIONS))
async def test_equivalent_slugs_collide(api: Api, first: str, second: str) -> None:
    user_token = await api.user_token("alice")
    await api.create_room(user_token, first)
    rooms = await Room.find_all().to_list()
    again = await api.client.post(
        "/api/rooms", json={"slug": second, "name": "Second"}, headers=bearer(user_token)
    )
    assert again.status_code == 409, await again.get_data(as_text=True)
    assert (await error_of(again))["code"] == "room_exists"
    assert await Room.find_all().to_list() == rooms


def test_the_table_covers_every_endpoint() -> None:
    covered: set[tuple[str, str]] = set()
    for case in BAD_INPUT.values():
        path = case.path.split("?")[0]
        parts = path.split("/")
        if path.startswith("/api/rooms/") and len(parts) > 3:
            parts[3] = "<slug>"
        if path.startswith("/api/users/") and parts[3] not in ("me", "by-username"):
            parts[3] = "<id>"
        if path.startswith("/api/users/by-username/"):
            parts[4] = "<u>"
        covered.add((case.method, "/".join(parts)))
    endpoints = {
        ("POST", "/api/users"),
        ("POST", "/api/auth/login"),
        ("GET", "/api/users/me"),
        ("GET", "/api/users/<id>"),
        ("GET", "/api/users/by-username/<u>"),
        ("POST", "/api/sessions"),
        ("POST", "/api/rooms"),
        ("GET", "/api/rooms/<slug>"),
        ("GET", "/api/rooms/<slug>/qr.svg"),
        ("GET", "/api/rooms/<slug>/messages"),
        ("POST", "/api/rooms/<slug>/messages"),
    }
    assert endpoints <= covered, endpoints - covered
