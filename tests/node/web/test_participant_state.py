"""Participant state (issue 17 item 2): mic muted, camera off, hand raised, screen share.

`participant-state {state}` on the WebSocket is stored with the membership in Redis and
announced through the room's event stream, so a page on another node hears it and a late
joiner finds it in `joined`. Two in-process nodes share one Redis here, as a mesh does.
(Bad input is in test_ws_bad_input.py's table: an `error`, nothing changed.)
"""

from __future__ import annotations

import asyncio
import json
from contextlib import AsyncExitStack
from typing import Any

from redis.asyncio import Redis

from node.state import keys
from tests.conftest import Api
from tests.node.runtime.test_live_inprocess import Peer

TIMEOUT = 5.0


async def connect(stack: AsyncExitStack, api: Api, session_token: str) -> Peer:
    context: Any = api.client.websocket(f"/ws?session_token={session_token}")
    ws = await stack.enter_async_context(context)
    peer = Peer(api, ws, session_token)
    peer.session_id = (await peer.next("hello"))["session_id"]
    return peer


async def test_state_reaches_the_room_on_every_node_and_late_joiners(
    make_app: Any, redis: Redis
) -> None:
    first = Api((await make_app(node_name="node-1")).test_client())
    second = Api((await make_app(node_name="node-2")).test_client())
    alice_token = await first.user_token("alice")
    bob_token = await first.user_token("bob")
    carol_token = await first.user_token("carol")
    await first.create_room(alice_token, "lobby")
    async with AsyncExitStack() as stack:
        alice = await connect(stack, first, await first.session_token(alice_token))
        bob = await connect(stack, second, await first.session_token(bob_token))
        joined = await alice.join("lobby")
        assert joined["self"]["state"] == {
            "mic_muted": False,
            "camera_off": False,
            "hand_raised": False,
            "screen_sharing": False,
            "screen_mid": None,
            "e2ee": False,
        }
        await bob.join("lobby")

        ack = await alice.request(
            "participant-state", state={"mic_muted": True, "hand_raised": True}
        )
        assert ack["type"] == "ack" and ack["state"]["mic_muted"] is True, ack
        # bob is on node-2: the event crossed nodes through the room's stream.
        heard = await bob.next("participant-state", alice.session_id)
        assert heard["state"]["mic_muted"] and heard["state"]["hand_raised"], heard
        assert heard["state"]["camera_off"] is False and heard["room"] == "lobby"
        # The sender hears its own change too (every page shows the same thing).
        assert (await alice.next("participant-state", alice.session_id))["state"] == heard["state"]

        # A partial change keeps the rest.
        await alice.request(
            "participant-state",
            state={"hand_raised": False, "screen_sharing": True, "screen_mid": "2"},
        )
        heard = await bob.next("participant-state", alice.session_id)
        assert heard["state"]["mic_muted"] is True and heard["state"]["hand_raised"] is False
        assert heard["state"]["screen_mid"] == "2"

        # Stored with the membership: what Redis holds is what a late joiner sees.
        raw: Any = await redis.hget(keys.room_members("lobby"), alice.session_id)
        assert json.loads(raw)["flags"]["screen_sharing"] is True
        carol = await connect(stack, second, await first.session_token(carol_token))
        late = await carol.join("lobby")
        seen = {p["session_id"]: p["state"] for p in late["participants"]}
        assert seen[alice.session_id]["mic_muted"] is True
        assert seen[alice.session_id]["screen_mid"] == "2"
        assert seen[bob.session_id]["mic_muted"] is False

        # After leaving, the old membership's state cannot be set (and nothing is sent).
        assert (await alice.request("leave"))["type"] == "ack"
        refused = await alice.request("participant-state", state={"mic_muted": False})
        assert refused["type"] == "error" and refused["code"] == "not_in_room", refused
        await bob.next("participant-left", alice.session_id)
        assert (await bob.request("ping"))["type"] == "pong"
        await asyncio.sleep(0.2)
        assert not [m for m in bob.seen if m["type"] == "participant-state"], bob.seen
