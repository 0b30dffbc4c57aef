"""Happenings (issue 16, R8) through the real in-process app: plan, change, cancel, answer."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from redis.asyncio import Redis

from node.state import keys
from node.store.happenings import Rsvp
from node.store.models import Room
from node.store.rooms import remember_person
from tests.conftest import Api, bearer, error_of

PICNIC = {
    "title": "Picnic at the lake",
    "description": "Bring fruit",
    "start": "2026-03-29T10:00",
    "end": "2026-03-29T14:00",
    "zone": "Asia/Ho_Chi_Minh",
    "place": "West Lake",
    "place_url": "https://maps.example.org/west-lake",
}


async def person(api: Api, name: str, room: str | None = None) -> tuple[str, str]:
    """A signed-up user's session token and id, one of `room`'s people when given."""
    user_token = await api.user_token(name)
    me = await (await api.client.get("/api/users/me", headers=bearer(user_token))).get_json()
    if room is not None:
        found = await Room.find_one(Room.slug == room)
        assert found is not None
        await remember_person(found, me["id"])
    return await api.session_token(user_token), me["id"]


async def plan(api: Api, token: str, room: str = "lobby", **fields: Any) -> dict[str, Any]:
    response = await api.client.post(
        f"/api/rooms/{room}/happenings", json={**PICNIC, **fields}, headers=bearer(token)
    )
    assert response.status_code == 201, await response.get_data(as_text=True)
    data: dict[str, Any] = await response.get_json()
    return data


async def room_with_owner(api: Api) -> str:
    owner_user = await api.user_token("owner")
    await api.create_room(owner_user, "lobby")
    return await api.session_token(owner_user)


async def test_plan_list_edit_cancel_and_who_may(api: Api) -> None:
    owner = await room_with_owner(api)
    alice, _ = await person(api, "alice", "lobby")
    bob, _ = await person(api, "bob", "lobby")
    stranger, _ = await person(api, "stranger")

    made = await plan(api, alice, description="", place="  ", place_url=None)
    assert (made["description"], made["place"], made["place_url"]) == ("", "", None)
    made = await plan(api, alice)
    assert made["start"] == "2026-03-29T03:00:00Z"  # 10:00 at UTC+7
    assert made["start_local"] == "2026-03-29T10:00:00+07:00"
    assert made["zone"] == "Asia/Ho_Chi_Minh" and made["creator_name"] == "Alice"
    assert made["counts"] == {"going": 0, "waitlisted": 0, "maybe": 0, "not_going": 0}

    # not one of the room's people: neither plan nor read nor answer
    response = await api.client.post(
        "/api/rooms/lobby/happenings", json=PICNIC, headers=bearer(stranger)
    )
    assert response.status_code == 403 and (await error_of(response))["code"] == "not_joined"
    response = await api.client.get("/api/rooms/lobby/happenings", headers=bearer(stranger))
    assert response.status_code == 403
    response = await api.client.put(
        f"/api/happenings/{made['id']}/rsvp", json={"answer": "going"}, headers=bearer(stranger)
    )
    assert response.status_code == 403

    listed = await (
        await api.client.get("/api/rooms/lobby/happenings", headers=bearer(bob))
    ).get_json()
    assert made["id"] in [h["id"] for h in listed["happenings"]]

    # bob is one of the people, not its planner: no changes
    response = await api.client.patch(
        f"/api/happenings/{made['id']}", json={"title": "Mine now"}, headers=bearer(bob)
    )
    assert response.status_code == 403 and (await error_of(response))["code"] == "forbidden"
    response = await api.client.delete(f"/api/happenings/{made['id']}", headers=bearer(bob))
    assert response.status_code == 403

    # its planner moves it an hour later; times re-read in the zone
    response = await api.client.patch(
        f"/api/happenings/{made['id']}",
        json={"start": "2026-03-29T11:00", "title": "Picnic, later"},
        headers=bearer(alice),
    )
    assert response.status_code == 200, await response.get_data(as_text=True)
    changed = await response.get_json()
    assert changed["start"] == "2026-03-29T04:00:00Z" and changed["title"] == "Picnic, later"

    # a new zone keeps the wall times: 11:00 now meant in Amsterdam (CEST, UTC+2)
    response = await api.client.patch(
        f"/api/happenings/{made['id']}", json={"zone": "Europe/Amsterdam"}, headers=bearer(alice)
    )
    moved = await response.get_json()
    assert moved["start_local"] == "2026-03-29T11:00:00+02:00"
    assert moved["end_local"] == "2026-03-29T14:00:00+02:00"
    response = await api.client.patch(
        f"/api/happenings/{made['id']}", json={"end": None}, headers=bearer(alice)
    )
    assert (await response.get_json())["end"] is None

    # the room's creator may cancel it
    response = await api.client.delete(f"/api/happenings/{made['id']}", headers=bearer(owner))
    assert response.status_code == 200 and (await response.get_json())["cancelled"] is True
    response = await api.client.put(
        f"/api/happenings/{made['id']}/rsvp", json={"answer": "going"}, headers=bearer(bob)
    )
    assert response.status_code == 409
    assert (await error_of(response))["code"] == "happening_cancelled"

    response = await api.client.get("/api/happenings/nope", headers=bearer(alice))
    assert response.status_code == 404
    assert (await error_of(response))["code"] == "happening_not_found"


async def test_bad_input_is_a_clear_422_and_writes_nothing(api: Api, redis: Redis) -> None:
    await room_with_owner(api)
    alice, _ = await person(api, "alice", "lobby")
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"end": "2026-03-29T09:00"}, "end_before_start", "end"),
        ({"zone": "Mars/Olympus_Mons"}, "invalid_input", "unknown time zone"),
        ({"zone": "+07:00"}, "invalid_input", "unknown time zone"),
        ({"title": "x" * 121}, "invalid_input", "title"),
        ({"title": "   "}, "invalid_input", "title"),
        ({"description": "x" * 4001}, "invalid_input", "description"),
        ({"place": "x" * 201}, "invalid_input", "place"),
        ({"place_url": "javascript:alert(1)"}, "invalid_input", "place_url"),
        ({"start": "next saturday"}, "invalid_time", "start"),
        ({"start": "20266-03-29T10:00"}, "invalid_time", "start"),
        ({"start": "2033-03-29T10:00", "end": None}, "invalid_time", "too far"),
        ({"capacity": 0}, "invalid_input", "capacity"),
        ({"capacity": 10_001}, "invalid_input", "capacity"),
        ({"unknown": 1}, "invalid_input", "unknown"),
        # 02:30 does not exist in Amsterdam on the day clocks go forward
        (
            {"zone": "Europe/Amsterdam", "start": "2026-03-29T02:30", "end": None},
            "invalid_time",
            "does not exist",
        ),
    ]
    events_before = await redis.xlen(keys.room_events("lobby"))
    for fields, code, words in cases:
        response = await api.client.post(
            "/api/rooms/lobby/happenings", json={**PICNIC, **fields}, headers=bearer(alice)
        )
        assert response.status_code == 422, (fields, await response.get_data(as_text=True))
        error = await error_of(response)
        assert error["code"] == code and words in error["message"], (fields, error)
    listed = await (
        await api.client.get("/api/rooms/lobby/happenings", headers=bearer(alice))
    ).get_json()
    assert listed["happenings"] == []
    assert await redis.xlen(keys.room_events("lobby")) == events_before
    assert await redis.zcard(keys.REMINDERS_DUE) == 0
    # and an edit that would end before its start changes nothing
    made = await plan(api, alice)
    response = await api.client.patch(
        f"/api/happenings/{made['id']}", json={"start": "2026-03-29T15:00"}, headers=bearer(alice)
    )
    assert response.status_code == 422
    assert (await error_of(response))["code"] == "end_before_start"
    same = await (
        await api.client.get(f"/api/happenings/{made['id']}", headers=bearer(alice))
    ).get_json()
    assert same["start"] == made["start"]


async def test_planned_in_ho_chi_minh_read_in_amsterdam_across_dst(api: Api) -> None:
    """Amsterdam goes from UTC+1 to UTC+2 at 01:00 UTC on 29 March 2026; Ho Chi Minh City
    stays at UTC+7. The same 10:00 there is 04:00 in Amsterdam the day before, 05:00 after."""
    await room_with_owner(api)
    alice, _ = await person(api, "alice", "lobby")
    amsterdam = ZoneInfo("Europe/Amsterdam")
    seen = []
    for day in ("2026-03-28", "2026-03-29"):
        made = await plan(api, alice, start=f"{day}T10:00", end=None)
        start = datetime.fromisoformat(made["start"])
        assert datetime.fromisoformat(made["start_local"]) == start
        seen.append(start.astimezone(amsterdam).strftime("%H:%M %Z"))
    assert seen == ["04:00 CET", "05:00 CEST"]
    # the autumn hour that happens twice in Amsterdam is its first (summer time) one
    made = await plan(api, alice, zone="Europe/Amsterdam", start="2026-10-25T02:30", end=None)
    assert made["start"] == "2026-10-25T00:30:00Z"
    # an instant with an offset is taken as that instant, whatever the zone
    made = await plan(api, alice, start="2026-03-29T03:00:00Z", end=None)
    assert made["start_local"] == "2026-03-29T10:00:00+07:00"


@pytest.mark.redis_paths
async def test_50_rsvps_race_for_10_places(api: Api) -> None:
    await room_with_owner(api)
    alice, _ = await person(api, "alice", "lobby")
    made = await plan(api, alice, capacity=10)
    people = [await person(api, f"racer{i}", "lobby") for i in range(50)]

    async def going(token: str) -> dict[str, Any]:
        response = await api.client.put(
            f"/api/happenings/{made['id']}/rsvp", json={"answer": "going"}, headers=bearer(token)
        )
        assert response.status_code == 200, await response.get_data(as_text=True)
        data: dict[str, Any] = await response.get_json()
        return data

    answers = await asyncio.gather(*(going(token) for token, _ in people))
    final = await (
        await api.client.get(f"/api/happenings/{made['id']}", headers=bearer(alice))
    ).get_json()
    assert final["counts"] == {"going": 10, "waitlisted": 40, "maybe": 0, "not_going": 0}
    waiting = [r for r in final["rsvps"] if r["status"] == "waitlisted"]
    assert [r["position"] for r in waiting] == list(range(1, 41))
    # each response told its answerer truly: the 10 who were told "going" are the 10 going
    by_user = {r["user_id"]: r["status"] for r in final["rsvps"]}
    told = {}
    for (_, user_id), answer in zip(people, answers, strict=True):
        told[user_id] = next(r["status"] for r in answer["rsvps"] if r["user_id"] == user_id)
    assert told == by_user
    # answering "going" again keeps one's place
    first_waiting = waiting[0]["user_id"]
    token_of = {user_id: token for token, user_id in people}
    again = await going(token_of[first_waiting])
    assert next(r for r in again["rsvps"] if r["user_id"] == first_waiting)["position"] == 1
    # someone going drops out: the first in line moves up, the line moves on
    leaver = next(r["user_id"] for r in final["rsvps"] if r["status"] == "going")
    response = await api.client.put(
        f"/api/happenings/{made['id']}/rsvp",
        json={"answer": "not_going"},
        headers=bearer(token_of[leaver]),
    )
    after = await response.get_json()
    status = {r["user_id"]: r for r in after["rsvps"]}
    assert status[first_waiting]["status"] == "going"
    assert status[leaver]["status"] == "not_going"
    assert after["counts"] == {"going": 10, "waitlisted": 39, "maybe": 0, "not_going": 1}
    assert status[waiting[1]["user_id"]]["position"] == 1
    # a bad answer is a 422
    response = await api.client.put(
        f"/api/happenings/{made['id']}/rsvp", json={"answer": "yes"}, headers=bearer(alice)
    )
    assert response.status_code == 422


@pytest.mark.redis_paths
async def test_changes_and_answers_reach_the_room_stream(api: Api, redis: Redis) -> None:
    await room_with_owner(api)
    alice, _ = await person(api, "alice", "lobby")
    made = await plan(api, alice)
    for _ in range(2):  # the same answer again changes nothing and says nothing
        await api.client.put(
            f"/api/happenings/{made['id']}/rsvp", json={"answer": "maybe"}, headers=bearer(alice)
        )
    await api.client.delete(f"/api/happenings/{made['id']}", headers=bearer(alice))
    entries: Any = await redis.xrange(keys.room_events("lobby"))
    events = [(f[b"type"].decode(), json.loads(f[b"data"])) for _, f in entries]
    happenings = [(d["action"], d["happening"]["id"]) for t, d in events if t == "happening"]
    assert happenings == [
        ("created", made["id"]),
        ("rsvp", made["id"]),
        ("rsvp", made["id"]),
        ("cancelled", made["id"]),
    ]
    chat = [d["text"] for t, d in events if t == "chat"]
    assert len(chat) == 3 and "planned" in chat[0] and "cancelled" in chat[2]
    assert chat[1] == "🤔 Alice might come to “Picnic at the lake”"
    assert all(d["happening"] == made["id"] for t, d in events if t == "chat")
    history = await (
        await api.client.get("/api/rooms/lobby/messages", headers=bearer(alice))
    ).get_json()
    assert [m["author"]["display_name"] for m in history["messages"]] == ["sfumesh"] * 3


async def test_each_changed_answer_is_one_chat_line_saying_where_it_left_them(
    api: Api, redis: Redis
) -> None:
    await room_with_owner(api)
    alice, _ = await person(api, "alice", "lobby")
    bob, _ = await person(api, "bob", "lobby")
    made = await plan(api, alice, capacity=1)
    url = f"/api/happenings/{made['id']}/rsvp"
    for token, answer in [
        (alice, "going"),
        (alice, "going"),  # unchanged: no line
        (bob, "going"),
        (bob, "going"),  # unchanged: no line
        (alice, "not_going"),  # Bob moves up; one line, Alice's
        (bob, "maybe"),
    ]:
        response = await api.client.put(url, json={"answer": answer}, headers=bearer(token))
        assert response.status_code == 200
    entries: Any = await redis.xrange(keys.room_events("lobby"))
    events = [(f[b"type"].decode(), json.loads(f[b"data"])) for _, f in entries]
    chat = [d["text"] for t, d in events if t == "chat"][1:]  # after "planned"
    title = "“Picnic at the lake”"
    assert chat == [
        f"🙋 Alice is going to {title}",
        f"⏳ Bob is on the wait list for {title} (#1)",
        f"🙅 Alice can't come to {title}",
        f"🤔 Bob might come to {title}",
    ]
    assert sum(t == "happening" and d["action"] == "rsvp" for t, d in events) == 6


@pytest.mark.redis_paths
async def test_room_limit_holds_when_creations_race_for_the_last_places(
    make_app: Callable[..., Any],
) -> None:
    cap = 6
    app = await make_app(happenings__max_per_room=cap)
    api = Api(app.test_client())
    owner = await api.user_token("owner")
    alice, alice_id = await person(api, "alice")
    # rounds with 1..3 places left and 4..9 racers: many interleavings of count and insert
    for round_, (left, racers) in enumerate([(1, 4), (2, 5), (3, 9), (1, 8), (2, 9), (3, 6)]):
        slug = f"race{round_}"
        await api.create_room(owner, slug)
        found = await Room.find_one(Room.slug == slug)
        assert found is not None
        await remember_person(found, alice_id)
        for _ in range(cap - left):
            await plan(api, alice, room=slug)

        async def create(slug: str = slug) -> int:
            response = await api.client.post(
                f"/api/rooms/{slug}/happenings", json=PICNIC, headers=bearer(alice)
            )
            if response.status_code == 409:
                assert (await error_of(response))["code"] == "too_many_happenings"
            return int(response.status_code)

        codes = await asyncio.gather(*(create() for _ in range(racers)))
        assert sorted(codes) == [201] * left + [409] * (racers - left), (round_, codes)
        listed = await (
            await api.client.get(f"/api/rooms/{slug}/happenings", headers=bearer(alice))
        ).get_json()
        assert len(listed["happenings"]) == cap


async def test_listing_reads_all_answers_at_once_and_shows_what_each_shows(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    await room_with_owner(api)
    alice, _ = await person(api, "alice", "lobby")
    bob, _ = await person(api, "bob", "lobby")
    carol, _ = await person(api, "carol", "lobby")
    made = [await plan(api, alice, capacity=1 + i % 2, title=f"Outing {i}") for i in range(6)]
    await plan(api, alice, title="Nobody answered")
    for i, happening in enumerate(made):
        url = f"/api/happenings/{happening['id']}/rsvp"
        order = [(alice, "going"), (bob, "going"), (carol, ["maybe", "going", "not_going"][i % 3])]
        for token, answer in order[i % 3 :] + order[: i % 3]:
            await api.client.put(url, json={"answer": answer}, headers=bearer(token))
    one_by_one = []
    for happening in made:
        response = await api.client.get(f"/api/happenings/{happening['id']}", headers=bearer(bob))
        one_by_one.append(await response.get_json())

    reads: list[object] = []
    find = Rsvp.find

    def counted(*args: Any, **kwargs: Any) -> Any:
        reads.append(args)
        return find(*args, **kwargs)

    monkeypatch.setattr(Rsvp, "find", counted)
    listed = await (
        await api.client.get("/api/rooms/lobby/happenings", headers=bearer(bob))
    ).get_json()
    assert len(reads) == 1  # was one per happening
    by_id = {h["id"]: h for h in listed["happenings"]}
    assert [by_id[h["id"]] for h in made] == one_by_one
    assert by_id[next(iter(set(by_id) - {h["id"] for h in made}))]["rsvps"] == []
    assert any(h["counts"]["waitlisted"] for h in one_by_one)
