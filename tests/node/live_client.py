"""A client of real node processes: HTTP with httpx, WebSocket with `websockets`.

Every message a socket receives is kept in order, so tests can check the whole history
(who was reported gone, in which order chats came), not just the latest message.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from dataclasses import dataclass, field
from typing import Any

import httpx
import websockets
from websockets.asyncio.client import ClientConnection

TIMEOUT = 15.0
PASSWORD = "correct horse battery"


@dataclass
class Socket:
    ws: ClientConnection
    node_url: str
    session_token: str
    session_id: str = ""
    node: str = ""
    messages: list[dict[str, Any]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    reader: asyncio.Task[None] | None = None
    _ids: int = 0

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                self.messages.append(json.loads(raw))
                self.arrived.set()
        except websockets.exceptions.ConnectionClosed:
            pass
        finally:
            self.arrived.set()

    @property
    def closed(self) -> bool:
        return self.reader is not None and self.reader.done()

    async def wait_for(self, type_: str, within_s: float = TIMEOUT, **match: Any) -> dict[str, Any]:
        """The first message of this type whose fields (or participant's) match."""

        def fits(message: dict[str, Any]) -> bool:
            if message.get("type") != type_:
                return False
            inner = message.get("participant", {})
            return all(message.get(k, inner.get(k)) == v for k, v in match.items())

        async def scan() -> dict[str, Any]:
            seen = 0
            while True:
                for message in self.messages[seen:]:
                    if fits(message):
                        return message
                seen = len(self.messages)
                if self.closed:
                    raise ConnectionError(f"closed before {type_} {match}: {self.messages[-3:]}")
                self.arrived.clear()
                if len(self.messages) == seen:
                    await self.arrived.wait()

        return await asyncio.wait_for(scan(), within_s)

    async def request(self, type_: str, **fields: Any) -> dict[str, Any]:
        self._ids += 1
        frame_id = f"{type_}-{self._ids}"
        await self.ws.send(json.dumps({"type": type_, "id": frame_id, **fields}))
        reply = await self.wait_for_id(frame_id)
        return reply

    async def wait_for_id(self, frame_id: str) -> dict[str, Any]:
        async def scan() -> dict[str, Any]:
            while True:
                for message in self.messages:
                    if message.get("id") == frame_id:
                        return message
                if self.closed:
                    raise ConnectionError(f"closed before reply {frame_id}")
                self.arrived.clear()
                await self.arrived.wait()

        return await asyncio.wait_for(scan(), TIMEOUT)

    async def close(self) -> None:
        await self.ws.close()
        if self.reader is not None:
            await self.reader


@dataclass
class User:
    http: httpx.AsyncClient
    username: str
    user_id: str
    user_token: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.user_token}"}

    async def new_session(self, node_url: str) -> str:
        reply = await self.http.post(f"{node_url}/api/sessions", headers=self.auth)
        assert reply.status_code == 201, reply.text
        token: str = reply.json()["session_token"]
        return token

    async def connect(self, node_url: str, session_token: str | None = None) -> Socket:
        token = session_token or await self.new_session(node_url)
        ws_url = node_url.replace("http", "ws", 1) + f"/ws?session_token={token}"
        sock = Socket(await websockets.connect(ws_url, max_size=2**22), node_url, token)
        sock.reader = asyncio.create_task(sock._read())
        hello = await sock.wait_for("hello")
        sock.session_id, sock.node = hello["session_id"], hello["node"]
        return sock

    async def http_join(self, sock: Socket, slug: str, via_url: str) -> httpx.Response:
        return await self.http.post(
            f"{via_url}/api/rooms/{slug}/join",
            headers={"Authorization": f"Bearer {sock.session_token}"},
        )

    async def join(self, sock: Socket, slug: str, via_url: str) -> dict[str, Any]:
        reply = await self.http_join(sock, slug, via_url)
        assert reply.status_code == 200, reply.text
        ack = await sock.request("join", room_token=reply.json()["room_token"])
        assert ack["type"] == "ack", ack
        return await sock.wait_for("joined")


async def sign_up(http: httpx.AsyncClient, node_url: str, prefix: str = "u") -> User:
    name = f"{prefix}{secrets.token_hex(4)}"
    body = {
        "username": name,
        "email": f"{name}@example.org",
        "password": PASSWORD,
        "display_name": name,
    }
    reply = await http.post(f"{node_url}/api/users", json=body)
    assert reply.status_code == 201, reply.text
    login = await http.post(
        f"{node_url}/api/auth/login", json={"login": name, "password": PASSWORD}
    )
    assert login.status_code == 200, login.text
    return User(http, name, reply.json()["id"], login.json()["user_token"])


async def create_room(user: User, node_url: str, slug: str, capacity: int = 8) -> None:
    reply = await user.http.post(
        f"{node_url}/api/rooms", json={"slug": slug, "capacity": capacity}, headers=user.auth
    )
    assert reply.status_code == 201, reply.text
