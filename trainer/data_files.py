"""Finding the training images and their captions on disk, without torch.

`trainer check`, the training dataset and the window's dataset view all see the same list from `scan_dataset`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .job import DatasetSpec, JobError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
_KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclass
class ImageItem:
    path: Path
    caption: str
    caption_path: Path | None  # None: no caption file, the folder's instance prompt stands in
    repeats: int
    folder: Path


@dataclass
class Subset:
    folder: Path
    repeats: int
    images: int = 0
    captions_found: int = 0


@dataclass
class Scan:
    items: list[ImageItem] = field(default_factory=list)
    subsets: list[Subset] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return len(self.items)

    @property
    def captions_found(self) -> int:
        return sum(1 for i in self.items if i.caption_path is not None)

    @property
    def captions_missing(self) -> int:
        return self.num_images - self.captions_found

    @property
    def num_samples(self) -> int:
        """Images seen per epoch, repeats included."""
        return sum(i.repeats for i in self.items)


def scan_dataset(spec: DatasetSpec) -> Scan:
    """Every image in the job's folders (and their kohya-style `N_name` subfolders), with its caption."""
    if not spec.folders:
        raise JobError("dataset.folders: no dataset folder given")
    scan = Scan()
    for index, folder_spec in enumerate(spec.folders):
        root = Path(folder_spec.path).expanduser()
        if not root.is_dir():
            raise JobError(f"dataset.folders.{index}.path: {root}: folder not found")
        for folder, repeats in _subset_folders(root, folder_spec.repeats):
            _scan_folder(scan, folder, repeats, folder_spec.caption_extension, folder_spec.instance_prompt)
    return scan


def read_caption(path: Path) -> str:
    """The caption text: first non-empty line, whitespace trimmed. Non-UTF-8 text is an error naming the file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: caption is not UTF-8 text") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else ""


def _subset_folders(root: Path, repeats: int) -> list[tuple[Path, int]]:
    """The folder itself and each `N_name` subfolder. An explicit repeats setting wins over N."""
    match = _KOHYA_FOLDER.match(root.name)
    own = repeats or (int(match.group(1)) if match else 1)
    out = [(root, own)]
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        sub_match = _KOHYA_FOLDER.match(sub.name)
        if sub_match:
            out.append((sub, repeats or int(sub_match.group(1))))
    return out


def _scan_folder(scan: Scan, folder: Path, repeats: int, caption_ext: str, instance_prompt: str) -> None:
    subset = Subset(folder=folder, repeats=repeats)
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS):
        caption_path: Path | None = path.with_suffix(caption_ext)
        caption = instance_prompt
        if caption_path.is_file():
            try:
                caption = read_caption(caption_path) or instance_prompt
            except (ValueError, OSError) as exc:
                scan.warnings.append(str(exc) if isinstance(exc, ValueError) else f"{caption_path}: {exc}")
                caption_path = None
        else:
            caption_path = None
        scan.items.append(ImageItem(path, caption, caption_path, repeats, folder))
        subset.images += 1
        subset.captions_found += caption_path is not None
    if subset.images:
        scan.subsets.append(subset)
