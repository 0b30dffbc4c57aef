"""Headless Debian Chromium for tests, driven by Playwright (never `playwright install`).

Flags as measured in the research notes (FINDINGS, "Loopback WebRTC, real browser"): a fake
camera and microphone that need no permission prompt, WebRTC allowed on loopback, nothing
that phones home. Playwright gives every launch a fresh temporary user-data dir, and every
`page()` its own context (cookies, storage, permissions).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from playwright.async_api import Browser, ConsoleMessage, Error, Page, async_playwright

log = logging.getLogger(__name__)

CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--allow-loopback-in-peer-connection",
    # Chromium keeps only the last --disable-features, so this one replaces Playwright's
    # own list (MediaRouter, PaintHolding, ...), none of which these tests need.
    "--disable-features=WebRtcHideLocalIpsWithMdns",
)


class ChromiumMissing(RuntimeError):
    pass


def chromium_path() -> str:
    path = shutil.which("chromium")
    if path is None:
        raise ChromiumMissing(
            "the Debian package `chromium` is not installed (no `chromium` on PATH); "
            "./scripts/setup installs it"
        )
    return path


@asynccontextmanager
async def chromium(
    extra_args: Sequence[str] = (), *, fake_media: bool = True
) -> AsyncIterator[Browser]:
    """A headless Chromium, closed (with its temporary profile) on exit. Without
    `fake_media` it has no camera or microphone at all (as a machine without any)."""
    executable = chromium_path()
    args = [a for a in CHROMIUM_ARGS if fake_media or a != "--use-fake-device-for-media-stream"]
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=executable,
            headless=True,
            args=[*args, *extra_args],
        )
        try:
            yield browser
        finally:
            await browser.close()


@asynccontextmanager
async def page(browser: Browser, url: str | None = None) -> AsyncIterator[Page]:
    """A page in a context of its own, at `url` if given; closed on exit."""
    context = await browser.new_context()
    try:
        new_page = await context.new_page()
        # The page's own words end up in the test's log, where a failure is read.
        new_page.on("console", _log_console)
        new_page.on("pageerror", _log_page_error)
        if url is not None:
            await new_page.goto(url)
        yield new_page
    finally:
        await context.close()


def _log_console(message: ConsoleMessage) -> None:
    level = logging.WARNING if message.type in ("error", "warning") else logging.INFO
    where = message.location.get("url", "")
    log.log(level, "page console %s: %s (%s)", message.type, message.text, where)


def _log_page_error(error: Error) -> None:
    log.warning("page error: %s", error)
