"""`python -m trainer queue JOB...`: train several jobs one after another, headless, and say how each went.

Every job file is checked up front (the same checks as `trainer check`, plus two jobs writing to one output
folder), so a typo in the fifth file stops the queue before hours of training rather than after. Each job then
runs as its own `python -m trainer run` child: a failed job's state (GPU memory held by a crashed step, frozen
objects, global torch flags) dies with its process and cannot leak into the next job. A failed job is marked
and the queue goes on; the summary table at the end names its reason.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .events import read_events
from .job import JobError, load_job

REPO_ROOT = Path(__file__).resolve().parent.parent
# `trainer run`'s exit codes (cli.py) as the queue reports them.
STATUS = {0: "completed", 1: "failed", 2: "failed", 3: "stopped"}


@dataclass
class Entry:
    path: Path
    output_dir: Path
    status: str = "not run"
    steps: int | None = None
    loss: float | None = None
    seconds: float = 0.0
    reason: str = ""


def check_all(paths: list[str], overrides: list[str]) -> list[Entry]:
    """Every job valid with its data and model present, each with its own output folder; else JobError naming
    the file."""
    from .families.model_files import require_weights
    from .plan import make_plan

    entries: list[Entry] = []
    seen: dict[Path, Path] = {}
    for name in paths:
        try:
            job = load_job(name, overrides)
            plan = make_plan(job)
            require_weights(job.model)
        except JobError as exc:
            raise JobError(f"{name}: {exc}") from None
        if plan.output_dir in seen:
            raise JobError(f"{name}: output.output_dir: {plan.output_dir} is also the output folder of "
                           f"{seen[plan.output_dir]}; give each job its own")
        seen[plan.output_dir] = Path(name)
        entries.append(Entry(Path(name), plan.output_dir))
    return entries


def run_all(entries: list[Entry], overrides: list[str], log: str | None = None) -> list[Entry]:
    """Runs the entries in order, each in a child process; a Ctrl-C stops the running job and the queue."""
    sets = [arg for value in overrides for arg in ("--set", value)]
    for number, entry in enumerate(entries, 1):
        print(f"queue: job {number}/{len(entries)}: {entry.path}", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "trainer", "run", str(entry.path), *sets] + (["--log", log] if log else [])
        start = time.monotonic()
        child = subprocess.Popen(cmd, cwd=REPO_ROOT)
        try:
            code = child.wait()
        except KeyboardInterrupt:  # the child got the same SIGINT and stops at its next step, saving
            code = child.wait()
            code = 3 if code not in STATUS else code
        entry.seconds = time.monotonic() - start
        entry.status = STATUS.get(code, "failed")
        _read_outcome(entry, code)
        if entry.status == "stopped":
            break
    return entries


def _read_outcome(entry: Entry, code: int) -> None:
    events, _ = read_events(entry.output_dir / "events.jsonl") if (entry.output_dir / "events.jsonl").is_file() \
        else ([], 0)
    steps = [e for e in events if e["type"] == "step"]
    if steps:
        entry.steps, entry.loss = steps[-1]["step"], steps[-1]["loss"]
    errors = [e["message"] for e in events if e["type"] == "error"]
    if entry.status == "failed":
        # A child that failed before its reporter started (exit 2: the data vanished after the check) wrote no
        # events; its own line on the terminal above says why.
        entry.reason = errors[-1] if errors else f"exit code {code}; see its output above"


def table(entries: list[Entry]) -> str:
    rows = [("job", "status", "steps", "final loss", "output folder", "time")]
    for e in entries:
        loss = "-" if e.loss is None else f"{e.loss:.4f}"
        steps = "-" if e.steps is None else str(e.steps)
        rows.append((str(e.path), e.status, steps, loss, str(e.output_dir), _duration(e.seconds)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines += [f"{e.path}: {e.reason}" for e in entries if e.reason]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
