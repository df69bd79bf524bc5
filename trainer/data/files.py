"""Finding the training images and their captions on disk (folders, kohya `N_name` folders, webdataset shards,
Hugging Face imagefolders whose captions are a column of metadata.jsonl or metadata.csv).

`trainer check`, the training dataset and the window's dataset view all see the same list from `scan_dataset`.
"""

from __future__ import annotations

import csv
import json
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..job import DatasetFolder, DatasetSpec, JobError, MetadataFilter

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
MAX_SIDECAR_BYTES = 1_000_000  # a caption or metadata file bigger than this is not a caption
MAX_MEMBER_BYTES = 256_000_000  # a shard member bigger than this is refused, never read into memory
MAX_METADATA_BYTES = 256_000_000  # an imagefolder's metadata file: a line per image, so it may be large
METADATA_FILES = ("metadata.jsonl", "metadata.csv")  # what the datasets library's imagefolder reads
_KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclass
class ImageItem:
    path: Path  # the image file; for a shard sample `<shard.tar>/<member>` (a name, not a file)
    caption: str  # the first caption (what the window shows)
    caption_path: Path | None  # None: no caption, the folder's instance prompt stands in
    repeats: int
    folder: Path
    captions: list[str] = field(default_factory=list)  # every caption line; one is picked per epoch
    weight: float = 1.0
    archive: Path | None = None  # the .tar shard holding this sample
    span: tuple[int, int] | None = None  # (offset, size) of the image bytes inside the shard
    mask_mode: str = "none"  # the folder's dataset.folders.N.mask; trainer/data/masks.py finds the mask


@dataclass
class Subset:
    folder: Path
    repeats: int
    images: int = 0
    captions_found: int = 0
    weight: float = 1.0
    filtered_out: int = 0


@dataclass
class Scan:
    items: list[ImageItem] = field(default_factory=list)
    subsets: list[Subset] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why): images that will not be trained
    filter_reasons: Counter = field(default_factory=Counter)  # why metadata filters left samples out

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

    @property
    def filtered_out(self) -> int:
        return sum(self.filter_reasons.values())

    def require_images(self, spec: DatasetSpec) -> None:
        """The one line `check`, `run` and the window's Start give when there is nothing to train."""
        if self.num_images:
            return
        if not self.skipped and not self.filter_reasons:
            folders = ", ".join(f.path for f in spec.folders)
            raise JobError(f"dataset.folders: no images (png, jpg, jpeg, webp) found in {folders}")
        raise JobError(f"dataset: no usable images: {self.skipped_summary()}; `trainer check` lists them")

    def skipped_summary(self) -> str:
        parts = []
        if self.skipped:
            path, why = self.skipped[0]
            parts.append(f"{len(self.skipped)} files skipped (first: {path}: {why})")
        if self.filter_reasons:
            parts.append(f"{self.filtered_out} left out by filters")
        return ", ".join(parts) or "none found"

    def drop(self, bad: list[tuple[ImageItem, str]]) -> None:
        """Leave out images found unusable after the scan (by a probe or bucketing), keeping the counts right."""
        ids = {id(item) for item, _ in bad}
        self.items = [item for item in self.items if id(item) not in ids]
        for item, why in bad:
            self.skipped.append((str(item.path), why))
            for sub in self.subsets:
                if sub.folder == item.folder:
                    sub.images -= 1
                    sub.captions_found -= item.caption_path is not None


def scan_dataset(spec: DatasetSpec) -> Scan:
    """Every image in the job's folders (their `N_name` subfolders and .tar shards), with its captions."""
    if not spec.folders:
        raise JobError("dataset.folders: no dataset folder given")
    scan = Scan()
    for index, folder_spec in enumerate(spec.folders):
        root = Path(folder_spec.path).expanduser()
        if root.is_file() and root.suffix.lower() == ".tar":
            _scan_shard(scan, root, folder_spec.repeats or 1, folder_spec, spec)
            continue
        if not root.is_dir():
            raise JobError(f"dataset.folders.{index}.path: {root}: folder not found")
        table = imagefolder_captions(scan, root, folder_spec.caption_column)
        for folder, repeats in folder_repeats(folder_spec):
            _scan_folder(scan, folder, repeats, folder_spec, spec, table)
        if table.names:
            unused = sorted(set(table.names) - table.used)
            if unused:
                scan.warnings.append(f"{table.path}: {len(unused)} rows name images not found (first: {unused[0]})")
    return scan


@dataclass
class CaptionTable:
    """An imagefolder's captions: file_name (relative to the folder, '/'-separated) -> its captions, or why its
    row is unusable."""
    path: Path | None = None
    names: dict[str, list[str] | str] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)


def imagefolder_captions(scan: Scan, root: Path, column: str) -> CaptionTable:
    """The captions in root's metadata.jsonl or metadata.csv (the `column` of each row), if it has one.

    A row that cannot be read is listed as skipped with its line number; a row whose caption is unusable skips
    its image, as an unusable caption file does."""
    path = next((root / name for name in METADATA_FILES if (root / name).is_file()), None)
    table = CaptionTable(path)
    if path is None:
        return table
    try:
        if path.stat().st_size > MAX_METADATA_BYTES:
            raise ValueError(f"over {MAX_METADATA_BYTES // 1_000_000} MB")
        text = path.read_bytes().decode("utf-8-sig")
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        scan.skipped.append((str(path), f"metadata unreadable, its captions not used ({exc})"))
        return table
    rows = _jsonl_rows(text) if path.suffix == ".jsonl" else _csv_rows(text)
    for line, row in rows:
        where = f"{path.name} line {line}"
        if isinstance(row, str):
            scan.skipped.append((f"{path}:{line}", f"row skipped: {row}"))
            continue
        name = row.get("file_name")
        if not isinstance(name, str) or not name.strip():
            scan.skipped.append((f"{path}:{line}", "row skipped: no file_name"))
            continue
        caption = row.get(column)
        if isinstance(caption, str):
            table.names[Path(name).as_posix()] = [part.strip() for part in caption.splitlines() if part.strip()]
        elif isinstance(caption, list) and all(isinstance(c, str) for c in caption):
            table.names[Path(name).as_posix()] = [c.strip() for c in caption if c.strip()]
        else:
            why = f"no '{column}' column" if caption is None else f"'{column}' is not text"
            table.names[Path(name).as_posix()] = f"{where}: {why}"
    return table


def read_captions(path: Path) -> tuple[list[str], str]:
    """Every non-empty line of a caption file, and a warning ('' if none).

    UTF-8 is expected; Windows-1252 text is read with a warning; a file that is not text raises ValueError.
    """
    try:
        if path.stat().st_size > MAX_SIDECAR_BYTES:
            raise ValueError(f"{path}: caption file is over {MAX_SIDECAR_BYTES // 1000} kB; not a caption")
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: caption unreadable ({exc.strerror or exc})") from None
    return decode_captions(data, str(path))


def decode_captions(data: bytes, name: str) -> tuple[list[str], str]:
    warning = ""
    if b"\x00" in data:
        raise ValueError(f"{name}: caption is not text (binary data)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        try:
            text = data.decode("cp1252")
        except UnicodeDecodeError:
            raise ValueError(f"{name}: caption is neither UTF-8 nor Windows-1252 text") from None
        warning = f"{name}: caption is not UTF-8; read as Windows-1252 (save it as UTF-8 to silence this)"
    return [line.strip() for line in text.splitlines() if line.strip()], warning


def passes(metadata: dict, filters: list[MetadataFilter]) -> str:
    """'' if the metadata passes every filter, else why not (for the counts in `trainer check`)."""
    for flt in filters:
        found, value = _lookup(metadata, flt.key)
        if not found:
            return f"no '{flt.key}' in metadata"
        if not _compare(value, flt.op, flt.value):
            return f"{flt.key} {flt.op} {json.dumps(flt.value)} is false"
    return ""


def _lookup(metadata: dict, key: str) -> tuple[bool, object]:
    if key in metadata:
        return True, metadata[key]
    node: object = metadata
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _compare(left, op: str, right) -> bool:
    if op == "==":
        return left == right
    if op == "!=":
        return left != right
    if op in ("in", "not_in"):
        hit = not isinstance(left, (dict, list)) and left in right
        return hit if op == "in" else not hit
    if op == "contains":
        if isinstance(left, str):
            return isinstance(right, str) and right in left
        return isinstance(left, list) and right in left
    if not (_is_number(left) and _is_number(right)):
        return False  # an ordering on text or on a missing number never passes
    return {">": left > right, ">=": left >= right, "<": left < right, "<=": left <= right}[op]


def folder_repeats(folder_spec: DatasetFolder) -> list[tuple[Path, int]]:
    """How many times each part of a dataset folder trains per epoch: the folder itself and each `N_name`
    subfolder. An explicit repeats setting wins over N; with neither, 1. (The window's dataset table shows
    these; a folder that does not exist yet is just itself.)"""
    root, repeats = Path(folder_spec.path).expanduser(), folder_spec.repeats
    if root.is_file():  # a .tar shard
        return [(root, repeats or 1)]
    match = _KOHYA_FOLDER.match(root.name)
    own = repeats or (int(match.group(1)) if match else 1)
    out = [(root, own)]
    if not root.is_dir():
        return out
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        sub_match = _KOHYA_FOLDER.match(sub.name)
        if sub_match:
            out.append((sub, repeats or int(sub_match.group(1))))
    return out


def _scan_folder(scan: Scan, folder: Path, repeats: int, folder_spec: DatasetFolder, spec: DatasetSpec,
                 table: CaptionTable) -> None:
    subset = Subset(folder=folder, repeats=repeats, weight=folder_spec.weight)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    for path in files:
        suffix = path.suffix.lower()
        if suffix == ".tar":
            _scan_shard(scan, path, repeats, folder_spec, spec)
            continue
        if suffix not in IMAGE_EXTENSIONS:
            continue
        if folder_spec.filters:
            why = passes(_read_metadata(scan, path.with_suffix(".json")), folder_spec.filters)
            if why:
                scan.filter_reasons[why] += 1
                subset.filtered_out += 1
                continue
        caption_path: Path | None = path.with_suffix(folder_spec.caption_extension)
        lines: list[str] = []
        name = path.relative_to(table.path.parent).as_posix() if table.path else ""
        if name in table.names:
            table.used.add(name)
            found = table.names[name]
            if isinstance(found, str):
                scan.skipped.append((str(path), f"its caption is unusable: {found}"))
                continue
            caption_path, lines = table.path, found
        elif caption_path.is_file():
            try:
                lines, warning = read_captions(caption_path)
            except ValueError as exc:
                scan.skipped.append((str(path), f"its caption is unusable: {exc}"))
                continue
            if warning:
                scan.warnings.append(warning)
        else:
            caption_path = None
        _add(scan, subset, ImageItem(path, "", caption_path, repeats, folder, weight=folder_spec.weight,
                                     mask_mode=folder_spec.mask), lines, folder_spec, spec)
    if subset.images or subset.filtered_out:
        scan.subsets.append(subset)


def _scan_shard(scan: Scan, shard: Path, repeats: int, folder_spec: DatasetFolder, spec: DatasetSpec) -> None:
    """A webdataset shard: members grouped by stem (`0001.jpg` + `0001.txt` + `0001.json`); nothing extracted."""
    subset = Subset(folder=shard, repeats=repeats, weight=folder_spec.weight)
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                stem, dot, ext = member.name.rpartition(".")
                if dot:
                    groups.setdefault(stem, {})[f".{ext.lower()}"] = member
            texts = {stem: _member_text(scan, tar, shard, group, folder_spec) for stem, group in groups.items()}
    except (OSError, tarfile.TarError) as exc:
        scan.skipped.append((str(shard), f"unreadable .tar shard ({exc})"))
        return
    for stem, group in groups.items():
        image_ext = next((e for e in IMAGE_EXTENSIONS if e in group), None)
        if image_ext is None:
            continue
        member = group[image_ext]
        path = shard / member.name
        if member.size > MAX_MEMBER_BYTES:
            scan.skipped.append((str(path), f"refused: {member.size // 1_000_000} MB member is over the "
                                            f"{MAX_MEMBER_BYTES // 1_000_000} MB limit"))
            continue
        caption_text, metadata = texts[stem]
        if folder_spec.filters:
            why = passes(metadata, folder_spec.filters)
            if why:
                scan.filter_reasons[why] += 1
                subset.filtered_out += 1
                continue
        if isinstance(caption_text, ValueError):
            scan.skipped.append((str(path), f"its caption is unusable: {caption_text}"))
            continue
        has_caption = caption_text is not None
        caption_member = group.get(folder_spec.caption_extension.lower())
        item = ImageItem(path, "", shard / caption_member.name if has_caption else None,
                         repeats, shard, weight=folder_spec.weight, archive=shard,
                         span=(member.offset_data, member.size), mask_mode=folder_spec.mask)
        _add(scan, subset, item, caption_text or [], folder_spec, spec)
    if subset.images or subset.filtered_out:
        scan.subsets.append(subset)


def _member_text(scan: Scan, tar: tarfile.TarFile, shard: Path, group: dict, folder_spec: DatasetFolder):
    """(captions or None or a ValueError, metadata dict) of one shard sample."""
    captions = None
    member = group.get(folder_spec.caption_extension.lower())
    if member is not None:
        try:
            captions, warning = decode_captions(_read_member(tar, member), f"{shard}/{member.name}")
            if warning:
                scan.warnings.append(warning)
        except ValueError as exc:
            captions = exc
    metadata: dict = {}
    if folder_spec.filters and ".json" in group:
        metadata = _parse_metadata(scan, _safe_member(tar, group[".json"]), f"{shard}/{group['.json'].name}")
    return captions, metadata


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    if member.size > MAX_SIDECAR_BYTES:
        raise ValueError(f"{member.name}: over {MAX_SIDECAR_BYTES // 1000} kB; not a caption")
    handle = tar.extractfile(member)
    return handle.read() if handle is not None else b""


def _safe_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes | None:
    try:
        return _read_member(tar, member)
    except ValueError:
        return None


def _read_metadata(scan: Scan, path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = path.read_bytes() if path.stat().st_size <= MAX_SIDECAR_BYTES else None
    except OSError:
        data = None
    return _parse_metadata(scan, data, str(path))


def _parse_metadata(scan: Scan, data: bytes | None, name: str) -> dict:
    try:
        value = json.loads(data) if data is not None else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        value = None
    if not isinstance(value, dict):
        scan.warnings.append(f"{name}: metadata is not a JSON object; its image has no metadata")
        return {}
    return value


def _add(scan: Scan, subset: Subset, item: ImageItem, lines: list[str], folder_spec: DatasetFolder,
         spec: DatasetSpec) -> None:
    """Captions get the instance token replaced; with no caption (or an empty file) the instance prompt stands in."""
    token, prompt = spec.instance_token, folder_spec.instance_prompt
    captions = [line.replace(token, prompt) if token else line for line in lines] or [prompt]
    item.captions, item.caption = captions, captions[0]
    scan.items.append(item)
    subset.images += 1
    subset.captions_found += item.caption_path is not None


def _jsonl_rows(text: str) -> list[tuple[int, dict | str]]:
    rows: list[tuple[int, dict | str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            rows.append((number, "not valid JSON"))
            continue
        rows.append((number, row if isinstance(row, dict) else "not a JSON object"))
    return rows


def _csv_rows(text: str) -> list[tuple[int, dict | str]]:
    reader = csv.DictReader(text.splitlines())
    rows: list[tuple[int, dict | str]] = []
    try:
        for row in reader:
            if None in row or None in row.values():  # more or fewer fields than the header names
                rows.append((reader.line_num, "its field count differs from the header's"))
            else:
                rows.append((reader.line_num, row))
    except csv.Error as exc:
        rows.append((reader.line_num, f"not valid CSV ({exc})"))
    return rows
