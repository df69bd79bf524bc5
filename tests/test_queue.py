"""`python -m trainer queue`: jobs run one after another in child processes, a failed job is marked and the queue goes
on, the summary table names each, and an invalid file stops the queue before anything trains."""

import json
import shutil

import pytest

from trainer import job_queue
from trainer.cli import main
from trainer.job import load_job, save_job

QUICK = ["--set", "schedule.max_steps=2", "--set", "validation.prompts=[]", "--set", "output.checkpoint_every=0"]


def _variant(demo_job, name: str, **fields):
    job = load_job(demo_job)
    job.output.output_dir = str(demo_job.parent / name)
    for key, value in fields.items():
        section, attr = key.split(".")
        setattr(getattr(job, section), attr, value)
    path = demo_job.parent / f"{name}.json"
    save_job(job, path)
    return path


@pytest.mark.slow  # two real demo trainings, each in its own process
def test_queue_runs_each_job_marks_the_failed_one_and_goes_on(demo_job, monkeypatch, capsys):
    first = _variant(demo_job, "a")
    vanishing = demo_job.parent / "vanishing"
    shutil.copytree(demo_job.parent / "dataset", vanishing)
    broken = _variant(demo_job, "b")
    job = load_job(broken)
    job.dataset.folders[0].path = str(vanishing)
    save_job(job, broken)
    third = _variant(demo_job, "c", **{"network.rank": 16, "network.alpha": 16})

    checked = job_queue.check_all

    def check_then_lose_the_data(paths, overrides):
        entries = checked(paths, overrides)
        shutil.rmtree(vanishing)  # after the up-front check: only the child of the second job finds it gone
        return entries

    monkeypatch.setattr(job_queue, "check_all", check_then_lose_the_data)
    assert main(["queue", str(first), str(broken), str(third), *QUICK]) == 1

    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.split() and line.split()[0] in (str(first), str(broken), str(third))}
    assert rows[str(first)][1:3] == ["completed", "2"]
    assert rows[str(broken)][1] == "failed"
    assert rows[str(third)][1:3] == ["completed", "2"]
    assert f"{broken}: " in out  # the failed job's reason under the table
    saved = json.loads((demo_job.parent / "c" / "job.json").read_text())
    assert saved["network"]["rank"] == 16
    assert json.loads((demo_job.parent / "a" / "job.json").read_text())["network"]["rank"] != 16
    assert list((demo_job.parent / "c").joinpath("final").glob("*.safetensors"))


def test_an_invalid_job_file_stops_the_queue_before_anything_runs(demo_job, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**json.loads(demo_job.read_text()), "network": {"rank": "many"}}))
    monkeypatch.setattr(job_queue, "run_all", lambda *a: pytest.fail("a job ran"))
    assert main(["queue", str(demo_job), str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "network.rank" in err


def test_two_jobs_writing_to_one_folder_are_refused_up_front(demo_job, capsys, monkeypatch):
    monkeypatch.setattr(job_queue, "run_all", lambda *a: pytest.fail("a job ran"))
    twin = demo_job.parent / "twin.json"
    shutil.copy(demo_job, twin)
    assert main(["queue", str(demo_job), str(twin)]) == 2
    err = capsys.readouterr().err
    assert str(twin) in err and "output.output_dir" in err
