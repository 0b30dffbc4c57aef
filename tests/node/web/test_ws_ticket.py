"""Issue 21 item 12(c): the session token out of the WebSocket URL.

`POST /api/sessions/ws-ticket` (session token) gives a ticket that opens `/ws?ticket=...`
once, within seconds, on any node of the mesh; `/ws?session_token=...` still works (the
contract names it).
"""

from __future__ import annotations

import asyncio
import json
from contextlib import AsyncExitStack
from typing import Any

import pytest
from quart.testing.connections import WebsocketResponseError
from redis.asyncio import Redis

from node.state import keys
from tests.conftest import Api, bearer, error_of, keys_matching
from tests.node.runtime.test_live_inprocess import Peer

TIMEOUT = 5.0


async def session_grant(api: Api, username: str = "alice") -> dict[str, Any]:
    user_token = await api.user_token(username)
    response = await api.client.post("/api/sessions", headers=bearer(user_token))
    assert response.status_code == 201
    grant: dict[str, Any] = await response.get_json()
    return grant


async def ticket_of(api: Api, session_token: str) -> dict[str, Any]:
    response = await api.client.post("/api/sessions/ws-ticket", headers=bearer(session_token))
    assert response.status_code == 201, await response.get_data(as_text=True)
    ticket: dict[str, Any] = await response.get_json()
    return ticket


async def hello_with(api: Api, query: str) -> dict[str, Any]:
    async with api.client.websocket(f"/ws?{query}") as ws:
        hello: dict[str, Any] = json.loads(await asyncio.wait_for(ws.receive(), TIMEOUT))
        return hello


async def refusal(api: Api, query: str) -> tuple[int, dict[str, Any]]:
    with pytest.raises(WebsocketResponseError) as refused:
        async with api.client.websocket(f"/ws?{query}") as ws:
            await asyncio.wait_for(ws.receive(), TIMEOUT)
    response = refused.value.response
    return response.status_code, await error_of(response)


async def test_a_ticket_opens_the_socket_once(api: Api, redis: Redis) -> None:
    grant = await session_grant(api)
    ticket = await ticket_of(api, grant["session_token"])
    assert ticket["ticket"] not in grant["session_token"]
    hello = await hello_with(api, f"ticket={ticket['ticket']}")
    assert hello["type"] == "hello" and hello["session_id"] == grant["session_id"]
    # Spent: the same ticket again is refused, and nothing of it is left in Redis.
    status, error = await refusal(api, f"ticket={ticket['ticket']}")
    assert (status, error["code"]) == (401, "unauthorized")
    assert "ticket" in error["message"]
    assert await keys_matching(redis, keys.ws_ticket("*")) == []


@pytest.mark.redis_paths
async def test_two_sockets_racing_with_one_ticket_get_one_session(api: Api) -> None:
    grant = await session_grant(api)
    ticket = (await ticket_of(api, grant["session_token"]))["ticket"]

    async def attempt() -> str:
        try:
            async with api.client.websocket(f"/ws?ticket={ticket}") as ws:
                await asyncio.wait_for(ws.receive(), TIMEOUT)
                return "opened"
        except WebsocketResponseError:
            return "refused"

    assert sorted(await asyncio.gather(*(attempt() for _ in range(4)))) == [
        "opened",
        "refused",
        "refused",
        "refused",
    ]


async def test_a_ticket_expires(make_app: Any, redis: Redis) -> None:
    api = Api((await make_app(tokens__ws_ticket_ttl_s=0.2)).test_client())
    grant = await session_grant(api)
    ticket = await ticket_of(api, grant["session_token"])
    await asyncio.sleep(0.5)
    status, error = await refusal(api, f"ticket={ticket['ticket']}")
    assert (status, error["code"]) == (401, "unauthorized")


@pytest.mark.redis_paths
async def test_a_ticket_lives_seconds_by_default(api: Api, redis: Redis) -> None:
    grant = await session_grant(api)
    await ticket_of(api, grant["session_token"])
    [key] = await keys_matching(redis, keys.ws_ticket("*"))
    assert 0 < await redis.pttl(key) <= 30_000


async def test_only_a_session_token_buys_a_ticket(api: Api) -> None:
    user_token = await api.user_token("alice")
    for headers in ({}, bearer(user_token), bearer("garbage")):
        response = await api.client.post("/api/sessions/ws-ticket", headers=headers)
        assert response.status_code == 401
        assert (await error_of(response))["code"] == "unauthorized"


@pytest.mark.parametrize("ticket", ["", "nope", "x" * 5000, "%C3%A9" * 10, "%00"])
async def test_bad_tickets_are_refused(api: Api, ticket: str) -> None:
    status, error = await refusal(api, f"ticket={ticket}")
    assert (status, error["code"]) == (401, "unauthorized")


@pytest.mark.redis_paths
async def test_a_ticket_from_one_node_opens_a_socket_on_another(make_app: Any) -> None:
    """The web client asks its page's node for the ticket and opens the closest node."""
    first = Api((await make_app(node_name="node-1")).test_client())
    second = Api((await make_app(node_name="node-2")).test_client())
    grant = await session_grant(first)
    ticket = await ticket_of(first, grant["session_token"])
    hello = await hello_with(second, f"ticket={ticket['ticket']}")
    assert (hello["node"], hello["session_id"]) == ("node-2", grant["session_id"])


async def test_the_session_token_in_the_url_still_works_and_joins(api: Api) -> None:
    """The contract's `/ws?session_token=...`, and a ticket socket joining a room."""
    grant = await session_grant(api)
    hello = await hello_with(api, f"session_token={grant['session_token']}")
    assert hello["session_id"] == grant["session_id"]
    user_token = await api.login("alice")
    await api.create_room(user_token, "lobby")
    ticket = await ticket_of(api, grant["session_token"])
    async with AsyncExitStack() as stack:
        opening: Any = api.client.websocket(f"/ws?ticket={ticket['ticket']}")
        ws = await stack.enter_async_context(opening)
        peer = Peer(api, ws, grant["session_token"])
        peer.session_id = (await peer.next("hello"))["session_id"]
        joined = await peer.join("lobby")
        assert joined["self"]["session_id"] == grant["session_id"]
