"""A synthetic simulcast publisher for the benches (issue 14), without Chromium.

    python -m node.bench.forward.peers simulcast-publisher --spec JSON --address A \\
        --layer-media Q.bin --layer-media H.bin --layer-media F.bin [--ladder]

It offers ONE video m-line the way Chromium does with three `sendEncodings`: aiortc's offer
edited (`simulcast_offer`) to announce `a=rid:q send`, `a=rid:h send`, `a=rid:f send` and
`a=simulcast:send q;h;f`, with no `a=ssrc` lines (a simulcast sender signals no SSRCs; the
node learns them from the RIDs in the first packets); the `sdes:mid` and `rtp-stream-id`
extmaps come from aiortc's own table once `adapter.enable_simulcast_extensions` has run.
Then it sends three pre-encoded VP8 loops (`LAYERS`: 320x180 / 640x360 / 1280x720 at about
150 / 500 / 1500 kbit/s, 30 fps) on three SSRCs, each packet carrying its RID, through one
tapped sender (`adapter.tap_simulcast_sender`): never encoding while it runs. A PLI/FIR
naming a layer's SSRC restarts that layer's loop at its keyframe (at most once a second per
layer); the node's `layers` message switches encodings off and on as it would a browser's;
NACKs are answered from that layer's history (no RTX: the offer has none). All
layers share one RTP timestamp per frame (as one camera's capture time; `bench forward`
aligns every subscriber's frames with the publisher's whatever layer it receives).

With `--ladder` the same loops make a single-encoding publisher that follows the REMB it is
sent, as a real encoder would: it sends the best loop whose bit rate the REMB covers,
switching at that loop's keyframe (down at once, up when the REMB has covered the next loop
by `LADDER_UP_MARGIN` for `LADDER_UP_HOLD_S`). That is today's behaviour for a publisher
without simulcast, whose REMB the node caps by the slowest subscriber (`bench quality`'s
baseline).

The loops are encoded once with libvpx through PyAV (aiortc's own encoder will not go below
250 kbit/s) and packetized by aiortc's `Vp8Encoder.pack`, then cached like the forward
bench's media (`.data/bench-media/simulcast-opus32k/`). The audio is Opus at 32 kbit/s, a
browser's speech rate. The process speaks the forward bench's JSON
lines (`node.bench.forward.peers`): `ready`, then `marked` per `mark`, `stop`.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import av
from aiortc import RTCPeerConnection
from aiortc.codecs.vpx import Vp8Encoder
from aiortc.rtp import RtpPacket

from node.bench.codecs import MovingPattern
from node.bench.forward import media as bench_media
from node.bench.forward.peers import (
    PublisherMarks,
    close_quietly,
    codec_preferences,
    command_loop,
    emit,
    stdin_reader,
)
from node.bench.forward.sfumesh import SfumeshSignalling
from node.bench.forward.systems import Signalling, signalling_from_spec
from node.media import adapter

log = logging.getLogger(__name__)
_rng = random.SystemRandom()


@dataclass(frozen=True)
class Layer:
    rid: str
    width: int
    height: int
    bitrate: int


#: the encodings, lowest first: the web client's `SIMULCAST_ENCODINGS` (a quarter, half and
#: full size of a 720p camera, capped at 150/500/1500 kbit/s)
LAYERS: Final = (
    Layer("q", 320, 180, 150_000),
    Layer("h", 640, 360, 500_000),
    Layer("f", 1280, 720, 1_500_000),
)
RIDS: Final = tuple(layer.rid for layer in LAYERS)
#: the loops' length: the first frame is their only keyframe
LOOP_SECONDS: Final = 10.0
#: the audio: Opus at a browser's speech rate (aiortc's own 96 kbit/s would be a third of
#: a 300 kbit/s link)
AUDIO_BITRATE: Final = 32_000
FPS: Final = 30
KEYFRAME_MIN_INTERVAL_S: Final = 1.0
MAX_BEHIND_S: Final = 0.5
#: the ladder climbs to the next loop when the REMB covers its rate by this much ...
LADDER_UP_MARGIN: Final = 1.15
#: ... for this long
LADDER_UP_HOLD_S: Final = 2.0


# --------------------------------------------------------------------------- media


def layer_params(layer: Layer, seconds: float = LOOP_SECONDS) -> bench_media.MediaParams:
    return bench_media.MediaParams(
        width=layer.width, height=layer.height, fps=FPS, bitrate=layer.bitrate, seconds=seconds
    )


def encode_layer_video(params: bench_media.MediaParams) -> tuple[list[list[bytes]], list[bool]]:
    """The moving pattern at `params`, encoded by libvpx in real-time CBR with aiortc's
    settings but any bit rate, packetized as aiortc does; only the first frame a keyframe."""
    pattern = MovingPattern(params.width, params.height)
    time_base = fractions.Fraction(1, params.fps)
    codec: Any = av.CodecContext.create("libvpx", "w")
    codec.width = params.width
    codec.height = params.height
    codec.bit_rate = params.bitrate
    codec.pix_fmt = "yuv420p"
    codec.time_base = time_base
    codec.framerate = fractions.Fraction(params.fps, 1)
    codec.gop_size = 3000
    codec.qmin = 2
    codec.qmax = 56
    codec.options = {
        "bufsize": str(params.bitrate),
        "cpu-used": "-6",
        "deadline": "realtime",
        "lag-in-frames": "0",
        "minrate": str(params.bitrate),
        "maxrate": str(params.bitrate),
        "noise-sensitivity": "4",
        "overshoot-pct": "15",
        "partitions": "0",
        "static-thresh": "1",
        "undershoot-pct": "100",
    }
    packetizer = Vp8Encoder()
    frames: list[list[bytes]] = []
    keyframes: list[bool] = []
    for index in range(params.frames):
        frame = pattern.frame(index)
        frame.pts = index
        frame.time_base = time_base
        frame.pict_type = av.video.frame.PictureType.NONE
        for packet in codec.encode(frame):
            if packet.time_base is None:
                packet.time_base = time_base
            payloads, _ = packetizer.pack(packet)
            frames.append(payloads)
            keyframes.append(bench_media.is_vp8_keyframe(payloads[0]))
    if len(frames) != params.frames or not keyframes or not keyframes[0]:
        raise RuntimeError(f"libvpx gave {len(frames)} frames for {params.frames}")
    return frames, keyframes


def cache_dir() -> Path:
    return bench_media.default_cache_dir() / f"simulcast-opus{AUDIO_BITRATE // 1000}k"


def load_or_encode_layers(
    seconds: float = LOOP_SECONDS, directory: Path | None = None
) -> list[tuple[bench_media.PreEncoded, Path]]:
    """Each layer's loop and its cache file (lowest first), encoded once."""
    out = []
    for layer in LAYERS:
        params = layer_params(layer, seconds)
        path = bench_media.cache_path(params, directory or cache_dir())
        media: bench_media.PreEncoded | None = None
        if path.exists():
            try:
                media = bench_media.load(path)
            except (OSError, ValueError, KeyError, TypeError):
                media = None
            if media is not None and media.params != params:
                media = None
        if media is None:
            video, keyframes = encode_layer_video(params)
            media = bench_media.PreEncoded(
                params, video, keyframes, bench_media.encode_audio(params, AUDIO_BITRATE)
            )
            bench_media.save(media, path)
        out.append((media, path))
    return out


# --------------------------------------------------------------------------- SDP


def simulcast_offer(sdp: str, rids: Sequence[str] = RIDS) -> str:
    """aiortc's offer as Chromium's looks with simulcast: in the first video m-section the
    `a=ssrc`/`a=ssrc-group` lines removed and `a=rid:<id> send` per encoding plus
    `a=simulcast:send <ids>` added (lowest first). Other sections are left alone."""
    newline = "\r\n" if "\r\n" in sdp else "\n"
    lines = sdp.split(newline)
    trailing = lines[-1] == ""
    if trailing:
        lines = lines[:-1]
    out: list[str] = []
    section = ""
    done = False

    def close() -> None:
        nonlocal done
        if section == "video" and not done:
            out.extend(f"a=rid:{rid} send" for rid in rids)
            out.append("a=simulcast:send " + ";".join(rids))
            done = True

    for line in lines:
        if line.startswith("m="):
            close()
            section = line[2:].split(" ", 1)[0]
        elif (
            section == "video"
            and not done
            and (line.startswith("a=ssrc:") or line.startswith("a=ssrc-group:"))
        ):
            continue
        out.append(line)
    close()
    if not done:
        raise ValueError("the offer has no video m-line")
    return newline.join(out) + (newline if trailing else "")


# --------------------------------------------------------------------------- publisher


class LayeredPublisher(PublisherMarks):
    """Sends the layers' pre-encoded loops: as three simulcast encodings, or (`ladder`) as
    one encoding that follows REMB. Never encodes. Marks report like the forward bench's
    `Publisher` (plus `layers`). With `all_layers` every encoding is sent whatever the
    node's `layers` messages say (they are not listened to)."""

    def __init__(
        self,
        layers: Sequence[bench_media.PreEncoded],
        signalling: Signalling,
        *,
        ladder: bool = False,
        all_layers: bool = False,
    ) -> None:
        if len(layers) != len(LAYERS):
            raise ValueError(f"{len(LAYERS)} layers, lowest first")
        super().__init__()
        adapter.enable_simulcast_extensions()
        self.layers = list(layers)
        self.signalling = signalling
        self.ladder = ladder
        self.pc = RTCPeerConnection(adapter.rtc_configuration())
        video = self.pc.addTransceiver("video", direction="sendonly")
        # VP8 alone: retransmissions go out as the packets themselves (no RTX stream, whose
        # repaired RID the node would need)
        video.setCodecPreferences(
            [c for c in codec_preferences("video", "video/VP8") if c.mimeType == "video/VP8"]
        )
        audio = self.pc.addTransceiver("audio", direction="sendonly")
        audio.setCodecPreferences(codec_preferences("audio", "audio/opus"))
        self.simulcast: adapter.SimulcastSenderTap | None = None
        #: the ladder's loop (simulcast: unused)
        self.current = len(LAYERS) - 1
        if ladder:
            self.video: adapter.SenderTap = adapter.tap_sender(video.sender)
            self.video.on_keyframe_request = lambda: self._keyframe_requested(self.current)
        else:
            self.simulcast = adapter.tap_simulcast_sender(video.sender, RIDS)
            self.simulcast.on_layer_keyframe_request = self._keyframe_requested
            self.video = self.simulcast
            if not isinstance(signalling, SfumeshSignalling):
                raise ValueError("only sfumesh's signalling carries a simulcast offer")
            signalling.offer_filter = simulcast_offer
            signalling.on_layers = None if all_layers else self._layers_message
        #: the encodings sent (the node switches unwatched ones off, as in a browser)
        self.active = set(range(len(LAYERS)))
        self.audio = adapter.tap_sender(audio.sender)
        self.switches = 0
        self._up_since: float | None = None
        self._restart = [False] * len(LAYERS)
        self._last_restart = [-math.inf] * len(LAYERS)
        self.layer_counts = [[0, 0] for _ in LAYERS]  # packets, bytes
        self.remb: list[tuple[float, int]] = []
        self._tasks: list[asyncio.Task[None]] = []

    def _layers_message(self, mid: str, active: list[str]) -> None:
        """The node's `layers`: send only these encodings (a browser's `active: false`);
        one switched on again starts with its keyframe."""
        wanted = {RIDS.index(rid) for rid in active if rid in RIDS}
        for layer in wanted - self.active:
            self._restart[layer] = True
        self.active = wanted

    def _keyframe_requested(self, layer: int) -> None:
        self.keyframe_requests += 1
        now = time.monotonic()
        if now - self._last_restart[layer] >= KEYFRAME_MIN_INTERVAL_S:
            self._last_restart[layer] = now
            self._restart[layer] = True

    async def start(self, limit_s: float) -> None:
        await asyncio.wait_for(self.signalling.publish(self.pc), limit_s)
        await asyncio.wait_for(
            asyncio.gather(self.video.wait_ready(), self.audio.wait_ready()), limit_s
        )
        self._tasks = [
            asyncio.ensure_future(self._send_video()),
            asyncio.ensure_future(self._send_audio()),
        ]

    def _ladder_step(self, now: float) -> None:
        """Follow the REMB: down at once, up once it has covered the next loop for a while."""
        remb = self.video.remb_bitrate
        if remb is None:
            return
        if not self.remb or self.remb[-1][1] != remb:
            self.remb.append((now, remb))
        rates = [media.video_bitrate for media in self.layers]
        target = self.current
        while target > 0 and remb < rates[target]:
            target -= 1
        if target == self.current and target + 1 < len(rates):
            if remb >= rates[target + 1] * LADDER_UP_MARGIN:
                self._up_since = self._up_since if self._up_since is not None else now
                if now - self._up_since >= LADDER_UP_HOLD_S:
                    target += 1
            else:
                self._up_since = None
        if target != self.current:
            self.current = target
            self.switches += 1
            self._up_since = None
            self._restart[target] = True  # a new resolution starts with its keyframe

    async def _send_video(self) -> None:
        payload_type = self.video.payload_type
        assert payload_type is not None
        count = len(self.layers)
        sequences = [_rng.randrange(1 << 15) for _ in range(count)]
        indices = [0] * count
        timestamp = _rng.randrange(1 << 30)
        counter = 0
        interval = 1 / FPS
        due = time.monotonic()
        simulcast = self.simulcast
        while True:
            now = time.monotonic()
            if simulcast is None:
                self._ladder_step(now)
            counter += 1
            timestamp = (timestamp + bench_media.video_ts_step(counter, FPS)) & 0xFFFFFFFF
            self.frames.append((timestamp, now))
            self.counts["video"][2] += 1
            stamp = adapter.send_stamp()
            sending = sorted(self.active) if simulcast is not None else [self.current]
            for layer in sending:
                if self._restart[layer]:
                    self._restart[layer] = False
                    self.restarts += 1
                    indices[layer] = 0
                loop = self.layers[layer].video
                payloads = loop[indices[layer] % len(loop)]
                indices[layer] += 1
                last = len(payloads) - 1
                # the ladder's single stream keeps one sequence whatever loop it sends
                slot = layer if simulcast is not None else 0
                for number, payload in enumerate(payloads):
                    marker = 1 if number == last else 0
                    if simulcast is not None:
                        sent = simulcast.write_layer(
                            layer, payload_type, marker, sequences[slot], timestamp, payload, stamp
                        )
                    else:
                        sent = self.video.write(
                            payload_type, marker, sequences[slot], timestamp, payload, None, stamp
                        )
                    sequences[slot] = (sequences[slot] + 1) & 0xFFFF
                    if sent:
                        self.counts["video"][0] += 1
                        self.counts["video"][1] += len(payload)
                        self.layer_counts[layer][0] += 1
                        self.layer_counts[layer][1] += len(payload)
            due += interval
            delay = due - time.monotonic()
            if delay < -MAX_BEHIND_S:
                self.schedule_resets += 1
                due = time.monotonic()
                delay = 0
            await asyncio.sleep(max(0.0, delay))

    async def _send_audio(self) -> None:
        audio = self.layers[0].audio
        payload_type = self.audio.payload_type
        assert payload_type is not None
        sequence = _rng.randrange(1 << 15)
        timestamp = _rng.randrange(1 << 30)
        index = 0
        due = time.monotonic()
        while True:
            packet = RtpPacket(
                payload_type=payload_type,
                marker=1 if index == 0 else 0,
                sequence_number=sequence,
                timestamp=timestamp,
                payload=audio[index % len(audio)],
            )
            index += 1
            sequence = (sequence + 1) & 0xFFFF
            timestamp = (timestamp + bench_media.AUDIO_TS_STEP) & 0xFFFFFFFF
            if self.audio.write(
                packet.payload_type,
                packet.marker,
                packet.sequence_number,
                packet.timestamp,
                packet.payload,
                None,
                adapter.send_stamp(),
            ):
                self.counts["audio"][0] += 1
                self.counts["audio"][1] += len(packet.payload)
            self.counts["audio"][2] += 1
            due += bench_media.AUDIO_PTIME_S
            delay = due - time.monotonic()
            if delay < -MAX_BEHIND_S:
                due = time.monotonic()
                delay = 0
            await asyncio.sleep(max(0.0, delay))

    def mark(self) -> dict[str, Any]:
        """Counts since the previous mark, in the forward bench publisher's shape."""
        layers = [{"packets": p, "bytes": b} for p, b in self.layer_counts]
        for values in self.layer_counts:
            values[:] = [0, 0]
        remb, self.remb = self.remb, []
        return {
            "publisher": {
                **self.mark_counts([self.video, self.audio]),
                "layers": layers,
                "ladder": self.ladder,
                "current_layer": self.current if self.ladder else None,
                "switches": self.switches,
                "remb": remb,
                "layer_keyframe_requests": (
                    list(self.simulcast.layer_keyframe_requests) if self.simulcast else None
                ),
            }
        }

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await close_quietly("publisher signalling", self.signalling.close())
        await close_quietly("publisher connection", self.pc.close())


async def publisher_main(
    spec: dict[str, Any], media_paths: Sequence[Path], ladder: bool, limit_s: float
) -> int:
    """The `simulcast-publisher` process (see the module docstring)."""
    layers = [bench_media.load(path) for path in media_paths]
    reader = await stdin_reader()
    signalling = signalling_from_spec(spec, "publisher")
    all_layers = bool(spec.get("all_layers"))
    publisher = LayeredPublisher(layers, signalling, ladder=ladder, all_layers=all_layers)
    try:
        try:
            await publisher.start(limit_s)
        except Exception as error:
            log.exception("publisher set-up failed")
            emit("error", message=f"publisher: {type(error).__name__}: {error}")
            return 1
        # (this process's loop class: run as `python -m node.bench.forward.peers`, that
        # module is `__main__` and the `peers` imported here is a second copy)
        loop_class = type(asyncio.get_running_loop())
        emit("ready", t=time.monotonic(), rcvbuf=getattr(loop_class, "rcvbuf", None))

        def mark() -> dict[str, Any]:
            # in the shape of `peers.publisher_main`'s marks (one process, several
            # publishers), which bench forward and bench quality both read
            return {"publishers": [publisher.mark()["publisher"]]}

        await command_loop(reader, mark)
    finally:
        await publisher.close()
    emit("stopped")
    return 0
