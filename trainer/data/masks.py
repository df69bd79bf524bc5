"""Which mask belongs to which image, and reading it: the one rule the trainer, `check` and the window share.

dataset.folders.N.mask picks the source for a folder's images:
  none    no masks: every pixel trains.
  folder  a same-stem image in a `masks` folder beside the images: masks/foo.png for foo.jpg (any of the image
          extensions; .png first). White trains, black does not, grey trains partly. Not read from .tar shards.
  alpha   the image's own alpha channel: opaque trains, transparent does not.
An image whose mask is missing (no file, or no alpha channel) trains everywhere; `check` counts both.
No torch here (the window imports it); Pillow is imported only when a mask is read.
"""

from __future__ import annotations

from pathlib import Path

from .files import IMAGE_EXTENSIONS, ImageItem

MASKS_FOLDER = "masks"
MODES = ("none", "folder", "alpha")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def mask_file(image: Path) -> Path | None:
    """The mask file of an image in a folder: <folder>/masks/<stem>.<ext>, or None."""
    folder = image.parent / MASKS_FOLDER
    for ext in (".png", *(e for e in IMAGE_EXTENSIONS if e != ".png")):
        for candidate in (folder / f"{image.stem}{ext}", folder / f"{image.stem}{ext.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def mask_source(item: ImageItem) -> Path | str | None:
    """Where the item's mask comes from: the mask file's path, 'alpha', or None (no mask: train everywhere)."""
    if item.mask_mode == "folder":
        return None if item.archive is not None else mask_file(item.path)
    if item.mask_mode == "alpha":
        return "alpha" if _has_alpha(item) else None
    return None


def count(items: list[ImageItem]) -> tuple[int, int]:
    """(with a mask, without) among the images of folders that use masks; (0, 0) when none does."""
    masked = [item for item in items if item.mask_mode != "none"]
    found = sum(1 for item in masked if mask_source(item) is not None)
    return found, len(masked) - found


def load(item: ImageItem):
    """The mask as a Pillow 'L' image (255 trains, 0 does not) at its own size, EXIF rotation applied, or None.
    A mask file of another size than its image is stretched onto it by the caller (it covers the same view)."""
    from PIL import Image, ImageOps

    from . import images

    source = mask_source(item)
    if source is None:
        return None
    if source == "alpha":
        handle = images._open(item)
        try:
            img = Image.open(handle)
            img.load()
            img = ImageOps.exif_transpose(img)
            return img.convert("RGBA").getchannel("A")
        except (OSError, ValueError, SyntaxError) as exc:
            raise images.BadImage(f"cannot decode its alpha channel ({exc})") from None
        finally:
            handle.close()
    try:
        with Image.open(source) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode in _ALPHA_MODES or "transparency" in img.info:  # white painted on transparent
                rgba = img.convert("RGBA")
                img = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
            return img.convert("L")
    except (OSError, ValueError, SyntaxError) as exc:
        raise images.BadImage(f"its mask {source} cannot be read ({exc})") from None


def _has_alpha(item: ImageItem) -> bool:
    """From the header only."""
    from PIL import Image

    try:
        if item.archive is not None:
            from . import images

            handle = images._open(item)
        else:
            handle = open(item.path, "rb")
        try:
            with Image.open(handle) as img:
                return img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info)
        finally:
            handle.close()
    except Exception:  # noqa: BLE001 - an unreadable image is reported by the image checks, not here
        return False
