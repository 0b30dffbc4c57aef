"""Issue 18 item 1 in the browser: the web client gives its peer connections the TURN
server and credentials the node handed its session in `hello`, and Chromium's own TURN
client gets a relay allocation from a real coturn with them."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from pathlib import Path
from typing import Any

import httpx
import pytest

from node.local.coturn import start_coturn
from node.local.launch import start_node
from node.runtime.services import BackingServices
from tests.browser import chromium
from tests.node.live_client import create_room, sign_up
from tests.webapp.web import new_page, wait_joined, web_context

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CANDIDATES = """async () => {
  const pc = window.sfumesh.conn.media.publishPc;
  const types = [];
  (await pc.getStats()).forEach((s) => {
    if (s.type === "local-candidate") types.push(s.candidateType);
  });
  return { servers: pc.getConfiguration().iceServers, types };
}"""


async def test_the_web_client_gathers_relay_candidates_with_the_nodes_credentials(
    backing: BackingServices, token_keys: dict[str, str], tmp_path: Path
) -> None:
    coturn = await asyncio.to_thread(start_coturn, tmp_path, allowed_peers=["127.0.0.1"])
    try:
        env = {
            "SFUMESH_MEDIA_HOST_ADDRESSES": json.dumps(["127.0.0.1"]),
            "SFUMESH_DATABASE": f"web_{secrets.token_hex(4)}",
            "SFUMESH_BCRYPT_COST": "4",
            **coturn.node_env(),
        }
        node = await asyncio.to_thread(
            start_node, backing, token_keys, name="node-1", data_dir=tmp_path, extra_env=env
        )
        try:
            slug = f"turn-{secrets.token_hex(3)}"
            async with httpx.AsyncClient(timeout=30) as http:
                alice = await sign_up(http, node.url, prefix="al")
                await create_room(alice, node.url, slug)
            async with chromium() as browser, web_context(browser, alice.user_token) as context:
                page = await new_page(context, f"{node.url}/r/{slug}")
                await wait_joined(page)
                session_id = await page.evaluate("() => window.sfumesh.conn.hello.session_id")
                await page.wait_for_function(
                    "() => window.sfumesh.conn.media?.publishPc?.iceGatheringState === 'complete'",
                    timeout=30_000,
                )
                found: dict[str, Any] = await page.evaluate(CANDIDATES)
        finally:
            await asyncio.to_thread(node.stop)
    finally:
        await asyncio.to_thread(coturn.stop)
    [server] = [s for s in found["servers"] if s.get("username")]
    assert server["urls"] == coturn.urls
    assert re.fullmatch(rf"\d+:{session_id}", server["username"]), server
    assert "relay" in found["types"], found  # coturn accepted the credentials
    assert "host" in found["types"], found
