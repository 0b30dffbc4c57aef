"""`GET /static/<path>`: the web client's files, and nothing outside them."""

from __future__ import annotations

import pytest
from quart.typing import TestClientProtocol as QuartClient

from node.web.app import WEBAPP_DIR
from tests.conftest import error_of


async def test_serves_the_media_module_as_javascript(client: QuartClient) -> None:
    response = await client.get("/static/media.js")
    assert response.status_code == 200
    assert response.mimetype == "text/javascript"
    body = await response.get_data()
    assert body == (WEBAPP_DIR / "media.js").read_bytes()
    assert b"export class RoomMedia" in body


async def test_serves_other_files_with_their_type(client: QuartClient) -> None:
    response = await client.get("/static/index.html")
    assert response.status_code == 200
    assert response.mimetype == "text/html"


@pytest.mark.parametrize(
    "path",
    [
        "/static/missing.js",
        "/static/../node/app.py",
        "/static/%2e%2e/pyproject.toml",
        "/static/..%2fpyproject.toml",
        "/static/%2fetc/passwd",
        "/static//etc/passwd",
        "/static/media.js/",
        "/static/",
    ],
)
async def test_missing_or_outside_is_the_contract_404(client: QuartClient, path: str) -> None:
    unknown = await client.get("/no-such-page")
    response = await client.get(path)
    assert response.status_code == 404 == unknown.status_code
    error = await error_of(response)
    assert error == await error_of(unknown)
    assert error["code"] == "not_found"
