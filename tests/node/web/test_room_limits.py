"""Room look-ups per client address and room creation per user are limited (issue 21, items
2 and 15): counted atomically in Redis, the one over the limit is 429 with Retry-After."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Api, bearer, error_of


async def _get(api: Api, path: str, address: str) -> Any:
    return await api.client.get(path, scope_base={"client": (address, 40000)})


@pytest.mark.redis_paths
async def test_room_lookups_are_limited_per_address(make_app: Any) -> None:
    test_app = await make_app(rooms__lookups_per_window=5, rooms__lookup_window_s=60)
    api = Api(test_app.test_client())
    owner = await api.user_token("owner")
    await api.create_room(owner, "hidden-place")
    # Found or not, info or QR code: each is one look-up from this address.
    paths = [
        "/api/rooms/hidden-place",
        "/api/rooms/guess-1",
        "/api/rooms/hidden-place/qr.svg",
        "/api/rooms/guess-2",
        "/api/rooms/guess-3/qr.svg",
    ]
    statuses = [(await _get(api, path, "198.51.100.7")).status_code for path in paths]
    assert statuses == [200, 404, 200, 404, 404]
    refused = await _get(api, "/api/rooms/hidden-place", "198.51.100.7")
    assert refused.status_code == 429
    assert (await error_of(refused))["code"] == "rate_limited"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    qr = await _get(api, "/api/rooms/hidden-place/qr.svg", "198.51.100.7")
    assert qr.status_code == 429
    # Another address has its own count.
    assert (await _get(api, "/api/rooms/hidden-place", "203.0.113.9")).status_code == 200


@pytest.mark.redis_paths
async def test_room_creation_is_limited_per_user(make_app: Any) -> None:
    test_app = await make_app(rooms__creations_per_window=3)
    api = Api(test_app.test_client())
    alice = await api.user_token("alice")
    bob = await api.user_token("bob")
    for i in range(2):
        await api.create_room(alice, f"alice-{i}")
    # A name already taken made no room: it does not count.
    taken = await api.client.post("/api/rooms", json={"slug": "alice-0"}, headers=bearer(alice))
    assert taken.status_code == 409
    await api.create_room(alice, "alice-2")
    refused = await api.client.post("/api/rooms", json={"slug": "alice-3"}, headers=bearer(alice))
    assert refused.status_code == 429, await refused.get_data(as_text=True)
    assert (await error_of(refused))["code"] == "rate_limited"
    assert int(refused.headers["Retry-After"]) > 3600
    assert (await api.client.get("/api/rooms/alice-3")).status_code == 404
    await api.create_room(bob, "bob-0")
