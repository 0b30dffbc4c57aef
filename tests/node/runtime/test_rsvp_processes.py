"""50 RSVPs racing for 10 places through 3 real node processes (issue 16, R8 item 2):
exactly 10 going, the other 40 wait-listed in one order, the same on every node."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

import httpx
import pytest
import websockets

from node.local.launch import LocalNode

pytestmark = pytest.mark.slow

PASSWORD = "correct horse battery"  # throwaway test users


async def person(http: httpx.AsyncClient, name: str) -> str:
    body = {"username": name, "email": f"{name}@example.org", "password": PASSWORD}
    assert (await http.post("/api/users", json={**body, "display_name": name})).status_code == 201
    login = await http.post("/api/auth/login", json={"login": name, "password": PASSWORD})
    user = {"Authorization": f"Bearer {login.json()['user_token']}"}
    session: str = (await http.post("/api/sessions", headers=user)).json()["session_token"]
    return session


async def join(http: httpx.AsyncClient, session: str, room: str) -> None:
    """One of the room's people, as a page becomes one: a WebSocket, then the join."""
    url = str(http.base_url).replace("http", "ws", 1) + f"/ws?session_token={session}"
    async with websockets.connect(url) as socket:
        await socket.recv()  # hello
        reply = await http.post(
            f"/api/rooms/{room}/join", headers={"Authorization": f"Bearer {session}"}
        )
        assert reply.status_code == 200, reply.text


async def test_50_rsvps_for_10_places_through_3_nodes(
    node_processes: Callable[..., LocalNode],
) -> None:
    nodes = [node_processes(f"node-{i}") for i in range(1, 4)]
    clients = [httpx.AsyncClient(base_url=node.url, timeout=60) for node in nodes]
    try:
        first = clients[0]
        owner = await person(first, "owner")
        login = await first.post("/api/auth/login", json={"login": "owner", "password": PASSWORD})
        user = {"Authorization": f"Bearer {login.json()['user_token']}"}
        reply = await first.post("/api/rooms", json={"slug": "race", "capacity": 60}, headers=user)
        assert reply.status_code == 201
        planned = await first.post(
            "/api/rooms/race/happenings",
            json={"title": "Boat trip", "start": "2026-12-24T09:00", "zone": "UTC", "capacity": 10},
            headers={"Authorization": f"Bearer {owner}"},
        )
        happening = planned.json()["id"]
        sessions = []
        for index in range(50):
            client = clients[index % 3]
            session = await person(client, f"racer{index}")
            await join(client, session, "race")
            sessions.append(session)

        async def going(index: int) -> str:
            reply = await clients[index % 3].put(
                f"/api/happenings/{happening}/rsvp",
                json={"answer": "going"},
                headers={"Authorization": f"Bearer {sessions[index]}"},
            )
            assert reply.status_code == 200, reply.text
            me = next(r for r in reply.json()["rsvps"] if r["display_name"] == f"racer{index}")
            status: str = me["status"]
            return status

        told = await asyncio.gather(*(going(i) for i in range(50)))
        assert Counter(told) == Counter({"going": 10, "waitlisted": 40})
        views = [
            (
                await client.get(
                    f"/api/happenings/{happening}", headers={"Authorization": f"Bearer {owner}"}
                )
            ).json()
            for client in clients
        ]
        for view in views:  # every node tells the same order
            assert view["counts"]["going"] == 10 and view["counts"]["waitlisted"] == 40
            assert view["rsvps"] == views[0]["rsvps"]
        waiting = [r for r in views[0]["rsvps"] if r["status"] == "waitlisted"]
        assert [r["position"] for r in waiting] == list(range(1, 41))
        # each was told what the final list says
        final = {r["display_name"]: r["status"] for r in views[0]["rsvps"]}
        assert told == [final[f"racer{i}"] for i in range(50)]
    finally:
        for client in clients:
            await client.aclose()
