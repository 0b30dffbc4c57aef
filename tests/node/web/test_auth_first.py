"""Issue 21, item 1: no one may make a node normalise long text for nothing.

The attack: `"a"` and 15,999 combining marks as chat text (NFC is quadratic in a run of
marks), sent without a token (validation used to run before the login check), with a token,
and over the WebSocket faster than the chat limit. Each is measured as work, never as time:
the characters NFC was given, and whether the body or query was parsed at all.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import pytest
import quart_schema.conversion
import quart_schema.validation
from redis.asyncio import Redis

from node.store.messages import MAX_CHAT_CHARS
from node.web.auth import AUTH_ATTRIBUTE
from node.web.errors import JSONCheckedRequest
from node.web.tokens import Purpose
from tests.conftest import Api, bearer, error_of
from tests.node.web.test_ws_bad_input import open_scene

ATTACK = "a" + "\u0301\u0316" * 7_999  # 15,999 marks of two classes: NFC reorders them


def utf8_json(value: Any) -> dict[str, Any]:
    """A JSON body as a browser sends it (UTF-8, not \\u escapes: ATTACK is 32 KB so)."""
    return {
        "data": json.dumps(value, ensure_ascii=False).encode(),
        "headers": {"Content-Type": "application/json"},
    }


@dataclass
class Work:
    normalised: list[int] = field(default_factory=list)  # lengths given to NFC
    bodies_parsed: int = 0
    models_loaded: int = 0  # quart-schema validations (bodies and query strings)

    def texts(self) -> list[int]:
        """What NFC was given apart from the room's slug (and its single characters): the
        chat text's share."""
        return [length for length in self.normalised if length > len("lobby")]


@pytest.fixture
def work(monkeypatch: pytest.MonkeyPatch) -> Iterator[Work]:
    counts = Work()
    normalize = unicodedata.normalize
    get_json = JSONCheckedRequest.get_json
    model_load = quart_schema.conversion.model_load

    def counting_normalize(form: Any, value: str) -> str:
        counts.normalised.append(len(value))
        return normalize(form, value)

    async def counting_get_json(self: JSONCheckedRequest, *args: Any, **kwargs: Any) -> Any:
        counts.bodies_parsed += 1
        return await get_json(self, *args, **kwargs)

    def counting_model_load(*args: Any, **kwargs: Any) -> Any:
        counts.models_loaded += 1
        return model_load(*args, **kwargs)

    monkeypatch.setattr(unicodedata, "normalize", counting_normalize)
    monkeypatch.setattr(JSONCheckedRequest, "get_json", counting_get_json)
    monkeypatch.setattr(quart_schema.validation, "model_load", counting_model_load)
    yield counts


# Every route that needs a token, and which; a route added without `authenticated` (or
# with it below its validators) fails the tests below.
AUTHENTICATED = {
    ("GET", "/api/users/me"): Purpose.USER,
    ("GET", "/api/users/<user_id>"): Purpose.USER,
    ("GET", "/api/users/by-username/<username>"): Purpose.USER,
    ("POST", "/api/auth/refresh"): Purpose.USER,
    ("POST", "/api/auth/logout"): Purpose.USER,
    ("POST", "/api/users/me/password"): Purpose.USER,
    ("POST", "/api/sessions"): Purpose.USER,
    ("POST", "/api/sessions/ws-ticket"): Purpose.SESSION,
    ("POST", "/api/rooms"): Purpose.USER,
    ("POST", "/api/rooms/<slug>/join"): Purpose.SESSION,
    ("POST", "/api/rooms/<slug>/kick"): Purpose.USER,
    ("PATCH", "/api/rooms/<slug>"): Purpose.USER,
    ("GET", "/api/rooms/<slug>/messages"): Purpose.SESSION,
    ("POST", "/api/rooms/<slug>/messages"): Purpose.SESSION,
    # split the bill (node/web/costs.py)
    ("GET", "/api/rooms/<slug>/costs"): Purpose.SESSION,
    ("POST", "/api/rooms/<slug>/expenses"): Purpose.SESSION,
    ("GET", "/api/rooms/<slug>/expenses/<expense_id>"): Purpose.SESSION,
    ("PUT", "/api/rooms/<slug>/expenses/<expense_id>"): Purpose.SESSION,
    ("DELETE", "/api/rooms/<slug>/expenses/<expense_id>"): Purpose.SESSION,
    ("POST", "/api/rooms/<slug>/payments"): Purpose.SESSION,
    ("DELETE", "/api/rooms/<slug>/payments/<payment_id>"): Purpose.SESSION,
    # Memories (issue 15)
    ("POST", "/api/rooms/<slug>/files"): Purpose.SESSION,
    ("GET", "/api/rooms/<slug>/files"): Purpose.SESSION,
    ("POST", "/api/rooms/<slug>/files/token"): Purpose.SESSION,
    ("DELETE", "/api/files/<file_id>"): Purpose.SESSION,
    # a session token in the header, or a file token in `?t=` (an <img> sends no header)
    ("GET", "/api/files/<file_id>"): Purpose.FILE,
    ("GET", "/api/files/<file_id>/<variant>"): Purpose.FILE,
    ("GET", "/api/rooms/<slug>/happenings"): Purpose.SESSION,
    ("POST", "/api/rooms/<slug>/happenings"): Purpose.SESSION,
    ("GET", "/api/happenings/<happening_id>"): Purpose.SESSION,
    ("PATCH", "/api/happenings/<happening_id>"): Purpose.SESSION,
    ("DELETE", "/api/happenings/<happening_id>"): Purpose.SESSION,
    ("PUT", "/api/happenings/<happening_id>/rsvp"): Purpose.SESSION,
    ("GET", "/api/happenings/<happening_id>/event.ics"): Purpose.SESSION,
    ("POST", "/api/rooms/<slug>/calendar"): Purpose.SESSION,
    ("DELETE", "/api/rooms/<slug>/calendar"): Purpose.SESSION,
}
PUBLIC = {
    ("POST", "/api/users"),
    ("POST", "/api/auth/login"),
    ("GET", "/api/rooms/<slug>"),
    ("GET", "/api/rooms/<slug>/qr.svg"),
    ("GET", "/api/nodes"),
    ("POST", "/api/nodes/rank"),
    ("GET", "/api/ping"),
    ("GET", "/api/calendars/room.ics"),  # its token is in the URL (calendar apps)
}


def test_every_api_route_is_known_authenticated_or_public(api: Api) -> None:
    app = api.client.app
    marked: dict[tuple[str, str], Purpose] = {}
    public: set[tuple[str, str]] = set()
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api/"):
            continue
        purpose = getattr(app.view_functions[rule.endpoint], AUTH_ATTRIBUTE, None)
        for method in rule.methods or ():
            if method in ("HEAD", "OPTIONS"):
                continue
            if purpose is None:
                public.add((method, rule.rule))
            else:
                marked[(method, rule.rule)] = purpose
    assert marked == AUTHENTICATED
    assert public == PUBLIC


def _concrete(path: str) -> str:
    return (
        path.replace("<user_id>", "0123456789abcdef01234567")
        .replace("<username>", "alice")
        .replace("<slug>", "lobby")
        .replace("<expense_id>", "0123456789abcdef01234567")
        .replace("<payment_id>", "0123456789abcdef01234567")
        .replace("<happening_id>", "0123456789abcdef01234567")
    )


@pytest.mark.parametrize("route", list(AUTHENTICATED), ids="{0[0]} {0[1]}".format)
async def test_no_token_is_refused_before_the_request_is_read(
    api: Api, work: Work, route: tuple[str, str]
) -> None:
    method, path = route
    user_token = await api.user_token("alice")
    session_token = await api.session_token(user_token)
    # A token of the other purpose is as good as none.
    wrong = session_token if AUTHENTICATED[route] is Purpose.USER else user_token
    body = utf8_json({"text": ATTACK, "slug": ATTACK[:4000], "name": ATTACK[:4000]})
    query = f"?before={quote(ATTACK)}&limit=5"
    work.normalised.clear()
    work.bodies_parsed = work.models_loaded = 0
    for headers in ({}, bearer("not.a.token"), bearer(wrong), {"Authorization": "Basic x"}):
        # (`open` is typed as if `json` were required; it is not.)
        client: Any = api.client
        response = await client.open(
            _concrete(path) + query,
            method=method,
            data=body["data"],
            headers={**body["headers"], **headers},
        )
        assert response.status_code == 401, await response.get_data(as_text=True)
        assert (await error_of(response))["code"] == "unauthorized"
    assert work == Work(), "the request was read before its token was checked"


async def test_an_invalid_body_without_a_token_gets_401_not_422(api: Api) -> None:
    """Issue 17: an anonymous caller never learns the body's rules (422) before being told
    to authenticate (401), whatever is wrong with the body."""
    bodies: list[tuple[bytes, str]] = [
        (b"{not json", "application/json"),
        (b"[1, 2, 3]", "application/json"),
        (b'{"slug": 5, "text": null, "amount": "x", "capacity": -1}', "application/json"),
        (b"\xff\xfe", "application/json"),
        (b"slug=a&text=b", "application/x-www-form-urlencoded"),
    ]
    client: Any = api.client
    for method, path in AUTHENTICATED:
        for data, content_type in bodies:
            response = await client.open(
                _concrete(path) + "?limit=-5&before=x",
                method=method,
                data=data,
                headers={"Content-Type": content_type},
            )
            assert response.status_code == 401, (method, path, data, response.status_code)
            assert (await error_of(response))["code"] == "unauthorized"


async def test_the_attack_with_a_token_is_refused_before_nfc(api: Api, work: Work) -> None:
    user_token = await api.user_token("alice")
    await api.create_room(user_token, "lobby")
    session_token = await api.session_token(user_token)
    work.normalised.clear()
    for text, problem in ((ATTACK, "combining marks"), ("x" * 16_001, "at most")):
        body = utf8_json({"text": text})
        response = await api.client.post(
            "/api/rooms/lobby/messages",
            data=body["data"],
            headers={**body["headers"], **bearer(session_token)},
        )
        assert response.status_code == 422
        error = await error_of(response)
        assert error["code"] == "invalid_input" and problem in error["message"], error
    assert work.normalised == []
    # Marks in runs up to the cap are fine: normalised in one pass (and once more, cheaply,
    # on the one write path), never more than the raw text.
    text = ("a" + "\u0316\u0301" * 8) * 200
    response = await api.client.post(
        "/api/rooms/lobby/messages", json={"text": text}, headers=bearer(session_token)
    )
    assert response.status_code == 201, await response.get_data(as_text=True)
    assert 0 < sum(work.normalised) <= 2 * len(text)


async def test_an_unauthenticated_slug_is_checked_before_nfc(api: Api, work: Work) -> None:
    """Room lookups need no token, and the slug comes from the path."""
    for path in (f"/api/rooms/{quote('a' + chr(0x301) * 40)}", "/api/rooms/" + "a" * 2_000):
        response = await api.client.get(path)
        assert response.status_code == 422, await response.get_data(as_text=True)
        assert (await error_of(response))["code"] == "invalid_slug"
    assert work.normalised == []


async def test_ws_chat_normalises_only_what_the_rate_limit_admits(
    api: Api, redis: Redis, work: Work
) -> None:
    """Over the WebSocket the text is normalised after the chat limit: frames beyond it cost
    the node no NFC, and the attack text none at all."""
    async with AsyncExitStack() as stack:
        scene = await open_scene(stack, api, redis)
        alice = scene.peers["alice"]
        work.normalised.clear()
        frame = {"type": "chat", "id": "attack", "text": ATTACK}
        await alice.ws.send(json.dumps(frame, ensure_ascii=False))  # 32 KB, under 64 KiB
        reply = await alice.next("error")
        assert (reply["id"], reply["code"]) == ("attack", "invalid_text"), reply
        assert "combining marks" in reply["message"], reply
        assert work.texts() == []

        # Too long once normalised: each admitted frame costs one NFC of its text.
        too_long = "x" * (MAX_CHAT_CHARS + 1)
        sent = 3 * scene.settings.live.chat_per_s
        for n in range(sent):
            await alice.ws.send(json.dumps({"type": "chat", "id": f"c{n}", "text": too_long}))
        codes = [(await alice.next("error"))["code"] for _ in range(sent)]
        admitted = codes.count("invalid_text")
        assert codes.count("rate_limited") == sent - admitted > 0, codes
        assert work.texts() == [len(too_long)] * admitted
