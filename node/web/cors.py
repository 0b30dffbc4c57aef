"""CORS for the API, open to the mesh's own nodes only (issue 17, failover).

A page is served by one node but must keep working when that node dies: it then calls the
API of another node (a WebSocket ticket, the join, the ranking), which is a cross-origin
request with an Authorization header, so the browser asks first (a preflight). Only the
origins of the mesh's nodes are answered: this node's own URL, every node in the Redis
registry, and every node registered within `live.node_url_memory_s` (its origin must outlive
its record: the pages of a node that died, whose record expired or was reaped before they
noticed, or of a drained one, call the others from that origin for the rest of the call). A
foreign origin gets no CORS header at all, so its browser keeps the answer from it. No
credentials (cookies) are involved: tokens travel in the header. Only `/api/` is concerned;
pages, static files and /metrics stay same-origin.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from quart import Response, request

ALLOWED_METHODS = "GET, POST, PUT, PATCH, DELETE"
ALLOWED_HEADERS = "Authorization, Content-Type"
#: headers a cross-origin caller may read (a 429's wait, the API's own)
EXPOSED_HEADERS = "Retry-After"
#: how long a browser may reuse a preflight's answer (s)
MAX_AGE_S = 600
#: how long the set of mesh origins is reused before the registry is read again (s): a
#: foreign origin must not make every request read Redis
CACHE_S = 2.0


def origin_of(url: str) -> str | None:
    """`scheme://host[:port]` of an http(s) URL, lower case, as browsers send Origin."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}".lower()


class MeshOrigins:
    """The origins of the mesh's nodes, read from `node_urls` at most every CACHE_S."""

    def __init__(
        self,
        node_urls: Callable[[], Awaitable[list[str]]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._node_urls = node_urls
        self._clock = clock
        self._origins: frozenset[str] = frozenset()
        self._read_at = float("-inf")

    async def allows(self, origin: str) -> bool:
        if self._clock() - self._read_at > CACHE_S:
            urls = await self._node_urls()
            self._origins = frozenset(o for o in map(origin_of, urls) if o is not None)
            self._read_at = self._clock()
        return origin.lower() in self._origins


def _is_api() -> bool:
    return request.path.startswith("/api/")


async def preflight(origins: MeshOrigins) -> Response | None:
    """The answer to a CORS preflight of an API route (None: not one). A foreign origin
    gets an empty 204 without CORS headers: its browser refuses to go on."""
    if request.method != "OPTIONS" or not _is_api():
        return None
    origin = request.headers.get("Origin")
    if origin is None or "Access-Control-Request-Method" not in request.headers:
        return None
    response = Response("", status=204)
    response.headers["Vary"] = "Origin"
    if await origins.allows(origin):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Methods"] = ALLOWED_METHODS
        response.headers["Access-Control-Allow-Headers"] = ALLOWED_HEADERS
        response.headers["Access-Control-Max-Age"] = str(MAX_AGE_S)
    return response


async def allow_origin(origins: MeshOrigins, response: Response) -> Response:
    """An API response readable by a mesh node's page (and only by one)."""
    origin = request.headers.get("Origin")
    if not _is_api() or origin is None:
        return response
    response.vary.add("Origin")
    if "Access-Control-Allow-Origin" not in response.headers and await origins.allows(origin):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
    return response
