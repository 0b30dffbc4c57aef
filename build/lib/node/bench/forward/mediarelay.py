"""aiortc's MediaRelay as a system under test for `sfumesh bench forward`.

The way aiortc's documentation and examples build a "server that relays": the publisher's
tracks are received normally (depayloaded, jitter-buffered and **decoded** by aiortc), and
each subscriber's peer connection gets `MediaRelay().subscribe(track)` for audio and video,
so aiortc **re-encodes** every frame once per subscriber (VP8 with libvpx, Opus with libopus;
the encoder's bitrate follows the subscriber's REMB, as aiortc does).

One deviation from the examples: proxies are made with `buffered=False`. With the default
(`buffered=True`) a subscriber whose encoder falls behind queues decoded frames without
bound; at high K that grows by hundreds of MB per second on this machine. Unbuffered, a
lagging encoder skips to the newest frame (frames are dropped, latency stays bounded). A
drain consumer subscribes as soon as the publisher's tracks arrive, so decoded frames never
pile up before the first subscriber.

The server (`python -m node.bench.forward.mediarelay --address A --port P`) is one Python
process, measured by its PID; its signalling is a tiny HTTP/1.1 server on the standard
library's asyncio streams (one JSON request per connection):

* `POST /publish {sdp, type}` -> the answer `{sdp, type}`;
* `POST /subscribe {}` -> `{id, sdp, type: "offer"}` (waits for the publisher's tracks);
* `POST /answer {id, sdp, type}` -> `{}`;  `POST /close {id}` -> `{}`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Final

import httpx
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaRelay
from aiortc.mediastreams import MediaStreamError

from mesh.process import ManagedProcess, free_port
from node.bench.forward.peers import run_on_big_buffer_loop
from node.bench.forward.systems import SIGNALLING
from node.media import adapter

log = logging.getLogger(__name__)

TRACK_WAIT_S: Final = 60.0
REQUEST_TIMEOUT_S: Final = 60.0
MAX_BODY: Final = 1 << 20
KINDS: Final = ("audio", "video")


class MediaRelayError(RuntimeError):
    """The relay server refused a request or could not start."""


# --------------------------------------------------------------------------- server


class RelayServer:
    """The SFU process: one publisher, any number of subscribers, decode + re-encode."""

    def __init__(self) -> None:
        self.relay = MediaRelay()
        self.tracks: dict[str, MediaStreamTrack] = {}
        self.have_tracks = asyncio.Event()
        self.pcs: dict[str, RTCPeerConnection] = {}
        self._drains: list[asyncio.Task[None]] = []

    async def publish(self, body: Mapping[str, Any]) -> dict[str, Any]:
        if self.tracks:
            raise MediaRelayError("there is a publisher already")
        pc = RTCPeerConnection(adapter.rtc_configuration())
        self.pcs["publisher"] = pc

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            self.tracks[track.kind] = track
            self._drains.append(asyncio.ensure_future(self._drain(track)))
            if all(kind in self.tracks for kind in KINDS):
                self.have_tracks.set()

        await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type="offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        return {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type}

    async def _drain(self, track: MediaStreamTrack) -> None:
        # Keeps the relay reading the decoded track, with or without subscribers.
        proxy = self.relay.subscribe(track, buffered=False)
        with contextlib.suppress(MediaStreamError):
            while True:
                await proxy.recv()

    async def subscribe(self, body: Mapping[str, Any]) -> dict[str, Any]:
        await asyncio.wait_for(self.have_tracks.wait(), TRACK_WAIT_S)
        pc = RTCPeerConnection(adapter.rtc_configuration())
        identifier = secrets.token_hex(8)
        self.pcs[identifier] = pc
        for kind in KINDS:
            pc.addTrack(self.relay.subscribe(self.tracks[kind], buffered=False))
        await pc.setLocalDescription(await pc.createOffer())
        return {"id": identifier, "sdp": pc.localDescription.sdp, "type": "offer"}

    async def answer(self, body: Mapping[str, Any]) -> dict[str, Any]:
        pc = self.pcs.get(str(body.get("id")))
        if pc is None:
            raise MediaRelayError("unknown subscriber id")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type="answer"))
        return {}

    async def close(self, body: Mapping[str, Any]) -> dict[str, Any]:
        pc = self.pcs.pop(str(body.get("id")), None)
        if pc is not None:
            await pc.close()
        return {}

    async def shutdown(self) -> None:
        for task in self._drains:
            task.cancel()
        await asyncio.gather(*self._drains, return_exceptions=True)
        await asyncio.gather(*(pc.close() for pc in self.pcs.values()), return_exceptions=True)

    def routes(self) -> dict[str, Callable[[Mapping[str, Any]], Awaitable[dict[str, Any]]]]:
        return {
            "/publish": self.publish,
            "/subscribe": self.subscribe,
            "/answer": self.answer,
            "/close": self.close,
        }


async def _respond(writer: asyncio.StreamWriter, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 409: "Conflict"}.get(status, "")
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(data)}\r\nconnection: close\r\n\r\n"
    )
    writer.write(head.encode() + data)
    await writer.drain()


async def _serve_one(
    server: RelayServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        request_line = (await reader.readline()).decode("latin-1").split()
        length = 0
        while True:
            line = (await reader.readline()).decode("latin-1").strip()
            if not line:
                break
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        if len(request_line) < 2 or request_line[0] != "POST" or not 0 <= length <= MAX_BODY:
            await _respond(writer, 400, {"error": "POST with a JSON body only"})
            return
        handler = server.routes().get(request_line[1])
        if handler is None:
            await _respond(writer, 404, {"error": f"no route {request_line[1]}"})
            return
        body = json.loads(await reader.readexactly(length)) if length else {}
        try:
            reply = await handler(body if isinstance(body, dict) else {})
        except (MediaRelayError, KeyError, ValueError, TimeoutError) as error:
            await _respond(writer, 409, {"error": f"{type(error).__name__}: {error}"})
            return
        await _respond(writer, 200, reply)
    except Exception:
        log.exception("request failed")
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def serve(port: int) -> int:
    server = RelayServer()
    listener = await asyncio.start_server(
        lambda r, w: _serve_one(server, r, w), host="127.0.0.1", port=port
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        listener.close()
        await server.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m node.bench.forward.mediarelay")
    parser.add_argument("--address", required=True, help="the only ICE host address")
    parser.add_argument("--port", type=int, required=True, help="HTTP port on 127.0.0.1")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr)
    adapter.set_host_addresses([args.address])
    return run_on_big_buffer_loop(serve(args.port))


# --------------------------------------------------------------------------- driver side


class MediaRelaySystem:
    """The relay server as a child process, stopped by PID."""

    name = "mediarelay"

    def __init__(self, address: str, workdir: Path, *, log_level: str = "WARNING") -> None:
        self.address = address
        self.workdir = Path(workdir)
        self.log_level = log_level
        self.port = 0
        self._process: ManagedProcess | None = None

    @property
    def pid(self) -> int:
        if self._process is None or self._process.pid is None:
            raise MediaRelayError("the relay server is not running")
        return self._process.pid

    def spec(self) -> dict[str, Any]:
        return {"system": "mediarelay", "url": f"http://127.0.0.1:{self.port}"}

    async def start(self) -> None:
        self.port = free_port()
        argv = [
            sys.executable,
            "-m",
            "node.bench.forward.mediarelay",
            "--address",
            self.address,
            "--port",
            str(self.port),
            "--log-level",
            self.log_level,
        ]
        self._process = ManagedProcess(
            "mediarelay", argv, self.workdir / "mediarelay.log", env=dict(os.environ)
        )
        self._process.start()
        await asyncio.to_thread(self._process.wait_port, "127.0.0.1", self.port, 30.0)

    async def stop(self) -> None:
        if self._process is not None:
            await asyncio.to_thread(self._process.stop)
            self._process = None


class MediaRelaySignalling:
    """A client of the relay server (JSON over HTTP with httpx)."""

    def __init__(
        self, spec: Mapping[str, Any], role: str, *, timeout: float = REQUEST_TIMEOUT_S
    ) -> None:
        self.url = str(spec["url"])
        self.role = role
        self.timeout = timeout
        self.id: str | None = None

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=self.url, timeout=self.timeout) as http:
            response = await http.post(path, json=body)
        if response.status_code != 200:
            raise MediaRelayError(f"POST {path}: HTTP {response.status_code}: {response.text}")
        reply: dict[str, Any] = response.json()
        return reply

    async def publish(self, pc: RTCPeerConnection) -> None:
        await pc.setLocalDescription(await pc.createOffer())
        offer = pc.localDescription
        answer = await self._post("/publish", {"sdp": offer.sdp, "type": offer.type})
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))

    async def subscribe(self, pc: RTCPeerConnection) -> None:
        offer = await self._post("/subscribe", {})
        self.id = str(offer["id"])
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer["sdp"], type="offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        answer = pc.localDescription
        await self._post("/answer", {"id": self.id, "sdp": answer.sdp, "type": answer.type})

    async def close(self) -> None:
        if self.id is not None:
            with contextlib.suppress(Exception):
                await self._post("/close", {"id": self.id})
            self.id = None


def _signalling(spec: dict[str, Any], role: str) -> MediaRelaySignalling:
    return MediaRelaySignalling(spec, role)


SIGNALLING["mediarelay"] = _signalling


if __name__ == "__main__":
    sys.exit(main())
