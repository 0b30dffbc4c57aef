"""Memories in the web client (issue 15): a photo dropped in one page shows as a thumbnail
in the other page's chat and in its Memories tab, and a late joiner finds it in history."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
from collections.abc import Callable

import httpx
import pytest
from playwright.async_api import Page, expect

from node.local.launch import LocalNode
from tests.browser import chromium
from tests.node.live_client import create_room, sign_up
from tests.node.web.test_files import photo
from tests.webapp.web import new_page, screenshot, wait_joined, web_context

pytestmark = [pytest.mark.slow, pytest.mark.browser]

MEDIA_ENV = {"SFUMESH_MEDIA_HOST_ADDRESSES": json.dumps(["127.0.0.1"])}
THUMB = "#messages li.message img.thumb"

# A drop of one file on the room, as the browser makes it when a photo is dragged in.
DROP = """
([name, data]) => {
  const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
  const transfer = new DataTransfer();
  transfer.items.add(new File([bytes], name, { type: "image/jpeg" }));
  const event = new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true });
  document.querySelector(".room").dispatchEvent(event);
}
"""


async def loaded(page: Page, selector: str) -> None:
    await expect(page.locator(selector).first).to_be_visible(timeout=10_000)
    await page.wait_for_function(
        "(s) => [...document.querySelectorAll(s)].some((i) => i.complete && i.naturalWidth > 0)",
        arg=selector,
        timeout=10_000,
    )


async def test_dropped_photo_reaches_the_other_page_gallery_and_late_joiner(
    node_processes: Callable[..., LocalNode],
) -> None:
    node = await asyncio.to_thread(node_processes, extra_env=MEDIA_ENV)
    slug = f"trip-{secrets.token_hex(3)}"
    async with httpx.AsyncClient(timeout=30) as http:
        alice, bob, carol = [await sign_up(http, node.url, prefix=p) for p in ("al", "bo", "ca")]
        await create_room(alice, node.url, slug)
    url = f"{node.url}/r/{slug}"
    async with (
        chromium() as browser,
        web_context(browser, alice.user_token) as alice_ctx,
        web_context(browser, bob.user_token) as bob_ctx,
        web_context(browser, carol.user_token) as carol_ctx,
    ):
        first = await new_page(alice_ctx, url)
        second = await new_page(bob_ctx, url)
        await wait_joined(first)
        await wait_joined(second)
        await first.evaluate(DROP, ["beach.jpg", base64.b64encode(photo()).decode()])
        # Live, on the other page: the thumbnail, loaded through its file token.
        await loaded(second, THUMB)
        await loaded(first, THUMB)
        await second.get_by_role("tab", name="Memories").click()
        await loaded(second, "#gallery img.thumb")
        await screenshot(second, "memories.png")
        # Opened large: the display size, and the original to download.
        await second.locator("#gallery .thumb-button").first.click()
        await loaded(second, "#viewer img.large")
        href = await second.locator("#viewer a").get_attribute("href")
        assert href is not None and "download=1" in href and "t=" in href
        # Someone joining later finds it in the history.
        third = await new_page(carol_ctx, url)
        await wait_joined(third)
        await loaded(third, THUMB)


async def test_only_the_creator_sees_and_sets_keeping_photos_exif(
    node_processes: Callable[..., LocalNode],
) -> None:
    node = await asyncio.to_thread(node_processes, extra_env=MEDIA_ENV)
    slug = f"exif-{secrets.token_hex(3)}"
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
            await first.get_by_role("tab", name="Memories").click()
            await expect(first.locator("#exif-kept")).to_be_hidden()
            await first.locator("#exif-keep").check()
            await expect(first.locator("#exif-kept")).to_be_visible(timeout=10_000)
            info = (await http.get(f"{node.url}/api/rooms/{slug}")).json()
            assert info["keep_original_exif"] is True
            second = await new_page(bob_ctx, url)
            await wait_joined(second)
            await second.get_by_role("tab", name="Memories").click()
            await expect(second.locator("#exif-kept")).to_be_visible()
            await expect(second.locator("#exif-choice")).to_be_hidden()
