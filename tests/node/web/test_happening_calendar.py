"""Happenings as iCalendar (issue 16, R8 item 5): the same instants back, across DST; the
room's feed behind a token in its URL, and what revokes it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

from icalendar import Calendar

from tests.conftest import Api, bearer, error_of
from tests.node.web.test_happenings import PICNIC, person, plan, room_with_owner


def feed_path(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


def events_of(body: str | bytes) -> list[Any]:
    return list(Calendar.from_ical(body).walk("VEVENT"))


def instant(event: Any, name: str) -> datetime:
    value: datetime = event.decoded(name)
    return value.astimezone(UTC)


async def test_one_happening_ics_parses_back_to_the_same_instants(api: Api) -> None:
    await room_with_owner(api)
    alice, _ = await person(api, "alice", "lobby")
    made = await plan(api, alice)
    response = await api.client.get(
        f"/api/happenings/{made['id']}/event.ics", headers=bearer(alice)
    )
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/calendar")
    body = await response.get_data()
    calendar = Calendar.from_ical(body)
    assert [tz["TZID"] for tz in calendar.walk("VTIMEZONE")] == ["Asia/Ho_Chi_Minh"]
    (event,) = events_of(body)
    assert str(event["SUMMARY"]) == PICNIC["title"] and str(event["LOCATION"]) == "West Lake"
    assert instant(event, "DTSTART") == datetime.fromisoformat(made["start"])
    assert instant(event, "DTEND") == datetime.fromisoformat(made["end"])
    assert event["DTSTART"].params["TZID"] == "Asia/Ho_Chi_Minh"
    stranger, _ = await person(api, "stranger")
    response = await api.client.get(
        f"/api/happenings/{made['id']}/event.ics", headers=bearer(stranger)
    )
    assert response.status_code == 403


async def test_feed_across_dst_and_its_revocation(api: Api) -> None:
    await room_with_owner(api)
    alice, _ = await person(api, "alice", "lobby")
    made = [
        await plan(api, alice, start=f"{day}T10:00", end=None)
        for day in ("2026-03-28", "2026-03-29")
    ]
    response = await api.client.post("/api/rooms/lobby/calendar", headers=bearer(alice))
    assert response.status_code == 200
    link = await response.get_json()
    assert link["webcal"].startswith("webcal://") and "token=" in link["url"]

    response = await api.client.get(feed_path(link["url"]))  # no header: the URL is enough
    assert response.status_code == 200, await response.get_data(as_text=True)
    events = events_of(await response.get_data())
    starts = sorted(instant(e, "DTSTART") for e in events)
    assert starts == [datetime.fromisoformat(m["start"]) for m in made]
    amsterdam = [s.astimezone(ZoneInfo("Europe/Amsterdam")).strftime("%H:%M") for s in starts]
    assert amsterdam == ["04:00", "05:00"]

    # cancelled ones stay in the feed, marked so (calendar apps remove them)
    await api.client.delete(f"/api/happenings/{made[0]['id']}", headers=bearer(alice))
    events = events_of(await (await api.client.get(feed_path(link["url"]))).get_data())
    assert sorted(str(e["STATUS"]) for e in events) == ["CANCELLED", "CONFIRMED"]

    # resetting the link revokes every earlier one
    response = await api.client.delete("/api/rooms/lobby/calendar", headers=bearer(alice))
    fresh = await response.get_json()
    old = await api.client.get(feed_path(link["url"]))
    assert old.status_code == 404 and (await error_of(old))["code"] == "calendar_not_found"
    assert (await api.client.get(feed_path(fresh["url"]))).status_code == 200

    # a session token, a forged one, none: refused alike
    for token in (alice, fresh["url"].rsplit("=", 1)[1][:-4] + "AAAA", "x"):
        response = await api.client.get(f"/api/calendars/room.ics?token={token}")
        assert response.status_code == 404
    response = await api.client.get("/api/calendars/room.ics")
    assert response.status_code == 422

    # not one of the room's people: no link
    stranger, _ = await person(api, "stranger")
    response = await api.client.post("/api/rooms/lobby/calendar", headers=bearer(stranger))
    assert response.status_code == 403


async def test_a_password_change_revokes_the_feed(api: Api) -> None:
    await room_with_owner(api)
    alice, _ = await person(api, "alice", "lobby")
    link = await (
        await api.client.post("/api/rooms/lobby/calendar", headers=bearer(alice))
    ).get_json()
    path = urlsplit(link["url"]).path + "?" + urlsplit(link["url"]).query
    assert (await api.client.get(path)).status_code == 200
    user_token = await api.login("alice")
    response = await api.client.post(
        "/api/users/me/password",
        json={"old_password": api.password, "new_password": "another long password"},
        headers=bearer(user_token),
    )
    assert response.status_code in (200, 204), await response.get_data(as_text=True)
    assert (await api.client.get(path)).status_code == 404
