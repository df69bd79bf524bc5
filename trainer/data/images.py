"""Opening images safely: a quick header probe for `trainer check`, and the full decode for training.

Every broken file (empty, not an image, truncated, a decompression bomb, unreadable) is a `BadImage` naming why.
"""

from __future__ import annotations

import io
import math
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .files import ImageItem

MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS  # ~179 MP, Pillow's own hard limit: larger is refused as a bomb
TAIL_BYTES = 4096
_ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


class BadImage(Exception):
    """An image that cannot be trained on; the message says why (the caller names the file)."""


def probe(item: ImageItem) -> tuple[int, int]:
    """(width, height) as trained (EXIF rotation applied), from the header and the file's last bytes only."""
    handle = _open(item)
    try:
        size = _length(item, handle)
        if size == 0:
            raise BadImage("empty file (0 bytes)")
        img = _pil_open(handle)
        width, height, fmt, orientation = *img.size, img.format, _orientation(img)
        _check_pixels(width, height)
        _check_complete(fmt, handle, size)
    finally:
        handle.close()
    return (height, width) if orientation in _ROTATED else (width, height)


def load(item: ImageItem, cover: tuple[int, int] | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """(8-bit RGB image, its full (width, height)): EXIF rotation applied, 16-bit scaled down, transparency on
    white. With `cover` (a bucket), a large JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale that still
    covers it (JPEG draft mode: several times faster on camera photos); the size returned stays the full one."""
    handle = _open(item)
    try:
        if _length(item, handle) == 0:
            raise BadImage("empty file (0 bytes)")
        img = _pil_open(handle)  # the handle is ours and closed below; Pillow does not own it
        _check_pixels(*img.size)
        rotated = _orientation(img) in _ROTATED
        full = (img.height, img.width) if rotated else img.size
        try:
            if cover is not None and img.format == "JPEG":
                scale = max(cover[0] / full[0], cover[1] / full[1])
                need = (img.width * scale, img.height * scale)
                img.draft("RGB", (math.ceil(need[0]), math.ceil(need[1])))
            img.load()
            img = ImageOps.exif_transpose(img)
        except (OSError, ValueError, SyntaxError) as exc:
            raise BadImage(f"cannot decode ({_first_line(exc)})") from None
        return to_rgb(img), full
    finally:
        handle.close()


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparent pixels become white (a checkerboard or black would be learned)."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        array = np.asarray(img).astype(np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or array.max() > 255 else 255.0
        img = Image.fromarray((array * (255.0 / top)).clip(0, 255).round().astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray((np.asarray(img).clip(0, 1) * 255).round().astype(np.uint8), "L")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def _open(item: ImageItem):
    """A binary file object for the image's bytes: the file, or a window onto its span inside a shard (so a
    probe reads only the header and the tail, never the whole member)."""
    try:
        if item.archive is None:
            return open(item.path, "rb")
        shard = open(item.archive, "rb")
        offset, size = item.span
        if os.fstat(shard.fileno()).st_size < offset + size:
            shard.close()
            raise BadImage("shard member is cut short")
        return io.BufferedReader(_Span(shard, offset, size))
    except OSError as exc:
        raise BadImage(f"unreadable ({exc.strerror or exc})") from None


def _length(item: ImageItem, handle) -> int:
    if item.archive is not None:
        return item.span[1]
    return os.fstat(handle.fileno()).st_size


class _Span(io.RawIOBase):
    """Bytes [offset, offset + size) of an open file, as a seekable file of their own."""

    def __init__(self, f, offset: int, size: int):
        self.f, self.offset, self.size, self.pos = f, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = max(0, {0: pos, 1: self.pos + pos, 2: self.size + pos}[whence])
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self.size - self.pos))
        self.f.seek(self.offset + self.pos)
        data = self.f.read(n)
        buffer[:len(data)] = data
        self.pos += len(data)
        return len(data)

    def close(self) -> None:
        self.f.close()
        super().close()


def _pil_open(handle) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(handle)
    except Image.DecompressionBombError:
        raise BadImage(f"refused: over {MAX_PIXELS // 1_000_000} megapixels (decompression-bomb guard)") from None
    except UnidentifiedImageError:
        raise BadImage(f"not an image ({_sniff(handle)})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise BadImage(f"cannot read the image header ({_first_line(exc)})") from None


def _check_pixels(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise BadImage(f"refused: {width}x{height} is over {MAX_PIXELS // 1_000_000} megapixels "
                       "(decompression-bomb guard)")
    if width < 1 or height < 1:
        raise BadImage(f"empty image ({width}x{height})")


def _orientation(img: Image.Image) -> int:
    raw = img.info.get("exif")
    if not raw:
        return 1
    try:
        exif = Image.Exif()
        exif.load(raw)
        return int(exif.get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a malformed EXIF block only means "no rotation"
        return 1


def _check_complete(fmt: str | None, handle, size: int) -> None:
    """Truncation caught without decoding: JPEG ends with EOI, PNG with IEND, WebP's RIFF size fits the file."""
    handle.seek(max(0, size - TAIL_BYTES))
    tail = handle.read(TAIL_BYTES)
    if fmt == "JPEG" and b"\xff\xd9" not in tail:
        raise BadImage("truncated JPEG (no end-of-image marker)")
    if fmt == "PNG" and b"IEND" not in tail:
        raise BadImage("truncated PNG (no IEND chunk)")
    if fmt == "WEBP":
        handle.seek(4)
        riff = int.from_bytes(handle.read(4), "little")
        if riff + 8 > size:
            raise BadImage("truncated WebP (file shorter than its RIFF header says)")


def _sniff(handle) -> str:
    handle.seek(0)
    head = handle.read(512)
    try:
        head.decode("utf-8")
        return "it is a text file"
    except UnicodeDecodeError:
        return "unknown format"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
