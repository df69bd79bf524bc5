"""The run this window started, recorded so that a window opened later (after this one was closed or killed)
can offer to follow it while its trainer still trains."""

from __future__ import annotations

import json
import os
from pathlib import Path

from trainer.events import read_events

from .settings import settings

KEY = "live_run"


def record(run_dir: Path, pid: int) -> None:
    s = settings()
    s.setValue(KEY, json.dumps({"dir": str(run_dir), "pid": pid}))
    s.sync()  # now, not when the window exits: a killed window never does


def clear() -> None:
    s = settings()
    s.remove(KEY)
    s.sync()


def still_running() -> tuple[Path, int] | None:
    """The recorded run folder and trainer pid while that process lives and the run has not finished."""
    try:
        entry = json.loads(str(settings().value(KEY, "") or "null"))
        run_dir, pid = Path(entry["dir"]), int(entry["pid"])
    except (ValueError, TypeError, KeyError):
        return None
    events = run_dir / "events.jsonl"
    finished = events.is_file() and any(e["type"] == "run_finished" for e in read_events(events)[0])
    if finished or not _alive(pid):
        clear()
        return None
    return run_dir, pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True
