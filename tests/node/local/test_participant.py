"""Issues 22 (item 4) and 20: the shared participant (`node.local.participant`) keeps its
socket alive, and its video does not stay frozen behind a lost packet.

A bench or test client that runs longer than the node's `ws_idle_timeout_s` was dropped as
idle: it never sent `ping` (the web client pings every 20 s). Here the idle timeout is 1 s
and the participant pings every 0.25 s; one socket that never pings shows the node's side.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any
from unittest.mock import MagicMock

import httpx
import pytest
from aiortc import RTCRtpReceiver
from aiortc.rtp import RtpPacket

from mesh.closest import pick_node
from node.local.launch import LocalNode, start_nodes
from node.local.participant import FailoverParticipant, MediaPeer, open_socket, until
from node.media import adapter
from node.runtime.services import BackingServices
from tests.node.live_client import create_room, sign_up


@pytest.mark.slow
async def test_a_pinging_participant_outlives_the_idle_timeout(
    node_processes: Callable[..., LocalNode],
) -> None:
    node = node_processes(extra_env={"SFUMESH_WS_IDLE_TIMEOUT_S": "1.0"})
    async with httpx.AsyncClient(timeout=30) as http:
        user = await sign_up(http, node.url)
        pinging = await open_socket(node.url, await user.new_session(node.url), 0.25)
        silent = await open_socket(node.url, await user.new_session(node.url), None)
        try:
            await asyncio.sleep(3.0)  # three idle timeouts
            assert silent.closed
            assert any(m.get("code") == "idle_timeout" for m in silent.messages), silent.messages
            assert not pinging.closed, pinging.messages[-3:]
            pongs = sum(1 for m in pinging.messages if m.get("type") == "pong")
            assert pinging.pings >= 8 and pongs >= 8, (pinging.pings, pongs)
            assert not any(m.get("type") == "error" for m in pinging.messages)
        finally:
            await pinging.close()
            await silent.close()


def _packet(seq: int) -> RtpPacket:
    packet = RtpPacket(payload_type=96, sequence_number=seq, timestamp=seq * 3000)
    packet._data = b"frame"  # type: ignore[attr-defined]  # what aiortc's depayload sets
    return packet


def test_a_receiver_stuck_behind_a_hole_moves_past_it() -> None:
    """Issue 20's freeze, as the lab showed it: a packet never repaired (its NACK given up
    128 packets later) left aiortc's jitter buffer waiting for 512 packets, every keyframe
    queued behind it. `adapter.skip_jitter_hole`, which the participant calls when a video
    track has decoded nothing for `STALL_S`, lets frames flow from the next one."""
    transport = MagicMock()
    transport.state = "new"
    receiver = RTCRtpReceiver("video", transport)
    buffer: Any = receiver._RTCRtpReceiver__jitter_buffer  # type: ignore[attr-defined]
    frames = [buffer.add(_packet(seq))[1] for seq in range(5)]
    assert sum(f is not None for f in frames) == 4  # a frame is out once the next begins
    stuck = [buffer.add(_packet(seq))[1] for seq in range(6, 200)]  # 5 never arrives
    assert all(f is None for f in stuck)
    assert adapter.skip_jitter_hole(receiver) > 0
    flowing = [buffer.add(_packet(seq))[1] for seq in range(200, 205)]
    assert all(f is not None for f in flowing)
    assert adapter.skip_jitter_hole(receiver) == 0  # no hole now: nothing done


@pytest.mark.slow
async def test_a_failover_participant_leaves_a_node_gone_silent(
    backing: BackingServices, token_keys: dict[str, str], tmp_path: Path
) -> None:
    """Issue 17: a node that stops answering (frozen: SIGSTOP, its socket stays open) is
    noticed by the failed pings (nothing heard for SILENT_S) and the participant fails over
    to the next node with the same session; media flows both ways again."""
    adapter.set_host_addresses(["127.0.0.1"])
    env = {"SFUMESH_MEDIA_HOST_ADDRESSES": '["127.0.0.1"]', "SFUMESH_BCRYPT_COST": "4"}
    env["SFUMESH_DATABASE"] = f"failover_{secrets.token_hex(4)}"
    # node-1's record outlives A's failover: its relay to node-2 (and A's old tracks on it)
    # is still there when A joins node-2, as when a page fails over quickly; reaped sooner,
    # the relay may end first (its track update to the frozen node gets no reply).
    env["SFUMESH_NODE_TTL_S"] = "30"
    nodes = await asyncio.to_thread(
        start_nodes, backing, token_keys, count=2, data_dir=tmp_path, extra_env=env
    )
    node1 = nodes[0]
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            alice, bob = await sign_up(http, node1.url, "a"), await sign_up(http, node1.url, "b")
            slug = f"silent-{secrets.token_hex(3)}"
            await create_room(alice, node1.url, slug)
            ranking = sorted(await pick_node(http, node1.url), key=lambda n: n.name != node1.name)
            a = FailoverParticipant(http, alice.user_token, slug, ranking, "A")
            b = FailoverParticipant(http, bob.user_token, slug, ranking[::-1], "B")
            try:
                await a.start()
                await b.start()
                assert (a.node and a.node.name, b.node and b.node.name) == ("node-1", "node-2")
                await until(lambda: a.frames_from(b.session_id) > 10, "A to decode B")
                await until(lambda: b.frames_from(a.session_id) > 10, "B to decode A")
                assert node1.process.pid is not None
                os.kill(node1.process.pid, signal.SIGSTOP)
                await until(lambda: bool(a.failovers), "A to fail over", within_s=30)
                assert a.peer is not None and a.peer.sock.node == "node-2"
                assert a.peer.sock.session_id == a.session_id == a.peers[0].sock.session_id
                seen = b.frames_from(a.session_id)
                await until(lambda: a.peer is not None and a.peer.decodes(b.session_id, 5), "A")
                await until(lambda: b.frames_from(a.session_id) > seen + 10, "B to decode A")
                assert not b.failovers
                # A's old tracks, still relayed from the frozen node when A joins node-2,
                # are never sent back to A (a frozen tile of itself on the web page).
                assert a.session_id not in a.peer.owners.values(), a.peer.describe()
            finally:
                await a.close()
                await b.close()
    finally:
        adapter.set_host_addresses(None)
        if node1.process.pid is not None and node1.process.exit_code() is None:
            os.kill(node1.process.pid, signal.SIGKILL)  # frozen: it would not stop by itself
        for node in nodes:
            node.stop()


@pytest.mark.slow
async def test_a_track_that_never_decoded_asks_for_a_keyframe(
    node_processes: Callable[..., LocalNode],
) -> None:
    """Issue 20 (a lab call waited 40 s for a first frame): B's video is lost until B asks
    for a keyframe, so B never decodes a frame by itself (alice's encoder makes a keyframe
    only when asked, or every 3000 frames). The participant counted a freeze only after a
    first frame and never asked; now a track that decoded nothing for STALL_S since it
    arrived is frozen too, and the keyframe it asks for gets through."""
    node = node_processes(extra_env={"SFUMESH_MEDIA_HOST_ADDRESSES": '["127.0.0.1"]'})
    adapter.set_host_addresses(["127.0.0.1"])
    try:
        async with httpx.AsyncClient(timeout=30) as http, AsyncExitStack() as stack:
            alice, bob = await sign_up(http, node.url, "a"), await sign_up(http, node.url, "b")
            await create_room(alice, node.url, "first-frame")
            peers: list[MediaPeer] = []
            for user in (alice, bob):
                sock = await user.connect(node.url)
                stack.push_async_callback(sock.close)
                await user.join(sock, "first-frame", node.url)
                peer = MediaPeer(sock, user.username)
                stack.push_async_callback(peer.close)
                peers.append(peer)
            a, b = peers
            lost = [0]

            @b.subscribe.on("track")
            def lose_until_asked(track: Any) -> None:
                if track.kind != "video":
                    return
                receiver: Any = next(
                    t.receiver for t in b.subscribe.getTransceivers() if t.receiver.track is track
                )
                handle = receiver._handle_rtp_packet
                received = next(r for r in b.received if r.track is track)

                async def handle_rtp(packet: RtpPacket, arrival_time_ms: int) -> None:
                    if not received.keyframe_requests:
                        lost[0] += 1
                        return
                    await handle(packet, arrival_time_ms)

                receiver._handle_rtp_packet = handle_rtp

            await a.start_publishing()
            await until(lambda: bool(b.from_(a.sock.session_id, "video")), "b's video track")
            video = b.from_(a.sock.session_id, "video")[0]
            await until(
                lambda: video.frames >= 5,
                "b decodes alice's video",
                within_s=8.0,
                describe=lambda: f"{video.frames} frames, {video.keyframe_requests} PLIs",
            )
            assert lost[0] > 10 and video.keyframe_requests >= 1
    finally:
        adapter.set_host_addresses(None)
