"""A simulcast publisher's side of layer selection (issue 14 item 4): the encodings nobody
watches are switched off at the publisher and come back when wanted, and REMB asks it for
what the selected layers take. A real node, a headless Chromium publisher (its encodings
read back with `RTCRtpSender.getParameters`), a real aiortc subscriber."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from playwright.async_api import Page

from node.bench.report import metric_sum
from node.local.launch import LocalNode
from tests.browser import chromium, page
from tests.node.live_client import create_room, sign_up
from tests.node.media.test_browser import STEP_S
from tests.node.media.test_loopback import loopback_ice  # noqa: F401 (a fixture)
from tests.node.media.test_simulcast import SIMULCAST_PUBLISH, subscriber, video_from

pytestmark = [pytest.mark.slow, pytest.mark.browser]

log = logging.getLogger(__name__)

LIMIT_S = 60.0
ENCODINGS = (
    "() => room.media.transceivers.video.sender.getParameters().encodings.map((e) => e.active)"
)
LAYERS = "() => room.messages.filter((m) => m.type === 'layers').map((m) => m.active)"


async def until(check: Callable[[], Any], what: str, limit_s: float = LIMIT_S) -> Any:
    deadline = time.monotonic() + limit_s
    while True:
        result = await check()
        if result:
            return result
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.3)


async def encodings(publisher: Page) -> list[bool]:
    result = await publisher.evaluate(ENCODINGS)
    assert isinstance(result, list)
    return [bool(active) for active in result]


@pytest.mark.usefixtures("loopback_ice")
async def test_unwatched_encodings_go_off_at_the_publisher_and_come_back(
    node_processes: Callable[..., LocalNode],
) -> None:
    env = {
        "SFUMESH_MEDIA_HOST_ADDRESSES": json.dumps(["127.0.0.1"]),
        "SFUMESH_MEDIA_SIMULCAST_FOLLOW_BANDWIDTH": "false",
        "SFUMESH_MEDIA_SIMULCAST_LAYER_OFF_S": "1",
    }
    node = await asyncio.to_thread(node_processes, extra_env=env)
    slug = "publisher-layers"
    async with httpx.AsyncClient(timeout=STEP_S) as http:
        publisher = await sign_up(http, node.url, prefix="pub")
        await create_room(publisher, node.url, slug)
        token = await publisher.new_session(node.url)
        watcher = await sign_up(http, node.url, prefix="small")
        async with chromium() as browser, page(browser, f"{node.url}/") as publisher_page:
            arguments = {"sessionToken": token, "slug": slug, "videoCodec": None}
            session_id = await asyncio.wait_for(
                publisher_page.evaluate(SIMULCAST_PUBLISH, arguments), STEP_S
            )
            sock, peer = await subscriber(watcher, node.url, slug)
            try:
                told_tiles: dict[str, tuple[int, int]] = {}

                async def shown(width: int, height: int) -> bool:
                    track = video_from(peer, session_id)
                    if track is None or track.mid is None:
                        return False
                    if told_tiles.get(track.mid) != (width, height):
                        tile = {"width": width, "height": height}
                        ack = await sock.request("view", tiles={track.mid: tile})
                        assert ack["type"] == "ack", ack
                        told_tiles[track.mid] = (width, height)
                    return track.size == (width, height)

                # a large tile first (the uplink's estimate grows with all three layers)
                await until(lambda: shown(1280, 720), "the full layer never came")
                await asyncio.sleep(3.0)
                # then one small tile: only the quarter-size encoding is wanted, so the
                # other two go off at the browser
                await until(lambda: shown(320, 180), "the small layer never came")
                await until(
                    lambda: _is(encodings(publisher_page), [True, False, False]),
                    "the unwatched encodings stayed on",
                )
                told = await publisher_page.evaluate(LAYERS)
                assert ["q"] in told, told

                async def asks_little() -> bool:
                    text = (await http.get(f"{node.url}/metrics")).text
                    remb = metric_sum(text, "sfumesh_media_remb_bps", 'direction="in",kind="video"')
                    arriving = 'sfumesh_media_publisher_layers{layer="0"} 1.0' in text
                    others = any(
                        f'sfumesh_media_publisher_layers{{layer="{layer}"}}' in text
                        for layer in (1, 2)
                    )
                    # within what the three layers take with headroom (2.7 Mbit/s), not the
                    # 8 Mbit/s budget: the uplink's estimate is held while encodings are off
                    return 0 < remb <= 2_700_000 and arriving and not others

                await until(asks_little, "REMB or the arriving layers did not follow")

                # a large tile: the full-size encoding is switched on again, and decoded
                # (REMB held the uplink's estimate meanwhile, so it comes back at once)
                asked = time.monotonic()
                await until(lambda: shown(1280, 720), "the full layer never came back")
                log.info("the full layer came back in %.1f s", time.monotonic() - asked)
                assert (await encodings(publisher_page))[2] is True
                told = await publisher_page.evaluate(LAYERS)
                assert told[0] == ["q", "h", "f"], told  # (the first round: all on)
                told = told[told.index(["q"]) :]
                assert any("f" in active for active in told), told
                assert peer.errors == []
                assert await publisher_page.evaluate("() => room.errors") == []
            finally:
                await peer.close()
                await sock.close()


async def _is(value: Any, expected: Any) -> bool:
    return bool(await value == expected)
