"""Training on a "remote" machine from the terminal, for real: this machine's own sshd (tests/sshd.py) on a free
port, the system's ssh and rsync. The demo is started there, paused, stopped, resumed, followed to the end and
downloaded, and its loss curve equals a local run's."""

import subprocess
import sys
import time

import pytest
from sshd import sshd  # noqa: F401 - the fixture

from trainer import remote
from trainer.cli import main
from trainer.events import read_events
from trainer.job import load_job, save_job


def short_demo(job_path, steps=4):
    job = load_job(job_path)
    job.schedule.max_steps = steps
    job.validation.prompts = ["a shape"]
    job.validation.steps = 2
    job.validation.at_start = False
    job.output.checkpoint_every = 0
    save_job(job, job_path)
    return job_path


def losses(events_path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_events(events_path)[0] if e["type"] == "step"}


def wait_for(run, kind: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        remote.fetch(run)
        path = run.local / "events.jsonl"
        if path.is_file() and any(e["type"] == kind for e in read_events(path)[0]):
            return
        time.sleep(0.5)
    raise AssertionError(f"no {kind} event in {timeout} s; the log there: "
                         + subprocess.run(remote.log_command(run), capture_output=True, text=True).stdout)


@pytest.mark.slow  # three trainer starts (there, resumed there, here): about 40 s on an idle two-core machine
def test_a_demo_trains_there_paused_stopped_resumed_and_downloaded(sshd, demo_job, tmp_path, capsys):
    job = short_demo(demo_job)
    local = tmp_path / "local"
    args = ["remote", "start", str(job), "--host", sshd.host, "--user", sshd.user, "--port", str(sshd.port),
            "--key", sshd.key, "--folder", sshd.folder, "--python", sys.executable, "--local", str(local),
            "--name", "demo", "--no-follow"]
    args += [a for opt in sshd.options[2:][1::2] for a in ("--ssh-option", opt)]
    assert main(args) == 0
    # the trainer there is still importing torch when this lands: it pauses after its first step
    assert main(["remote", "pause", str(local)]) == 0
    run = remote.RemoteRun.load(local)
    wait_for(run, "paused")
    assert main(["remote", "stop", str(local)]) == 0
    assert main(["remote", "follow", str(local)]) == 3  # stopped, with a checkpoint there
    assert max(losses(local / "events.jsonl")) == 1
    assert main(["remote", "resume", str(local)]) == 0
    assert (local / "final").is_dir() and any((local / "samples").iterdir())
    assert not (local / "checkpoints").exists()  # they stay there unless fetched with --checkpoints
    assert main(["remote", "fetch", str(local), "--checkpoints"]) == 0
    assert (local / "checkpoints").is_dir()

    # the same bundle, here, in one go
    assert main(["bundle", str(job), str(tmp_path / "here"), "--with-data", "--with-model"]) == 0
    assert main(["run", str(tmp_path / "here" / "job.json")]) == 0
    assert losses(local / "events.jsonl") == losses(tmp_path / "here" / "output" / "events.jsonl")
    assert list(losses(local / "events.jsonl")) == [1, 2, 3, 4]


def test_an_unreachable_machine_is_one_line(tmp_path, demo_job, capsys):
    local = tmp_path / "local"
    code = main(["remote", "start", str(demo_job), "--host", "127.0.0.1", "--port", "1", "--local", str(local),
                 "--ssh-option", "ConnectTimeout=5"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: upload failed (exit 255): ") and "port 1" in err[-1]
    assert main(["remote", "stop", str(tmp_path)]) == 2  # no remote.json: not a remote run's folder
