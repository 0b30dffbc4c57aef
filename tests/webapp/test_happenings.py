"""The Happenings tab (issue 16, R8 item 6): one page plans a happening, another answers
"going" and both see the count change live; the form's zone is the browser's."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import date, timedelta

import httpx
import pytest
from playwright.async_api import expect

from node.local.launch import LocalNode
from tests.browser import chromium
from tests.node.live_client import create_room, sign_up
from tests.webapp.web import PHONE, new_page, screenshot, wait_joined, web_context

pytestmark = [pytest.mark.slow, pytest.mark.browser]


async def test_plan_on_one_page_rsvp_on_another(node_processes: Callable[..., LocalNode]) -> None:
    node = await asyncio.to_thread(node_processes)
    async with httpx.AsyncClient(timeout=30) as http:
        alice = await sign_up(http, node.url, prefix="alice")
        bob = await sign_up(http, node.url, prefix="bob")
        await create_room(alice, node.url, "picnic")
    room_url = f"{node.url}/r/picnic"
    day = (date.today() + timedelta(days=7)).isoformat()
    async with chromium() as browser, web_context(browser, alice.user_token) as first_context:
        async with web_context(browser, bob.user_token, viewport=PHONE) as second_context:
            first = await new_page(first_context, room_url)
            second = await new_page(second_context, room_url)
            await wait_joined(first)
            await wait_joined(second)
            for page in (first, second):
                await page.locator("#tab-happenings").click()

            await first.locator("#happening-new").click()
            zone = await first.evaluate("() => Intl.DateTimeFormat().resolvedOptions().timeZone")
            await expect(first.locator("#happening-form select[name=zone]")).to_have_value(zone)
            await first.fill("#happening-form input[name=title]", "Picnic at the lake")
            await first.fill("#happening-form input[name=date]", day)
            await first.fill("#happening-form input[name=time]", "10:00")
            await first.fill("#happening-form input[name=place]", "West Lake")
            await first.fill("#happening-form input[name=capacity]", "5")
            await first.locator("#happening-form button[type=submit]").click()

            card = "#happenings-upcoming li.happening"
            for page in (first, second):  # the other page hears of it live
                await expect(page.locator(f"{card} h3")).to_have_text("Picnic at the lake")
                await expect(page.locator(f"{card} .count-going")).to_have_text("0 going")
            await expect(second.locator("#happenings-count")).to_have_text("1")

            await second.locator(f"{card} button.rsvp-going").click()
            for page in (second, first):
                await expect(page.locator(f"{card} .count-going")).to_have_text("1 going")
                await expect(page.locator(f"{card} .names li.going")).to_contain_text(bob.username)
            await expect(second.locator(f"{card} button.rsvp-going")).to_have_attribute(
                "aria-pressed", "true"
            )
            # the chat says it was planned
            await expect(first.locator("#tab-chat")).to_be_visible()
            await first.locator("#tab-chat").click()
            await expect(first.locator("#messages li.message .text").last).to_contain_text(
                "Picnic at the lake"
            )
            await screenshot(second, "happenings-phone.png")
            # the page is no wider than the phone: the tab bar scrolls, not the page
            wide = await second.evaluate("() => document.documentElement.scrollWidth")
            assert wide <= PHONE["width"], wide
            # Vietnamese strings
            await second.select_option("#lang", "vi")
            await expect(second.locator(f"{card} .count-going")).to_have_text("1 người đi")
