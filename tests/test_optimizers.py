"""The optimizers a job can name: their fields, their state through a checkpoint, and each one training the demo and
resuming exactly."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resume_checks import assert_resume_is_exact
from trainer.job import OPTIMIZERS, JobError, apply_override, defaults, from_sparse, load_job, to_sparse
from trainer.run import checkpoint, optimizers

ROOT = Path(__file__).resolve().parent.parent
# The ones whose packages run on this CPU; 8-bit AdamW has its own round-trip test (tests/test_train.py).
CPU_OPTIMIZERS = [name for name in OPTIMIZERS if name != "adamw8bit"]
OWN_SETTINGS = {"adafactor": {"relative_step": True, "warmup_init": True}, "prodigy": {"d_coef": 0.5,
                                                                                       "safeguard_warmup": True}}


def test_each_optimizer_takes_only_its_own_fields():
    assert from_sparse({"optimizer": {"name": "prodigy", "d_coef": 0.5}}).optimizer.d_coef == 0.5
    assert from_sparse({"optimizer": {"name": "prodigy"}}).optimizer.learning_rate == 1.0  # its own default
    with pytest.raises(JobError, match=r"^job: optimizer.d_coef: unknown key$"):
        from_sparse({"optimizer": {"name": "adamw", "d_coef": 0.5}})
    with pytest.raises(JobError, match=r"^job: optimizer.betas: unknown key$"):
        from_sparse({"optimizer": {"name": "adafactor", "betas": [0.9, 0.99]}})
    with pytest.raises(JobError, match=r"^job: optimizer.betas: List should have at least 3 items"):
        from_sparse({"optimizer": {"name": "came", "betas": [0.9, 0.99]}})
    with pytest.raises(JobError, match=r"^job: optimizer.name: expected one of adamw, adamw8bit, prodigy, "):
        from_sparse({"optimizer": {"name": "sgd"}})
    with pytest.raises(JobError, match=r"schedule.lr_scheduler: schedule-free AdamW schedules its own"):
        from_sparse({"optimizer": {"name": "adamw_schedulefree"}, "schedule": {"lr_scheduler": "cosine"}})
    with pytest.raises(JobError, match=r"^job: optimizer: warmup_init needs relative_step$"):
        from_sparse({"optimizer": {"name": "adafactor", "warmup_init": True}})


def test_old_job_files_and_switching_optimizers():
    old = {"version": 1, "optimizer": {"name": "adamw8bit", "learning_rate": 3e-4, "weight_decay": 0.0,
                                       "betas": [0.9, 0.99], "eps": 1e-6, "max_grad_norm": 2.0}}
    assert from_sparse(old).optimizer.betas == [0.9, 0.99]
    # `--set optimizer.name=...` on a full job file: AdamW's fields go, the shared ones stay.
    full = apply_override(apply_override(defaults(), "optimizer.max_grad_norm=0.5"), "optimizer.name=adafactor")
    job = from_sparse(full)
    assert job.optimizer.name == "adafactor" and job.optimizer.max_grad_norm == 0.5
    to_8bit = from_sparse(apply_override(apply_override(defaults(), "optimizer.eps=1e-6"), "optimizer.name=adamw8bit"))
    assert (to_8bit.optimizer.name, to_8bit.optimizer.eps) == ("adamw8bit", 1e-6)  # the same fields: all kept
    assert from_sparse(apply_override(full, "optimizer.name=lion")).optimizer.name == "lion"
    # A sparse file keeps the choice and whatever differs from that optimizer's defaults (Prodigy's weight decay
    # of 0.01 equals AdamW's default but not Prodigy's own).
    job = from_sparse({"optimizer": {"name": "prodigy", "weight_decay": 0.01}})
    assert to_sparse(job) == {"version": 1, "optimizer": {"name": "prodigy", "weight_decay": 0.01}}
    assert from_sparse(to_sparse(job)) == job


@pytest.mark.parametrize("name", CPU_OPTIMIZERS)
def test_optimizer_state_round_trips_through_a_checkpoint(tmp_path, name):
    """Two steps, a checkpoint, then two more steps from the original and from a fresh optimizer loaded from the
    checkpoint: the weights are equal bit for bit (Prodigy's d, schedule-free's z and averaged point, Adafactor's
    factored rows and columns all came back)."""
    job = from_sparse({"optimizer": {"name": name, **OWN_SETTINGS.get(name, {})}})
    torch.manual_seed(0)
    start = [torch.randn(8, 6), torch.randn(6)]
    grads = [[torch.randn(8, 6), torch.randn(6)] for _ in range(4)]

    def make():
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = optimizers.build(job, [{"params": params, "lr": job.optimizer.learning_rate, "name": "denoiser"}])
        return params, opt, optimizers.scheduler(job, opt, 10)

    def step(params, opt, sched, grad):
        for p, g in zip(params, grad):
            p.grad = g.clone()
        opt.step()
        sched.step()

    params, opt, sched = make()
    for grad in grads[:2]:
        step(params, opt, sched, grad)
    with optimizers.eval_mode(opt):
        checkpoint.save(tmp_path, 2, {"a": params[0], "b": params[1]}, opt.state_dict(), sched, {}, keep_last=1)
    assert len(opt.state) == 2 and all(opt.state[p] for p in params)
    params2, opt2, sched2 = make()
    _, weights, _ = checkpoint.load(tmp_path / "step-2", opt2, sched2)
    with torch.no_grad():
        for p, key in zip(params2, "ab"):
            p.copy_(weights[key])
    if optimizers.has_eval_mode(opt2):
        opt2.train()
    for grad in grads[2:]:
        step(params, opt, sched, grad)
        step(params2, opt2, sched2, grad)
    assert all(torch.equal(a, b) for a, b in zip(params, params2))
    assert sched.get_last_lr() == sched2.get_last_lr()


def test_schedule_free_weights_are_saved_in_eval_mode(tmp_path):
    job = from_sparse({"optimizer": {"name": "adamw_schedulefree", "betas": [0.5, 0.999]}})
    p = torch.nn.Parameter(torch.ones(4))
    opt = optimizers.build(job, [{"params": [p], "lr": 0.1}])
    for _ in range(3):
        p.grad = torch.ones(4)
        opt.step()
    training_point = p.detach().clone()
    with optimizers.eval_mode(opt):
        averaged = p.detach().clone()
    assert not torch.equal(training_point, averaged)
    assert torch.equal(p.detach(), training_point)  # train mode again after


@pytest.mark.slow  # a minute or more each on a busy 2-core machine
@pytest.mark.parametrize("name", CPU_OPTIMIZERS)
def test_each_optimizer_trains_the_demo_and_resumes_exactly(demo_job, tmp_path, name):
    settings = [f"optimizer.name={name}", *(f"optimizer.{k}={str(v).lower()}"
                                              for k, v in OWN_SETTINGS.get(name, {}).items())]
    if name == "adamw_schedulefree":  # validation in the middle: eval mode and back must not change the run
        settings += ["validation.every_n_steps=1", "validation.at_start=false", "validation.steps=1",
                     'validation.prompts=["a red circle"]']
    else:
        settings += ["validation.prompts=[]"]
    whole = assert_resume_is_exact(demo_job, [a for s in settings for a in ("--set", s)], tmp_path)
    assert (whole / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_check_prints_the_optimizer_line(demo_job):
    out = subprocess.run([sys.executable, "-m", "trainer", "check", str(demo_job), "--no-estimate", "--set",
                          "optimizer.name=prodigy", "--set", "optimizer.d_coef=0.5"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    line = next(l for l in out.stdout.splitlines() if l.startswith("optimizer:"))
    assert line.startswith("optimizer: prodigy (learning rate 1, schedule constant; ") and "d_coef 0.5" in line
    assert load_job(demo_job).optimizer.name == "adamw"
