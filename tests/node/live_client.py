"""A client of real node processes: HTTP with httpx, WebSocket with `websockets`
(`node.local.participant.Socket`).

Every message a socket receives is kept in order, so tests can check the whole history
(who was reported gone, in which order chats came), not just the latest message.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import httpx

from node.local.participant import Socket, open_socket

__all__ = ["PASSWORD", "Socket", "User", "create_room", "sign_up"]

PASSWORD = "correct horse battery"


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
        return await open_socket(node_url, token)

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
