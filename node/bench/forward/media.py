"""Pre-encoded media for `sfumesh bench forward`: VP8 video and Opus audio, encoded once.

The publisher never encodes while the bench runs: a loop of `seconds` of video (a moving
test pattern, `node.bench.codecs.MovingPattern`) is encoded once with aiortc's own
`Vp8Encoder` (libvpx through PyAV, target bitrate `bitrate`) and packetized by it into RTP
payloads per frame; the audio is a gliding tone encoded with aiortc's `OpusEncoder`, one
payload per 20 ms. The result is cached under `.data/bench-media/` in a file named after the
parameters, so later runs load it in milliseconds.

Only the loop's first frame is a keyframe (`frame.pict_type = NONE` for every frame, else
PyAV marks each frame as a keyframe). A publisher answers a keyframe request (PLI) by
restarting the loop at that first frame, so the stream it sends always stays decodable.

RTP timestamps are not stored: the publisher numbers frames itself with `video_ts_step`,
3000 ticks (at 30 fps) plus a deterministic pseudo-random step within +/-30 ticks. The
irregular steps let a subscriber's frames be matched to the publisher's by their
timestamp differences alone, whatever constant offset an SFU adds (see `node.bench.forward.
run.estimate_offset`).
"""

from __future__ import annotations

import array
import fractions
import json
import math
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Final

import av
from aiortc.codecs.opus import OpusEncoder
from aiortc.codecs.vpx import Vp8Encoder, vp8_depayload

from node.bench.codecs import MovingPattern

FORMAT_VERSION: Final = 1
MAGIC: Final = b"SFUMESH-BENCH-MEDIA\n"
VIDEO_CLOCK: Final = 90_000
AUDIO_CLOCK: Final = 48_000
AUDIO_PTIME_S: Final = 0.020
AUDIO_SAMPLES: Final = int(AUDIO_CLOCK * AUDIO_PTIME_S)
AUDIO_TS_STEP: Final = AUDIO_SAMPLES
#: maximum deviation (ticks) of a video frame's timestamp step from 90000 / fps
TS_JITTER: Final = 30

_U8 = struct.Struct("!B")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


@dataclass(frozen=True)
class MediaParams:
    """What is encoded. Every field is part of the cache file's name."""

    width: int = 640
    height: int = 360
    fps: int = 30
    bitrate: int = 1_500_000
    seconds: float = 24.0

    def __post_init__(self) -> None:
        if self.width < 16 or self.height < 16 or self.width % 2 or self.height % 2:
            raise ValueError("video size must be even and at least 16x16")
        if not 1 <= self.fps <= 120 or not 100_000 <= self.bitrate <= 1_500_000:
            raise ValueError("fps must be 1..120 and bitrate 100k..1.5M (aiortc's maximum)")
        if not 1 <= self.seconds <= 600:
            raise ValueError("the loop must last 1..600 s")

    @property
    def frames(self) -> int:
        return max(1, round(self.seconds * self.fps))

    @property
    def audio_packets(self) -> int:
        return max(1, round(self.seconds / AUDIO_PTIME_S))

    def key(self) -> str:
        return (
            f"vp8-{self.width}x{self.height}-{self.fps}fps-{self.bitrate // 1000}k-"
            f"{self.seconds:g}s-opus-v{FORMAT_VERSION}"
        )


@dataclass
class PreEncoded:
    """RTP payloads, ready to send: per video frame a list, per audio packet one."""

    params: MediaParams
    video: list[list[bytes]]
    keyframes: list[bool]
    audio: list[bytes]

    @property
    def video_bitrate(self) -> float:
        """Payload bits per second of the video loop."""
        total = sum(len(p) for frame in self.video for p in frame)
        return total * 8 / (len(self.video) / self.params.fps)

    @property
    def video_packets_per_s(self) -> float:
        return sum(len(frame) for frame in self.video) / (len(self.video) / self.params.fps)


def video_ts_step(counter: int, fps: int = 30) -> int:
    """The timestamp step before the publisher's `counter`-th video frame: 90000 / fps
    plus a deterministic pseudo-random deviation within +/-TS_JITTER ticks."""
    mixed = (counter * 0x9E3779B1 + 0x7F4A7C15) & 0xFFFFFFFF
    mixed ^= mixed >> 15
    mixed = (mixed * 0x2C1B3C6D) & 0xFFFFFFFF
    mixed ^= mixed >> 12
    return VIDEO_CLOCK // fps + mixed % (2 * TS_JITTER + 1) - TS_JITTER


def is_vp8_keyframe(payload: bytes) -> bool:
    """True when `payload` starts a VP8 keyframe (RFC 6386 9.1: bit 0 of the tag is 0)."""
    data = vp8_depayload(payload)
    return bool(data) and not data[0] & 1


def encode_video(params: MediaParams) -> tuple[list[list[bytes]], list[bool]]:
    pattern = MovingPattern(params.width, params.height)
    encoder = Vp8Encoder()
    encoder.target_bitrate = params.bitrate
    time_base = fractions.Fraction(1, params.fps)
    frames: list[list[bytes]] = []
    keyframes: list[bool] = []
    for index in range(params.frames):
        frame = pattern.frame(index)
        frame.pts = index
        frame.time_base = time_base
        # Without this PyAV asks libvpx for a keyframe every time.
        frame.pict_type = av.video.frame.PictureType.NONE
        payloads, _ = encoder.encode(frame)
        if not payloads:
            raise RuntimeError(f"the VP8 encoder returned nothing for frame {index}")
        frames.append(payloads)
        keyframes.append(is_vp8_keyframe(payloads[0]))
    if not keyframes[0]:
        raise RuntimeError("the first encoded frame is not a keyframe")
    return frames, keyframes


def _tone(index: int) -> bytes:
    """20 ms of a stereo s16 tone gliding between 300 and 700 Hz (no two packets alike)."""
    samples = array.array("h")
    start = index * AUDIO_SAMPLES
    for n in range(start, start + AUDIO_SAMPLES):
        t = n / AUDIO_CLOCK
        # phase of a sine whose frequency glides as 500 + 200 sin(2 pi 0.25 t)
        phase = (
            2 * math.pi * (500 * t - 200 / (2 * math.pi * 0.25) * math.cos(2 * math.pi * 0.25 * t))
        )
        value = int(8000 * math.sin(phase))
        samples.append(value)
        samples.append(value)
    return samples.tobytes()


def encode_audio(params: MediaParams, bitrate: int | None = None) -> list[bytes]:
    """The tone as Opus packets, at aiortc's 96 kbit/s unless `bitrate` says otherwise (a
    browser sends speech at ~32 kbit/s: what a weak link must carry besides the video)."""
    encoder = OpusEncoder()
    if bitrate is not None:
        encoder.codec.bit_rate = bitrate  # (the codec opens at its first frame)
    payloads: list[bytes] = []
    index = 0
    # The encoder buffers a little at the start: feed until enough packets came out.
    while len(payloads) < params.audio_packets:
        frame = av.AudioFrame(format="s16", layout="stereo", samples=AUDIO_SAMPLES)
        frame.sample_rate = AUDIO_CLOCK
        frame.pts = index * AUDIO_SAMPLES
        frame.time_base = fractions.Fraction(1, AUDIO_CLOCK)
        frame.planes[0].update(_tone(index))
        out, _ = encoder.encode(frame)
        payloads.extend(out)
        index += 1
        if index > params.audio_packets + 50:
            raise RuntimeError("the Opus encoder returned too few packets")
    return payloads[: params.audio_packets]


def encode(params: MediaParams) -> PreEncoded:
    video, keyframes = encode_video(params)
    return PreEncoded(params, video, keyframes, encode_audio(params))


# --------------------------------------------------------------------------- cache file


def _write_blob(out: BinaryIO, data: bytes) -> None:
    out.write(_U32.pack(len(data)))
    out.write(data)


def _read_exact(source: BinaryIO, size: int) -> bytes:
    data = source.read(size)
    if len(data) != size:
        raise ValueError("truncated media file")
    return data


def _read_blob(source: BinaryIO) -> bytes:
    (size,) = _U32.unpack(_read_exact(source, _U32.size))
    return _read_exact(source, size)


def save(media: PreEncoded, path: Path) -> None:
    """Write `media` to `path` atomically (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    header = {
        "version": FORMAT_VERSION,
        "params": asdict(media.params),
        "frames": len(media.video),
        "audio": len(media.audio),
    }
    try:
        with temporary.open("wb") as out:
            out.write(MAGIC)
            _write_blob(out, json.dumps(header).encode())
            for payloads, keyframe in zip(media.video, media.keyframes, strict=True):
                out.write(_U8.pack(1 if keyframe else 0))
                out.write(_U16.pack(len(payloads)))
                for payload in payloads:
                    _write_blob(out, payload)
            for payload in media.audio:
                _write_blob(out, payload)
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)


def load(path: Path) -> PreEncoded:
    """Read a file written by `save`. ValueError when it is not one (or truncated)."""
    with path.open("rb") as source:
        if source.read(len(MAGIC)) != MAGIC:
            raise ValueError(f"{path} is not a bench media file")
        header = json.loads(_read_blob(source))
        if header.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: format version {header.get('version')}")
        params = MediaParams(**header["params"])
        video: list[list[bytes]] = []
        keyframes: list[bool] = []
        for _ in range(int(header["frames"])):
            (flag,) = _U8.unpack(_read_exact(source, _U8.size))
            (count,) = _U16.unpack(_read_exact(source, _U16.size))
            keyframes.append(bool(flag))
            video.append([_read_blob(source) for _ in range(count)])
        audio = [_read_blob(source) for _ in range(int(header["audio"]))]
    return PreEncoded(params, video, keyframes, audio)


def default_cache_dir() -> Path:
    """`.data/bench-media` in the project checkout (or the working directory)."""
    root = Path(__file__).resolve().parents[2]
    base = root if (root / "pyproject.toml").exists() else Path.cwd()
    return base / ".data" / "bench-media"


def cache_path(params: MediaParams, cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / f"{params.key()}.bin"


def load_or_encode(params: MediaParams, cache_dir: Path | None = None) -> tuple[PreEncoded, Path]:
    """The media for `params` and its cache file: loaded, or encoded and saved first."""
    path = cache_path(params, cache_dir)
    if path.exists():
        try:
            media = load(path)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable: encode again and replace it
        else:
            if media.params == params:
                return media, path
    media = encode(params)
    save(media, path)
    return media, path
