"""Shared by the method, network and optimizer tests: a run resumed from its halfway checkpoint ends bit-for-bit
where the uninterrupted run ends."""

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from trainer.cli import main
from trainer.events import read_events


def losses(run: Path) -> dict[int, float]:
    events, _ = read_events(run / "events.jsonl")
    return {e["step"]: e["loss"] for e in events if e["type"] == "step"}


def assert_resume_is_exact(job: Path, settings: list[str], tmp_path: Path, steps: int = 4) -> Path:
    """Train `steps` steps with a checkpoint every steps/2; then, in another run folder, resume from a copy of
    that halfway checkpoint alone. The losses after it and the last checkpoint's tensors (weights, optimizer
    state) must be identical. Returns the uninterrupted run's folder."""
    half = steps // 2
    every = ["--set", f"schedule.max_steps={steps}", "--set", f"output.checkpoint_every={half}",
             "--set", "output.keep_last=5", *settings]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert main(["run", str(job), *every, "--set", f"output.output_dir={whole}"]) == 0
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(whole / "checkpoints" / f"step-{half}", resumed / "checkpoints" / f"step-{half}")
    assert main(["run", str(job), *every, "--set", f"output.output_dir={resumed}", "--resume"]) == 0

    assert sorted(losses(resumed)) == list(range(half + 1, steps + 1))
    assert all(losses(resumed)[s] == losses(whole)[s] for s in losses(resumed)), (losses(whole), losses(resumed))
    for name in ("weights.safetensors", "optimizer.safetensors"):
        a, b = (load_file(r / "checkpoints" / f"step-{steps}" / name) for r in (whole, resumed))
        assert a.keys() == b.keys() and a, name
        assert all(torch.equal(a[k], b[k]) for k in a), name
    return whole
