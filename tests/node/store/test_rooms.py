"""R1-R3: slugs, creation policy, capacity, persistence of rooms, QR invites."""

from __future__ import annotations

import asyncio
import unicodedata
from collections import Counter
from typing import Any

import pytest
import segno

from node.state import keys
from node.state.sessions import Membership
from node.store.models import Room
from node.store.rooms import normalize_slug, qr_svg
from tests.conftest import Api, bearer, error_of


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("Lobby", "lobby"),
        ("Straße", "strasse"),
        (unicodedata.normalize("NFD", "Café"), "café"),
        ("🎉🎉", "🎉🎉"),
        ("👩🏽‍💻-devs", "👩🏽‍💻-devs"),
        ("日本語の部屋", "日本語の部屋"),
        ("Tiếng-Việt", "tiếng-việt"),
        ("ΚΑΦΕ", "καφε"),
    ],
)
def test_slugs_are_normalised(raw: str, canonical: str) -> None:
    assert normalize_slug(raw) == canonical


@pytest.mark.parametrize(
    "raw",
    [
        "a",
        "x" * 49,
        "has space",
        "a/b",
        "..",
        "a.b",
        "-lead",
        "trail_",
        "api",
        "DOCS",
        "p\u0430ypal",
        "ｐａｙ",
        "rtl\u202eabc",
        "zero\u200bwidth",
        "tab\there",
        "\u0301ab",
    ],
)
def test_hostile_or_confusing_slugs_are_refused(raw: str) -> None:
    with pytest.raises(ValueError):
        normalize_slug(raw)


async def test_create_and_get_room(api: Api) -> None:
    token = await api.user_token("alice")
    room = await api.create_room(token, "Team-🚀", name="Team rocket")
    assert room["slug"] == "team-🚀" and room["name"] == "Team rocket"
    assert room["capacity"] == 8
    assert room["occupancy"] == {"people": 0, "sessions": 0}
    got = await (await api.client.get("/api/rooms/TEAM-🚀")).get_json()
    assert got["slug"] == "team-🚀" and got["creator_id"] == room["creator_id"]


async def test_taken_slug_after_normalisation_is_409(api: Api) -> None:
    token = await api.user_token("alice")
    await api.create_room(token, "café")
    response = await api.client.post(
        "/api/rooms", json={"slug": unicodedata.normalize("NFD", "CAFÉ")}, headers=bearer(token)
    )
    assert response.status_code == 409
    assert (await error_of(response))["code"] == "room_exists"
    assert await Room.find_all().count() == 1


async def test_concurrent_creation_of_one_slug_makes_one_room(api: Api) -> None:
    token = await api.user_token("alice")
    responses = await asyncio.gather(
        *(
            api.client.post("/api/rooms", json={"slug": "Race"}, headers=bearer(token))
            for _ in range(20)
        )
    )
    assert Counter(r.status_code for r in responses) == Counter({201: 1, 409: 19})
    assert await Room.find_all().count() == 1


async def test_capacity_bounds(api: Api) -> None:
    token = await api.user_token("alice")
    assert (await api.create_room(token, "big", capacity=100))["capacity"] == 100
    for capacity in (0, 101):
        response = await api.client.post(
            "/api/rooms", json={"slug": f"c{capacity}", "capacity": capacity}, headers=bearer(token)
        )
        assert response.status_code == 422


async def test_allowlist_policy(make_app: Any) -> None:
    test_app = await make_app(rooms__create_policy="allowlist", rooms__creators=["Alice"])
    api = Api(test_app.test_client())
    alice = await api.user_token("alice")
    bob = await api.user_token("bob")
    await api.create_room(alice, "alices-room")
    response = await api.client.post("/api/rooms", json={"slug": "bobs-room"}, headers=bearer(bob))
    assert response.status_code == 403
    assert (await error_of(response))["code"] == "forbidden"
    assert await Room.find_all().count() == 1
    # Anyone with the link may still look the room up (R3).
    assert (await api.client.get("/api/rooms/alices-room")).status_code == 200


async def test_room_creation_needs_a_user_token(api: Api) -> None:
    response = await api.client.post("/api/rooms", json={"slug": "nobody"})
    assert response.status_code == 401
    assert await Room.find_all().count() == 0


async def test_unknown_room_is_404(api: Api) -> None:
    for path in ("/api/rooms/nowhere", "/api/rooms/nowhere/qr.svg"):
        response = await api.client.get(path)
        assert response.status_code == 404
        assert (await error_of(response))["code"] == "room_not_found"


async def test_qr_code_encodes_the_percent_encoded_room_url(api: Api) -> None:
    token = await api.user_token("alice")
    await api.create_room(token, "phở-🍜")
    response = await api.client.get("/api/rooms/phở-🍜/qr.svg")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("image/svg+xml")
    url = "https://rooms.example.org/r/ph%E1%BB%9F-%F0%9F%8D%9C"
    assert await response.get_data() == qr_svg(url)
    assert segno.make_qr(url, error="m").designator  # the URL fits a QR code


async def test_occupancy_counts_people_not_sessions(api: Api, redis: Any) -> None:
    token = await api.user_token("alice")
    await api.create_room(token, "busy")
    members = {
        sid: Membership(sid, user, user, "n1", 1, "active", 0.0).encode()
        for sid, user in (("s1", "u1"), ("s2", "u1"), ("s3", "u2"))
    }
    await redis.hset(keys.room_members("busy"), mapping=members)
    room = await (await api.client.get("/api/rooms/busy")).get_json()
    assert room["occupancy"] == {"people": 2, "sessions": 3}
