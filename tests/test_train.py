"""The trainer end to end on the tiny demo model: events, outputs that load in diffusers, stop and resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_checks import assert_both_lora_files_change_the_image
from trainer.run import checkpoint
from trainer.cli import main
from trainer.events import TOKEN_ENV, EventListener, read_events

ROOT = Path(__file__).resolve().parent.parent


def _trainer(args: list[str], token: str | None = None, launcher: list[str] | None = None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if token:
        env[TOKEN_ENV] = token
    cmd = (launcher or [sys.executable]) + ["-m", "trainer", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _losses(run: Path) -> dict[int, float]:
    events, _ = read_events(run / "events.jsonl")
    return {e["step"]: e["loss"] for e in events if e["type"] == "step"}


def test_demo_trains_and_both_lora_files_load(demo_job):
    run = demo_job.parent / "run"
    listener = EventListener(token="s3cret")
    proc = _trainer(["run", str(demo_job), "--events", listener.address], token="s3cret")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    listener.close()

    events, _ = read_events(run / "events.jsonl")
    types = [e["type"] for e in events]
    assert types[0] == "run_started" and events[0]["total_steps"] == 8
    assert types.count("step") == 8 and types.count("checkpoint") == 1  # every 10 steps: only the final one
    assert types.count("sample") == 4  # 2 prompts at step 0 and at the end
    assert events[-1]["type"] == "run_finished" and events[-1]["status"] == "completed"
    assert [e["type"] for e in listener.events] == types, "the socket carries the same events as the file"
    assert all(np.isfinite(e["loss"]) for e in events if e["type"] == "step")

    resolved = json.loads((run / "job.json").read_text())
    assert resolved["provenance"]["packages"]["torch"] == torch.__version__.split("+")[0] or \
        resolved["provenance"]["packages"]["torch"].startswith(torch.__version__.split("+")[0])
    for sample in (e for e in events if e["type"] == "sample"):
        assert Path(sample["path"]).is_file()

    kohya = run / "final" / "demo_lora.safetensors"
    with safe_open(str(kohya), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert any(k.endswith(".lora_down.weight") for k in keys) and any(k.endswith(".lora_up.weight") for k in keys)
    alphas = [k for k in keys if k.endswith(".alpha")]
    assert len(alphas) == len(keys) // 3
    for key in ("ss_network_dim", "ss_network_alpha", "ss_base_model_version", "ss_resolution",
                "ss_num_train_images", "ss_training_started_at", "ss_tag_frequency", "sdtrainer_job"):
        assert key in meta, key
    assert meta["ss_network_dim"] == "4" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_resolution"] == "(64, 64)" and meta["ss_num_train_images"] == "12"
    assert json.loads(meta["sdtrainer_job"])["network"]["rank"] == 4

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(demo_job.parent / "model", safety_checker=None)
    assert_both_lora_files_change_the_image(pipe, run / "final", "demo_lora.safetensors")


def test_stop_then_resume_matches_an_uninterrupted_run(demo_job, tmp_path):
    uninterrupted = tmp_path / "whole"
    assert main(["run", str(demo_job), "--set", f"output.output_dir={uninterrupted}",
                 "--set", "validation.prompts=[]"]) == 0

    run = demo_job.parent / "run"
    listener = EventListener(token="tok")
    proc = _trainer(["run", str(demo_job), "--events", listener.address, "--set", "validation.prompts=[]"],
                    token="tok")
    assert listener.wait_for("step", timeout=120) is not None
    listener.send("stop")
    _, err = proc.communicate(timeout=120)
    listener.close()
    assert proc.returncode == 3, err[-2000:]
    events, _ = read_events(run / "events.jsonl")
    assert events[-1]["status"] == "stopped"
    stopped_at = [e for e in events if e["type"] == "checkpoint"][-1]["step"]
    assert stopped_at < 8 and not (run / "final").exists()

    assert main(["run", str(demo_job), "--resume", "--set", "validation.prompts=[]"]) == 0
    whole, resumed = _losses(uninterrupted), _losses(run)
    assert sorted(resumed) == list(range(1, 9))
    for step in range(stopped_at + 1, 9):
        assert resumed[step] == pytest.approx(whole[step], rel=1e-5), step
    a = load_file(uninterrupted / "final" / "pytorch_lora_weights.safetensors")
    b = load_file(run / "final" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_half_written_checkpoints_are_never_picked(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step-4").mkdir(parents=True)
    (root / "step-4" / checkpoint.STATE_FILE).write_text("{}")
    (root / "step-8").mkdir()  # renamed but state.json missing: incomplete
    (root / ".step-12.tmp").mkdir()
    assert checkpoint.latest(root) == root / "step-4"


def test_checkpoint_keeps_the_last_k(tmp_path):
    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([param], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    param.grad = torch.ones(3)
    opt.step()
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, {"p": param}, opt.state_dict(), sched, {"epoch": 0}, keep_last=2)
    assert [p.name for p in checkpoint.complete(tmp_path)] == ["step-2", "step-3"]
    fresh = torch.nn.Parameter(torch.zeros(3))
    opt2 = torch.optim.AdamW([fresh], lr=0.1)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0)
    state, weights, ema = checkpoint.load(tmp_path / "step-3", opt2, sched2)
    assert state["step"] == 3 and torch.equal(weights["p"], param.detach()) and ema is None
    torch.testing.assert_close(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_runs_unchanged_under_accelerate_launch(demo_job):
    accelerate = Path(sys.executable).with_name("accelerate")
    proc = _trainer(["run", str(demo_job), "--set", "schedule.max_steps=2", "--set", "validation.prompts=[]"],
                    launcher=[str(accelerate), "launch", "--num_processes", "1"])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    events, _ = read_events(demo_job.parent / "run" / "events.jsonl")
    assert events[-1]["type"] == "run_finished" and events[-1]["status"] == "completed"


def test_8bit_adam_state_round_trips_through_a_checkpoint(tmp_path):
    if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
        del sys.modules["bitsandbytes"]  # hidden by an in-process trainer run of an earlier test
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    param, other = torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(5000))
    opt = bnb.optim.AdamW8bit([param, other], lr=1e-3)  # nested quantisation state, a map shared by both
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for _ in range(2):
        param.grad, other.grad = torch.randn(5000), torch.randn(5000)
        opt.step()
    checkpoint.save(tmp_path, 2, {"p": param, "o": other}, opt.state_dict(), sched, {}, keep_last=1)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in (param, other)]
    opt2 = bnb.optim.AdamW8bit(copies, lr=1e-3)
    checkpoint.load(tmp_path / "step-2", opt2, torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0))
    for p, c in zip((param, other), copies):
        grad = torch.randn(5000)
        p.grad, c.grad = grad.clone(), grad.clone()
    opt.step()
    opt2.step()
    assert torch.equal(param, copies[0]) and torch.equal(other, copies[1])
