"""CORS on the API, for the mesh's own nodes only (issue 17, failover): a page served by
another node of the mesh may call this node's API with its Authorization header; a foreign
origin gets no CORS header (its browser keeps the answer from it), and nothing but /api/ is
opened."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from node.state.registry import NodeInfo, Registry
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


async def test_a_node_that_left_the_registry_is_no_longer_allowed(
    api: Api, redis: Redis, monkeypatch: Any
) -> None:
    await register_other(redis)
    assert "Access-Control-Allow-Origin" in (await preflight(api, OTHER)).headers
    await Registry(redis, NodeInfo("node-2", "far", OTHER, 0.0), ttl_s=60).deregister()
    monkeypatch.setattr("node.web.cors.CACHE_S", 0.0)
    assert "Access-Control-Allow-Origin" not in (await preflight(api, OTHER)).headers
