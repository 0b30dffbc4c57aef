"""Seats through the HTTP API and the WebSocket (issue 21, item 6): an HTTP join never
completed frees its seat after `live.pending_seat_ttl_s`; the room's creator (and only they)
removes someone with POST /api/rooms/{slug}/kick, who is told `left` while the others see
`participant-left`, and who cannot join again for a while."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import Any

import pytest

from tests.conftest import Api, bearer, error_of
from tests.node.runtime.test_live_inprocess import connect


@pytest.mark.redis_paths
async def test_throwaway_joins_free_their_seats_and_the_next_person_gets_in(
    make_app: Any,
) -> None:
    test_app = await make_app(live__pending_seat_ttl_s=2.0)
    api = Api(test_app.test_client())
    owner = await api.user_token("owner")
    await api.create_room(owner, "duo", capacity=2)
    async with AsyncExitStack() as stack:
        squatters = [
            await connect(stack, api, await api.session_token(await api.user_token(name)))
            for name in ("throwaway1", "throwaway2")
        ]
        for squatter in squatters:
            assert (await squatter.http_join("duo")).status_code == 200
        owner_peer = await connect(stack, api, await api.session_token(owner))
        full = await owner_peer.http_join("duo")
        assert full.status_code == 409 and (await error_of(full))["code"] == "room_full"
        await asyncio.sleep(2.2)
        await owner_peer.join("duo")  # HTTP join and WebSocket join both succeed
        # Renewing on the same connection does not work any more.
        again = await squatters[0].http_join("duo")
        assert again.status_code == 409 and (await error_of(again))["code"] == "join_expired"


@pytest.mark.redis_paths
async def test_the_creator_removes_someone_and_only_the_creator(make_app: Any) -> None:
    test_app = await make_app()
    api = Api(test_app.test_client())
    owner = await api.user_token("owner")
    bob = await api.user_token("bob")
    carol = await api.user_token("carol")
    await api.create_room(owner, "club")
    bob_id = (await (await api.client.get("/api/users/me", headers=bearer(bob))).get_json())["id"]
    async with AsyncExitStack() as stack:
        owner_peer = await connect(stack, api, await api.session_token(owner))
        bob_peer = await connect(stack, api, await api.session_token(bob))
        carol_peer = await connect(stack, api, await api.session_token(carol))
        for peer in (owner_peer, bob_peer, carol_peer):
            await peer.join("club")

        not_owner = await api.client.post(
            "/api/rooms/club/kick", json={"user_id": bob_id}, headers=bearer(carol)
        )
        assert not_owner.status_code == 403
        assert (await error_of(not_owner))["code"] == "not_room_creator"

        response = await api.client.post(
            "/api/rooms/club/kick", json={"user_id": bob_id}, headers=bearer(owner)
        )
        assert response.status_code == 200, await response.get_data(as_text=True)
        assert (await response.get_json())["sessions_removed"] == 1
        left = await bob_peer.next("left")
        assert left["reason"] == "removed-by-owner"
        gone = await owner_peer.next("participant-left", bob_peer.session_id)
        assert gone["reason"] == "removed-by-owner"
        assert (await carol_peer.next("participant-left", bob_peer.session_id))["user_id"] == bob_id
        # Bob's connection is out of the room and cannot come back for now.
        refused = await bob_peer.request("chat", text="still here?")
        assert refused["type"] == "error" and refused["code"] == "not_in_room"
        rejoin = await bob_peer.http_join("club")
        assert rejoin.status_code == 403
        assert (await error_of(rejoin))["code"] == "removed_by_owner"

        too_long = await api.client.post(
            "/api/rooms/club/kick", json={"user_id": "x" * 65}, headers=bearer(owner)
        )
        assert too_long.status_code in (400, 422)
        assert (await error_of(too_long))["code"]
