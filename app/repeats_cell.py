"""The dataset table's repeats cell: how many times a folder trains per epoch, not the 0 that means "automatic".

The rule is the trainer's (trainer/data/files.py `folder_repeats`: the explicit repeats, else N from an `N_name`
folder, else 1); this only words it.
"""

from __future__ import annotations

from pydantic import ValidationError

from trainer.data.files import folder_repeats
from trainer.job import DatasetFolder

AUTO_TIP = "0 in the job: N from an 'N_name' folder name, else 1"


def repeats_shown(row: dict[str, str]) -> tuple[str, str] | None:
    """(cell text, tooltip) for a dataset-folder row given as its cells' texts; None (the value itself) when the
    row's path or repeats is not a value yet."""
    try:
        folder = DatasetFolder(path=row.get("path", "").strip(), repeats=int(row.get("repeats", "").strip() or "0"))
    except (ValueError, ValidationError):
        return None
    try:
        parts = folder_repeats(folder)
    except OSError:  # a folder that cannot be listed: its own name's rule still holds
        return None
    own = parts[0][1]
    subs = [f"{sub.name}: {n}" for sub, n in parts[1:]]
    text = "; ".join([str(own), *subs])
    where = "; ".join(["the folder itself " + str(own), *subs])
    how = f"set to {folder.repeats}" if folder.repeats else AUTO_TIP
    return text, f"Trains per epoch: {where} ({how})"
