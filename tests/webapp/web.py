"""Helpers for the web client's browser tests: pages logged in as a user, room state and
media stats read from the page (`window.sfumesh`), screenshots kept as artifacts."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from playwright.async_api import Browser, BrowserContext, ConsoleMessage, Page

log = logging.getLogger(__name__)

# Kept after the run (.data/ is git-ignored): look at them.
ARTIFACTS = Path(__file__).resolve().parents[2] / ".data" / "artifacts" / "webapp"
STEP_MS = 30_000
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}

# What the media of the page's room has received so far.
RECEIVED = """
async () => {
  const media = window.sfumesh?.conn?.media;
  const out = { video: 0, audio: 0 };
  if (!media?.subscribePc) return out;
  for (const report of (await media.subscribePc.getStats()).values()) {
    if (report.type !== "inbound-rtp") continue;
    if (report.kind === "video") out.video = Math.max(out.video, report.framesDecoded ?? 0);
    if (report.kind === "audio") out.audio = Math.max(out.audio, report.packetsReceived ?? 0);
  }
  return out;
}
"""


def _log_console(message: ConsoleMessage) -> None:
    level = logging.WARNING if message.type in ("error", "warning") else logging.INFO
    log.log(level, "page console %s: %s", message.type, message.text)


# The pages' Content-Security-Policy (node/web/headers.py) must never have to block what
# the client does: every violation is reported on the console, and fails the test.
CSP_VIOLATION = "CSP violation:"
_REPORT_CSP = f"""
document.addEventListener("securitypolicyviolation", (event) =>
  console.error(`{CSP_VIOLATION} ${{event.violatedDirective}} ${{event.blockedURI}}`));
"""


# The pre-join screen's own "skip this screen next time", as a returning person has it:
# the tests that are not about it go straight into the room.
_SKIP_PREJOIN = """
if (!localStorage.getItem('sfumesh.devices'))
  localStorage.setItem('sfumesh.devices', JSON.stringify({skipPrejoin: true}));
"""


@asynccontextmanager
async def web_context(
    browser: Browser,
    user_token: str | None = None,
    viewport: dict[str, int] | None = None,
    *,
    prejoin: bool = False,
) -> AsyncIterator[BrowserContext]:
    """A browser context (own storage), logged in as `user_token`'s user if given; rooms
    open without the pre-join screen unless `prejoin`."""
    context = await browser.new_context(viewport=viewport or DESKTOP)  # type: ignore[arg-type]
    if not prejoin:
        await context.add_init_script(script=_SKIP_PREJOIN)
    violations: list[str] = []
    context.on(
        "console",
        lambda message: violations.append(message.text) if CSP_VIOLATION in message.text else None,
    )
    await context.add_init_script(script=_REPORT_CSP)
    if user_token is not None:
        grant = json.dumps({"user_token": user_token, "expires_at": "2999-01-01T00:00:00Z"})
        await context.add_init_script(
            script=f"if (!localStorage.getItem('sfumesh.user')) "
            f"localStorage.setItem('sfumesh.user', {json.dumps(grant)});"
        )
    try:
        yield context
    finally:
        await context.close()
    assert violations == [], violations


async def new_page(context: BrowserContext, url: str | None = None) -> Page:
    page = await context.new_page()
    page.on("console", _log_console)
    page.on("pageerror", lambda error: log.warning("page error: %s", error))
    if url is not None:
        await page.goto(url)
    return page


async def wait_joined(page: Page, timeout_ms: int = STEP_MS) -> None:
    await page.wait_for_function(
        "() => window.sfumesh?.conn?.state === 'joined'", timeout=timeout_ms
    )


async def hello(page: Page) -> dict[str, Any]:
    result = await page.evaluate("() => window.sfumesh.conn.hello")
    assert isinstance(result, dict)
    return result


async def received(page: Page) -> dict[str, int]:
    result = await page.evaluate(RECEIVED)
    assert isinstance(result, dict)
    return result


async def until(
    check: Callable[[], Awaitable[bool]], limit_s: float, what: str, step_s: float = 0.3
) -> None:
    deadline = time.monotonic() + limit_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {limit_s} s: {what}")
        await asyncio.sleep(step_s)


async def decoding(pages: list[Page], frames: int, limit_s: float) -> list[dict[str, int]]:
    """Every page has decoded more than `frames` video frames and heard audio."""
    states: list[dict[str, int]] = []

    async def check() -> bool:
        nonlocal states
        states = [await received(p) for p in pages]
        return all(s["video"] > frames and s["audio"] > 0 for s in states)

    try:
        await until(check, limit_s, "video decoded on every page", step_s=0.5)
    except AssertionError as error:
        raise AssertionError(f"{error}: {states}") from None
    return states


async def messages(page: Page) -> list[str]:
    texts = await page.locator("#messages li.message .text").all_text_contents()
    return list(texts)


async def send_chat(page: Page, text: str) -> None:
    await page.fill("#chat-text", text)
    await page.press("#chat-text", "Enter")


async def screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    await page.screenshot(path=str(path))
    log.info("screenshot written: %s", path)
    return path
