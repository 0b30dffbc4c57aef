"""Issue 18 item 1: TURN credentials in the TURN REST style, handed only to a connected
session in its WebSocket `hello`; `[turn]` settings checked without showing the secret.
(coturn refusing expired and forged ones, and media over a relay: tests/node/local/test_coturn.py.)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from quart.testing.connections import WebsocketResponseError

from node.config import ConfigError, load_settings
from node.runtime.turn import ice_servers
from tests.conftest import Api

SECRET = "a-turn-secret-of-32-bytes-or-so!"
URLS = ["turn:turn.example.org:3478?transport=udp", "turns:turn.example.org:443?transport=tcp"]


def test_credentials_are_what_coturn_computes() -> None:
    settings = load_settings(
        env={
            "SFUMESH_TURN_URLS": json.dumps(URLS),
            "SFUMESH_TURN_SECRET": SECRET,
            "SFUMESH_TURN_CREDENTIAL_TTL_S": "600",
        }
    ).turn
    [server] = ice_servers(settings, "sess-1", now=1_000_000.0)
    assert server["urls"] == URLS
    assert server["username"] == "1000600:sess-1"
    expected = hmac.new(SECRET.encode(), b"1000600:sess-1", hashlib.sha1).digest()
    assert server["credential"] == base64.b64encode(expected).decode()


def test_no_turn_configured_hands_out_nothing() -> None:
    assert ice_servers(load_settings(env={}).turn, "sess-1") == []


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"SFUMESH_TURN_URLS": json.dumps(URLS)}, "turn.secret"),
        ({"SFUMESH_TURN_URLS": json.dumps(URLS), "SFUMESH_TURN_SECRET": "short"}, "turn.secret"),
        (
            {"SFUMESH_TURN_URLS": '["stun:turn.example.org"]', "SFUMESH_TURN_SECRET": SECRET},
            "turn: or turns:",
        ),
        (
            {
                "SFUMESH_TURN_URLS": json.dumps(URLS),
                "SFUMESH_TURN_SECRET": SECRET,
                "SFUMESH_TURN_CREDENTIAL_TTL_S": "5",
            },
            "credential_ttl_s",
        ),
    ],
)
def test_unusable_turn_settings_are_refused_without_the_secret(
    env: dict[str, str], problem: str
) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(env=env)
    assert problem in str(error.value)
    assert SECRET not in str(error.value) and "short" not in str(error.value)


def test_the_secret_is_never_shown_by_the_settings() -> None:
    settings = load_settings(
        env={"SFUMESH_TURN_URLS": json.dumps(URLS), "SFUMESH_TURN_SECRET": SECRET}
    )
    assert SECRET not in repr(settings) and SECRET not in settings.model_dump_json()


async def test_hello_hands_this_session_fresh_credentials(make_app: Callable[..., Any]) -> None:
    app = await make_app(**{"turn.urls": URLS, "turn.secret": SECRET, "turn.credential_ttl_s": 900})
    api = Api(app.test_client())
    session_token = await api.session_token(await api.user_token("alice"))
    before = int(time.time())
    async with api.client.websocket(f"/ws?session_token={session_token}") as ws:
        hello = json.loads(await ws.receive())
    assert hello["type"] == "hello"
    [server] = hello["ice_servers"]
    expiry, _, session_id = server["username"].partition(":")
    assert session_id == hello["session_id"]
    assert before + 900 <= int(expiry) <= int(time.time()) + 900
    digest = hmac.new(SECRET.encode(), server["username"].encode(), hashlib.sha1).digest()
    assert server["credential"] == base64.b64encode(digest).decode()
    assert server["urls"] == URLS


async def test_turn_credentials_only_reach_a_connected_session(
    make_app: Callable[..., Any],
) -> None:
    """No HTTP answer carries them: not the session, not the ticket, not the node list."""
    app = await make_app(**{"turn.urls": URLS, "turn.secret": SECRET})
    api = Api(app.test_client())
    user_token = await api.user_token("alice")
    headers = {"authorization": f"Bearer {user_token}"}
    session = await api.client.post("/api/sessions", headers=headers)
    session_token = (await session.get_json())["session_token"]
    ticket = await api.client.post(
        "/api/sessions/ws-ticket", headers={"authorization": f"Bearer {session_token}"}
    )
    nodes = await api.client.get("/api/nodes")
    for response in (session, ticket, nodes):
        assert "credential" not in (await response.get_data(as_text=True))
    async with api.client.websocket("/ws?session_token=not-a-token") as ws:
        with pytest.raises(WebsocketResponseError):  # refused at the handshake: no hello
            await ws.receive()
