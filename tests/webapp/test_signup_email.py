"""Sign-up with an email that already has an account (issue 21, item 8): the server answers
as for any sign-up and creates nothing, so the page says what to do when the new account's
login then fails, without the server ever telling which emails are registered."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import pytest
from playwright.async_api import expect

from node.local.launch import LocalNode
from tests.browser import chromium
from tests.node.live_client import PASSWORD, sign_up
from tests.webapp.web import new_page, web_context

pytestmark = [pytest.mark.slow, pytest.mark.browser]


async def test_sign_up_with_a_registered_email_says_to_log_in_instead(
    node_processes: Callable[..., LocalNode],
) -> None:
    node = await asyncio.to_thread(node_processes)
    async with httpx.AsyncClient(timeout=30) as http:
        owner = await sign_up(http, node.url, prefix="owner")

    async with chromium() as browser, web_context(browser) as context:
        page = await new_page(context, f"{node.url}/")
        await page.get_by_role("tab", name="Sign up").click()
        await page.fill("#signup-username", f"{owner.username}x")
        await page.fill("#signup-display", "Someone")
        await page.fill("#signup-email", f"{owner.username}@example.org")
        await page.fill("#signup-password", PASSWORD)
        await page.get_by_role("button", name="Sign up", exact=True).click()
        await expect(page.locator("#form-signup .form-error")).to_contain_text(
            "If this email already has an account, log in with that one instead."
        )
        await expect(page.locator("#who")).to_be_hidden()
