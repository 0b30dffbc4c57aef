"""Active speaker from the ssrc-audio-level header extension (issue 14): of two aiortc
publishers in a room, the one sending a tone is announced to the room as `speaker`; the
node never decodes audio (it reads the level each packet carries)."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable

import httpx
import pytest
from aiortc import AudioStreamTrack
from av import AudioFrame

from node.local.launch import LocalNode
from node.local.participant import MediaPeer
from node.media import adapter
from tests.node.live_client import create_room, sign_up
from tests.node.media.test_loopback import loopback_ice  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.slow]


class Tone(AudioStreamTrack):
    """A 440 Hz tone at about -16 dBov (aiortc computes the level it sends)."""

    async def recv(self) -> AudioFrame:
        frame = await super().recv()
        assert isinstance(frame, AudioFrame)
        rate = frame.sample_rate
        start = frame.pts or 0
        samples = frame.samples * len(frame.layout.channels)
        data = b"".join(
            int(5000 * math.sin(2 * math.pi * 440 * (start + i) / rate)).to_bytes(
                2, "little", signed=True
            )
            for i in range(samples)
        )
        frame.planes[0].update(data)
        return frame


@pytest.mark.usefixtures("loopback_ice")
async def test_the_one_speaking_is_announced(node_processes: Callable[..., LocalNode]) -> None:
    assert adapter  # (the client side is plain aiortc)
    env = {"SFUMESH_MEDIA_HOST_ADDRESSES": json.dumps(["127.0.0.1"])}
    node = await asyncio.to_thread(node_processes, extra_env=env)
    async with httpx.AsyncClient(timeout=15) as http:
        users = [await sign_up(http, node.url, prefix=p) for p in ("loud", "quiet")]
        await create_room(users[0], node.url, "speakers")
        socks = [await user.connect(node.url) for user in users]
        peers = []
        try:
            for user, sock, audio in zip(users, socks, (Tone(), None), strict=True):
                await user.join(sock, "speakers", node.url)
                peers.append(MediaPeer(sock, user.username, audio=audio))
            for peer in peers:
                await peer.start_publishing()
            for sock in socks:
                event = await sock.wait_for("speaker", within_s=30)
                assert event["session_id"] == socks[0].session_id
                assert event["user_id"] == users[0].user_id
        finally:
            for peer in peers:
                await peer.close()
            for sock in socks:
                await sock.close()
