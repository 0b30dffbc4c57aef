"""Issue 21 item 12(a), (b): tokens can be revoked, and user tokens are short and refreshed.

Logout ends one login: its user tokens and the session and room tokens they bought, on every
node. A password change ends every login of the user. A user token lives an hour and is
renewed with `POST /api/auth/refresh` while valid, up to `tokens.user_max_age_s` after the
login.
"""

from __future__ import annotations

import asyncio
import base64
import json
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from quart.testing.connections import WebsocketResponseError
from redis.asyncio import Redis

from node.state import keys
from node.store.models import User
from node.web.context import EXTENSION, NodeContext
from node.web.tokens import Purpose
from tests.conftest import Api, bearer, error_of, keys_matching
from tests.node.runtime.test_live_inprocess import connect

NEW_PASSWORD = "a brand new passphrase"


async def status_of(api: Api, method: str, path: str, token: str) -> int:
    response = await api.client.open(path, method=method, headers=bearer(token), json=None)
    return response.status_code


async def me(api: Api, token: str) -> int:
    return await status_of(api, "GET", "/api/users/me", token)


async def session_ok(api: Api, session_token: str) -> bool:
    return await status_of(api, "GET", "/api/rooms/lobby/messages", session_token) == 200


async def ws_opens(api: Api, session_token: str) -> bool:
    try:
        async with api.client.websocket(f"/ws?session_token={session_token}") as ws:
            await asyncio.wait_for(ws.receive(), 5)
    except WebsocketResponseError:
        return False
    return True


async def test_logout_revokes_the_login_and_what_it_bought(api: Api) -> None:
    first = await api.user_token("alice")
    await api.create_room(first, "lobby")
    session = await api.session_token(first)
    assert await session_ok(api, session)
    other_login = await api.login("alice")
    other_session = await api.session_token(other_login)
    # A room token, bought before the logout, for a WebSocket still open after it.
    async with AsyncExitStack() as stack:
        peer = await connect(stack, api, session)
        grant = await (await peer.http_join("lobby")).get_json()

        response = await api.client.post("/api/auth/logout", headers=bearer(first))
        assert response.status_code == 204

        assert await me(api, first) == 401
        response = await api.client.get("/api/users/me", headers=bearer(first))
        assert (await error_of(response))["message"] == "token revoked (logged out)"
        assert await status_of(api, "POST", "/api/sessions", first) == 401
        assert await status_of(api, "POST", "/api/auth/refresh", first) == 401
        assert await status_of(api, "POST", "/api/auth/logout", first) == 401
        assert not await session_ok(api, session)
        assert await status_of(api, "POST", "/api/sessions/ws-ticket", session) == 401
        assert not await ws_opens(api, session)
        refused = await peer.request("join", room_token=grant["room_token"])
        assert (refused["type"], refused["code"]) == ("error", "bad_token")
    # The other login of the same user is untouched.
    assert await me(api, other_login) == 200
    assert await session_ok(api, other_session)
    assert await ws_opens(api, other_session)


@pytest.mark.redis_paths
async def test_logout_holds_on_every_node_and_for_as_long_as_a_token_lives(
    make_app: Any, redis: Redis
) -> None:
    one = Api((await make_app(node_name="node-1")).test_client())
    two = Api((await make_app(node_name="node-2")).test_client())
    token = await one.user_token("alice")
    session = await one.session_token(token)
    assert (await one.client.post("/api/auth/logout", headers=bearer(token))).status_code == 204
    assert await me(two, token) == 401
    assert await status_of(two, "POST", "/api/sessions/ws-ticket", session) == 401
    [key] = await keys_matching(redis, keys.token_revoked("*"))
    longest = 24 * 3600  # tokens.session_ttl_s, the longest default life
    assert longest < await redis.ttl(key) <= longest + 120


async def test_password_change_revokes_every_token_of_the_user(api: Api) -> None:
    first = await api.user_token("alice")
    await api.create_room(first, "lobby")
    second = await api.login("alice")
    session = await api.session_token(second)
    bob = await api.user_token("bob")
    async with AsyncExitStack() as stack:
        peer = await connect(stack, api, session)
        grant = await (await peer.http_join("lobby")).get_json()
        response = await api.client.post(
            "/api/users/me/password",
            json={"old_password": api.password, "new_password": NEW_PASSWORD},
            headers=bearer(first),
        )
        assert response.status_code == 200, await response.get_data(as_text=True)
        fresh = (await response.get_json())["user_token"]
        for token in (first, second):
            response = await api.client.get("/api/users/me", headers=bearer(token))
            assert response.status_code == 401
            assert (await error_of(response))["message"] == "token revoked (password changed)"
        assert not await session_ok(api, session)
        assert not await ws_opens(api, session)
        refused = await peer.request("join", room_token=grant["room_token"])
        assert refused["code"] == "bad_token"
    assert await me(api, fresh) == 200
    assert await me(api, bob) == 200
    # The old password no longer logs in; the new one does.
    response = await api.client.post(
        "/api/auth/login", json={"login": "alice", "password": api.password}
    )
    assert response.status_code == 401
    assert await me(api, await api.login("alice", NEW_PASSWORD)) == 200


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"old_password": "not the password", "new_password": NEW_PASSWORD}, 401, None),
        ({"old_password": "x", "new_password": "short"}, 422, None),
        ({"new_password": NEW_PASSWORD}, 422, None),
        ({"old_password": 5, "new_password": NEW_PASSWORD}, 422, None),
    ],
)
async def test_a_refused_password_change_changes_nothing(
    api: Api, body: dict[str, Any], status: int, code: str | None
) -> None:
    token = await api.user_token("alice")
    before = await User.find_one(User.username == "alice")
    assert before is not None
    response = await api.client.post("/api/users/me/password", json=body, headers=bearer(token))
    assert response.status_code == status
    error = await error_of(response)
    if status == 401:
        assert error["code"] == "invalid_credentials"
    after = await User.find_one(User.username == "alice")
    assert after is not None
    assert (after.password_hash, after.token_generation) == (
        before.password_hash,
        before.token_generation,
    )
    assert await me(api, token) == 200


async def test_password_change_needs_a_user_token(api: Api) -> None:
    token = await api.user_token("alice")
    session = await api.session_token(token)
    body = {"old_password": api.password, "new_password": NEW_PASSWORD}
    for headers in ({}, bearer(session)):
        response = await api.client.post("/api/users/me/password", json=body, headers=headers)
        assert response.status_code == 401


async def test_wrong_old_passwords_are_rate_limited(make_app: Any) -> None:
    api = Api((await make_app(login_limit__per_login=3)).test_client())
    token = await api.user_token("alice")
    body = {"old_password": "not the password", "new_password": NEW_PASSWORD}
    statuses = [
        (
            await api.client.post("/api/users/me/password", json=body, headers=bearer(token))
        ).status_code
        for _ in range(5)
    ]
    assert statuses == [401, 401, 401, 429, 429]


def node_context(api: Api) -> NodeContext:
    context: NodeContext = api.client.app.extensions[EXTENSION]
    return context


async def test_refresh_gives_a_new_token_of_the_same_login(api: Api) -> None:
    token = await api.user_token("alice")
    response = await api.client.post("/api/auth/refresh", headers=bearer(token))
    assert response.status_code == 200
    grant = await response.get_json()
    assert grant["user_token"] != token
    expires = datetime.fromisoformat(grant["expires_at"])
    assert expires - datetime.now(UTC) <= timedelta(hours=1)  # tokens.user_ttl_s
    assert await me(api, grant["user_token"]) == 200
    # The same login: logging out with the new token ends the old one too.
    assert (
        await api.client.post("/api/auth/logout", headers=bearer(grant["user_token"]))
    ).status_code == 204
    assert await me(api, token) == 401


async def test_an_expired_token_cannot_refresh(api: Api) -> None:
    await api.user_token("alice")
    user = await User.find_one(User.username == "alice")
    assert user is not None
    tokens = node_context(api).tokens
    expired = tokens.issue(Purpose.USER, str(user.id), ttl_s=-10).token
    response = await api.client.post("/api/auth/refresh", headers=bearer(expired))
    assert response.status_code == 401
    assert (await error_of(response))["message"] == "token expired"
    session = tokens.issue(Purpose.SESSION, str(user.id), session_id="s1").token
    assert await status_of(api, "POST", "/api/auth/refresh", session) == 401


async def test_refresh_stops_at_the_login_max_age(make_app: Any) -> None:
    api = Api((await make_app(tokens__user_max_age_s=3600)).test_client())
    await api.user_token("alice")
    user = await User.find_one(User.username == "alice")
    assert user is not None
    tokens = node_context(api).tokens
    now = datetime.now(UTC)
    near = tokens.issue(Purpose.USER, str(user.id), authenticated_at=now - timedelta(minutes=50))
    response = await api.client.post("/api/auth/refresh", headers=bearer(near.token))
    assert response.status_code == 200
    # Never past the login's end, however long a user token may live.
    expires = datetime.fromisoformat((await response.get_json())["expires_at"])
    assert expires <= now + timedelta(minutes=10, seconds=2)
    old = tokens.issue(Purpose.USER, str(user.id), authenticated_at=now - timedelta(hours=2))
    response = await api.client.post("/api/auth/refresh", headers=bearer(old.token))
    assert response.status_code == 401
    assert (await error_of(response))["code"] == "login_required"


async def test_user_tokens_live_an_hour_by_default(api: Api) -> None:
    await api.signup("alice")
    response = await api.client.post(
        "/api/auth/login", json={"login": "alice", "password": api.password}
    )
    expires = datetime.fromisoformat((await response.get_json())["expires_at"])
    assert expires - datetime.now(UTC) <= timedelta(hours=1)
    _, payload, _ = (await response.get_json())["user_token"].split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    assert {"fam", "gen", "auth_time"} <= set(claims)


async def test_checking_revocation_costs_one_redis_command_per_request(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every request pays for it, so it stays one EXISTS (the generation comes with the user
    document the request reads anyway)."""
    token = await api.user_token("alice")
    session = await api.session_token(token)
    client = node_context(api).redis
    original: Any = client.execute_command
    revocation_commands: list[tuple[Any, ...]] = []

    async def counting(*args: Any, **options: Any) -> Any:
        if any(b"token-revoked" in str(arg).encode() for arg in args):
            revocation_commands.append(args)
        return await original(*args, **options)

    monkeypatch.setattr(client, "execute_command", counting)
    for _ in range(5):
        assert await me(api, token) == 200
        assert await status_of(api, "POST", "/api/sessions/ws-ticket", session) == 201
    assert len(revocation_commands) == 10
    assert all(command[0] == "EXISTS" for command in revocation_commands)
