"""Staying in a room: a refresh in a full room gets back in (capacity counts people, R6),
a dropped WebSocket reconnects by itself, closing the tab frees the seat, and a second tab
of the same person replaces the first (`session-replaced`)."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from playwright.async_api import expect

from node.local.launch import LocalNode
from tests.browser import chromium
from tests.node.live_client import create_room, sign_up
from tests.webapp.web import hello, new_page, until, wait_joined, web_context

pytestmark = [pytest.mark.slow, pytest.mark.browser]

MEDIA_ENV = {"SFUMESH_MEDIA_HOST_ADDRESSES": json.dumps(["127.0.0.1"])}


async def test_refresh_in_a_full_room_and_closing_the_tab(
    node_processes: Callable[..., LocalNode],
) -> None:
    node = await asyncio.to_thread(node_processes, extra_env=MEDIA_ENV)
    slug = f"full-{secrets.token_hex(3)}"
    async with httpx.AsyncClient(timeout=30) as http:
        alice, bob, carol = [await sign_up(http, node.url, prefix=p) for p in ("al", "bo", "ca")]
        await create_room(alice, node.url, slug, capacity=2)
    url = f"{node.url}/r/{slug}"

    async with (
        chromium() as browser,
        web_context(browser, alice.user_token) as alice_ctx,
        web_context(browser, bob.user_token) as bob_ctx,
        web_context(browser, carol.user_token) as carol_ctx,
    ):
        sockets: list[str] = []
        first = await new_page(alice_ctx)
        first.on("websocket", lambda ws: sockets.append(ws.url))
        await first.goto(url)
        await wait_joined(first)
        second = await new_page(bob_ctx, url)
        await wait_joined(second)
        await expect(first.locator("#people-count")).to_have_text("2")

        # A third person is refused: the room is full.
        third = await new_page(carol_ctx, url)
        await expect(third.get_by_role("heading", level=1)).to_have_text(
            "The room is full", timeout=30_000
        )
        await expect(third.locator(".notice-text")).to_contain_text("2 people")

        # Refresh: same tab, same session, back in, no "room full".
        before = await hello(first)
        await first.reload()
        await wait_joined(first)
        after = await hello(first)
        assert after["session_id"] == before["session_id"]
        await expect(first.locator("#people-count")).to_have_text("2")
        await expect(second.locator("#people-count")).to_have_text("2")
        assert await first.locator(".notice").count() == 0

        # The WebSocket drops: it comes back by itself, still the same session, still in.
        await first.evaluate("() => window.sfumesh.conn.ws.close()")
        await first.wait_for_function(
            "() => window.sfumesh.conn.state !== 'joined'", timeout=10_000
        )
        await wait_joined(first)
        assert (await hello(first))["session_id"] == before["session_id"]
        # Every socket (first load, refresh, reconnect) opened with a ticket of its own,
        # never with the session token in its URL (issue 21 item 12).
        tickets = [parse_qs(urlsplit(address).query).get("ticket", [""])[0] for address in sockets]
        assert len(sockets) >= 3 and all(tickets), sockets
        assert len(set(tickets)) == len(tickets)
        assert not any("session_token" in address for address in sockets)
        await expect(first.locator("#people-count")).to_have_text("2")
        await expect(second.locator("#people-count")).to_have_text("2")

        # Closing the tab frees the seat: the third person gets in.
        await first.close()
        await expect(second.locator("#people-count")).to_have_text("1", timeout=15_000)

        async def third_joined() -> bool:
            if await third.locator(".notice").count() > 0:
                await third.get_by_role("button", name="Try again").click()
            try:
                await wait_joined(third, timeout_ms=3_000)
            except Exception:
                return False
            return True

        await until(third_joined, 20, "the third person in after the first left")
        await expect(third.locator("#people-count")).to_have_text("2")
        await expect(second.locator("#people-count")).to_have_text("2")

        # The same person opens the room in another tab (a new session): the old tab steps
        # out and says so, without trying to take the seat back; the count stays 2 people.
        other_tab = await new_page(bob_ctx, url)
        await wait_joined(other_tab)
        await expect(second.get_by_role("heading", level=1)).to_have_text(
            "Opened somewhere else", timeout=15_000
        )
        assert await second.evaluate("() => window.sfumesh.conn.state") == "ended"
        await expect(other_tab.locator("#people-count")).to_have_text("2")
        await expect(third.locator("#people-count")).to_have_text("2")
