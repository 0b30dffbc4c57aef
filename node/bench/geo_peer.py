"""One participant of `bench geo`, run as its own process inside a client host of the lab
(`python -m node.bench.geo_peer`, through nsenter): encoding 640x360 VP8 and decoding the
other peer's costs CPU that two peers in one process would share with one GIL and one event
loop, which would then show up as latency that the network did not cause.

Protocol, JSON lines: the bench writes the peer's configuration as the first line of stdin;
the peer picks its node (the closest-node procedure, `mesh.closest.pick_node`, or a pinned
node), joins the room, publishes `CameraTrack` video and a tone, and prints
`{"event": "media", ...}` once it decodes the other peer's video. It keeps running and
sampling until stdin says `stop` (or closes), then prints `{"event": "result", ...}`: every
counter it painted, every frame it decoded (wall time in ms, the counter read back or
null), and its WebRTC stats sampled once a second. The bench turns these into figures.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from aiortc import AudioStreamTrack
from av import AudioFrame, VideoFrame
from av.frame import Frame
from av.packet import Packet

from mesh.closest import pick_node
from node.bench.geo_media import CameraTrack, frame_luma, now_ms, read_stamp
from node.local.participant import MediaPeer, Received, open_socket, until
from node.log import setup_logging
from node.media import adapter

log = logging.getLogger(__name__)

SAMPLE_S = 1.0
#: how long the peer waits for the other's first decoded frame
MEDIA_TIMEOUT_S = 90.0
TONE_HZ = 440.0


class ToneTrack(AudioStreamTrack):
    """A 440 Hz tone, 48 kHz mono, 20 ms frames: Opus has something to encode (silence
    costs it almost nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self._phase = 0

    async def recv(self) -> AudioFrame:
        frame = await super().recv()
        assert isinstance(frame, AudioFrame)
        samples = frame.samples
        times = (np.arange(samples) + self._phase) / frame.sample_rate
        self._phase += samples
        wave = (np.sin(2 * math.pi * TONE_HZ * times) * 8000).astype(np.int16)
        layout = frame.layout.name
        channels = len(frame.layout.channels)
        tone = AudioFrame.from_ndarray(
            np.repeat(wave, channels).reshape(1, -1), format="s16", layout=layout
        )
        tone.sample_rate = frame.sample_rate
        tone.pts = frame.pts
        tone.time_base = frame.time_base
        return tone


@dataclass
class Recorder:
    """Every decoded video frame of the other peer: (wall ms, counter read or None)."""

    own_session: str = ""
    frames: list[tuple[int, int | None]] = field(default_factory=list)
    misread: int = 0

    def __call__(self, track: Received, frame: Frame | Packet[Any]) -> None:
        if not isinstance(frame, VideoFrame) or track.owner == self.own_session:
            return
        counter = read_stamp(frame_luma(frame))
        if counter is None:
            self.misread += 1
        self.frames.append((now_ms(), counter))


def _stat_sample(reports: dict[str, Any], published: dict[str, Any]) -> dict[str, Any]:
    """What one second's stats say: the subscribe side's bytes, video loss and jitter, and
    the publish side's RTT to the node and the audio bytes it sent."""
    sample: dict[str, Any] = {"t_ms": now_ms()}
    for report in reports.values():
        kind = getattr(report, "type", "")
        if kind == "transport":
            sample["bytes_received"] = report.bytesReceived
        elif kind == "inbound-rtp" and report.kind == "video":
            sample["video_packets_received"] = report.packetsReceived
            sample["video_packets_lost"] = report.packetsLost
            sample["video_jitter_ts"] = report.jitter
        elif kind == "inbound-rtp" and report.kind == "audio":
            sample["audio_packets_received"] = report.packetsReceived
    for report in published.values():
        kind = getattr(report, "type", "")
        if kind == "remote-inbound-rtp" and report.kind == "video":
            sample["rtt_s"] = report.roundTripTime
        elif kind == "outbound-rtp" and report.kind == "audio":
            sample["audio_bytes_sent"] = report.bytesSent
            sample["audio_packets_sent"] = report.packetsSent
        elif kind == "outbound-rtp" and report.kind == "video":
            sample["video_bytes_sent"] = report.bytesSent
    return sample


async def _hold_bitrate(peer: MediaPeer, bitrate: int) -> None:
    """The video encoder at `bitrate` once it exists (`adapter.hold_encoder_bitrate`)."""
    sender = next(t.sender for t in peer.publish.getTransceivers() if t.kind == "video")
    while True:
        if adapter.hold_encoder_bitrate(sender, bitrate):
            return
        await asyncio.sleep(0.05)


async def _stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


def _emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def _session(http: httpx.AsyncClient, url: str, user_token: str) -> str:
    reply = await http.post(
        f"{url}/api/sessions", headers={"Authorization": f"Bearer {user_token}"}
    )
    reply.raise_for_status()
    token: str = reply.json()["session_token"]
    return token


async def run_peer(config: dict[str, Any], commands: asyncio.StreamReader) -> dict[str, Any]:
    """The peer's life (see the module docstring); its result message."""
    result: dict[str, Any] = {"event": "result", "name": config["name"]}
    async with httpx.AsyncClient(timeout=30.0) as http:
        url = config.get("node_url") or ""
        if config["pick"] == "closest":
            started = time.monotonic()
            ranking = await pick_node(http, config["seed_url"])
            result["pick_ms"] = (time.monotonic() - started) * 1000
            result["ranking"] = [
                {"name": n.name, "rtt_ms": n.rtt_ms, "measured": n.measured} for n in ranking
            ]
            url = ranking[0].url
        join_started = time.monotonic()
        sock = await open_socket(url, await _session(http, url, config["user_token"]))
        joined = await http.post(
            f"{url}/api/rooms/{config['slug']}/join",
            headers={"Authorization": f"Bearer {sock.session_token}"},
        )
        joined.raise_for_status()
        ack = await sock.request("join", room_token=joined.json()["room_token"])
        if ack.get("type") != "ack":
            raise RuntimeError(f"join refused: {ack}")
        recorder = Recorder(own_session=sock.session_id)
        camera = CameraTrack(config["width"], config["height"], seed=config.get("seed", 1))
        peer = MediaPeer(sock, config["name"], video=camera, audio=ToneTrack(), on_frame=recorder)
        samples: list[dict[str, Any]] = []

        async def sample() -> None:
            while True:
                subscribed = await peer.subscribe.getStats()
                published = await peer.publish.getStats()
                samples.append(_stat_sample(dict(subscribed), dict(published)))
                await asyncio.sleep(SAMPLE_S)

        sampler: asyncio.Task[None] | None = None
        holder: asyncio.Task[None] | None = None
        try:
            await peer.start_publishing()
            holder = asyncio.create_task(_hold_bitrate(peer, int(config["bitrate"])))
            await until(
                lambda: bool(recorder.frames), "the other peer's video", MEDIA_TIMEOUT_S,
                describe=peer.describe,
            )  # fmt: skip
            result["join_ms"] = (time.monotonic() - join_started) * 1000
            result["node"] = sock.node
            _emit({"event": "media", "name": config["name"], "node": sock.node})
            sampler = asyncio.create_task(sample())
            while True:
                line = await commands.readline()
                if not line or json.loads(line).get("cmd") == "stop":
                    break
        finally:
            for task in (sampler, holder):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            await peer.close()
            await sock.close()
    result.update(
        painted=camera.painted,
        frames=recorder.frames,
        misread=recorder.misread,
        samples=samples,
        keyframe_requests=sum(r.keyframe_requests for r in peer.received),
    )
    return result


async def _main() -> int:
    commands = await _stdin_lines()
    config = json.loads(await commands.readline())
    try:
        _emit(await run_peer(config, commands))
    except Exception as error:
        log.exception("geo peer %s failed", config.get("name"))
        _emit({"event": "error", "name": config.get("name"), "error": repr(error)})
        return 1
    return 0


def main() -> int:
    setup_logging("WARNING")
    return asyncio.run(_main())


if __name__ == "__main__":
    sys.exit(main())
