"""CORS on the API, for the mesh's own nodes only (issue 17, failover): a page served by
another node of the mesh may call this node's API with its Authorization header; a foreign
origin gets no CORS header (its browser keeps the answer from it), and nothing but /api/ is
opened."""

from __future__ import annotations

import time
from typing import Any

from redis.asyncio import Redis

from node.state import keys
from node.state.registry import URL_MEMORY_S, NodeInfo, Registry
from tests.conftest import Api, bearer

# This node (settings.public_base_url in the fixtures) and node-2, as registered.
OWN = "https://rooms.example.org"
OTHER = "http://10.1.2.3:8080"
FOREIGN = "https://evil.example.com"


async def register_other(redis: Redis) -> None:
    await Registry(redis, NodeInfo("node-2", "far", OTHER + "/", 0.0), ttl_s=60).register()


async def test_a_mesh_node_origin_may_call_the_api_with_its_token(api: Api, redis: Redis) -> None:
    await register_other(redis)
    user = await api.user_token("alice")
    for origin in (OTHER, OWN):
        response = await api.client.post(
            "/api/sessions", headers={**bearer(user), "Origin": origin}
        )
        assert response.status_code == 201, await response.get_data(as_text=True)
        assert response.headers["Access-Control-Allow-Origin"] == origin
        assert "Origin" in response.headers["Vary"]
        assert "Access-Control-Allow-Credentials" not in response.headers
    # Errors are readable too (the page must see a 401 to renew its token).
    refused = await api.client.post("/api/sessions", headers={"Origin": OTHER})
    assert refused.status_code == 401
    assert refused.headers["Access-Control-Allow-Origin"] == OTHER


async def test_a_foreign_origin_gets_no_cors_header(api: Api, redis: Redis) -> None:
    await register_other(redis)
    user = await api.user_token("alice")
    for origin in (FOREIGN, "http://10.1.2.3:8081", "null"):
        response = await api.client.post(
            "/api/sessions", headers={**bearer(user), "Origin": origin}
        )
        assert "Access-Control-Allow-Origin" not in response.headers
    # Pages and static files are never opened, whoever asks.
    page = await api.client.get("/", headers={"Origin": OTHER})
    assert "Access-Control-Allow-Origin" not in page.headers


async def preflight(api: Api, origin: str, path: str = "/api/rooms/lobby/join") -> Any:
    client: Any = api.client
    return await client.open(
        path,
        method="OPTIONS",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )


async def test_preflight_answers_mesh_origins_only(api: Api, redis: Redis) -> None:
    await register_other(redis)
    allowed = await preflight(api, OTHER)
    assert allowed.status_code == 204
    assert allowed.headers["Access-Control-Allow-Origin"] == OTHER
    assert "Authorization" in allowed.headers["Access-Control-Allow-Headers"]
    assert "POST" in allowed.headers["Access-Control-Allow-Methods"]
    assert "Access-Control-Allow-Credentials" not in allowed.headers
    refused = await preflight(api, FOREIGN)
    assert "Access-Control-Allow-Origin" not in refused.headers
    assert "Access-Control-Allow-Headers" not in refused.headers
    # Outside /api/ nothing is answered for anyone.
    page = await preflight(api, OTHER, "/r/lobby")
    assert "Access-Control-Allow-Origin" not in page.headers


async def test_a_dead_node_s_pages_may_still_call_the_api(
    api: Api, redis: Redis, monkeypatch: Any
) -> None:
    # The failover's own case (tests/webapp/test_failover.py[freeze] failed so under load):
    # a frozen node's record expired, or Serf's failure removed it, or the reaper forgot it,
    # before its page noticed and went to another node. The page still has that node's
    # origin; its calls there must be answered, or the browser refuses every one, for good.
    monkeypatch.setattr("node.web.cors.CACHE_S", 0.0)
    await register_other(redis)
    user = await api.user_token("alice")
    await Registry(redis, NodeInfo("node-2", "far", OTHER, 0.0), ttl_s=60).remove("node-2")
    live = await Registry(redis, NodeInfo("x", "near", OWN, 0.0), ttl_s=60).live()
    assert "node-2" not in [info.name for info in live]
    assert (await preflight(api, OTHER)).headers.get("Access-Control-Allow-Origin") == OTHER
    response = await api.client.post("/api/sessions", headers={**bearer(user), "Origin": OTHER})
    assert response.status_code == 201
    assert response.headers.get("Access-Control-Allow-Origin") == OTHER
    # A drained node (deregistered): the same for the pages it sent elsewhere.
    third = "http://10.1.2.4:8080"
    drained = Registry(redis, NodeInfo("node-3", "far", third, 0.0), ttl_s=60)
    await drained.register()
    await drained.deregister()
    assert (await preflight(api, third)).headers.get("Access-Control-Allow-Origin") == third
    assert "Access-Control-Allow-Origin" not in (await preflight(api, FOREIGN)).headers


async def test_a_node_gone_longer_than_the_url_memory_is_no_longer_allowed(
    api: Api, redis: Redis, monkeypatch: Any
) -> None:
    monkeypatch.setattr("node.web.cors.CACHE_S", 0.0)
    await register_other(redis)
    assert "Access-Control-Allow-Origin" in (await preflight(api, OTHER)).headers
    # node-2 left a day and a bit ago (`live.node_url_memory_s`, a day by default)
    long_ago = time.time() - URL_MEMORY_S - 60
    old = Registry(
        redis, NodeInfo("node-2", "far", OTHER + "/", 0.0), ttl_s=60, clock=lambda: long_ago
    )
    await old.register()
    await old.deregister()
    assert "Access-Control-Allow-Origin" not in (await preflight(api, OTHER)).headers
    # and the next node to register drops it from the set
    await Registry(
        redis, NodeInfo("node-3", "far", "http://10.1.2.4:8080", 0.0), ttl_s=60
    ).register()
    assert await redis.zscore(keys.node_urls(), OTHER + "/") is None
