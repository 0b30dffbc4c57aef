"""Shared fixtures: real redis-server and a MongoDB wire-protocol server for the whole run.

Set REDIS_TEST_URL / MONGODB_TEST_URI to test against servers of your own (a real MongoDB,
say); otherwise the embedded ones start on free loopback ports, through the same code path
as `sfumesh demo`, and are stopped by PID at the end.

SFUMESH_TEST_REDIS=cluster runs the same tests on a local 3-primary Redis Cluster instead
(started here, stopped by PID): in-process apps and node processes get `redis.mode =
"cluster"`. ./scripts/test runs the tests marked `redis_paths` that way too.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import AsyncMongoClient
from quart import Quart
from quart.testing.app import TestApp
from quart.typing import TestAppProtocol, TestClientProtocol
from redis.asyncio import Redis

from node.config import ENV_VARS, RedisSettings, Settings, load_settings, new_key
from node.local.launch import LocalNode, start_node
from node.runtime.services import BackingServices
from node.state.connect import open_redis_with
from node.web.app import create_app
from tests.redis_topologies import SentinelGroup, start_cluster, start_sentinel_group

SettingsFactory = Callable[..., Settings]

# Tests sign up and log in hundreds of users from one loopback address, many at once; the
# sign-up, login-attempt and hashing-queue limits would refuse them. Tests of those limits
# set their own. (Failed-login limits keep their defaults: tests of other things fail no
# login.) As settings overrides for in-process apps, as environment for node processes.
GENEROUS_LIMITS: dict[str, int] = {
    "signup_limit.per_address": 1_000_000,
    "signup_limit.total": 1_000_000,
    "login_limit.attempts_per_address": 1_000_000,
    "login_limit.attempts_total": 1_000_000,
    "hashing.max_waiting": 100_000,
    # Room look-ups and creations per address and user: tests of other things make many
    # rooms from one address (tests/node/web/test_room_limits.py sets its own limits).
    "rooms.lookups_per_window": 1_000_000,
    "rooms.creations_per_window": 1_000_000,
}
GENEROUS_LIMITS_ENV: dict[str, str] = {
    name: str(GENEROUS_LIMITS[dotted])
    for name, dotted in ENV_VARS.items()
    if dotted in GENEROUS_LIMITS
}


#: "single" (one redis-server) or "cluster" (a 3-primary Redis Cluster)
REDIS_MODE = os.environ.get("SFUMESH_TEST_REDIS", "single")
if REDIS_MODE not in ("single", "cluster"):
    raise ValueError(f"SFUMESH_TEST_REDIS must be single or cluster, not {REDIS_MODE!r}")
REDIS_MODE_ENV = {"SFUMESH_REDIS_MODE": REDIS_MODE}


@pytest.fixture(scope="session", autouse=True)
def _generous_limits_for_node_processes() -> Iterator[None]:
    """Every node process a test starts inherits these (a test's extra_env still wins)."""
    saved = {name: os.environ.get(name) for name in {**GENEROUS_LIMITS_ENV, **REDIS_MODE_ENV}}
    os.environ.update(GENEROUS_LIMITS_ENV)
    os.environ.update(REDIS_MODE_ENV)
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def running_app(app: Quart) -> TestAppProtocol:
    """An in-process app whose start and stop may take a while on a busy machine (the
    shutdown drains sessions and closes every peer connection; Quart allows 6 s)."""
    return TestApp(app, startup_timeout=60, shutdown_timeout=60)


@pytest.fixture(scope="session")
def backing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackingServices]:
    redis_url = os.environ.get("REDIS_TEST_URL", "")
    cluster = None
    if REDIS_MODE == "cluster" and not redis_url:
        cluster = start_cluster(tmp_path_factory.mktemp("redis-cluster"))
        redis_url = cluster.url
    try:
        services = BackingServices.start(
            redis_url, os.environ.get("MONGODB_TEST_URI", ""), tmp_path_factory.mktemp("services")
        )
    except BaseException:
        if cluster is not None:
            cluster.stop()
        raise
    if cluster is not None:
        services.children[:0] = cluster.processes  # watched and stopped with the rest
    try:
        yield services
        # A child that died during the run fails the run, even if no test noticed.
        services.check()
    finally:
        services.stop()


@pytest.fixture
def token_keys() -> dict[str, str]:
    return {"k1": new_key()}


@pytest.fixture
def make_settings(
    backing: BackingServices, token_keys: dict[str, str], tmp_path: Path
) -> SettingsFactory:
    """Settings for one test: its own database name, fast bcrypt; dotted overrides allowed."""
    database = f"test_{secrets.token_hex(6)}"

    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "redis_url": backing.redis_url,
            "redis.mode": REDIS_MODE,
            "mongodb_uri": backing.mongodb_uri,
            "database": database,
            "data_dir": str(tmp_path),
            "bcrypt_cost": 4,
            "tokens.keys": token_keys,
            "tokens.signing_key_id": next(iter(token_keys)),
            "public_base_url": "https://rooms.example.org",
            # In-process apps run without a Serf agent; node processes get one (launch.py).
            "serf.mode": "off",
            **GENEROUS_LIMITS,
            # Test clients are on loopback: their candidates must be probed (off by default).
            "media.allow_private_candidates": True,
        }
        values.update({key.replace("__", "."): value for key, value in overrides.items()})
        return load_settings(env={}, overrides=values)

    return build


@pytest.fixture
def sentinel_group(tmp_path: Path) -> Iterator[SentinelGroup]:
    """A primary, two replicas and three sentinels of its own (stopped by PID at the end)."""
    group = start_sentinel_group(tmp_path / "sentinel")
    try:
        yield group
    finally:
        group.stop()


def sentinel_settings(group: SentinelGroup) -> RedisSettings:
    return RedisSettings(mode="sentinel", sentinels=group.addresses, password=group.password)


def suite_redis(backing: BackingServices) -> Redis:
    """A client of the suite's Redis, single server or cluster (SFUMESH_TEST_REDIS)."""
    return open_redis_with(RedisSettings(mode=REDIS_MODE), backing.redis_url)


async def keys_matching(redis: Redis, pattern: str) -> list[bytes]:
    """KEYS `pattern` over every primary (on a cluster, KEYS asks one node only)."""
    return [key async for key in redis.scan_iter(match=pattern, count=1000)]


@pytest.fixture
async def redis(backing: BackingServices) -> AsyncIterator[Redis]:
    client = suite_redis(backing)
    # Tests run one at a time; each starts from an empty Redis (rate-limit counters and all).
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture
async def make_app(
    make_settings: SettingsFactory, redis: Redis, backing: BackingServices
) -> AsyncIterator[Callable[..., Any]]:
    """Start an in-process node app with the given setting overrides; stopped at the end."""
    running: list[TestAppProtocol] = []
    databases: set[str] = set()

    async def start(**overrides: Any) -> TestAppProtocol:
        settings = make_settings(**overrides)
        databases.add(settings.database)
        test_app = running_app(create_app(settings))
        await test_app.startup()
        running.append(test_app)
        return test_app

    yield start
    for test_app in reversed(running):
        await test_app.shutdown()
    mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(backing.mongodb_uri)
    for database in databases:
        await mongo.drop_database(database)
    await mongo.close()


@pytest.fixture
async def client(make_app: Callable[..., Any]) -> TestClientProtocol:
    test_app = await make_app()
    test_client: TestClientProtocol = test_app.test_client()
    return test_client


class Api:
    """The common walks through the API, so tests read as what they check."""

    def __init__(self, client: TestClientProtocol) -> None:
        self.client = client
        self.password = "correct horse battery"

    async def signup(self, username: str = "alice", **fields: Any) -> dict[str, Any]:
        body = {
            "username": username,
            "email": f"{username}@example.org",
            "password": self.password,
            "display_name": username.title(),
            **fields,
        }
        response = await self.client.post("/api/users", json=body)
        assert response.status_code == 201, await response.get_data(as_text=True)
        data: dict[str, Any] = await response.get_json()
        return data

    async def login(self, login: str = "alice", password: str | None = None) -> str:
        response = await self.client.post(
            "/api/auth/login", json={"login": login, "password": password or self.password}
        )
        assert response.status_code == 200, await response.get_data(as_text=True)
        token: str = (await response.get_json())["user_token"]
        return token

    async def user_token(self, username: str = "alice") -> str:
        await self.signup(username)
        return await self.login(username)

    async def session_token(self, user_token: str) -> str:
        response = await self.client.post("/api/sessions", headers=bearer(user_token))
        assert response.status_code == 201, await response.get_data(as_text=True)
        token: str = (await response.get_json())["session_token"]
        return token

    async def create_room(self, user_token: str, slug: str, **fields: Any) -> dict[str, Any]:
        response = await self.client.post(
            "/api/rooms", json={"slug": slug, **fields}, headers=bearer(user_token)
        )
        assert response.status_code == 201, await response.get_data(as_text=True)
        data: dict[str, Any] = await response.get_json()
        return data


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def error_of(response: Any) -> dict[str, Any]:
    """The contract's error object of a response, checked for shape."""
    body = await response.get_json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"]["code"], str) and isinstance(body["error"]["message"], str)
    error: dict[str, Any] = body["error"]
    return error


@pytest.fixture
def api(client: TestClientProtocol) -> Api:
    return Api(client)


@pytest.fixture
def node_processes(
    backing: BackingServices, token_keys: dict[str, str], tmp_path: Path
) -> Iterator[Callable[..., LocalNode]]:
    """Start real `sfumesh node` processes on the shared services; stopped by PID at the end."""
    started: list[LocalNode] = []
    database = f"test_{secrets.token_hex(6)}"

    def start(
        name: str = "node-1",
        services: BackingServices | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> LocalNode:
        env = {"SFUMESH_DATABASE": database, "SFUMESH_BCRYPT_COST": "4", **(extra_env or {})}
        node = start_node(
            services or backing, token_keys, name=name, data_dir=tmp_path, extra_env=env
        )
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()
