"""Photos (issue 15): decide by content whether an upload is an image, and make what is served.

Pillow alone reads the bytes, and only as the formats a room keeps (JPEG, PNG, WebP, GIF):
never by name or the client's content type. Everything served is re-encoded by Pillow with
the EXIF orientation applied and *no* metadata passed on (location, camera serial, time
zone...); the uploaded bytes are served only for photos uploaded while their room's creator
opted in (`Room.keep_original_exif`, if the operator's `files.keep_original_exif_allowed`).
Pixel counts are checked from the header, before anything is decoded: a decompression bomb
is refused for its size, not after it filled memory; a truncated image fails its full
decode and is refused too.

These functions are blocking (decoding a 12-megapixel JPEG takes a CPU for a while): the
caller runs them in a worker thread, a few at a time.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from PIL import Image, ImageOps, ImageSequence, UnidentifiedImageError

#: Pillow format -> the content type it is served as
FORMATS: dict[str, str] = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "GIF": "image/gif",
}
_EXIF_IFD = 0x8769
_DATETIME_ORIGINAL = 36867
_DATETIME = 306
#: all frames of an animation together, in multiples of the one-image pixel limit
_ANIMATION_PIXEL_FACTOR = 4


class ImageRefused(Exception):
    """The bytes claim to be an image the node cannot safely take; `code` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Rendered:
    """What an image upload becomes: its facts and the encoded variants to keep."""

    content_type: str
    width: int
    height: int
    taken_at: datetime | None
    #: variant name -> (encoded bytes, content type)
    variants: dict[str, tuple[bytes, str]]


def _taken_at(image: Image.Image) -> datetime | None:
    exif = image.getexif()
    raw = exif.get_ifd(_EXIF_IFD).get(_DATETIME_ORIGINAL) or exif.get(_DATETIME)
    if not isinstance(raw, str):
        return None
    try:
        # EXIF keeps local time without a zone: taken as UTC, it still orders one camera's day.
        return datetime.strptime(raw.strip("\x00 "), "%Y:%m:%d %H:%M:%S").replace(tzinfo=UTC)
    except ValueError:
        return None


def _open(path: Path, max_pixels: int) -> Image.Image:
    """The image at `path`, header read only; ImageRefused for a bomb, None-like errors up."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    with warnings.catch_warnings():
        # Pillow only warns between the limit and twice it; here the limit is the limit.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(path, formats=list(FORMATS))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise ImageRefused("image_too_large", f"more than {max_pixels} pixels") from error
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageRefused("image_too_large", f"more than {max_pixels} pixels")
    frames = getattr(image, "n_frames", 1)
    if frames * width * height > max_pixels * _ANIMATION_PIXEL_FACTOR:
        image.close()
        raise ImageRefused("image_too_large", "too many pixels over all its frames")
    return image


def is_image(path: Path, max_pixels: int) -> bool:
    """Whether Pillow recognises the file as one of the kept formats (header only);
    ImageRefused for one that is too large to decode."""
    try:
        image = _open(path, max_pixels)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False
    image.close()
    return True


def _encode(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    if fmt == "JPEG":
        if image.mode not in ("RGB", "L", "CMYK"):
            image = image.convert("RGB")
        image.save(out, "JPEG", quality=88, optimize=False, progressive=True)
    elif fmt == "WEBP":
        if image.mode not in ("RGB", "RGBA"):
            image = image.convert("RGBA")
        image.save(out, "WEBP", quality=85)
    else:
        image.save(out, fmt)
    return out.getvalue()


def _resized(image: Image.Image, box: int) -> tuple[bytes, str]:
    copy = image.copy()
    copy.thumbnail((box, box), Image.Resampling.LANCZOS, reducing_gap=3.0)
    alpha = copy.mode in ("RGBA", "LA", "PA") or (copy.mode == "P" and "transparency" in copy.info)
    # JPEG where there is no transparency (smaller); WebP keeps it.
    if alpha:
        return _encode(copy, "WEBP"), "image/webp"
    return _encode(copy, "JPEG"), "image/jpeg"


def render(path: Path, max_pixels: int, thumb_px: int, display_px: int) -> Rendered:
    """Decode the image at `path` fully and make its variants: `original` (full size,
    oriented, without metadata), `display` and `thumb`. ImageRefused if it cannot be."""
    try:
        with _open(path, max_pixels) as image:
            fmt = image.format or ""
            animated = getattr(image, "n_frames", 1) > 1
            image.load()  # a truncated file fails here (LOAD_TRUNCATED_IMAGES stays off)
            taken_at = _taken_at(image)
            oriented = ImageOps.exif_transpose(image)
            if animated and fmt == "GIF":
                # Kept animated: every frame re-encoded, no comment or extension passed on.
                out = io.BytesIO()
                frames = [frame.convert("RGBA") for frame in ImageSequence.Iterator(image)]
                frames[0].save(
                    out,
                    "GIF",
                    save_all=True,
                    append_images=frames[1:],
                    loop=image.info.get("loop", 0),
                    duration=image.info.get("duration", 100),
                )
                original = out.getvalue()
            else:
                original = _encode(oriented, fmt)
            variants = {
                "original": (original, FORMATS[fmt]),
                "display": _resized(oriented, display_px),
                "thumb": _resized(oriented, thumb_px),
            }
            width, height = oriented.size
    except ImageRefused:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageRefused("bad_image", f"the image cannot be decoded: {error}") from error
    except Image.DecompressionBombError as error:
        raise ImageRefused("image_too_large", str(error)) from error
    return Rendered(FORMATS[fmt], width, height, taken_at, variants)
