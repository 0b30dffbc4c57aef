"""Security headers on every HTTP response (issue 21, item 11).

The web client's pages get a Content-Security-Policy that lets them run only the node's
own scripts and styles (no inline script, nothing from a CDN) and talk only to the mesh:
the client times `GET /api/ping` on other nodes and may open its WebSocket on any of them
(`webapp/closest.js`, `webapp/room.js`), so `connect-src` lists every live node's origin,
http and ws, as the registry knows them when the page is served. Everything else (the API's
JSON, static files, the QR code, /docs) gets a policy that allows nothing active at all.
No response may be framed (clickjacking), sniffed into another type, or leak its URL in a
Referer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit

from quart import Response

# What a source expression may hold: scheme://host[:port], nothing that could end the
# directive (";", ",") or add another source (a space).
_ORIGIN = re.compile(r"^(?:https?|wss?)://[A-Za-z0-9.\-\[\]:]+$")

#: for everything that is not a page of the web client
STRICT_POLICY = "; ".join(
    (
        "default-src 'none'",
        "style-src 'self'",
        "img-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)

HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def origins(urls: Iterable[str]) -> list[str]:
    """The http and ws origins of node URLs, each once, in order; malformed ones left out."""
    found: dict[str, None] = {}
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            continue
        secure = parts.scheme == "https"
        for scheme in (parts.scheme, "wss" if secure else "ws"):
            origin = f"{scheme}://{parts.netloc}"
            if _ORIGIN.match(origin):
                found[origin] = None
    return list(found)


def page_policy(node_urls: Iterable[str]) -> str:
    """The policy of a web client page served while `node_urls` are the mesh's nodes."""
    connect = " ".join(("'self'", *origins(node_urls)))
    return "; ".join(
        (
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self'",
            # Camera and microphone streams play through srcObject, which no URL policy
            # covers (nor does any cover WebRTC); nothing is loaded by URL.
            "media-src 'self'",
            f"connect-src {connect}",
            "manifest-src 'self'",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
            "object-src 'none'",
        )
    )


def secure(response: Response) -> Response:
    """Every response: the headers above, and the strict policy unless it has its own."""
    for name, value in HEADERS.items():
        response.headers.setdefault(name, value)
    response.headers.setdefault("Content-Security-Policy", STRICT_POLICY)
    return response
