"""Two headless Chromium pages in one room on one real node see and hear each other.

The pages are served by the node (`/`), load the web client's media module
(`/static/media.js`), open the session WebSocket, join through the HTTP API, publish the
fake camera and microphone and subscribe to each other's tracks. The node forwards RTP
without decoding; the browsers decode. ICE runs on 127.0.0.1 only (`media.host_addresses`),
in the private network namespace the test suite runs in.
"""

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

from node.local.launch import LocalNode
from tests.browser import chromium, page
from tests.node.live_client import create_room, sign_up

pytestmark = [pytest.mark.slow, pytest.mark.browser]

log = logging.getLogger(__name__)

FRAMES = 60
STEP_S = 30.0
DECODE_LIMIT_S = 60.0

# Joins the room the way the web client will, and publishes; returns the session id.
# Everything the page heard and every failure stay in `window.room` for the checks.
JOIN_AND_PUBLISH = """
async ({ sessionToken, slug, videoCodec }) => {
  const { RoomMedia } = await import("/static/media.js");
  const stream = await navigator.mediaDevices.getUserMedia({ audio: true, video: true });
  const query = `session_token=${encodeURIComponent(sessionToken)}`;
  const ws = new WebSocket(`${location.origin.replace(/^http/, "ws")}/ws?${query}`);
  const room = (window.room = { ws, messages: [], errors: [], tracks: [], ended: [] });
  let counter = 0;
  const send = (message) => ws.send(JSON.stringify({ ...message, id: `m${++counter}` }));
  const media = (room.media = new RoomMedia(send, stream, { videoCodec }));
  media.addEventListener("track", (event) => {
    const owner = event.detail.owner;
    room.tracks.push({ kind: event.detail.track.kind, mid: event.detail.mid, owner });
  });
  media.addEventListener("trackended", (event) => room.ended.push(event.detail.track.kind));
  media.addEventListener("error", (event) => {
    room.errors.push(`${event.detail.pc}: ${event.detail.error}`);
  });
  const waiting = [];
  const next = (test) =>
    new Promise((resolve, reject) => {
      const seen = room.messages.find(test);
      if (seen) resolve(seen);
      else waiting.push({ test, resolve, reject });
    });
  ws.addEventListener("message", (event) => {
    const message = JSON.parse(event.data);
    room.messages.push(message);
    if (message.type === "error") room.errors.push(JSON.stringify(message));
    media.handle(message);
    for (const waiter of [...waiting]) {
      if (waiter.test(message)) {
        waiting.splice(waiting.indexOf(waiter), 1);
        waiter.resolve(message);
      }
    }
  });
  ws.addEventListener("close", (event) => {
    room.errors.push(`websocket closed: ${event.code}`);
    for (const waiter of waiting.splice(0)) waiter.reject(new Error("websocket closed"));
  });
  const hello = await next((m) => m.type === "hello");
  const reply = await fetch(`/api/rooms/${encodeURIComponent(slug)}/join`, {
    method: "POST",
    headers: { authorization: `Bearer ${sessionToken}` },
  });
  if (!reply.ok) throw new Error(`HTTP join: ${reply.status} ${await reply.text()}`);
  const { room_token } = await reply.json();
  ws.send(JSON.stringify({ type: "join", id: "join", room_token }));
  const joined = await next((m) => m.id === "join");
  if (joined.type !== "ack") throw new Error(`join: ${JSON.stringify(joined)}`);
  // Frames keep the session alive (ws_idle_timeout_s).
  room.pinger = setInterval(() => send({ type: "ping" }), 10000);
  await media.publish();
  await next((m) => m.type === "answer" && m.pc === "publish");
  return hello.session_id;
}
"""

RECEIVED = """
async () => {
  const { media, errors, tracks } = window.room;
  const out = {
    errors,
    tracks,
    publish: media.publishPc?.connectionState ?? null,
    subscribe: media.subscribePc?.connectionState ?? null,
    video: [],
    audio: [],
    sent: [],
  };
  const codecOf = (stats, report) => stats.get(report.codecId)?.mimeType ?? null;
  if (media.subscribePc) {
    const stats = await media.subscribePc.getStats();
    for (const report of stats.values()) {
      if (report.type !== "inbound-rtp") continue;
      if (report.kind === "video") {
        out.video.push({ frames: report.framesDecoded ?? 0, codec: codecOf(stats, report) });
      } else if (report.kind === "audio") {
        out.audio.push({ packets: report.packetsReceived ?? 0, codec: codecOf(stats, report) });
      }
    }
  }
  const sent = await media.publishPc.getStats();
  for (const report of sent.values()) {
    if (report.type === "outbound-rtp" && report.kind === "video") {
      out.sent.push(codecOf(sent, report));
    }
  }
  return out;
}
"""

HANG_UP = """
() => {
  clearInterval(window.room.pinger);
  window.room.media.close();
  window.room.ws.close();
}
"""


async def join_and_publish(page: Page, session_token: str, slug: str, codec: str) -> str:
    arguments = {"sessionToken": session_token, "slug": slug, "videoCodec": codec}
    session_id = await asyncio.wait_for(page.evaluate(JOIN_AND_PUBLISH, arguments), STEP_S)
    assert isinstance(session_id, str)
    return session_id


async def received(page: Page) -> dict[str, Any]:
    result = await asyncio.wait_for(page.evaluate(RECEIVED), STEP_S)
    assert isinstance(result, dict)
    return result


async def until_all(
    pages: list[Page], done: Callable[[dict[str, Any]], bool], limit_s: float
) -> list[dict[str, Any]]:
    """Every page's latest `received` once all are `done`, or when time is up."""
    deadline = time.monotonic() + limit_s
    while True:
        states = [await received(p) for p in pages]
        if all(done(state) for state in states) or time.monotonic() > deadline:
            return states
        await asyncio.sleep(0.5)


async def hang_up_and_see_tracks_end(leaver: Page, stayer: Page) -> None:
    """`leaver` hangs up; its audio and video end at `stayer`, which then hangs up too."""
    await asyncio.wait_for(leaver.evaluate(HANG_UP), STEP_S)
    deadline = time.monotonic() + STEP_S
    ended: list[str] = []
    while len(ended) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        ended = await asyncio.wait_for(stayer.evaluate("() => window.room.ended"), STEP_S)
    assert sorted(ended) == ["audio", "video"]
    await asyncio.wait_for(stayer.evaluate(HANG_UP), STEP_S)


def decoded(state: dict[str, Any]) -> bool:
    return bool(
        any(v["frames"] > FRAMES for v in state["video"])
        and any(a["packets"] > 0 for a in state["audio"])
    )


@pytest.mark.parametrize("codec", ["VP8", "H264"])
async def test_two_browsers_see_and_hear_each_other(
    node_processes: Callable[..., LocalNode], codec: str
) -> None:
    started = time.monotonic()
    env = {"SFUMESH_MEDIA_HOST_ADDRESSES": json.dumps(["127.0.0.1"])}
    node = await asyncio.to_thread(node_processes, extra_env=env)
    slug = f"browsers-{codec.lower()}"
    async with httpx.AsyncClient(timeout=STEP_S) as http:
        users = [await sign_up(http, node.url, prefix="web") for _ in range(2)]
        await create_room(users[0], node.url, slug)
        tokens = [await user.new_session(node.url) for user in users]

    async with (
        chromium() as browser,
        page(browser, f"{node.url}/") as first,
        page(browser, f"{node.url}/") as second,
    ):
        pages = [first, second]
        sessions = [
            await join_and_publish(p, token, slug, codec)
            for p, token in zip(pages, tokens, strict=True)
        ]
        assert len(set(sessions)) == 2
        states = await until_all(pages, decoded, DECODE_LIMIT_S)
        log.info("%s: both pages decoding after %.1f s", codec, time.monotonic() - started)

        for state, other in zip(states, reversed(sessions), strict=True):
            # The node's offer said whose tracks they are: the other page's.
            assert {t["owner"]["session_id"] for t in state["tracks"]} == {other}, state
            assert state["errors"] == [], state
            assert state["publish"] == state["subscribe"] == "connected", state
            # One participant besides this page: one video and one audio track from it.
            assert sorted(t["kind"] for t in state["tracks"]) == ["audio", "video"], state
            assert len(state["video"]) == 1 and len(state["audio"]) == 1, state
            assert state["video"][0]["frames"] > FRAMES, state
            assert state["audio"][0]["packets"] > 0, state
            assert state["video"][0]["codec"] == f"video/{codec}", state
            assert state["audio"][0]["codec"] == "audio/opus", state
            assert state["sent"] == [f"video/{codec}"], state

        # The first hangs up: its tracks end at the second (inactive m-lines).
        await hang_up_and_see_tracks_end(first, second)
