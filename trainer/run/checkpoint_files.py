"""Which checkpoints are complete and intact, judged from their files alone (no torch: `trainer check` uses it).

A checkpoint folder `step-N` holds its tensor files and `state.json`, written last: its presence marks a complete
checkpoint, and it records the size and SHA-256 of every other file, so a copy cut short or damaged later (a
failed download from a rented GPU) is found before anything is loaded from it.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

NAME = re.compile(r"^step-(\d+)$")
STATE_FILE = "state.json"  # written last: its presence marks a complete checkpoint


def manifest(folder: Path) -> dict[str, dict]:
    """Size and SHA-256 of every file in `folder` but state.json, for state.json's `files`."""
    return {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != STATE_FILE}


def complete(root: Path) -> list[Path]:
    """Complete checkpoints (their state.json written), oldest first; intact or not."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := NAME.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest(root: Path) -> Path | None:
    done = complete(root)
    return done[-1] if done else None


def damage(folder: Path, deep: bool = True) -> str | None:
    """Why the checkpoint in `folder` cannot be trusted, or None when every file has the size (and with `deep`,
    the hash) recorded when it was written. Checkpoints from before hashes were recorded are taken as they are."""
    try:
        files = json.loads((folder / STATE_FILE).read_text(encoding="utf-8")).get("files", {})
        records = [(name, int(r["size"]), str(r["sha256"])) for name, r in files.items()]
    except (OSError, ValueError, AttributeError, TypeError, KeyError) as exc:
        return f"{STATE_FILE} is unreadable ({type(exc).__name__})"
    for name, size, digest in records:
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size:,} bytes, {size:,} when written"
        if deep and _sha256(path) != digest:
            return f"{name} differs from what was written (SHA-256 mismatch)"
    return None


def newest_good(root: Path, deep: bool = True) -> tuple[Path | None, list[str]]:
    """The newest intact checkpoint, and one line for each damaged newer one passed over."""
    passed = []
    for path in reversed(complete(root)):
        why = damage(path, deep)
        if why is None:
            return path, passed
        passed.append(f"checkpoint {path} is damaged: {why}")
    return None, passed


def rotate(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` intact checkpoints. Only intact ones count, and nothing newer than the oldest
    of those is deleted, so a damaged checkpoint never pushes out the good ones it would be resumed from."""
    intact = [p for p in complete(root) if damage(p, deep=False) is None]  # sizes only: cheap on every save
    if len(intact) < keep_last:
        return
    oldest_kept = _step(intact[-keep_last])
    for path in complete(root):
        if _step(path) < oldest_kept:
            shutil.rmtree(path, ignore_errors=True)


def resume_lines(root: Path) -> list[str]:
    """`trainer check --resume`: which checkpoint a resume would use, and why."""
    found, passed = newest_good(root)
    lines = [f"resume: {line}; passed over" for line in passed]
    if found is None:
        lines.append(f"resume: no intact checkpoint in {root}: the run would start from step 0")
    else:
        lines.append(f"resume: from {found} (step {_step(found)}; every file's size and SHA-256 match)")
    return lines


def _step(path: Path) -> int:
    return int(NAME.match(path.name).group(1))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
