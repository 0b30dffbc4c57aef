"""The closest node, in the browser (N4): two node processes in one Serf mesh, and each
browser context made to measure a different one as nearer (its pings to the other are
delayed). Each lands on its own node, and they still see, hear and chat with each other,
which needs the relay between the nodes (N5-N7). When one node shuts down, its browser
follows the node's `reconnect` to the other."""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path

import httpx
import pytest
from playwright.async_api import BrowserContext, Route, expect

from node.local.launch import LocalNode, start_nodes
from node.runtime.services import BackingServices
from tests.browser import chromium
from tests.node.live_client import create_room, sign_up
from tests.webapp.web import decoding, hello, new_page, send_chat, wait_joined, web_context

pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.relay]

FRAMES = 60
DECODE_LIMIT_S = 90.0
# Loopback pings take ~1-5 ms; this puts the other node clearly farther away, even on a
# loaded machine (the client pings each node once: with 150 ms, a near node's ping held up
# longer than that picked the far node, 2 in ~27 runs of test_failover beside busy loops).
FAR_MS = 1000


async def make_far(context: BrowserContext, node: LocalNode) -> None:
    """Every GET /api/ping this context sends to `node` answers FAR_MS late (until
    `make_near`)."""

    async def slow(route: Route) -> None:
        await asyncio.sleep(FAR_MS / 1000)
        await route.continue_()

    # Each probe's URL carries a unique query (webapp/closest.js); a routed request has no
    # detailed Resource Timing, so the client times it whole, delay included.
    await context.route(f"{node.url}/api/ping?*", slow)


async def make_near(context: BrowserContext, node: LocalNode) -> None:
    """`node` answers this context's pings at once again."""
    await context.unroute(f"{node.url}/api/ping?*")


async def test_two_browsers_on_their_closest_nodes_meet_in_one_room(
    backing: BackingServices, token_keys: dict[str, str], tmp_path: Path
) -> None:
    env = {
        "SFUMESH_MEDIA_HOST_ADDRESSES": json.dumps(["127.0.0.1"]),
        "SFUMESH_DATABASE": f"web_{secrets.token_hex(4)}",
    }
    nodes: list[LocalNode] = await asyncio.to_thread(
        start_nodes, backing, token_keys, count=2, data_dir=tmp_path, extra_env=env
    )
    node1, node2 = nodes
    try:
        slug = f"two-nodes-{secrets.token_hex(3)}"
        async with httpx.AsyncClient(timeout=30) as http:
            alice = await sign_up(http, node1.url, prefix="al")
            bob = await sign_up(http, node1.url, prefix="bo")
            await create_room(alice, node1.url, slug)
        # Both open the same link, served by node 1.
        link = f"{node1.url}/r/{slug}"
        async with (
            chromium() as browser,
            web_context(browser, alice.user_token) as near1,
            web_context(browser, bob.user_token) as near2,
        ):
            await make_far(near1, node2)
            await make_far(near2, node1)
            first = await new_page(near1, link)
            second = await new_page(near2, link)
            await wait_joined(first)
            await wait_joined(second)
            assert (await hello(first))["node"] == node1.name
            assert (await hello(second))["node"] == node2.name
            # The people list says where each one is connected.
            await expect(first.locator("#people")).to_contain_text(node2.name)
            await expect(second.locator("#people")).to_contain_text(node1.name)

            await decoding([first, second], FRAMES, DECODE_LIMIT_S)
            await send_chat(first, "from node one")
            await expect(second.locator("#messages")).to_contain_text("from node one")
            await send_chat(second, "from node two")
            await expect(first.locator("#messages")).to_contain_text("from node two")

            # Node 2 shuts down: it sends its clients to node 1 (`reconnect`), and the
            # second browser follows, rejoins there and gets the media again.
            await asyncio.to_thread(node2.stop)
            await second.wait_for_function(
                f"() => window.sfumesh.conn.hello?.node === {json.dumps(node1.name)}"
                " && window.sfumesh.conn.state === 'joined'",
                timeout=30_000,
            )
            await expect(second.locator("#people-count")).to_have_text("2")
            await expect(first.locator("#people-count")).to_have_text("2")
            await decoding([first, second], FRAMES, DECODE_LIMIT_S)
    finally:
        for node in nodes:
            node.stop()
