"""Property tests: whatever a client sends, the node answers below 500, in the contract's shape.

Every endpoint gets random JSON (and near-valid bodies with fields swapped for random
values), random bytes, random Authorization headers and random text in its path and query
string. A 4xx must be `{"error": {"code", "message"}}` and must leave the store as it was.
Derandomized, so a run is repeatable; a failure shrinks to a small example.
"""

from __future__ import annotations

import json
import time
import unicodedata
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urlencode

import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.runtime.services import BackingServices
from node.state import keys as keys_module
from node.store.models import Message, Room, User
from node.store.rooms import RESERVED_SLUGS, SLUG_MAX_CHARS, SLUG_MIN_CHARS, normalize_slug
from node.store.text import INVISIBLE_CHARS, clean_text, is_hidden
from tests.conftest import error_of
from tests.node.web.test_bad_input import (
    BODY_ENDPOINTS,
    HOSTILE_SLUGS,
    TOKEN_ENDPOINTS,
    World,
    bind_beanie,
    open_world,
)

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
PURE = settings(FUZZ, max_examples=3000)

# --- strategies --------------------------------------------------------------------------

# Characters that have broken text handling somewhere: controls, bidi and zero-width
# format characters, fillers, combining marks, look-alikes, compatibility forms, emoji parts.
TRICKY = (
    "\x00\x07\t\n\r\x1b\x7f\u0085\u00a0\u00ad\u0301\u0308\u034f\u115f\u1160\u180b\u180e"
    "\u200b\u200c\u200d\u200e\u202a\u202e\u2028\u2060\u2066\u2800\u3000\u3164\ufe00\ufe0e"
    "\ufe0f\ufeff\ufffc\ufffd\U000e0041\U000e0100\ue000"
    "aAzZ09-_./\\%?#&=+@$:;'\" <>{}[]éÉßſǅﬁĲ²①ａⓐ𝐚аеορΣςσİı"
    "🎉👍🏽👨🏻\U0001f3fb❤☃🏳🌈⃣"
)
tricky_text = st.text(st.sampled_from(TRICKY), max_size=12)
any_text = st.text(max_size=40)  # any code point but surrogates
surrogate_text = st.text(st.characters(categories=["Cs", "Ll"]), max_size=6)
long_text = st.integers(min_value=40, max_value=12_000).map(lambda n: "ā" * n)
# Mostly what a slug may hold, so that some are accepted and the accepted path is tested too.
slug_like = st.text(
    st.sampled_from("abzAZ09-_éÉßſİıΣσςаЖ日本\u0301🎉👍🏽❤\ufe0f\u200d"), max_size=10
)
texts = st.one_of(
    tricky_text, any_text, long_text, slug_like, st.sampled_from(list(HOSTILE_SLUGS.values()))
)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(),  # NaN and infinities too: Python's JSON writes and reads them
    texts,
    surrogate_text,
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.one_of(st.text(max_size=8), tricky_text), children, max_size=4)
    ),
    max_leaves=12,
)


DROP = object()


def mutated(
    valid: dict[str, Any], values: st.SearchStrategy[Any]
) -> st.SearchStrategy[dict[str, Any]]:
    """The valid dict with up to three fields dropped, changed or added: near misses."""
    names = st.one_of(st.sampled_from(sorted(valid)), st.text(max_size=8))
    changes = st.lists(st.tuples(names, st.one_of(st.just(DROP), values)), max_size=3)

    def apply(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result = dict(valid)
        for name, value in pairs:
            if value is DROP:
                result.pop(name, None)
            else:
                result[name] = value
        return result

    return changes.map(apply)


body_cases = st.sampled_from(sorted(BODY_ENDPOINTS)).flatmap(
    lambda name: st.tuples(
        st.just(name),
        st.one_of(json_values, mutated(BODY_ENDPOINTS[name][1], st.one_of(texts, json_values))),
    )
)

content_types = st.sampled_from(
    [
        None,
        "application/json",
        "application/json; charset=latin-1",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/vnd.api+json",
    ]
)
raw_bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda value: json.dumps(value).encode()),
    # Valid JSON cut short or with a stray byte: the parser's error paths.
    st.tuples(json_values, st.integers(0, 50), st.binary(max_size=3)).map(
        lambda t: json.dumps(t[0]).encode()[: t[1]] + t[2]
    ),
)

# Header values: anything HTTP can carry in a header (no CR, LF or NUL).
header_text = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\r\n\x00"), max_size=60
)
segment = st.one_of(
    st.text(
        st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_="),
        max_size=40,
    ),
    json_values.map(lambda v: jwt.utils.base64url_encode(json.dumps(v).encode()).decode()),
)
jwt_like = st.lists(segment, min_size=1, max_size=4).map(".".join)
NOW = int(time.time())
YEAR_9999 = 253_402_300_799
# A valid user token's claims, each kept, dropped or swapped for something random.
# ("<user>" stands for the world's user id.) Expiry stays before the year 10000: past it
# TokenService.verify fails with a 500, see test_signed_token_expiring_after_year_9999.
VALID_CLAIMS: dict[str, Any] = {
    "iss": "sfumesh",
    "aud": "sfumesh",
    "sub": "<user>",
    "purpose": "user",
    "iat": NOW,
    "exp": NOW + 3600,
    "jti": "j",
    "session_id": "s",
}
claim_values = st.one_of(
    json_values,
    st.sampled_from(["sfumesh", "user", "session", "room", "<user>", ["sfumesh"]]),
    st.integers(min_value=-(2**40), max_value=YEAR_9999),
)
claims = mutated(VALID_CLAIMS, claim_values)
header_claims = st.dictionaries(
    st.sampled_from(["kid", "alg", "typ", "crit", "jku"]),
    st.one_of(json_values, st.sampled_from(["k1", "HS256", "none", "RS256"])),
    max_size=3,
)


def signed(world_key: str, payload: dict[str, Any], header: dict[str, Any]) -> str:
    """A token with random claims, signed with the node's own key (as if the key leaked)."""
    parts = [
        {"alg": "HS256", "kid": "k1", **header},
        payload,
    ]
    encoded = [jwt.utils.base64url_encode(json.dumps(part).encode()) for part in parts]
    signing_input = b".".join(encoded)
    algorithm = jwt.algorithms.HMACAlgorithm(jwt.algorithms.HMACAlgorithm.SHA256)
    signature = algorithm.sign(signing_input, algorithm.prepare_key(world_key))
    return (signing_input + b"." + jwt.utils.base64url_encode(signature)).decode()


# --- the world ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def _module_world(
    backing: BackingServices, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[World]:
    async with open_world(backing, tmp_path_factory.mktemp("fuzz")) as world:
        yield world


@pytest.fixture
async def world(_module_world: World) -> World:
    await bind_beanie(_module_world)
    return _module_world


async def _counts(world: World) -> tuple[int, int, int, set[Any]]:
    # Failed logins, sign-ups and chat posts count in Redis on purpose (expiring rate-limit
    # counters, which may vanish mid-request); the node's own registry record expires and is
    # written again by its heartbeat whenever a CPU-bound test before held the event loop
    # past node_ttl_s. Any other new key is something stored.
    volatile = (b":loginlimit:", b":signuplimit:", b":chat-limit:", b":room-lookups:")
    registry = (keys_module.NODES.encode(), keys_module.node("").encode())
    found = [key for key in await world.redis.keys("*") if isinstance(key, bytes)]
    keys = {
        key
        for key in found
        if not any(part in key for part in volatile) and not key.startswith(registry)
    }
    return (
        await User.find_all().count(),
        await Room.find_all().count(),
        await Message.find_all().count(),
        keys,
    )


async def _request(world: World, method: str, path: str, **kwargs: Any) -> Any:
    before = await _counts(world)
    response = await world.client.open(path, method=method, **kwargs)
    body = await response.get_data(as_text=True)
    assert response.status_code < 500, (method, path, body)
    if response.status_code >= 400:
        assert response.content_type == "application/json", body
        await error_of(response)
        assert await _counts(world) == before, ("refused but stored", method, path, body)
    return response


def _auth(world: World, purpose: str) -> dict[str, str]:
    value = world.auth[purpose]
    return {"Authorization": value} if value is not None else {}


# --- endpoints ---------------------------------------------------------------------------


@FUZZ
@given(case=body_cases)
async def test_random_json_bodies(world: World, case: tuple[str, Any]) -> None:
    name, body = case
    path, _, purpose = BODY_ENDPOINTS[name]
    headers = _auth(world, purpose)
    await _request(world, "POST", path, json=body, headers=headers)


@FUZZ
@given(name=st.sampled_from(sorted(BODY_ENDPOINTS)), body=raw_bodies, content_type=content_types)
async def test_random_bytes_bodies(
    world: World, name: str, body: bytes, content_type: str | None
) -> None:
    path, _, purpose = BODY_ENDPOINTS[name]
    headers = _auth(world, purpose)
    if content_type is not None:
        headers["Content-Type"] = content_type
    await _request(world, "POST", path, data=body, headers=headers)


@FUZZ
@given(
    name=st.sampled_from(sorted(TOKEN_ENDPOINTS)),
    value=st.one_of(
        header_text,
        header_text.map("Bearer ".__add__),
        jwt_like.map("Bearer ".__add__),
        st.tuples(st.sampled_from(["Bearer", "bearer", "BEARER", "Basic", ""]), jwt_like).map(
            " ".join
        ),
    ),
)
async def test_random_authorization_headers(world: World, name: str, value: str) -> None:
    method, path, body, _ = TOKEN_ENDPOINTS[name]
    kwargs: dict[str, Any] = {"headers": {"Authorization": value}}
    if isinstance(body, dict):
        kwargs["json"] = body
    response = await _request(world, method, path.format(user_id=world.user_id), **kwargs)
    assert response.status_code == 401


@FUZZ
@given(
    name=st.sampled_from(sorted(TOKEN_ENDPOINTS)),
    payload=claims,
    header=header_claims,
)
async def test_tokens_with_random_claims_signed_by_the_node(
    world: World, name: str, payload: dict[str, Any], header: dict[str, Any]
) -> None:
    method, path, body, _ = TOKEN_ENDPOINTS[name]
    payload = {
        name: world.user_id if value == "<user>" else value for name, value in payload.items()
    }
    token = signed(world.signing_key, payload, header)
    kwargs: dict[str, Any] = {"headers": {"Authorization": f"Bearer {token}"}}
    if isinstance(body, dict):
        kwargs["json"] = body
    await _request(world, method, path.format(user_id=world.user_id), **kwargs)


PATH_TEMPLATES = [
    ("GET", "/api/rooms/{}", "none"),
    ("GET", "/api/rooms/{}/qr.svg", "none"),
    ("GET", "/api/rooms/{}/messages", "session"),
    ("POST", "/api/rooms/{}/messages", "session"),
    ("GET", "/api/users/{}", "user"),
    ("GET", "/api/users/by-username/{}", "user"),
]


@FUZZ
@given(template=st.sampled_from(PATH_TEMPLATES), value=texts)
async def test_random_path_values(world: World, template: tuple[str, str, str], value: str) -> None:
    method, path, purpose = template
    kwargs: dict[str, Any] = {"headers": _auth(world, purpose)}
    if method == "POST":
        kwargs["json"] = {"text": "fuzz"}
    await _request(world, method, path.format(quote(value, safe="")), **kwargs)


query_values = st.one_of(
    texts,
    st.integers().map(str),
    st.integers(1, 100).map(str),
    st.sampled_from(["", "0", "1", "100", "101", "-1", "1e2", " 5", "0x10", "５"]),
)
query_strings = st.one_of(
    st.dictionaries(
        st.one_of(
            st.sampled_from(["before", "limit"]),
            st.sampled_from(["before", "limit"]),
            st.text(max_size=8),
        ),
        query_values,
        max_size=3,
    ).map(lambda q: urlencode(q)),
    st.text(max_size=40).map(lambda raw: quote(raw, safe="=&")),
)


@FUZZ
@given(query=query_strings)
async def test_random_history_queries(world: World, query: str) -> None:
    await _request(
        world, "GET", f"/api/rooms/lobby/messages?{query}", headers=_auth(world, "session")
    )


@FUZZ
@given(slug=st.one_of(slug_like, texts), capacity=st.one_of(st.none(), st.integers(), json_values))
async def test_random_room_slugs(world: World, slug: str, capacity: Any) -> None:
    body: dict[str, Any] = {"slug": slug}
    if capacity is not None:
        body["capacity"] = capacity
    response = await _request(world, "POST", "/api/rooms", json=body, headers=_auth(world, "user"))
    if response.status_code == 201:
        room = await response.get_json()
        assert room["slug"] == normalize_slug(slug)
        # The room answers at its canonical address and at the one it was created with.
        for spelling in {room["slug"], slug}:
            found = await world.client.get(f"/api/rooms/{quote(spelling, safe='')}")
            assert found.status_code == 200, (spelling, await found.get_data(as_text=True))
    elif response.status_code == 409:
        assert (await error_of(response))["code"] == "room_exists"


# --- the text rules themselves (no server: many more examples) -----------------------


@PURE
@given(raw=st.one_of(texts, st.text(st.characters(exclude_categories=[]), max_size=20)))
def test_normalize_slug_is_canonical_or_refuses(raw: str) -> None:
    try:
        slug = normalize_slug(raw)
    except ValueError:
        return
    assert normalize_slug(slug) == slug
    assert slug == unicodedata.normalize("NFC", slug)
    assert SLUG_MIN_CHARS <= len(slug) <= SLUG_MAX_CHARS
    assert slug not in RESERVED_SLUGS
    assert not any(char.isspace() or char in INVISIBLE_CHARS for char in slug)
    # No format characters but the joiners of an emoji, never at either end.
    assert not any(is_hidden(char) for char in slug)
    assert not is_hidden(slug[0]) and slug[0] not in "\u200d\ufe0e\ufe0f"
    assert slug[-1] != "\u200d"
    # The address is the same whichever way it was typed.
    assert normalize_slug(slug.upper()) == slug or slug.upper().casefold() != slug
    assert normalize_slug(unicodedata.normalize("NFD", raw)) == slug


@PURE
@given(
    raw=st.one_of(texts, st.text(st.characters(exclude_categories=[]), max_size=20)),
    newlines=st.booleans(),
)
def test_clean_text_is_stable_or_refuses(raw: str, newlines: bool) -> None:
    try:
        text = clean_text(raw, max_chars=200, allow_newlines=newlines)
    except ValueError:
        return
    assert clean_text(text, max_chars=200, allow_newlines=newlines) == text
    assert text and text == text.strip() and len(text) <= 200
    assert not any(is_hidden(char) for char in text if char not in "\n\t")


async def test_signed_token_expiring_after_year_9999(world: World) -> None:
    """Only with the node's key (a leaked or misconfigured one), but still not a 500."""
    payload = {**VALID_CLAIMS, "sub": world.user_id, "exp": YEAR_9999 + 1}
    del payload["session_id"]
    token = signed(world.signing_key, payload, {})
    await _request(world, "GET", "/api/users/me", headers={"Authorization": f"Bearer {token}"})
