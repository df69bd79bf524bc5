"""Where the window keeps its own state: QSettings (geometry, last preset, last form) and per-user folders."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QSettings, QStandardPaths

ORGANIZATION = "sdtrainer"
APPLICATION = "SD LoRA Trainer"
REPO_ROOT = Path(__file__).resolve().parent.parent
RESOURCES = REPO_ROOT / "resources"


def settings() -> QSettings:
    return QSettings(ORGANIZATION, APPLICATION)


def data_dir() -> Path:
    path = Path(QStandardPaths.writableLocation(QStandardPaths.StandardLocation.AppLocalDataLocation))
    path.mkdir(parents=True, exist_ok=True)
    return path


def user_presets_dir() -> Path:
    path = data_dir() / "presets"
    path.mkdir(parents=True, exist_ok=True)
    return path


def logs_dir() -> Path:
    # The trainer's stderr goes here, not into the run folder: the trainer refuses a run folder that holds
    # anything but job.json (unless resuming), and the log must outlive the window.
    path = data_dir() / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def autosave_path() -> Path:
    # Beside the window's other per-user state, not in a run or preset folder: it belongs to no job file.
    return data_dir() / "autosave-job.json"


def queue_dir() -> Path:
    # The queue's list and its own copies of the queued job files: editing the job in the window later must not
    # change a job already queued.
    path = data_dir() / "queue"
    path.mkdir(parents=True, exist_ok=True)
    return path
