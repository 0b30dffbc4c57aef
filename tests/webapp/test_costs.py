"""The Costs tab (R9): an expense added on one page changes the balances on the other, and
recording the suggested payment settles both."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable

import httpx
import pytest
from playwright.async_api import Page, expect

from node.local.launch import LocalNode
from tests.browser import chromium
from tests.node.live_client import create_room, sign_up
from tests.webapp.web import new_page, screenshot, wait_joined, web_context

pytestmark = [pytest.mark.slow, pytest.mark.browser]

MEDIA_ENV = {"SFUMESH_MEDIA_HOST_ADDRESSES": json.dumps(["127.0.0.1"])}


async def open_costs(page: Page) -> None:
    await page.locator("#tab-costs").click()
    await expect(page.locator("#panel-costs")).to_have_attribute("data-loaded", "true")


async def test_expense_on_one_page_changes_balances_on_the_other(
    node_processes: Callable[..., LocalNode],
) -> None:
    node = await asyncio.to_thread(node_processes, extra_env=MEDIA_ENV)
    slug = f"costs-{secrets.token_hex(3)}"
    async with httpx.AsyncClient(timeout=30) as http:
        alice, bob = [await sign_up(http, node.url, prefix=p) for p in ("al", "bo")]
        await create_room(alice, node.url, slug)
    url = f"{node.url}/r/{slug}"

    async with (
        chromium() as browser,
        web_context(browser, alice.user_token) as alice_ctx,
        web_context(browser, bob.user_token) as bob_ctx,
    ):
        first = await new_page(alice_ctx, url)
        await wait_joined(first)
        second = await new_page(bob_ctx, url)
        await wait_joined(second)
        await expect(first.locator("#people-count")).to_have_text("2")
        await open_costs(first)
        await open_costs(second)
        await expect(second.locator("#balances")).to_contain_text("All settled up.")
        # bob joined after alice's page loaded the books: he is offered to share anyway
        await expect(first.locator(f'#expense-among input[value="{bob.user_id}"]')).to_be_checked()

        # A wrong amount is said so on the page, and nothing is sent.
        await first.fill("#expense-what", "Picnic")
        await first.fill("#expense-amount", "30.123")
        await first.select_option("#expense-currency", "EUR")
        await first.get_by_role("button", name="Add expense").click()
        await expect(first.locator("#costs-error")).to_contain_text("Enter an amount in EUR")

        await first.fill("#expense-amount", "30.01")
        await first.get_by_role("button", name="Add expense").click()
        # 30.01 EUR in two: 15.00 each, the cent left over to the first by user id
        bob_part = 1501 if bob.user_id < alice.user_id else 1500
        owed = f"{bob_part // 100}.{bob_part % 100:02d} EUR"
        bob_row = second.locator(f'#balances li[data-person="{bob.user_id}"]')
        await expect(bob_row).to_contain_text(f"−{owed}")
        await expect(
            second.locator(f'#balances li[data-person="{alice.user_id}"]')
        ).to_contain_text(owed)
        await expect(second.locator("#expenses")).to_contain_text("Picnic")
        await expect(second.locator("#settle-up")).to_contain_text("pays")
        await screenshot(second, "costs-balances.png")

        # bob records the suggested payment: both pages are settled
        await second.get_by_role("button", name="Record payment").click()
        await expect(second.locator("#balances")).to_contain_text("All settled up.")
        await expect(first.locator("#balances")).to_contain_text("All settled up.")
        await expect(first.locator("#settle-up li")).to_have_count(0)

        # bob splits a taxi by exact amounts in another currency: kept apart, exact parts
        await second.fill("#expense-what", "Taxi")
        await second.fill("#expense-amount", "50000")
        await second.select_option("#expense-currency", "VND")
        await second.select_option("#expense-payer", bob.user_id)
        await second.select_option("#expense-mode", "exact")
        await second.fill(f'#expense-among input.part[data-person="{alice.user_id}"]', "20000")
        await second.fill(f'#expense-among input.part[data-person="{bob.user_id}"]', "29999")
        await second.get_by_role("button", name="Add expense").click()
        await expect(second.locator("#costs-error")).to_contain_text("must add up")
        await second.fill(f'#expense-among input.part[data-person="{bob.user_id}"]', "30000")
        await second.get_by_role("button", name="Add expense").click()
        alice_vnd = first.locator(
            f'#balances li[data-person="{alice.user_id}"][data-currency="VND"]'
        )
        await expect(alice_vnd).to_contain_text("−20000 VND")
        await expect(first.locator("#balances li")).to_have_count(2)
        await screenshot(second, "costs-exact.png")
