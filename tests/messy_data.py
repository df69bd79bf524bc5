"""Builders for the data tests: good images, every kind of broken file, webdataset shards."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def noise_image(size=(96, 80), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def png_bomb(width=20000, height=20000) -> bytes:
    """A few hundred bytes whose header claims `width` x `height` pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def _bytes(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


# name -> None if it must be trained (handled), else a phrase of the reason it is skipped
BROKEN = {
    "truncated.jpg": "truncated JPEG",
    "truncated.png": "truncated PNG",
    "zero.jpg": "empty file",
    "text.png": "not an image",
    "bomb.png": "decompression-bomb",
    "tiny.png": "too small",
    "cmyk.jpg": None,
    "gray16.png": None,
    "palette.png": None,
    "rotated.jpg": None,
}


def write_broken(folder: Path) -> dict[str, str | None]:
    """Every broken-file case of the issue in `folder`, each with a caption; returns BROKEN."""
    folder.mkdir(parents=True, exist_ok=True)
    jpg = _bytes(noise_image(seed=1), "JPEG", quality=90)
    png = _bytes(noise_image(seed=2), "PNG")
    (folder / "truncated.jpg").write_bytes(jpg[: len(jpg) * 6 // 10])
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.png").write_text("this is a caption, saved with the wrong name\n")
    (folder / "bomb.png").write_bytes(png_bomb())
    noise_image((20, 20), seed=3).save(folder / "tiny.png")
    Image.new("CMYK", (100, 80), (0, 255, 255, 0)).save(folder / "cmyk.jpg")  # red
    Image.fromarray(np.full((80, 96), 32768, np.uint16)).save(folder / "gray16.png")  # mid grey, 16 bit
    pal = Image.new("P", (96, 80), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(1, (0, 0, 48, 80))  # left half blue, right half transparent
    pal.save(folder / "palette.png", transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 120x70, shown 70x120
    Image.new("RGB", (120, 70), (10, 200, 10)).save(folder / "rotated.jpg", exif=exif.tobytes())
    for name in BROKEN:
        (folder / name).with_suffix(".txt").write_text(f"photo {Path(name).stem}", encoding="utf-8")
    return BROKEN


def write_shard(path: Path, samples: list[dict]) -> Path:
    """A webdataset .tar: each sample {"stem", "image" (PIL), "caption"?, "json"?} as stem.jpg/.txt/.json."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for s in samples:
            members = {f"{s['stem']}.jpg": _bytes(s["image"], "JPEG", quality=90)}
            if "caption" in s:
                members[f"{s['stem']}.txt"] = s["caption"].encode("utf-8")
            if "json" in s:
                members[f"{s['stem']}.json"] = json.dumps(s["json"]).encode("utf-8")
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path
