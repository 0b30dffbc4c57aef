"""Camera-like video for `bench geo`: a moving scene encoded live, with its capture time
painted into every frame so that the receiver can read it back after decoding
(glass-to-glass latency; every lab host shares the machine's clock).

The scene is a textured panorama panning sideways, a bright box bouncing across it and a
little per-frame "sensor" noise (low bits flipped from a small bank), so VP8 has real motion
and detail to spend its bitrate on, like a webcam, at a few ms of numpy per frame.

The stamp: 48 bits (a 32-bit millisecond counter, the wall clock modulo 2**32, and a 16-bit
check, CRC-32 of those 4 bytes cut to 16 bits) as two rows of 24 black/white blocks at the
top of the luma plane, each block width/26 pixels square (24 px at 640x360). A block is
read as the mean of its central quarter against mid-grey: compression blurs the edges, not
the centres. A frame whose check does not match is counted as misread and not used.
"""

from __future__ import annotations

import time
import zlib
from fractions import Fraction
from typing import Final

import numpy as np
import numpy.typing as npt
from aiortc import VideoStreamTrack
from av import VideoFrame

STAMP_BITS: Final = 48
STAMP_COLUMNS: Final = 24
STAMP_ROWS: Final = STAMP_BITS // STAMP_COLUMNS
#: the stamp's block is width // BLOCK_DIVISOR pixels square
BLOCK_DIVISOR: Final = 26
BLACK: Final = 16
WHITE: Final = 235
NOISE_BANK: Final = 8

Luma = npt.NDArray[np.uint8]


def now_ms() -> int:
    """The wall clock in ms modulo 2**32 (what the stamp carries)."""
    return time.time_ns() // 1_000_000 & 0xFFFFFFFF


def _check(counter: int) -> int:
    return zlib.crc32(counter.to_bytes(4, "big")) & 0xFFFF


def _layout(width: int) -> tuple[int, int, int]:
    """Block size and the stamp's top-left corner (x, y)."""
    block = max(4, width // BLOCK_DIVISOR)
    return block, (width - STAMP_COLUMNS * block) // 2, block // 2


def paint_stamp(luma: Luma, counter: int) -> None:
    """Paint `counter` (ms, 32 bits) and its check into the luma plane, in place."""
    _height, width = luma.shape
    block, x0, y0 = _layout(width)
    value = (counter & 0xFFFFFFFF) << 16 | _check(counter & 0xFFFFFFFF)
    for bit in range(STAMP_BITS):
        row, column = divmod(bit, STAMP_COLUMNS)
        on = value >> (STAMP_BITS - 1 - bit) & 1
        y, x = y0 + row * block, x0 + column * block
        luma[y : y + block, x : x + block] = WHITE if on else BLACK


def read_stamp(luma: Luma) -> int | None:
    """The counter painted into a decoded frame's luma plane; None if the check fails."""
    height, width = luma.shape
    block, x0, y0 = _layout(width)
    if y0 + STAMP_ROWS * block > height:
        return None
    quarter = block // 4
    value = 0
    for bit in range(STAMP_BITS):
        row, column = divmod(bit, STAMP_COLUMNS)
        y, x = y0 + row * block + quarter, x0 + column * block + quarter
        centre = luma[y : y + 2 * quarter, x : x + 2 * quarter]
        value = value << 1 | int(centre.mean() > (BLACK + WHITE) / 2)
    counter, check = value >> 16, value & 0xFFFF
    return counter if _check(counter) == check else None


def frame_luma(frame: VideoFrame) -> Luma:
    """A decoded frame's luma plane as a (height, width) array (a view of its buffer)."""
    plane = frame.planes[0]
    rows: Luma = np.frombuffer(memoryview(plane), np.uint8).reshape(frame.height, plane.line_size)
    return rows[:, : frame.width]


def age_ms(counter: int, at_ms: int | None = None) -> int:
    """How long ago (ms) `counter` was painted, modulo the counter's wrap."""
    return ((now_ms() if at_ms is None else at_ms) - counter) & 0xFFFFFFFF


class CameraTrack(VideoStreamTrack):
    """A moving scene, `width`x`height` at 30 fps, the capture time painted in each frame.
    `painted` keeps every frame's counter (what a subscriber may read back)."""

    def __init__(self, width: int = 640, height: int = 360, seed: int = 1) -> None:
        super().__init__()
        if width % 4 or height % 4 or width < 160 or height < 96:
            raise ValueError("the video size must be at least 160x96, each a multiple of 4")
        self.width, self.height = width, height
        rng = np.random.default_rng(seed)
        # a panorama twice as wide as the frame: smooth blobs plus fine texture
        coarse = rng.integers(30, 220, size=(height // 16 + 2, width // 8 + 2), dtype=np.uint8)
        blobs = np.kron(coarse, np.ones((16, 16), dtype=np.uint8))[:height, : 2 * width]
        fine = rng.integers(0, 24, size=(height, 2 * width), dtype=np.uint8)
        self._panorama: Luma = (blobs // 2 + fine + 40).astype(np.uint8)
        self._chroma_u: Luma = np.kron(
            rng.integers(90, 170, size=(height // 32 + 1, width // 16 + 2), dtype=np.uint8),
            np.ones((16, 16), dtype=np.uint8),
        )[: height // 2, :width]
        self._chroma_v: Luma = self._chroma_u[::-1].copy()
        self._noise = [
            rng.integers(0, 4, size=(height, width), dtype=np.uint8) for _ in range(NOISE_BANK)
        ]
        self.frames = 0
        self.painted: list[int] = []

    async def recv(self) -> VideoFrame:
        pts, time_base = await self.next_timestamp()
        index = self.frames
        self.frames += 1
        width, height = self.width, self.height
        offset = (index * 4) % width
        luma = self._panorama[:, offset : offset + width] ^ self._noise[index % NOISE_BANK]
        # a bright box bouncing across the scene
        box = height // 4
        span_x, span_y = width - box, height - box
        x = abs((index * 7) % (2 * span_x) - span_x)
        y = abs((index * 5) % (2 * span_y) - span_y)
        luma[y : y + box, x : x + box] = 200 + index % 40
        counter = now_ms()
        paint_stamp(luma, counter)
        self.painted.append(counter)
        half = width // 2
        u_offset = offset // 2
        u = np.roll(self._chroma_u, -u_offset, axis=1)[:, :half]
        v = np.roll(self._chroma_v, u_offset, axis=1)[:, :half]
        planes = np.concatenate([luma.ravel(), u.ravel(), v.ravel()])
        frame = VideoFrame.from_ndarray(planes.reshape(height * 3 // 2, width), format="yuv420p")
        frame.pts = pts
        frame.time_base = time_base if isinstance(time_base, Fraction) else Fraction(time_base)
        return frame
