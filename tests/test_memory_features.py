"""The job's `memory` settings: each trains as the plain run does (within a stated tolerance where precision is
given up), resumes exactly, and lowers the part of `trainer estimate` it should. Tiny demo models, 2-3 steps."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from trainer.cli import main
from trainer.estimate import estimate
from trainer.job import JobError, load_job
from trainer.plan import make_plan

pytestmark = pytest.mark.usefixtures("one_torch_thread")
QUICK = ["validation.prompts=[]", "schedule.max_steps=2", "schedule.batch_size=1", "output.checkpoint_every=1"]
FULL = ["network.kind=full", "optimizer.max_grad_norm=0", "output.save_single_file=false"]


def _estimate(job_path, *settings, real=False):
    job = load_job(job_path, list(settings))
    return estimate(job, make_plan(job, resume=True), real=real)


def _run(job_path, out, *settings, resume=False):
    args = ["run", str(job_path), "--set", f"output.output_dir={out}"]
    for item in (*QUICK, *settings):
        args += ["--set", item]
    assert main(args + (["--resume"] if resume else [])) == 0


def _checkpoint(out, step, name="weights.safetensors"):
    return load_file(out / "checkpoints" / f"step-{step}" / name)


def test_fused_backward_trains_as_the_plain_step_and_resumes_exactly(demo_job, tmp_path):
    plain, fused = tmp_path / "plain", tmp_path / "fused"
    _run(demo_job, plain, *FULL)
    _run(demo_job, fused, *FULL, "memory.fused_backward=true")
    a, b = _checkpoint(plain, 2), _checkpoint(fused, 2)
    assert a.keys() == b.keys() and len(a) > 100  # the whole UNet trains
    moved = 0
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7)
        moved += not torch.equal(a[key], _checkpoint(plain, 1)[key])
    assert moved > len(a) / 2

    # Resumed from step 1, the second step gives the same weights and AdamW moments as the uninterrupted run.
    resumed = tmp_path / "resumed"
    shutil.copytree(fused, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-2")
    shutil.rmtree(resumed / "final")
    _run(demo_job, resumed, *FULL, "memory.fused_backward=true", resume=True)
    for name in ("weights.safetensors", "optimizer.safetensors"):
        want, got = _checkpoint(fused, 2, name), _checkpoint(resumed, 2, name)
        assert want.keys() == got.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), (name, key)


@pytest.mark.parametrize("setting, needs", [("optimizer.max_grad_norm=1", "max_grad_norm 0"),
                                            ("schedule.gradient_accumulation=2", "gradient_accumulation 1"),
                                            ("optimizer.on_nonfinite=skip", "on_nonfinite 'stop'")])
def test_fused_backward_refuses_what_needs_every_gradient_at_once(demo_job, setting, needs):
    with pytest.raises(JobError, match=f"memory.fused_backward: .*{needs}"):
        load_job(demo_job, [*FULL, "memory.fused_backward=true", setting])


def test_fused_backward_estimate_keeps_no_gradients(demo_job):
    plain = _estimate(demo_job, *FULL)
    fused = _estimate(demo_job, *FULL, "memory.fused_backward=true")
    # (The tiny model's peak is its activations: the gradients alive there are few, but none with the hooks.)
    assert plain.peak["gradients"] > 0 and fused.peak.get("gradients", 0) == 0
    assert fused.between_steps["optimizer state"] == plain.between_steps["optimizer state"]
    assert any("fused backward" in note for note in fused.notes)
    # On real tensors the same hooks step torch's AdamW, which makes what the fake trace counts.
    real = _estimate(demo_job, *FULL, "memory.fused_backward=true", real=True)
    assert real.peak.get("gradients", 0) == 0
    assert real.between_steps["optimizer state"] == pytest.approx(fused.between_steps["optimizer state"], rel=0.005)
