"""The whole web client on one real node, in headless Chromium with fake camera and mic.

Sign up through the form (a field error first), log out and in again, pick a room address
(availability shown while typing), create the room, open the invite link in a second
browser context that signs up there, see and hear each other, chat both ways, and a late
joiner gets the history (older pages as it scrolls up). Screenshots are kept.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Callable

import httpx
import pytest
from playwright.async_api import Page, expect

from node.local.launch import LocalNode
from tests.browser import chromium
from tests.node.live_client import PASSWORD, User, sign_up
from tests.webapp.web import (
    PHONE,
    decoding,
    messages,
    new_page,
    screenshot,
    send_chat,
    until,
    wait_joined,
    web_context,
)

pytestmark = [pytest.mark.slow, pytest.mark.browser]

log = logging.getLogger(__name__)

FRAMES = 60
DECODE_LIMIT_S = 60.0
MEDIA_ENV = {"SFUMESH_MEDIA_HOST_ADDRESSES": json.dumps(["127.0.0.1"])}
EARLIER = 40  # messages in the room before the late joiner comes


async def sign_up_with_form(page: Page, name: str) -> None:
    await page.get_by_role("tab", name="Sign up").click()
    await page.fill("#signup-username", name)
    await page.fill("#signup-display", name.title())
    await page.fill("#signup-email", f"{name}@example.org")
    await page.fill("#signup-password", PASSWORD)
    await page.get_by_role("button", name="Sign up", exact=True).click()


async def post_within_limit(http: httpx.AsyncClient, url: str, token: str, index: int) -> None:
    """Post one message, waiting out the per-session chat limit as a client should."""
    for _ in range(20):
        reply = await http.post(
            url, json={"text": f"earlier {index}"}, headers={"Authorization": f"Bearer {token}"}
        )
        if reply.status_code != 429:
            assert reply.status_code == 201, reply.text
            return
        await asyncio.sleep(float(reply.headers.get("Retry-After", "1")))
    raise AssertionError(f"message {index} still refused by the chat limit")


async def test_sign_up_create_invite_talk_chat_history(
    node_processes: Callable[..., LocalNode],
) -> None:
    started = time.monotonic()
    node = await asyncio.to_thread(node_processes, extra_env=MEDIA_ENV)
    suffix = secrets.token_hex(3)
    slug = f"café-☕-{suffix}"

    async with chromium() as browser, web_context(browser) as first_ctx:
        first = await new_page(first_ctx, f"{node.url}/")
        await expect(first.get_by_role("heading", level=1)).to_have_text(
            "Rooms for talking together"
        )
        await screenshot(first, "landing.png")

        # Sign up: the API's field error appears under its field, nothing else changes.
        alice = f"alice{suffix}"
        await first.get_by_role("tab", name="Sign up").click()
        await first.fill("#signup-username", alice)
        await first.fill("#signup-display", "Alice")
        await first.fill("#signup-email", f"{alice}@example.org")
        await first.fill("#signup-password", "short")
        await first.get_by_role("button", name="Sign up", exact=True).click()
        await expect(first.locator("#signup-password-error")).to_contain_text("at least 8")
        await expect(first.locator("#signup-password")).to_have_attribute("aria-invalid", "true")
        await expect(first.locator("#signup-username-error")).to_be_empty()
        await first.fill("#signup-password", PASSWORD)
        await first.get_by_role("button", name="Sign up", exact=True).click()
        await expect(first.get_by_role("heading", name="Create a room")).to_be_visible()
        await expect(first.locator("#who")).to_have_text("Alice")

        # Log out, then log in again (a wrong password first: said, not a field's fault).
        await first.get_by_role("button", name="Log out").click()
        await expect(first.get_by_role("tab", name="Log in")).to_be_visible()
        await expect(first.locator("#who")).to_be_hidden()
        await first.fill("#login-login", alice)
        await first.fill("#login-password", "not the password")
        await first.get_by_role("button", name="Log in", exact=True).click()
        await expect(first.locator("#form-login .form-error")).to_have_text(
            "Wrong username, email or password."
        )
        await first.fill("#login-password", PASSWORD)
        await first.get_by_role("button", name="Log in", exact=True).click()
        await expect(first.get_by_role("heading", name="Create a room")).to_be_visible()
        await expect(first.locator("#who")).to_have_text("Alice")

        # Availability while typing: reserved, then free; the unicode + emoji slug is fine.
        status = first.locator("#create-slug-status")
        await first.fill("#create-slug", "api")
        await expect(status).to_have_attribute("data-state", "bad")
        await expect(status).to_contain_text("reserved")
        await first.fill("#create-slug", slug)
        await expect(status).to_have_text("Available")
        await first.fill("#create-name", "Coffee")
        await screenshot(first, "home.png")
        await first.get_by_role("button", name="Create room").click()

        # The room, with the invite panel open: link, copy, QR code.
        await first.wait_for_url("**/r/*")
        dialog = first.locator("dialog.invite")
        await expect(dialog).to_be_visible(timeout=30_000)
        link = await first.locator("#invite-link").input_value()
        assert link == f"{node.url}/r/caf%C3%A9-%E2%98%95-{suffix}", link
        await first.wait_for_function("() => document.querySelector('#invite-qr').naturalWidth > 0")
        await first.get_by_role("button", name="Copy").click()
        await expect(first.locator("#invite-copied")).to_have_text("Link copied.")
        await screenshot(first, "invite.png")
        await dialog.get_by_role("button", name="Close").click()
        await expect(dialog).to_be_hidden()
        await wait_joined(first)

        # A second browser (phone-sized) opens the link and signs up there.
        async with web_context(browser, viewport=PHONE) as second_ctx:
            second = await new_page(second_ctx, link)
            await expect(second.get_by_role("heading", level=1)).to_have_text("Join “Coffee”")
            await sign_up_with_form(second, f"bob{suffix}")
            await wait_joined(second)

            states = await decoding([first, second], FRAMES, DECODE_LIMIT_S)
            log.info("both decoding after %.1f s: %s", time.monotonic() - started, states)
            for page in (first, second):
                await expect(page.locator("#people-count")).to_have_text("2")
                await expect(page.locator("#grid li.tile")).to_have_count(2)

            # Chat both ways.
            await send_chat(first, "hello from Alice")
            await expect(second.locator("#messages")).to_contain_text("hello from Alice")
            await send_chat(second, "xin chào từ Bob 👋")
            await expect(first.locator("#messages")).to_contain_text("xin chào từ Bob 👋")
            await expect(first.locator("#chat-text")).to_have_value("")
            await screenshot(first, "room-two-people.png")
            await screenshot(second, "room-two-people-phone.png")

        # More history than one page, then a late joiner.
        async with httpx.AsyncClient(timeout=30) as http:
            carol = await sign_up(http, node.url, prefix="carol")
            # Only the room's people may post, so the earlier messages are Alice's.
            login = await http.post(
                f"{node.url}/api/auth/login", json={"login": alice, "password": PASSWORD}
            )
            assert login.status_code == 200, login.text
            alice_user = User(http, alice, "", login.json()["user_token"])
            token = await alice_user.new_session(node.url)
            for index in range(EARLIER):
                await post_within_limit(http, f"{node.url}/api/rooms/{slug}/messages", token, index)
        async with web_context(browser, user_token=carol.user_token) as third_ctx:
            third = await new_page(third_ctx, link)
            await wait_joined(third)
            await expect(third.locator("#messages")).to_contain_text(f"earlier {EARLIER - 1}")
            shown = await messages(third)
            assert "hello from Alice" not in shown  # only the newest page so far
            # Scrolling up loads the older pages, in order, each message once.
            expected = ["hello from Alice", "xin chào từ Bob 👋"] + [
                f"earlier {i}" for i in range(EARLIER)
            ]

            async def all_loaded() -> bool:
                await third.evaluate("() => { document.querySelector('#messages').scrollTop = 0; }")
                return await messages(third) == expected

            await until(all_loaded, 15, "the whole history after scrolling up")
            await expect(third.locator("#people-count")).to_have_text("2")
    log.info("web client flow took %.1f s", time.monotonic() - started)
