"""Janus VideoRoom as a bench system: aiortc publisher -> Janus -> aiortc subscriber."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import pytest
from aiortc import (
    AudioStreamTrack,
    MediaStreamTrack,
    RTCPeerConnection,
    VideoStreamTrack,
)
from aiortc.mediastreams import MediaStreamError

from node.bench.forward.janus import JanusError, JanusSignalling, JanusSystem
from node.bench.forward.systems import SIGNALLING, signalling_from_spec
from node.local import netns
from node.media import adapter

pytestmark = pytest.mark.slow

VIDEO_FRAMES = 10
AUDIO_FRAMES = 20


async def _receive(track: MediaStreamTrack, count: int) -> int:
    received = 0
    while received < count:
        try:
            await track.recv()
        except MediaStreamError:
            break
        received += 1
    return received


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("event_loops", [None, 1], ids=["default", "event-loops-1"])
async def test_janus_forwards_aiortc_publisher_to_subscriber(
    tmp_path: Path, event_loops: int | None
) -> None:
    address = netns.ensure_veth()
    adapter.set_host_addresses([address])
    system = JanusSystem(event_loops, address, tmp_path / "janus")
    publisher_pc = RTCPeerConnection(configuration=adapter.rtc_configuration())
    subscriber_pc = RTCPeerConnection(configuration=adapter.rtc_configuration())
    publisher: JanusSignalling | None = None
    subscriber: JanusSignalling | None = None
    pid: int | None = None
    try:
        await system.start()
        pid = system.pid
        assert _pid_alive(pid)
        assert system.name == ("janus" if event_loops is None else "janus-event-loops-1")
        spec = system.spec()
        assert spec["system"] == "janus"
        assert SIGNALLING["janus"] is JanusSignalling

        publisher_pc.addTransceiver(VideoStreamTrack(), direction="sendonly")
        publisher_pc.addTransceiver(AudioStreamTrack(), direction="sendonly")
        publisher = JanusSignalling(spec, "publisher")
        await publisher.publish(publisher_pc)

        tracks: dict[str, MediaStreamTrack] = {}
        got_both = asyncio.Event()

        @subscriber_pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            tracks[track.kind] = track
            if {"audio", "video"} <= tracks.keys():
                got_both.set()

        signalling = signalling_from_spec(spec, "subscriber")
        assert isinstance(signalling, JanusSignalling)
        subscriber = signalling
        await subscriber.subscribe(subscriber_pc)
        await asyncio.wait_for(got_both.wait(), 30)

        video, audio = await asyncio.wait_for(
            asyncio.gather(
                _receive(tracks["video"], VIDEO_FRAMES), _receive(tracks["audio"], AUDIO_FRAMES)
            ),
            90,
        )
        assert video >= VIDEO_FRAMES
        assert audio >= AUDIO_FRAMES

        counters = await system.packet_counters()
        assert counters.handles >= 2
        assert counters.packets_in > 0
        assert counters.packets_out > 0
    finally:
        for signalling_client in (subscriber, publisher):
            if signalling_client is not None:
                with contextlib.suppress(Exception):
                    await signalling_client.close()
        await subscriber_pc.close()
        await publisher_pc.close()
        await system.stop()
        adapter.set_host_addresses(None)
    assert pid is not None and not _pid_alive(pid)


class _BrokenJanus(JanusSystem):
    def write_config(self) -> None:
        super().write_config()
        (self.workdir / "janus.jcfg").write_text("general: {\n  not a setting\n")


async def test_janus_start_failure_raises_with_log_tail(tmp_path: Path) -> None:
    system = _BrokenJanus(None, netns.ensure_veth(), tmp_path / "janus")
    try:
        with pytest.raises(JanusError, match="exited with code") as info:
            await system.start()
        assert "janus.jcfg" in str(info.value)  # the log tail names the bad file
    finally:
        await system.stop()
