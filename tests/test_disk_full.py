"""Disk space: a run that clearly does not fit is refused before it writes anything (exit 2); a disk that fills
mid-run stops it with one line naming the file and the space, the previous checkpoint intact (exit 1)."""

import errno
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.run import checkpoint, disk
from trainer.run.checkpoint_files import damage
from trainer.cli import main
from trainer.events import read_events

FAST = ["--set", "validation.prompts=[]", "--set", "output.checkpoint_every=2"]


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """A 600 KB filesystem: a real tmpfs where mounting is allowed (root), else the free space reported as 600 KB."""
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)],
                             capture_output=True).returncode == 0 if shutil.which("mount") else False
    if not mounted:
        usage = shutil.disk_usage(tmp_path)
        monkeypatch.setattr(disk.shutil, "disk_usage", lambda p: usage._replace(free=600 * 1024))
    yield mount
    if mounted:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_run_that_cannot_fit_is_refused_before_writing(demo_job, small_disk, capsys):
    out = small_disk / "run"
    assert main(["run", str(demo_job), *FAST, "--set", f"output.output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: output.output_dir: {out} has 0.6 MB free; the run writes "
                                               "about"), err
    assert "checkpoints" in err[0] and not out.exists()
    assert main(["check", str(demo_job), *FAST, "--set", f"output.output_dir={out}"]) == 0
    assert "disk: the run writes about" in capsys.readouterr().out


def test_a_disk_that_fills_mid_run_stops_cleanly(demo_job, monkeypatch, capsys):
    real, written = checkpoint.save_file, []

    def save_file(tensors, path):
        if written and Path(path).parent.name != written[0]:  # the second checkpoint meets a full disk
            Path(path).write_bytes(b"\0" * 100)  # a part of it got out
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        written.append(Path(path).parent.name)
        real(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    assert main(["run", str(demo_job), *FAST, "--set", "schedule.max_steps=6"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    ckpts = demo_job.parent / "run" / "checkpoints"
    assert len(errors) == 1 and errors[0].startswith(
        f"error: disk full writing {ckpts / '.step-4.tmp' / 'weights.safetensors'}: it needs about 0."), err[-600:]
    assert "--resume" in errors[0] and "previous checkpoint is intact" in errors[0]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-2"]  # nothing half-written left
    assert damage(ckpts / "step-2") is None
    events, _ = read_events(demo_job.parent / "run" / "events.jsonl")
    error = [e for e in events if e["type"] == "error"][-1]
    assert error["message"] == errors[0].removeprefix("error: ")
    assert "RunFailed: disk full writing" in error["traceback"]  # the traceback goes to the event, not the terminal
    assert events[-1]["status"] == "failed"


def test_a_full_disk_under_events_jsonl_does_not_stop_the_reporter(tmp_path, capsys):
    from trainer.events import Reporter, read_events

    reporter = Reporter(tmp_path / "events.jsonl", stream=sys.stderr)
    reporter.log("before")
    real = reporter._file

    class Full:
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        flush = close = lambda self: None

    reporter._file = Full()
    reporter.log("while full")
    reporter.log("still full")
    reporter._file = real
    reporter.log("after")
    reporter.close()
    said = [line for line in capsys.readouterr().err.splitlines() if "cannot write" in line]
    assert said == [f"cannot write {tmp_path / 'events.jsonl'} (No space left on device); events go to the window "
                    "and the terminal only until it can"]  # once, not per event
    assert [e["message"] for e in read_events(tmp_path / "events.jsonl")[0]] == ["before", "after"]
