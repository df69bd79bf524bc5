"""`python -m trainer remote`: what the terminal sees when the machine cannot be reached. The whole round trip
(start, pause, stop, resume, follow, fetch, against this machine's own sshd) runs these same commands from the
window in tests/test_app_remote.py, which also compares its losses with a local run's; the helpers here serve
both."""

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


def test_an_unreachable_machine_is_one_line(tmp_path, demo_job, capsys):
    local = tmp_path / "local"
    code = main(["remote", "start", str(demo_job), "--host", "127.0.0.1", "--port", "1", "--local", str(local),
                 "--ssh-option", "ConnectTimeout=5"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: upload failed (exit 255): ") and "port 1" in err[-1]
    assert main(["remote", "stop", str(tmp_path)]) == 2  # no remote.json: not a remote run's folder
