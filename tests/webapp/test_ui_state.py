"""UI state that must follow the browser: languages fetched only when chosen (W4), the
random room's loading state (W1), and fullscreen entered and left by other means than the
button, as Esc does (W2)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from urllib.parse import unquote

import httpx
import pytest
from playwright.async_api import Page, Route, expect

from node.local.launch import LocalNode
from tests.browser import chromium
from tests.node.live_client import sign_up
from tests.webapp.web import new_page, screenshot, wait_joined, web_context

pytestmark = [pytest.mark.slow, pytest.mark.browser]

IN_FULLSCREEN = "() => document.fullscreenElement !== null"
NOT_FULLSCREEN = "() => document.fullscreenElement === null"


def bundles(requests: list[str]) -> list[str]:
    return [url.rsplit("/", 1)[-1] for url in requests if "/static/i18n/" in url]


async def expect_fullscreen_ui(page: Page, on: bool, label: str) -> None:
    button = page.locator("#btn-fullscreen")
    await expect(button).to_have_attribute("aria-pressed", "true" if on else "false")
    await expect(button).to_have_text(label)
    classes = await page.evaluate("() => document.body.className")
    assert ("fullscreen" in classes.split()) == on, classes
    header = expect(page.locator("header.site"))
    await (header.to_be_hidden() if on else header.to_be_visible())


async def test_language_on_demand_and_fullscreen_follows_the_browser(
    node_processes: Callable[..., LocalNode],
) -> None:
    node = await asyncio.to_thread(node_processes)
    async with httpx.AsyncClient(timeout=30) as http:
        user = await sign_up(http, node.url, prefix="ui")

    async with chromium() as browser, web_context(browser, user.user_token) as context:
        requests: list[str] = []
        context.on("request", lambda request: requests.append(request.url))
        page = await new_page(context, f"{node.url}/")
        await expect(page.get_by_role("heading", level=1)).to_have_text("Create a room")
        assert bundles(requests) == ["en.json"], requests

        # Switching fetches that language only, and translates the page in place.
        requests.clear()
        await page.select_option("#lang", "vi")
        await expect(page.get_by_role("heading", level=1)).to_have_text("Tạo phòng")
        await expect(page.locator("html")).to_have_attribute("lang", "vi")
        assert bundles(requests) == ["vi.json"], requests
        await page.emulate_media(color_scheme="dark")
        await screenshot(page, "home-vi-dark.png")
        await page.emulate_media(color_scheme="light")
        # Back to English: already loaded, nothing fetched.
        requests.clear()
        await page.select_option("#lang", "en")
        await expect(page.get_by_role("heading", level=1)).to_have_text("Create a room")
        assert bundles(requests) == [], requests
        # The choice is kept; a new page loads only its bundle.
        await page.select_option("#lang", "vi")
        requests.clear()
        await page.reload()
        await expect(page.get_by_role("heading", level=1)).to_have_text("Tạo phòng")
        assert bundles(requests) == ["vi.json"], requests

        # A random room, with a visible loading state while it is made (slowed down here).
        async def slow_create(route: Route) -> None:
            await asyncio.sleep(1.0)
            await route.continue_()

        await context.route(f"{node.url}/api/rooms", slow_create)
        random = page.get_by_role("button", name="Vào một phòng ngẫu nhiên")
        await random.click()
        busy = page.locator("#random-room")
        await expect(busy).to_have_text("Đang tìm phòng…")
        await expect(busy).to_have_attribute("aria-busy", "true")
        await expect(busy).to_be_disabled()
        await expect(page.locator("#random-status")).to_have_text("Đang tìm phòng…")
        await page.wait_for_url("**/r/*")
        await wait_joined(page)
        assert re.fullmatch(r"[a-z]+-[a-z]+-[a-z2-7]{26}", unquote(page.url.rsplit("/", 1)[-1]))
        assert "en.json" not in bundles(requests), requests
        # A new room opens with its invite panel; Esc closes it.
        await expect(page.locator("dialog.invite")).to_be_visible()
        await page.keyboard.press("Escape")
        await expect(page.locator("dialog.invite")).to_be_hidden()

        # Fullscreen by the button...
        await expect_fullscreen_ui(page, False, "Toàn màn hình")
        await page.locator("#btn-fullscreen").click()
        await page.wait_for_function(IN_FULLSCREEN)
        await expect_fullscreen_ui(page, True, "Thoát toàn màn hình")
        # ...left by the browser (what Esc does): the UI follows.
        await page.evaluate("() => document.exitFullscreen()")
        await page.wait_for_function(NOT_FULLSCREEN)
        await expect_fullscreen_ui(page, False, "Toàn màn hình")
        # Entered by the browser, left by the button.
        await page.evaluate("() => document.documentElement.requestFullscreen()")
        await page.wait_for_function(IN_FULLSCREEN)
        await expect_fullscreen_ui(page, True, "Thoát toàn màn hình")
        await page.locator("#btn-fullscreen").click()
        await page.wait_for_function(NOT_FULLSCREEN)
        await expect_fullscreen_ui(page, False, "Toàn màn hình")
        # Entered by the button, left by the browser, in English now.
        await page.select_option("#lang", "en")
        await page.locator("#btn-fullscreen").click()
        await page.wait_for_function(IN_FULLSCREEN)
        await expect_fullscreen_ui(page, True, "Exit fullscreen")
        await page.evaluate("() => document.exitFullscreen()")
        await page.wait_for_function(NOT_FULLSCREEN)
        await expect_fullscreen_ui(page, False, "Fullscreen")
        assert (await page.evaluate("() => window.sfumesh.conn.state")) == "joined"
