"""`sfumesh bench codecs`: CPU per frame to encode and decode VP8 and H264 at 360p and 720p.

The codecs are the ones this project's peers use: aiortc's `Vp8Encoder`/`Vp8Decoder` (libvpx)
and `H264Encoder`/`H264Decoder` (libx264 and FFmpeg's h264 decoder), through PyAV, configured
exactly as aiortc configures them (its default target bitrates, its realtime and zero-latency
options, its thread counts).

The input is a deterministic synthetic test pattern at 30 fps: a textured background that
pans a few pixels each frame and a box that moves across it the other way, so the encoders
see real motion. For each codec and size, a short warm-up (which also holds the first
keyframe) is followed by `duration_s` of video:

- encode: `encoder.encode(frame)` per frame, RTP packetization included (as a sending peer
  pays it), timed with `time.process_time()` around each call;
- decode: the payloads of each frame are depayloaded and joined as aiortc's receiver and
  jitter buffer do, then given to `decoder.decode(JitterFrame(...))`; timed the same way.

Times are CPU time of this process (user + sys, summed over all of its threads: libx264 and
the decoders run slice threads), so "ms per frame" is what one frame costs in core time and
"fps per core" is how many frames one core could do back to back. Bitrate counts RTP
payload bytes (no RTP, SRTP, UDP or IP headers).
"""

from __future__ import annotations

import fractions
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import av
from aiortc.codecs import h264, vpx
from aiortc.codecs.base import Decoder, Encoder
from aiortc.jitterbuffer import JitterFrame

from node.bench.report import say, write_report

FPS = 30
TIME_BASE = fractions.Fraction(1, FPS)
DEFAULT_DURATION_S = 3.0
MAX_DURATION_S = 600.0
WARMUP_FRAMES = 10
SIZES = ((640, 360), (1280, 720))

# The background is a texture larger than the frame; each frame shows a window of it that
# moves by (PAN_DX, PAN_DY) pixels per frame, back and forth within PAN_RANGE.
PAN_RANGE = 256
PAN_DX = 4
PAN_DY = 2
# A box of a fifth of the frame's width crosses the picture the other way.
BOX_FRACTION = 5
BOX_DX = -6
BOX_DY = 3


def _ping_pong(step: int, span: int) -> int:
    """0, 1, ..., span, span - 1, ..., 0, 1, ...: a position bouncing within [0, span]."""
    if span <= 0:
        return 0
    phase = step % (2 * span)
    return phase if phase <= span else 2 * span - phase


def _even(value: int) -> int:
    return value - value % 2


@dataclass(frozen=True)
class Plane:
    """One plane of the pattern: background texture and box, row-major bytes."""

    width: int
    height: int
    texture: bytes
    texture_width: int
    box: bytes
    box_size: int

    def render(self, pan_x: int, pan_y: int, box_x: int, box_y: int, line_size: int) -> bytes:
        pad = b"\x00" * (line_size - self.width)
        rows = []
        for y in range(self.height):
            start = (y + pan_y) * self.texture_width + pan_x
            row = self.texture[start : start + self.width]
            box_row = y - box_y
            if 0 <= box_row < self.box_size:
                box_start = box_row * self.box_size
                row = (
                    row[:box_x]
                    + self.box[box_start : box_start + self.box_size]
                    + row[box_x + self.box_size :]
                )
            rows.append(row + pad)
        return b"".join(rows)


def _luma_texture(x: int, y: int) -> int:
    checker = 80 if (x // 48 + y // 48) % 2 else 0
    stripes = ((x + 2 * y) % 64) * 2
    grain = ((x * 2654435761) ^ (y * 40503)) >> 13 & 15
    return (24 + checker + stripes + grain) & 0xFF


def _luma_box(x: int, y: int, size: int) -> int:
    centre = size // 2
    ring = ((x - centre) ** 2 + (y - centre) ** 2) // max(1, size // 2)
    return 200 + (ring % 24) * 2


class MovingPattern:
    """Deterministic yuv420p frames of a panning texture and a moving box."""

    def __init__(self, width: int, height: int) -> None:
        if width % 2 or height % 2:
            raise ValueError("the pattern needs an even width and height")
        self.width = width
        self.height = height
        tw, th = width + PAN_RANGE, height + PAN_RANGE
        box = _even(width // BOX_FRACTION)
        luma = Plane(
            width,
            height,
            bytes(_luma_texture(x, y) for y in range(th) for x in range(tw)),
            tw,
            bytes(_luma_box(x, y, box) for y in range(box) for x in range(box)),
            box,
        )
        cw, ch, cb = tw // 2, th // 2, box // 2
        blue = Plane(
            width // 2,
            height // 2,
            bytes((96 + (x * 3 + y) % 64) for y in range(ch) for x in range(cw)),
            cw,
            bytes([60]) * (cb * cb),
            cb,
        )
        red = Plane(
            width // 2,
            height // 2,
            bytes((160 - (x + y * 3) % 64) for y in range(ch) for x in range(cw)),
            cw,
            bytes([220]) * (cb * cb),
            cb,
        )
        self.planes = (luma, blue, red)
        self.box = box

    def frame(self, index: int) -> av.VideoFrame:
        pan_x = _even(_ping_pong(index * PAN_DX, PAN_RANGE))
        pan_y = _even(_ping_pong(index * PAN_DY, PAN_RANGE))
        start_x, start_y = _even(self.width * 3 // 4), _even(self.height // 4)
        box_x = _even(_ping_pong(start_x + index * abs(BOX_DX), self.width - self.box))
        box_y = _even(_ping_pong(start_y + index * abs(BOX_DY), self.height - self.box))
        frame = av.VideoFrame(self.width, self.height, "yuv420p")
        for number, (plane, target) in enumerate(zip(self.planes, frame.planes, strict=True)):
            shift = 1 if number else 0
            target.update(
                plane.render(
                    pan_x >> shift,
                    pan_y >> shift,
                    box_x >> shift,
                    box_y >> shift,
                    target.line_size,
                )
            )
        frame.pts = index
        frame.time_base = TIME_BASE
        return frame


def _vp8_keyframe(data: bytes) -> bool:
    # VP8 frame tag, RFC 6386 section 9.1: bit 0 of the first byte is 0 on a key frame.
    return bool(data) and not data[0] & 1


def _h264_keyframe(data: bytes) -> bool:
    # An IDR slice (NAL unit type 5) anywhere in the Annex B stream.
    start = data.find(b"\x00\x00\x01")
    while start != -1 and start + 3 < len(data):
        if data[start + 3] & 0x1F == 5:
            return True
        start = data.find(b"\x00\x00\x01", start + 3)
    return False


@dataclass(frozen=True)
class Codec:
    name: str
    encoder: Callable[[], Encoder]
    decoder: Callable[[], Decoder]
    depayload: Callable[[bytes], bytes]
    keyframe: Callable[[bytes], bool]
    target_bitrate: int


CODECS = (
    Codec(
        "VP8", vpx.Vp8Encoder, vpx.Vp8Decoder, vpx.vp8_depayload, _vp8_keyframe, vpx.DEFAULT_BITRATE
    ),
    Codec(
        "H264",
        h264.H264Encoder,
        h264.H264Decoder,
        h264.h264_depayload,
        _h264_keyframe,
        h264.DEFAULT_BITRATE,
    ),
)


@dataclass
class CodecResult:
    codec: str
    width: int
    height: int
    frames: int
    encode_cpu_s: float
    encode_wall_s: float
    decode_cpu_s: float
    decode_wall_s: float
    decoded_frames: int
    payload_bytes: int
    keyframes: int
    target_bitrate: int

    @property
    def encode_ms_per_frame(self) -> float:
        return self.encode_cpu_s * 1000 / self.frames

    @property
    def decode_ms_per_frame(self) -> float:
        return self.decode_cpu_s * 1000 / self.frames

    @property
    def bitrate_kbps(self) -> float:
        return self.payload_bytes * 8 / 1000 / (self.frames / FPS)

    def summary(self) -> dict[str, Any]:
        return {
            "codec": self.codec,
            "width": self.width,
            "height": self.height,
            "encode_ms_per_frame": round(self.encode_ms_per_frame, 3),
            "decode_ms_per_frame": round(self.decode_ms_per_frame, 3),
            "bitrate_kbps": round(self.bitrate_kbps, 1),
            "frames": self.frames,
            "encode_fps_per_core": round(1000 / self.encode_ms_per_frame, 1),
            "decode_fps_per_core": round(1000 / self.decode_ms_per_frame, 1),
            "encode_wall_ms_per_frame": round(self.encode_wall_s * 1000 / self.frames, 3),
            "decode_wall_ms_per_frame": round(self.decode_wall_s * 1000 / self.frames, 3),
            "decoded_frames": self.decoded_frames,
            "keyframes": self.keyframes,
            "target_bitrate_kbps": self.target_bitrate / 1000,
        }


def _encode(encoder: Encoder, frame: av.VideoFrame) -> tuple[list[bytes], int, float, float]:
    """Payloads and RTP timestamp of one frame, and the CPU and wall seconds it took."""
    cpu, wall = time.process_time(), time.perf_counter()
    payloads, timestamp = encoder.encode(frame)
    return payloads, timestamp, time.process_time() - cpu, time.perf_counter() - wall


def _decode(
    codec: Codec, decoder: Decoder, payloads: list[bytes], timestamp: int
) -> tuple[bytes, int, float, float]:
    """One frame's payloads depayloaded and decoded: the bitstream, the number of frames
    out, and the CPU and wall seconds it took."""
    cpu, wall = time.process_time(), time.perf_counter()
    data = b"".join(codec.depayload(payload) for payload in payloads)
    frames = decoder.decode(JitterFrame(data=data, timestamp=timestamp))
    return data, len(frames), time.process_time() - cpu, time.perf_counter() - wall


def measure(codec: Codec, pattern: MovingPattern, frames: int) -> CodecResult:
    """Warm up, then encode `frames` frames and decode them again, one at a time.

    Every frame is decoded right after it was encoded, by one decoder that has seen the
    warm-up stream too, as a receiving peer would. Pattern frames are built outside the
    timed calls; the codecs as aiortc configures them are synchronous (no lookahead, no
    frame threads), so no codec work runs while a frame is being built.
    """
    encoder, decoder = codec.encoder(), codec.decoder()
    for index in range(WARMUP_FRAMES):
        payloads, timestamp, _, _ = _encode(encoder, pattern.frame(index))
        _decode(codec, decoder, payloads, timestamp)
    result = CodecResult(
        codec=codec.name,
        width=pattern.width,
        height=pattern.height,
        frames=frames,
        encode_cpu_s=0.0,
        encode_wall_s=0.0,
        decode_cpu_s=0.0,
        decode_wall_s=0.0,
        decoded_frames=0,
        payload_bytes=0,
        keyframes=0,
        target_bitrate=codec.target_bitrate,
    )
    for index in range(WARMUP_FRAMES, WARMUP_FRAMES + frames):
        frame = pattern.frame(index)
        payloads, timestamp, cpu_s, wall_s = _encode(encoder, frame)
        result.encode_cpu_s += cpu_s
        result.encode_wall_s += wall_s
        result.payload_bytes += sum(len(payload) for payload in payloads)
        data, decoded, cpu_s, wall_s = _decode(codec, decoder, payloads, timestamp)
        result.decode_cpu_s += cpu_s
        result.decode_wall_s += wall_s
        result.decoded_frames += decoded
        if codec.keyframe(data):
            result.keyframes += 1
    return result


def print_table(results: list[CodecResult], duration_s: float) -> None:
    frames = results[0].frames if results else 0
    say(
        f"sfumesh bench codecs: aiortc {_aiortc_version()} codecs via PyAV {av.__version__}, "
        f"{duration_s:g} s of 30 fps video ({frames} frames) per row after {WARMUP_FRAMES} "
        f"warm-up frames, {os.cpu_count() or '?'} CPUs"
    )
    say(
        "ms/frame is CPU time of this process (user + sys, all its threads) per frame; "
        "fps/core = 1000 / encode ms"
    )
    header = (
        f"{'codec':<6} {'size':>9} {'enc ms/frame':>13} {'dec ms/frame':>13} "
        f"{'enc fps/core':>13} {'kbit/s':>8} {'target':>7} {'keyframes':>10}"
    )
    say(header)
    say("-" * len(header))
    for result in results:
        say(
            f"{result.codec:<6} {f'{result.width}x{result.height}':>9} "
            f"{result.encode_ms_per_frame:>13.2f} {result.decode_ms_per_frame:>13.2f} "
            f"{1000 / result.encode_ms_per_frame:>13.0f} {result.bitrate_kbps:>8.0f} "
            f"{result.target_bitrate // 1000:>7} {result.keyframes:>10}"
        )
    say("")
    say(
        "wall ms/frame (encode / decode): "
        + ", ".join(
            f"{r.codec} {r.height}p {r.encode_wall_s * 1000 / r.frames:.2f} / "
            f"{r.decode_wall_s * 1000 / r.frames:.2f}"
            for r in results
        )
    )
    short = [r for r in results if r.decoded_frames != r.frames]
    for result in short:
        say(
            f"note: {result.codec} {result.height}p decoded {result.decoded_frames} "
            f"of {result.frames} frames"
        )


def _aiortc_version() -> str:
    from importlib.metadata import version

    return version("aiortc")


def report(results: list[CodecResult], duration_s: float) -> dict[str, Any]:
    return {
        "bench": "codecs",
        "results": [result.summary() for result in results],
        "cpu_count": os.cpu_count(),
        "duration_s": duration_s,
        "fps": FPS,
        "warmup_frames": WARMUP_FRAMES,
        "cpu_time": "process_time (user + sys) of this process, all threads",
        "aiortc": _aiortc_version(),
        "pyav": av.__version__,
        "python": platform.python_version(),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def run_codecs_bench(*, json_path: Path | None, duration_s: float = DEFAULT_DURATION_S) -> int:
    """`sfumesh bench codecs`: 0 when every row decoded every frame, 1 when not, 2 on bad
    arguments."""
    if not 0 < duration_s <= MAX_DURATION_S:
        say(f"sfumesh bench: --duration must be > 0 and <= {MAX_DURATION_S:g}", err=True)
        return 2
    frames = max(1, round(duration_s * FPS))
    results: list[CodecResult] = []
    try:
        for width, height in SIZES:
            pattern = MovingPattern(width, height)
            for codec in CODECS:
                results.append(measure(codec, pattern, frames))
    except KeyboardInterrupt:
        say("sfumesh bench: interrupted", err=True)
        return 130
    except av.FFmpegError as error:
        say(f"sfumesh bench: codec error: {error}", err=True)
        return 1
    print_table(results, duration_s)
    if json_path is not None and not write_report(json_path, report(results, duration_s)):
        return 1
    return 0 if all(r.decoded_frames == r.frames for r in results) else 1
