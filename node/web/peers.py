"""Who is at the other end: a request's or WebSocket's client address, and how many
WebSockets each user and each address may hold open on this node.

The caps (issue 21, item 4) bound what one user or one address can make this node keep:
every open socket holds a receive buffer of up to `ws_max_frame_bytes`, two tasks and its
session state. They are counted per node, in memory, not in Redis: the memory and event
loop they protect are this node's; a count here changes in one synchronous step (nothing
else runs on the event loop in between, so two sockets opening at once cannot both take the
last slot); and it can never outlive its sockets, where a Redis counter of a node that died
would keep its users locked out until someone reaped it. Across a mesh of N nodes one user
may so hold up to N times the cap, at most the cap on any one node.
"""

from __future__ import annotations

from collections import Counter
from typing import Literal

from quart.wrappers.base import BaseRequestWebsocket

Cap = Literal["user", "address"]


def client_address(connection: BaseRequestWebsocket, trusted_proxies: list[str]) -> str:
    """The socket peer, or behind trusted proxies the nearest address they did not add."""
    address = connection.remote_addr or "unknown"
    if address not in trusted_proxies:
        return address
    forwarded = [
        hop.strip()
        for header in connection.headers.getlist("X-Forwarded-For")
        for hop in header.split(",")
        if hop.strip()
    ]
    for hop in reversed(forwarded):
        if hop not in trusted_proxies:
            return hop
    return address


class SocketSlots:
    """Sessions with an open WebSocket on this node, per user and per client address.

    A session counts once however many of its sockets are open: its new socket replaces the
    old one (a page refresh), so a user at the cap can always reconnect a session they hold.
    """

    def __init__(self, per_user: int, per_address: int) -> None:
        self.per_user = per_user
        self.per_address = per_address
        # owner (user id or address) -> session id -> open sockets
        self._users: dict[str, Counter[str]] = {}
        self._addresses: dict[str, Counter[str]] = {}

    def take(self, user_id: str, address: str, session_id: str) -> Cap | None:
        """Count a socket of `session_id` (None), or say which cap it would exceed."""
        if _over(self._users.get(user_id), session_id, self.per_user):
            return "user"
        if _over(self._addresses.get(address), session_id, self.per_address):
            return "address"
        self._users.setdefault(user_id, Counter())[session_id] += 1
        self._addresses.setdefault(address, Counter())[session_id] += 1
        return None

    def give_back(self, user_id: str, address: str, session_id: str) -> None:
        """The socket counted by `take` closed."""
        _drop(self._users, user_id, session_id)
        _drop(self._addresses, address, session_id)

    def sessions(self, *, user_id: str | None = None, address: str | None = None) -> int:
        if user_id is not None:
            return len(self._users.get(user_id, ()))
        return len(self._addresses.get(address or "", ()))


def _over(sessions: Counter[str] | None, session_id: str, cap: int) -> bool:
    return sessions is not None and session_id not in sessions and len(sessions) >= cap


def _drop(owners: dict[str, Counter[str]], owner: str, session_id: str) -> None:
    sessions = owners.get(owner)
    if sessions is None or session_id not in sessions:
        return
    sessions[session_id] -= 1
    if sessions[session_id] <= 0:
        del sessions[session_id]
    if not sessions:
        del owners[owner]
