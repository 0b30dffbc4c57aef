"""R8, a room's limit on happenings at the store: even creations racing past the room's lock
(a holder stalled beyond its lease) never leave more than `max_per_room` in the room."""

from __future__ import annotations

import asyncio

from node.errors import Conflict
from node.store.happenings import Happening, NewHappening, create_happening
from node.store.models import Room
from tests.conftest import Api

CAP = 5


async def test_racing_creations_without_the_lock_never_overshoot_the_limit(api: Api) -> None:
    owner = await api.user_token("owner")
    new = NewHappening(title="Picnic", start="2026-03-29T10:00", zone="Asia/Ho_Chi_Minh")
    for round_, (left, racers) in enumerate([(1, 6), (2, 8), (3, 5), (1, 3), (4, 10)]):
        slug = f"limit{round_}"
        await api.create_room(owner, slug)
        room = await Room.find_one(Room.slug == slug)
        assert room is not None
        for _ in range(CAP - left):
            await create_happening(room, "u", "U", new, CAP, 100)

        async def create(room: Room = room) -> bool:
            try:
                await create_happening(room, "u", "U", new, CAP, 100)
            except Conflict as error:
                assert error.code == "too_many_happenings"
                return False
            return True

        kept = sum(await asyncio.gather(*(create() for _ in range(racers))))
        stored = await Happening.find(Happening.room == slug).count()
        assert stored <= CAP, (round_, stored)
        assert stored == CAP - left + kept  # whoever was told "created" is there
