"""U1-U4: sign-up, uniqueness, hashes never leaving the store, views by viewer."""

from __future__ import annotations

import re
from typing import Any

import bcrypt

from node.store.models import User
from node.store.rooms import get_room, remember_person
from node.store.users import PasswordHasher
from node.web.context import EXTENSION
from tests.conftest import Api, bearer, error_of


async def test_signup_returns_public_fields_only(api: Api) -> None:
    user = await api.signup("alice")
    assert set(user) == {"id", "username", "display_name"}
    assert user["username"] == "alice" and user["display_name"] == "Alice"


async def test_password_is_stored_as_bcrypt_hash_only(api: Api) -> None:
    await api.signup("alice")
    stored = await User.find_one(User.username_key == "alice")
    assert stored is not None
    assert stored.password_hash.startswith("$2b$04$")
    assert api.password not in stored.model_dump_json()
    assert bcrypt.checkpw(api.password.encode(), stored.password_hash.encode())


async def test_duplicate_username_is_409_and_writes_nothing(api: Api) -> None:
    await api.signup("alice")
    body = {
        "username": "ALICE",
        "email": "other@example.org",
        "password": api.password,
        "display_name": "Second",
    }
    response = await api.client.post("/api/users", json=body)
    assert response.status_code == 409
    assert (await error_of(response))["code"] == "user_exists"
    assert await User.find_all().count() == 1


def _hasher(api: Api) -> PasswordHasher:
    hasher: PasswordHasher = api.client.app.extensions[EXTENSION].hasher
    return hasher


async def test_taken_email_is_not_told_and_writes_nothing(api: Api) -> None:
    """Issue 21 item 8: a sign-up with someone's email answers exactly like one with a fresh
    email (status, fields, one bcrypt hash), and stores nothing (U2: no duplicate)."""
    alice = await api.signup("alice")
    hasher = _hasher(api)

    async def attempt(username: str, email: str) -> tuple[int, dict[str, object], int]:
        before = hasher.started
        body = {
            "username": username,
            "email": email,
            "password": api.password,
            "display_name": username.title(),
        }
        response = await api.client.post("/api/users", json=body)
        return response.status_code, await response.get_json(), hasher.started - before

    taken = await attempt("mallory", "Alice@Example.org")
    fresh = await attempt("trent", "trent@example.org")
    assert (taken[0], taken[2]) == (fresh[0], fresh[2]) == (201, 1)
    assert set(taken[1]) == set(fresh[1]) == {"id", "username", "display_name"}
    assert taken[1]["username"] == "mallory" and taken[1]["display_name"] == "Mallory"
    assert len(str(taken[1]["id"])) == len(str(fresh[1]["id"])) == len(alice["id"])
    assert taken[1]["id"] != alice["id"]
    # Nothing stored for the taken email: alice and trent only; alice unchanged.
    stored = {u.username: u for u in await User.find_all().to_list()}
    assert set(stored) == {"alice", "trent"}
    assert str(stored["alice"].id) == alice["id"]
    assert stored["alice"].email == "alice@example.org"
    # The username was not taken either: a later real sign-up may have it.
    assert (await attempt("mallory", "mallory@example.org"))[0] == 201
    # Asked twice with the same taken email, still nothing is stored twice.
    assert (await attempt("mallory2", "alice@example.org"))[0] == 201
    assert await User.find(User.email_key == "alice@example.org").count() == 1


async def test_password_over_72_bytes_is_refused_not_truncated(api: Api) -> None:
    body = {
        "username": "long",
        "email": "long@example.org",
        "password": "é" * 37,  # 74 bytes in UTF-8, 37 characters
        "display_name": "Long",
    }
    response = await api.client.post("/api/users", json=body)
    assert response.status_code == 422
    assert "72 bytes" in (await error_of(response))["message"]
    assert await User.find_all().count() == 0


async def test_password_of_exactly_72_bytes_works_and_73rd_byte_matters(api: Api) -> None:
    api.password = "p" * 72
    await api.signup("edge")
    await api.login("edge")
    response = await api.client.post(
        "/api/auth/login", json={"login": "edge", "password": "p" * 72 + "x"}
    )
    assert response.status_code == 401


async def test_login_by_username_or_email_case_insensitive(api: Api) -> None:
    await api.signup("alice")
    assert await api.login("ALICE")
    assert await api.login("Alice@EXAMPLE.org")


async def test_me_shows_email_to_self_only(api: Api) -> None:
    alice_token = await api.user_token("alice")
    bob_token = await api.user_token("bob")
    me = await (await api.client.get("/api/users/me", headers=bearer(alice_token))).get_json()
    assert me["email"] == "alice@example.org"
    assert "password" not in str(me) and "hash" not in str(me)

    # Profiles by id are for people who share a room (issue 21 item 17): bob joins alice's.
    room = await api.create_room(alice_token, "lobby")
    bob = await (await api.client.get("/api/users/me", headers=bearer(bob_token))).get_json()
    await remember_person(await get_room(room["slug"]), bob["id"])
    by_bob = await api.client.get(f"/api/users/{me['id']}", headers=bearer(bob_token))
    assert await by_bob.get_json() == {"id": me["id"], "username": "alice", "display_name": "Alice"}
    by_self = await api.client.get(f"/api/users/{me['id']}", headers=bearer(alice_token))
    assert (await by_self.get_json())["email"] == "alice@example.org"

    by_name = await api.client.get("/api/users/by-username/ALICE", headers=bearer(bob_token))
    assert await by_name.get_json() == {
        "id": me["id"],
        "username": "alice",
        "display_name": "Alice",
    }


async def test_user_lookup_needs_a_user_token(api: Api) -> None:
    user = await api.signup("alice")
    response = await api.client.get(f"/api/users/{user['id']}")
    assert response.status_code == 401
    response = await api.client.get("/api/users/by-username/alice")
    assert response.status_code == 401


async def test_unknown_user_lookups_are_404(api: Api) -> None:
    token = await api.user_token("alice")
    for path in (
        "/api/users/0123456789abcdef01234567",
        "/api/users/nope",
        "/api/users/by-username/nobody",
    ):
        response = await api.client.get(path, headers=bearer(token))
        assert response.status_code == 404
        assert (await error_of(response))["code"] == "user_not_found"


async def test_wrong_password_and_unknown_user_get_the_same_answer(api: Api) -> None:
    await api.signup("alice")
    wrong = await api.client.post(
        "/api/auth/login", json={"login": "alice", "password": "nope-nope"}
    )
    unknown = await api.client.post(
        "/api/auth/login", json={"login": "zed", "password": "nope-nope"}
    )
    assert wrong.status_code == unknown.status_code == 401
    assert await wrong.get_json() == await unknown.get_json()


async def test_display_name_is_normalised_and_controls_refused(api: Api) -> None:
    user = await api.signup("nfd", display_name="  Cafe\u0301  ")
    assert user["display_name"] == "Café"
    response = await api.client.post(
        "/api/users",
        json={
            "username": "evil",
            "email": "evil@example.org",
            "password": api.password,
            "display_name": "admin\u202egpj",
        },
    )
    assert response.status_code == 422


async def test_user_ids_are_random_and_say_nothing_of_order(api: Api) -> None:
    """Issue 21 item 17: ids are 128 random bits, not ObjectIds (time and a counter)."""
    ids = [(await api.signup(f"user{i}"))["id"] for i in range(6)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", user_id) for user_id in ids), ids
    # ObjectIds of consecutive inserts share their leading (time) bytes and count up.
    assert len({user_id[:8] for user_id in ids}) == len(ids), ids
    stored = await User.find_all().to_list()
    assert {user.id for user in stored} == set(ids)


async def test_profile_by_id_only_for_people_who_share_a_room(api: Api) -> None:
    alice_token = await api.user_token("alice")
    bob_token = await api.user_token("bob")
    carol_token = await api.user_token("carol")

    async def me(token: str) -> dict[str, str]:
        data: dict[str, str] = await (
            await api.client.get("/api/users/me", headers=bearer(token))
        ).get_json()
        return data

    alice, bob = await me(alice_token), await me(bob_token)
    room = await api.create_room(alice_token, "kitchen")

    async def lookup(token: str, user_id: str) -> Any:
        return await api.client.get(f"/api/users/{user_id}", headers=bearer(token))

    # A stranger is told exactly what an unknown id gets: nothing to list or probe.
    stranger = await lookup(bob_token, alice["id"])
    unknown = await lookup(bob_token, "0" * 32)
    assert stranger.status_code == unknown.status_code == 404
    assert await error_of(stranger) == await error_of(unknown)
    # Once bob has joined alice's room, they see each other; carol still sees neither.
    await remember_person(await get_room(room["slug"]), bob["id"])
    assert (await lookup(bob_token, alice["id"])).status_code == 200
    assert (await (await lookup(alice_token, bob["id"])).get_json())["username"] == "bob"
    assert (await lookup(carol_token, alice["id"])).status_code == 404
    assert (await lookup(carol_token, bob["id"])).status_code == 404
    # By exact username, anyone signed in may find someone.
    by_name = await api.client.get("/api/users/by-username/alice", headers=bearer(carol_token))
    assert (await by_name.get_json())["id"] == alice["id"]
