"""Issue 21, item 11: security headers on pages and API, and /docs from the node alone."""

from __future__ import annotations

import time
from html.parser import HTMLParser
from pathlib import Path

from quart.typing import TestClientProtocol as QuartClient
from redis.asyncio import Redis

from node.state.registry import NodeInfo, Registry
from node.web.app import WEBAPP_DIR
from node.web.headers import origins
from tests.conftest import Api, bearer

# One of each kind: pages, API answers (ok and errors), static files, docs, operations.
PATHS = (
    "/",
    "/r/caf%C3%A9",
    "/api/ping",
    "/api/nodes",
    "/api/rooms/nowhere",
    "/api/users/me",
    "/static/app.js",
    "/static/style.css",
    "/static/nothing.js",
    "/docs",
    "/openapi.json",
    "/healthz",
    "/metrics",
)


def directives(policy: str) -> dict[str, list[str]]:
    parsed = {}
    for part in policy.split(";"):
        name, *values = part.split()
        parsed[name] = values
    return parsed


async def test_every_response_has_the_headers(client: QuartClient) -> None:
    responses = [await client.get(path) for path in PATHS]
    responses.append(await client.delete("/api/ping"))  # 405
    for response in responses:
        headers = response.headers
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Referrer-Policy"] == "no-referrer"
        assert headers["X-Frame-Options"] == "DENY"
        policy = directives(headers["Content-Security-Policy"])
        assert policy["frame-ancestors"] == ["'none'"]
        assert policy["base-uri"] == ["'none'"]
        # Nothing inline or evaluated, anywhere.
        assert not any("unsafe" in value for values in policy.values() for value in values)


async def test_api_and_static_responses_allow_nothing_active(client: QuartClient) -> None:
    for path in ("/api/ping", "/api/rooms/nowhere", "/static/app.js", "/docs", "/openapi.json"):
        policy = directives((await client.get(path)).headers["Content-Security-Policy"])
        assert policy["default-src"] == ["'none'"] and "script-src" not in policy, path
        assert "connect-src" not in policy, path


async def test_pages_may_reach_the_mesh_and_nothing_else(api: Api, redis: Redis) -> None:
    """Scripts and styles from the node only; connections to this node and every live node
    (the client pings them and may open its WebSocket there), http and ws."""
    other = NodeInfo("node-9", "ap-southeast", "https://sg.rooms.example.org:8443", time.time())
    await Registry(redis, other, ttl_s=30).register()
    for path in ("/", "/r/lobby"):
        response = await api.client.get(path)
        policy = directives(response.headers["Content-Security-Policy"])
        assert policy["default-src"] == ["'none'"]
        assert policy["script-src"] == ["'self'"] and policy["style-src"] == ["'self'"]
        assert policy["object-src"] == ["'none'"]
        connect = policy["connect-src"]
        # This node (settings.public_base_url in the fixtures) and node-9, as registered.
        for origin in (
            "https://rooms.example.org",
            "wss://rooms.example.org",
            "https://sg.rooms.example.org:8443",
            "wss://sg.rooms.example.org:8443",
        ):
            assert origin in connect, (origin, connect)
        assert not [source for source in connect if source in ("*", "http:", "https:", "ws:")]


def test_origins_refuse_what_could_break_the_policy() -> None:
    assert origins(["http://a:1/x", "https://b", "http://a:1"]) == [
        "http://a:1",
        "ws://a:1",
        "https://b",
        "wss://b",
    ]
    for bad in ("javascript:alert(1)", "http://a;script-src *", "http://a b", "ftp://a", ""):
        assert origins([bad]) == [], bad


class _Inline(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self._tag = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._tag = tag
        names = {name for name, _ in attrs}
        if tag == "script" and "src" not in names:
            self.found.append("inline <script>")
        if tag == "style":
            self.found.append("<style>")
        self.found += [f"{tag} {name}=" for name in names if name == "style" or name[:2] == "on"]
        if tag == "link" and (dict(attrs).get("href") or "").startswith(("http:", "https:", "//")):
            self.found.append(f"{tag} from elsewhere")

    def handle_data(self, data: str) -> None:
        if self._tag == "script" and data.strip():
            self.found.append("script text")


def test_the_web_client_needs_nothing_inline() -> None:
    """The page policy allows no inline script or style: the client must not have any."""
    for page in sorted(Path(WEBAPP_DIR).glob("*.html")):
        parser = _Inline()
        parser.feed(page.read_text())
        assert parser.found == [], (page.name, parser.found)


async def test_docs_are_served_by_the_node_alone(api: Api) -> None:
    response = await api.client.get("/docs")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/html")
    page = await response.get_data(as_text=True)
    assert '<a href="/openapi.json">' in page
    assert "/api/rooms/{slug}/messages" in page and "bearer token" in page
    parser = _Inline()
    parser.feed(page)
    assert parser.found == [] and "<script" not in page
    assert "http://" not in page and "https://" not in page  # nothing from a CDN
    assert (await api.client.get("/static/docs.css")).status_code == 200
    # quart-schema's CDN pages are gone; the description itself stays.
    for path in ("/redocs", "/scalar"):
        assert (await api.client.get(path)).status_code == 404
    spec = await (await api.client.get("/openapi.json")).get_json()
    assert "/api/rooms/{slug}/messages" in spec["paths"]
    # The login check is part of the description of authenticated routes.
    token = await api.user_token("alice")
    assert (await api.client.get("/api/users/me", headers=bearer(token))).status_code == 200
    assert spec["paths"]["/api/users/me"]["get"]["security"] == [{"bearer": []}]
