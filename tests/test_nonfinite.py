"""A loss or gradient that turns NaN: found at its step, then the run stops (or skips, by the job's policy) with one
line, the last good checkpoint intact, and NaN never reaching the event writer as a crash."""

import json
import math
from types import SimpleNamespace

import torch

from trainer import train
from trainer.cli import main
from trainer.events import encode, make_event, read_events
from trainer.job import AdamWOptions
from trainer.methods.trainable import Group
from trainer.run import checkpoint
from trainer.run.checkpoint_files import damage
from trainer.run.nonfinite import Guard, find

FAST = ["--set", "validation.prompts=[]", "--set", "output.checkpoint_every=2"]


def _nan_loss_at(monkeypatch, bad_calls: set[int]) -> None:
    """The real loss, times NaN on the given calls (one call per step in the demo): backward carries it into
    the gradients as a real divergence would."""
    real, calls = train._loss, [0]

    def loss(*args, **kwargs):
        calls[0] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls[0] in bad_calls else value

    monkeypatch.setattr(train, "_loss", loss)


def test_nan_loss_stops_at_its_step_and_keeps_the_last_checkpoint(demo_job, monkeypatch, capsys):
    _nan_loss_at(monkeypatch, set(range(5, 100)))
    assert main(["run", str(demo_job), *FAST]) == 1
    run = demo_job.parent / "run"
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: step 5: the loss not finite"), err[-800:]
    events, _ = read_events(run / "events.jsonl")
    error = [e for e in events if e["type"] == "error"][-1]
    assert error["message"].startswith("step 5: the loss not finite (NaN or inf)")
    assert "step-4" in error["message"] and "--resume --set optimizer.learning_rate=" in error["message"]
    assert events[-1] == {**events[-1], "type": "run_finished", "status": "failed"}
    assert max(e["step"] for e in events if e["type"] == "step") == 4  # the NaN step never reached the weights
    kept = checkpoint.latest(run / "checkpoints")
    assert kept.name == "step-4" and damage(kept) is None
    assert all(torch.isfinite(t).all() for t in checkpoint.load_weights(kept)[0].values())


def test_skip_policy_skips_warns_and_stops_after_n_in_a_row(demo_job, monkeypatch):
    _nan_loss_at(monkeypatch, {3, 6, 7})
    code = main(["run", str(demo_job), *FAST, "--set", "optimizer.on_nonfinite=skip",
                 "--set", "optimizer.max_skipped_steps=2"])
    assert code == 1
    events, _ = read_events(demo_job.parent / "run" / "events.jsonl")
    steps = {e["step"]: e for e in events if e["type"] == "step"}
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]  # step 7 was the second NaN in a row: stop before it counts
    assert steps[3]["loss"] is None and steps[3]["nonfinite"] == ["loss", "grad_norm"]  # NaN in, NaN gradients
    assert steps[6]["loss"] is None and all(math.isfinite(steps[s]["loss"]) for s in (1, 2, 4, 5))
    warnings = [e["message"] for e in events if e["type"] == "log" and e["level"] == "warning"]
    assert any(m.startswith("step 3: the loss not finite") and "step skipped" in m for m in warnings)
    error = [e for e in events if e["type"] == "error"][-1]["message"]
    assert error.startswith("step 7: the loss not finite (NaN or inf) (2 steps in a row)")
    # Skipped steps left the weights finite: the checkpoint at step 6 holds no NaN.
    weights, _ = checkpoint.load_weights(demo_job.parent / "run" / "checkpoints" / "step-6")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_nonfinite_gradients_name_their_group():
    good, bad = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    good.grad, bad.grad = torch.ones(3), torch.tensor([1.0, float("inf"), 0.0])
    groups = [Group("denoiser", {"a": good}, 1e-4, 0), Group("text_encoder", {"b": bad}, 1e-5, 0)]
    assert find([torch.tensor(0.5)], groups) == "the gradients of text_encoder"
    assert find([torch.tensor(0.5), torch.tensor(float("nan"))], groups) == "the loss"
    bad.grad = torch.zeros(3)
    assert find([torch.tensor(0.5)], groups) is None


def test_nan_in_an_event_is_written_as_null_with_a_flag():
    event = make_event("step", step=3, epoch=0, loss=float("nan"), lr=float("inf"), its=1.0, eta=2.0)
    line = json.loads(encode(event))
    assert line["loss"] is None and line["lr"] is None and line["nonfinite"] == ["loss", "lr"]
    nested = json.loads(encode(make_event("run_finished", status="failed", outputs={"x": [1.0, float("-inf")]})))
    assert nested["outputs"] == {"x": [1.0, None]} and nested["nonfinite"] == ["outputs.x.1"]


class _TwoProcesses:
    """What Guard.skip sees of accelerate with a second process whose readings are `other`'s."""
    num_processes, is_main_process, scaler = 2, True, None

    def __init__(self, other: torch.Tensor):
        self.other = other

    def reduce(self, tensor, op):
        assert op == "sum"
        return tensor + self.other


def test_every_process_takes_the_same_branch_and_prints_the_mean_loss(tmp_path):
    weight = torch.nn.Parameter(torch.ones(2))
    weight.grad = torch.ones(2)
    groups = [Group("denoiser", {"w": weight}, 1e-4, 0)]
    guard = Guard(AdamWOptions(on_nonfinite="skip", max_skipped_steps=3), None, tmp_path)
    healthy = _TwoProcesses(torch.tensor([3.0, 1.0, 1.0]))  # its loss 3.0, loss and gradients finite
    assert guard.skip(healthy, [torch.tensor(1.0), torch.tensor(2.0)], groups, 1) == (False, 2.25)
    sick = _TwoProcesses(torch.tensor([float("nan"), 0.0, 1.0]))  # its loss is NaN: this process skips too
    logged = []
    guard.reporter = SimpleNamespace(log=lambda message, level: logged.append(message))
    skip, loss = guard.skip(sick, [torch.tensor(1.0)], groups, 2)
    assert skip and math.isnan(loss) and guard.in_a_row == 1
    assert logged[0].startswith("step 2: the loss or gradients of another process not finite")
