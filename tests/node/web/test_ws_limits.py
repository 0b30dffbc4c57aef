"""Issue 21, item 4: what one client can make a node hold through WebSockets.

A message is buffered whole by the server before the app sees it, so the server itself must
stop at `ws_max_frame_bytes` (it allowed 16 MiB); and each user and each address may hold
only so many sockets on a node.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import httpx
import pytest
import websockets
from quart.testing.connections import WebsocketResponseError
from websockets.asyncio.client import ClientConnection

from node.config import Settings
from node.local.launch import LocalNode
from node.web.context import EXTENSION, NodeContext
from node.web.server import hypercorn_config
from node.web.tokens import Purpose
from tests.conftest import Api, SettingsFactory, error_of
from tests.node.live_client import sign_up
from tests.node.runtime.test_live_inprocess import connect

LIMIT = 8192  # a small frame limit: the test sends a little over it


def test_hypercorn_is_given_the_frame_limit(make_settings: SettingsFactory) -> None:
    # The server's limit is the largest frame a client may send at all: an answer to a large
    # subscribe offer (ws_max_answer_bytes) may be bigger than every other frame.
    for limit in (LIMIT, 64 * 1024):
        settings: Settings = make_settings(
            live__ws_max_frame_bytes=limit, live__ws_max_answer_bytes=limit
        )
        assert hypercorn_config(settings).websocket_max_message_size == limit
    settings = make_settings(live__ws_max_frame_bytes=LIMIT, live__ws_max_answer_bytes=4 * LIMIT)
    assert hypercorn_config(settings).websocket_max_message_size == 4 * LIMIT


def _ws_url(node: LocalNode, session_token: str) -> str:
    return node.url.replace("http", "ws", 1) + f"/ws?session_token={session_token}"


async def _hello(ws: ClientConnection) -> None:
    assert '"hello"' in str(await asyncio.wait_for(ws.recv(), 10))


async def _closed_code(ws: ClientConnection) -> int | None:
    """The code the node closed this socket with (it must close it, and soon)."""
    try:
        while True:
            await asyncio.wait_for(ws.recv(), 10)
    except websockets.ConnectionClosed:
        pass
    return ws.close_code


@pytest.mark.slow
async def test_a_real_node_refuses_oversize_frames_and_extra_sockets(
    node_processes: Callable[..., LocalNode],
) -> None:
    node = node_processes(
        extra_env={
            "SFUMESH_WS_MAX_FRAME_BYTES": str(LIMIT),
            "SFUMESH_WS_MAX_ANSWER_BYTES": str(LIMIT),
            "SFUMESH_WS_MAX_PER_USER": "2",
        }
    )
    async with httpx.AsyncClient(timeout=30) as http:
        user = await sign_up(http, node.url)
        tokens = [await user.new_session(node.url) for _ in range(3)]

        # A message of exactly the limit reaches the app (which answers it) ...
        async with websockets.connect(_ws_url(node, tokens[0]), max_size=None) as ws:
            await _hello(ws)
            head, tail = '{"type":"ping","id":"edge","pad":"', '"}'
            await ws.send(head + "x" * (LIMIT - len(head) - len(tail)) + tail)
            assert '"pong"' in str(await asyncio.wait_for(ws.recv(), 10))
            # ... one byte more is refused by the server: closed, 1009 (message too big).
            await ws.send(b"x" * (LIMIT + 1))
            assert await _closed_code(ws) == 1009

        # A 16 MiB message sent in 1 KiB fragments is cut off near the limit: the node
        # never waits for (nor buffers) the rest of it.
        async with websockets.connect(_ws_url(node, tokens[0]), max_size=None) as ws:
            await _hello(ws)
            sent = 0

            async def fragments() -> AsyncIterator[bytes]:
                nonlocal sent
                while sent < 16 * 1024 * 1024 and ws.close_code is None:
                    sent += 1024
                    yield b"x" * 1024
                    await asyncio.sleep(0.005)  # room for the node's close to arrive

            with pytest.raises(websockets.ConnectionClosed):
                await ws.send(fragments())
            assert await _closed_code(ws) == 1009
            assert LIMIT < sent < 64 * LIMIT, sent  # cut off just past the limit

        # Two sockets per user on this node; the third session is refused at the handshake.
        async with AsyncExitStack() as stack:
            for token in tokens[:2]:
                ws = await stack.enter_async_context(websockets.connect(_ws_url(node, token)))
                await _hello(ws)
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with websockets.connect(_ws_url(node, tokens[2])):
                    pass
            assert refused.value.response.status_code == 429
            assert b"too_many_connections" in refused.value.response.body
            # One of the two reconnects (a page refresh): not an extra session, so allowed.
            again = await stack.enter_async_context(websockets.connect(_ws_url(node, tokens[0])))
            await _hello(again)
        await _third_gets_in_once_one_left(node, tokens)


async def _third_gets_in_once_one_left(node: LocalNode, tokens: list[str]) -> None:
    for _ in range(100):  # the node counts a socket off as its handler ends
        try:
            async with websockets.connect(_ws_url(node, tokens[2])) as ws:
                await _hello(ws)
                return
        except websockets.InvalidStatus:
            await asyncio.sleep(0.05)
    raise AssertionError("the third session never got in after the others closed")


async def _refusal(api: Api, session_token: str) -> dict[str, Any]:
    with pytest.raises(WebsocketResponseError) as refused:
        async with api.client.websocket(f"/ws?session_token={session_token}") as ws:
            await ws.receive()
    assert refused.value.response.status_code == 429
    return await error_of(refused.value.response)


async def test_sockets_per_user_and_per_address(make_app: Callable[..., Any]) -> None:
    test_app = await make_app(live__ws_max_per_user=2, live__ws_max_per_address=3)
    api = Api(test_app.test_client())
    context = test_app.app.extensions[EXTENSION]
    assert isinstance(context, NodeContext)
    slots = context.ws_slots
    alice, bob = await api.user_token("alice"), await api.user_token("bob")
    a = [await api.session_token(alice) for _ in range(3)]
    b = [await api.session_token(bob) for _ in range(2)]
    async with AsyncExitStack() as stack:
        await connect(stack, api, a[0])
        await connect(stack, api, a[1])
        error = await _refusal(api, a[2])
        assert error["code"] == "too_many_connections" and "user" in error["message"]
        # Same session again (a refresh): it replaces its socket, no new slot.
        await connect(stack, api, a[0])
        alice_id = context.tokens.verify(a[0], Purpose.SESSION).user_id
        assert slots.sessions(user_id=alice_id) == 2
        # Bob is the third session from this (test client) address; his second is one
        # too many for the address, though not for him.
        await connect(stack, api, b[0])
        error = await _refusal(api, b[1])
        assert error["code"] == "too_many_connections" and "address" in error["message"]
    # All closed: nothing is left counted, and everyone gets in again.
    for _ in range(100):
        if slots.sessions(address="127.0.0.1") == 0:
            break
        await asyncio.sleep(0.05)
    assert slots.sessions(address="127.0.0.1") == 0
    async with AsyncExitStack() as stack:
        await connect(stack, api, a[2])
        await connect(stack, api, b[1])
