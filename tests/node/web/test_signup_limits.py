"""Sign-up as a CPU weapon (issue 21, item 5): sign-ups are limited per address and over the
mesh before any bcrypt work, and bcrypt runs in a bounded pool of its own. Measured as work:
bcrypt runs started, never as time."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from typing import Any

import bcrypt
import pytest

from node.errors import Unavailable
from node.store.models import User
from node.store.users import PasswordHasher
from node.web.context import EXTENSION
from tests.conftest import error_of


def _hasher(test_app: Any) -> PasswordHasher:
    hasher: PasswordHasher = test_app.app.extensions[EXTENSION].hasher
    return hasher


async def _signup(client: Any, username: str, address: str) -> Any:
    body = {
        "username": username,
        "email": f"{username}@example.org",
        "password": "correct horse battery",
        "display_name": username.title(),
    }
    return await client.post("/api/users", json=body, scope_base={"client": (address, 40000)})


async def test_signup_flood_from_one_address_reaches_bcrypt_at_most_the_limit(
    make_app: Any,
) -> None:
    test_app = await make_app(signup_limit__per_address=3)
    client = test_app.test_client()
    hasher = _hasher(test_app)
    before = hasher.started
    responses = await asyncio.gather(*(_signup(client, f"flood{i}", "10.0.0.7") for i in range(40)))
    assert Counter(r.status_code for r in responses) == Counter({201: 3, 429: 37})
    assert hasher.started - before == 3
    refused = next(r for r in responses if r.status_code == 429)
    assert (await error_of(refused))["code"] == "rate_limited"
    assert 1 <= int(refused.headers["Retry-After"]) <= 3600
    assert await User.find_all().count() == 3
    # Another address is not affected.
    assert (await _signup(client, "neighbour", "10.0.0.8")).status_code == 201


@pytest.mark.redis_paths
async def test_signups_over_the_mesh_are_bounded(make_app: Any) -> None:
    test_app = await make_app(signup_limit__total=4, signup_limit__total_window_s=60)
    client = test_app.test_client()
    hasher = _hasher(test_app)
    before = hasher.started
    responses = await asyncio.gather(
        *(_signup(client, f"spread{i}", f"10.3.0.{i}") for i in range(15))
    )
    assert Counter(r.status_code for r in responses) == Counter({201: 4, 429: 11})
    assert hasher.started - before == 4


async def test_hashing_queue_is_bounded_and_says_busy() -> None:
    # Cost 12 (~0.2 s a run) keeps the first runs busy while the others arrive.
    hasher = PasswordHasher(12, threads=1, max_waiting=2)
    try:
        results = await asyncio.gather(
            *(hasher.hash("correct horse battery") for _ in range(10)), return_exceptions=True
        )
    finally:
        hasher.close()
    hashes = [r for r in results if isinstance(r, str)]
    busy = [r for r in results if isinstance(r, Unavailable)]
    assert len(hashes) == 3 and len(busy) == 7, results
    assert {error.code for error in busy} == {"busy"}
    assert hasher.started == 3


async def test_hashing_runs_in_its_own_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[str] = []
    real = bcrypt.hashpw

    def spy(password: bytes, salt: bytes) -> bytes:
        threads.append(threading.current_thread().name)
        return real(password, salt)

    monkeypatch.setattr(bcrypt, "hashpw", spy)
    hasher = PasswordHasher(4, threads=2, max_waiting=8)
    try:
        await asyncio.gather(*(hasher.hash("correct horse battery") for _ in range(6)))
    finally:
        hasher.close()
    # Never the loop's default executor (asyncio.to_thread), which the rest of the node uses.
    assert len(threads) == 6 and all(name.startswith("bcrypt") for name in threads), threads


async def test_login_flood_past_the_queue_is_503_busy(make_app: Any) -> None:
    # Logins in flight hold a failed-login slot each until answered: room for all ten.
    test_app = await make_app(
        bcrypt_cost=12, hashing__threads=1, hashing__max_waiting=1, login_limit__per_login=100
    )
    client = test_app.test_client()
    assert (await _signup(client, "alice", "10.0.0.1")).status_code == 201
    hasher = _hasher(test_app)
    before = hasher.started
    body = {"login": "alice", "password": "correct horse battery"}
    responses = await asyncio.gather(
        *(client.post("/api/auth/login", json=body) for _ in range(10))
    )
    statuses = Counter(r.status_code for r in responses)
    assert statuses[503] >= 1 and statuses[200] >= 2, statuses
    assert statuses[200] + statuses[503] == 10, statuses
    assert hasher.started - before == statuses[200]
    refused = next(r for r in responses if r.status_code == 503)
    assert (await error_of(refused))["code"] == "busy"
    assert refused.headers["Retry-After"] == "1"
    # A busy answer is not a failed login: the failure counters were given back.
    assert (await client.post("/api/auth/login", json=body)).status_code == 200
