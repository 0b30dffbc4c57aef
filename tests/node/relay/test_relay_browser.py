"""Two headless Chromium pages on two different nodes (each with its Serf agent) see and
hear each other: the media crosses between the nodes over a relay, and each page sees the
other exactly as it would a participant of its own node."""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path

import httpx
import pytest

from node.config import new_key
from node.local.launch import start_nodes
from node.runtime.services import BackingServices
from tests.browser import chromium, page
from tests.node.live_client import create_room, sign_up
from tests.node.media.test_browser import (
    DECODE_LIMIT_S,
    FRAMES,
    STEP_S,
    decoded,
    hang_up_and_see_tracks_end,
    join_and_publish,
    until_all,
)

pytestmark = [pytest.mark.slow, pytest.mark.browser]


async def test_two_browsers_on_two_nodes(backing: BackingServices, tmp_path: Path) -> None:
    env = {
        "SFUMESH_MEDIA_HOST_ADDRESSES": json.dumps(["127.0.0.1"]),
        "SFUMESH_DATABASE": f"relay_browser_{secrets.token_hex(4)}",
        "SFUMESH_BCRYPT_COST": "4",
    }
    nodes = await asyncio.to_thread(
        start_nodes, backing, {"k1": new_key()}, count=2, data_dir=tmp_path, extra_env=env
    )
    try:
        slug = f"two-nodes-{secrets.token_hex(3)}"
        async with httpx.AsyncClient(timeout=STEP_S) as http:
            users = [await sign_up(http, nodes[0].url, prefix="web") for _ in range(2)]
            await create_room(users[0], nodes[0].url, slug)
            pairs = zip(users, nodes, strict=True)
            tokens = [await user.new_session(node.url) for user, node in pairs]

        async with (
            chromium() as browser,
            page(browser, f"{nodes[0].url}/") as first,
            page(browser, f"{nodes[1].url}/") as second,
        ):
            pages = [first, second]
            sessions = [
                await join_and_publish(p, token, slug, "VP8")
                for p, token in zip(pages, tokens, strict=True)
            ]
            states = await until_all(pages, decoded, DECODE_LIMIT_S)
            for state, other in zip(states, reversed(sessions), strict=True):
                assert {t["owner"]["session_id"] for t in state["tracks"]} == {other}, state
                # The publisher's own mids (its audio and video m-lines), across the relay.
                assert {t["owner"]["source_mid"] for t in state["tracks"]} == {"0", "1"}, state
                assert state["errors"] == [], state
                assert len(state["video"]) == 1 and len(state["audio"]) == 1, state
                assert state["video"][0]["frames"] > FRAMES, state
                assert state["audio"][0]["packets"] > 0, state

            # The first hangs up on node 1: its tracks end at the second, on node 2.
            await hang_up_and_see_tracks_end(first, second)
    finally:
        for node in nodes:
            node.stop()
