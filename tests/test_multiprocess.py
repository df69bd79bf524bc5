"""Data-parallel on this CPU: the demo trained by 2 processes (gloo) under the shipped accelerate configs, against
one process with the doubled batch; resuming with 2 processes; and what `check` says about several processes."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.cli import main
from trainer.events import make_event, read_events
from trainer.job import load_job, save_job

ROOT = Path(__file__).resolve().parent.parent
STEPS = 4
# Both runs train the same samples at every step (each rank takes its half of the batch the single process
# takes), but each process draws its own noise and timesteps, so the curves agree in level, not in every digit.
# Measured on the demo: the two curves differ by 0.002-0.003 at each of these 4 steps (the loss is about 1.1).
LOSS_TOLERANCE = 0.02


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo without validation images (time), checkpointing every 2 steps: batch 2 per process."""
    from trainer.demo import build_demo

    root = tmp_path_factory.mktemp("multiprocess") / "demo"
    build_demo(root, steps=STEPS)
    job = load_job(root / "job.json")
    job.validation.prompts = []
    job.output.checkpoint_every = 2
    job.output.output_dir = str(root / "run2")
    save_job(job, root / "job.json")
    return root


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "SDTRAINER_PROCESS_TIMEOUT": "120"}


def _launch(config: str, job: Path, *args: str, launch=()) -> subprocess.Popen:
    """`accelerate launch` with one of the shipped configs."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "presets" / "accelerate" / config), *launch, "-m", "trainer", "run", str(job), *args]
    return subprocess.Popen(cmd, cwd=job.parent, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _finished(*procs: subprocess.Popen) -> None:
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(demo):
    """(2-process run folder, 1-process run folder with batch 4, 2-process resumed folder). Each shipped config
    that runs on a CPU trains once: multi_gpu.yaml (2 processes over gloo), one_gpu.yaml (the comparison) and
    multi_machine.yaml (the resume, as two one-process "machines" on this one)."""
    job = demo / "job.json"
    one = demo / "run1"
    _finished(_launch("multi_gpu.yaml", job, launch=("--main_process_port", "0")))
    _finished(_launch("one_gpu.yaml", job, "--set", f"output.output_dir={one}", "--set", "schedule.batch_size=4"))
    resumed = demo / "resumed"
    shutil.copytree(demo / "run2", resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step-{STEPS}")
    shutil.rmtree(resumed / "final")
    machines = ("--num_machines", "2", "--num_processes", "2", "--main_process_ip", "127.0.0.1",
                "--main_process_port", str(_free_port()))
    _finished(*[_launch("multi_machine.yaml", job, "--resume", "--set", f"output.output_dir={resumed}",
                        launch=(*machines, "--machine_rank", str(rank))) for rank in (0, 1)])
    return demo / "run2", one, resumed


def _steps(events: list[dict]) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in events if e["type"] == "step"}


def _trained_samples(events: list[dict], rank: int) -> set[int]:
    """The samples `rank` trained in epoch 0, from its debug line."""
    prefix = f"epoch 0 from batch 0: rank {rank} trains samples "
    lines = [e["message"] for e in events if e["type"] == "log" and e["message"].startswith(prefix)]
    assert len(lines) == 1, lines
    return {int(i) for i in lines[0][len(prefix):].split()}


@pytest.mark.slow
def test_two_processes_write_one_clean_run_that_matches_one_process_with_twice_the_batch(runs):
    two, one, _ = runs
    events, _ = read_events(two / "events.jsonl")
    kinds = [e["type"] for e in events]
    assert kinds.count("run_started") == 1 and kinds.count("run_finished") == 1
    assert events[-1]["status"] == "completed"
    assert sorted(_steps(events)) == list(range(1, STEPS + 1))
    assert sorted(p.name for p in two.iterdir()) == ["checkpoints", "events.jsonl", "final", "job.json", "logs", "tensorboard"]
    assert [p.name for p in (two / "logs").iterdir()] == ["rank-1.log"]
    assert json.loads((two / "job.json").read_text())["schedule"]["batch_size"] == 2  # the job as given

    rank1, _ = read_events(two / "logs" / "rank-1.log")
    assert not [e for e in rank1 if e["type"] in ("run_started", "step", "checkpoint", "run_finished")]
    mine, theirs = _trained_samples(events, 0), _trained_samples(rank1, 1)
    assert not mine & theirs, "each rank trains its own share of the epoch"
    assert mine | theirs == set(range(12)), "together they see every sample of the demo's 12"

    single, _ = read_events(one / "events.jsonl")
    a, b = _steps(events), _steps(single)
    assert sorted(a) == sorted(b)
    assert all(abs(a[s] - b[s]) < LOSS_TOLERANCE for s in a), (a, b)
    assert a != b, "the logged loss is the mean over both ranks' batches, not rank 0's alone"


@pytest.mark.slow
def test_the_lora_of_two_processes_loads(runs):
    from diffusers import StableDiffusionPipeline

    from tests.lora_checks import assert_both_lora_files_change_the_image

    two, _, _ = runs
    pipe = StableDiffusionPipeline.from_pretrained(load_job(two / "job.json").model.path, safety_checker=None)
    assert_both_lora_files_change_the_image(pipe, two / "final", "demo_lora.safetensors")


@pytest.mark.slow
def test_resuming_with_two_processes_continues_exactly(runs):
    two, _, resumed = runs
    events, _ = read_events(resumed / "events.jsonl")
    starts = [i for i, e in enumerate(events) if e["type"] == "run_started"]
    assert len(starts) == 2 and events[starts[1]]["start_step"] == 2
    continued = _steps(events[starts[1]:])
    original = _steps(read_events(two / "events.jsonl")[0])
    assert sorted(continued) == [3, 4]
    assert all(continued[s] == pytest.approx(original[s], abs=1e-6) for s in continued), (continued, original)


def test_check_prints_the_processes_and_the_global_batch(demo, capsys, monkeypatch):
    job = str(demo / "job.json")
    assert main(["check", job, "--no-estimate", "--processes", "4", "--set", "schedule.gradient_accumulation=3",
                 "--set", f"output.output_dir={demo / 'unused'}"]) == 0
    out = capsys.readouterr().out
    assert "processes: 4\n" in out
    assert "global batch: 24 (batch_size 2 x 4 processes x gradient_accumulation 3)" in out
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun: the launcher's count is the default
    assert main(["check", job, "--no-estimate", "--set", f"output.output_dir={demo / 'unused'}"]) == 0
    assert "global batch: 4 (batch_size 2 x 2 processes" in capsys.readouterr().out
    assert main(["check", job, "--no-estimate", "--processes", "0"]) == 2


def test_rank_zero_names_the_rank_that_failed(tmp_path, monkeypatch):
    from trainer.events import encode
    from trainer.run import ranks

    monkeypatch.setenv("WORLD_SIZE", "3")
    for index, when, message in ((1, 50.0, "old failure of an earlier attempt"), (2, 120.0, "CUDA out of memory"),
                                 (1, 130.0, "Connection closed by peer")):
        path = ranks.log_path(tmp_path, index)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as f:
            f.write(encode({**make_event("error", message=message, traceback=""), "time": when}))
    line = ranks.blame(tmp_path, since=100.0)
    assert line == f"rank 2 failed: CUDA out of memory (its log: {ranks.log_path(tmp_path, 2)})"
    assert ranks.blame(tmp_path, since=200.0) is None


def test_processes_that_plan_differently_all_stop_with_one_line(demo, tmp_path):
    """Machines that see different jobs or files (here: rank 1 is given other max_steps) must not train: every
    process exits 2, rank 0 says which rank differs, and the run folder holds only the job."""
    out = tmp_path / "run"
    machines = ("--num_machines", "2", "--num_processes", "2", "--main_process_ip", "127.0.0.1",
                "--main_process_port", str(_free_port()))
    procs = [_launch("multi_machine.yaml", demo / "job.json", "--set", f"output.output_dir={out}",
                     *(("--set", "schedule.max_steps=6") if rank else ()),
                     launch=(*machines, "--machine_rank", str(rank))) for rank in (0, 1)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [1, 1], outputs  # accelerate launch: a worker's 2 is its 1
    assert "error: dataset: rank 1 worked out a different plan from rank 0's" in outputs[0]
    assert "error:" not in outputs[1], "one line, from rank 0"
    assert [p.name for p in out.iterdir()] == ["job.json"]
