"""The web client and short user tokens (issue 21 item 12): it renews its user token while
the page is open, so a call that outlives the token still gets a new session when it needs
one, and its "Log out" ends the login on the node, not only in this browser."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable

import httpx
import pytest
from playwright.async_api import expect

from node.local.launch import LocalNode
from tests.browser import chromium
from tests.node.live_client import PASSWORD, create_room, sign_up
from tests.webapp.web import hello, new_page, wait_joined, web_context

pytestmark = [pytest.mark.slow, pytest.mark.browser]

USER_TTL_S = 12
ENV = {
    "SFUMESH_MEDIA_HOST_ADDRESSES": json.dumps(["127.0.0.1"]),
    "SFUMESH_USER_TOKEN_TTL_S": str(USER_TTL_S),
}
STORED_TOKEN = "() => JSON.parse(localStorage.getItem('sfumesh.user'))?.user_token ?? null"


async def test_a_long_call_outlives_its_user_token_and_logout_ends_the_login(
    node_processes: Callable[..., LocalNode],
) -> None:
    node = await asyncio.to_thread(node_processes, extra_env=ENV)
    slug = f"long-{secrets.token_hex(3)}"
    async with httpx.AsyncClient(timeout=30) as http:
        alice = await sign_up(http, node.url, prefix="al")
        await create_room(alice, node.url, slug)

        async with chromium() as browser, web_context(browser) as context:
            page = await new_page(context, f"{node.url}/")
            await page.fill("#login-login", alice.username)
            await page.fill("#login-password", PASSWORD)
            await page.get_by_role("button", name="Log in", exact=True).click()
            await expect(page.get_by_role("heading", name="Create a room")).to_be_visible()
            first_token = await page.evaluate(STORED_TOKEN)
            await page.goto(f"{node.url}/r/{slug}")
            await wait_joined(page)
            before = await hello(page)

            # Past two lives of the first token: it is refused, the page's token is not.
            await asyncio.sleep(2 * USER_TTL_S + 2)
            me = f"{node.url}/api/users/me"
            assert (await http.get(me, headers=bearer(first_token))).status_code == 401
            token = await page.evaluate(STORED_TOKEN)
            assert token is not None and token != first_token
            assert (await http.get(me, headers=bearer(token))).status_code == 200

            # The socket drops and the tab's session is gone: a new one needs the user token.
            await page.evaluate(
                "() => { sessionStorage.removeItem('sfumesh.session');"
                " window.sfumesh.conn.ws.close(); }"
            )
            await page.wait_for_function(
                "() => window.sfumesh.conn.state !== 'joined'", timeout=10_000
            )
            await wait_joined(page)
            assert (await hello(page))["session_id"] != before["session_id"]

            # "Log out" ends the login on the node: its current token no longer works.
            token = await page.evaluate(STORED_TOKEN)
            await page.get_by_role("button", name="Log out").click()
            await expect(page.get_by_role("tab", name="Log in")).to_be_visible()
            assert (await http.get(me, headers=bearer(token))).status_code == 401


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
