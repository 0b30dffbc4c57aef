"""Happenings live on every node (issue 16, R8 item 3): planned and answered over HTTP on one
node, heard over the WebSocket of a page on another."""

from __future__ import annotations

import json
from contextlib import AsyncExitStack
from typing import Any

from node.store.models import Room
from node.store.rooms import remember_person
from tests.conftest import Api, bearer
from tests.node.runtime.test_live_inprocess import Peer

PICNIC = {"title": "Picnic", "start": "2026-12-24T10:00", "zone": "Asia/Ho_Chi_Minh"}


async def test_a_happening_planned_on_one_node_reaches_a_page_on_another(make_app: Any) -> None:
    one = Api((await make_app(node_name="node-1")).test_client())
    two = Api((await make_app(node_name="node-2")).test_client())
    alice = await one.user_token("alice")
    await one.create_room(alice, "lobby")
    bob_user = await one.user_token("bob")
    room = await Room.find_one(Room.slug == "lobby")
    me = await (await one.client.get("/api/users/me", headers=bearer(bob_user))).get_json()
    assert room is not None
    await remember_person(room, me["id"])
    bob = await one.session_token(bob_user)
    async with AsyncExitStack() as stack:
        session = await two.session_token(alice)
        socket: Any = two.client.websocket(f"/ws?session_token={session}")
        ws = await stack.enter_async_context(socket)
        page = Peer(two, ws, session)
        assert (await page.next("hello"))["node"] == "node-2"
        await page.join("lobby")

        response = await one.client.post(
            "/api/rooms/lobby/happenings", json=PICNIC, headers=bearer(bob)
        )
        assert response.status_code == 201
        made = await response.get_json()
        planned = await page.next("happening")
        assert planned["action"] == "created" and planned["happening"]["id"] == made["id"]
        line = await page.next("chat")
        assert "Bob planned" in line["text"] and line["from"]["display_name"] == "sfumesh"

        response = await one.client.put(
            f"/api/happenings/{made['id']}/rsvp", json={"answer": "going"}, headers=bearer(bob)
        )
        assert response.status_code == 200
        answered = await page.next("happening")
        assert answered["action"] == "rsvp"
        assert answered["happening"]["counts"]["going"] == 1
        assert json.dumps(answered["happening"]["rsvps"][0]["display_name"]) == '"Bob"'
