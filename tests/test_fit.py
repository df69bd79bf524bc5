"""`trainer estimate --suggest`: settings that make a job fit a memory figure, each with its own estimate. The search
on a stand-in trace whose sizes follow the job's fields (its order, block swap's fewest blocks, its limits), then on
the tiny demo's real traces (a suggestion fits by its own estimate)."""

import json

import pytest

from trainer.cli import main
from trainer.estimate import CONTEXT_BYTES, GIB, Estimate, estimate
from trainer.fit import suggest
from trainer.job import load_job
from trainer.plan import make_plan

UNCACHED = ["dataset.cache_latents=false", "dataset.cache_text=false"]


def _sized(job, plan, swappable=20) -> Estimate:
    """A stand-in trace: 10 GiB of tensors, halved by bf16, less 2 GiB with checkpointing, 0.2 GiB less per
    swapped block, 2 GiB per image of the batch."""
    gib = 10 - 2 * (job.precision.gradient_checkpointing) - 0.2 * job.memory.block_swap
    gib = gib / (2 if job.precision.mixed_precision == "bf16" else 1) + 2 * job.schedule.batch_size
    return Estimate(plan.family, (64, 64), job.schedule.batch_size, job.precision.mixed_precision,
                    {"activations": int(gib * GIB)}, 1, 1, 1, swappable=swappable)


def _limit(counted_gib: float) -> float:
    """The memory figure at which `counted_gib` of tensors just fits (the allowance added)."""
    return (int(counted_gib * GIB * 1.1) + CONTEXT_BYTES) / GIB + 1e-6


@pytest.fixture
def job_and_plan(demo_job):
    job = load_job(demo_job, ["schedule.batch_size=4"])
    return job, make_plan(job, resume=True)


def test_each_setting_in_turn_and_the_fewest_swapped_blocks(job_and_plan):
    job, plan = job_and_plan
    base = _sized(job, plan)  # 10 + 8 = 18 GiB
    calls = []

    def trace(changed, changed_plan):
        calls.append(changed)
        return _sized(changed, changed_plan)

    # 12.6 GiB: bf16 alone (5 + 8 = 13) is not enough; bf16 with checkpointing (4 + 8) is; with bf16 kept, 10 of
    # the 20 blocks swapped fits too (5 - 1 + 8 = 12), 9 does not (12.1).
    search = suggest(job, plan, base, _limit(12.0), limit=2, max_traces=10, trace=trace)
    assert [s.changes for s in search.suggestions] == [
        {"precision.mixed_precision": "bf16", "precision.gradient_checkpointing": True},
        {"precision.mixed_precision": "bf16", "memory.block_swap": 10}]
    assert all(s.estimate.total / GIB <= _limit(12.0) for s in search.suggestions)
    assert search.suggestions[1].set_args() == ["precision.mixed_precision=bf16", "memory.block_swap=10"]
    # Each trace ran the job with the changes applied: bf16, checkpointing, 8-bit AdamW, fp8 and NF4 base weights
    # (which save nothing here, so they are not kept), then block swap's 20 and its halving.
    assert [c.memory.block_swap for c in calls] == [0, 0, 0, 0, 0, 20, 10, 5, 8, 9]
    assert [(c.optimizer.name, c.memory.base_weights) for c in calls[2:5]] == [
        ("adamw8bit", "auto"), ("adamw", "fp8"), ("adamw", "nf4")]
    assert search.traces == len(calls) and not search.stopped


def test_smaller_batch_keeps_the_images_per_step_and_the_search_is_bounded(job_and_plan):
    job, plan = job_and_plan
    base = _sized(job, plan, swappable=0)
    # Only batch 1 fits ((10 - 2) / 2 + 2 = 6 GiB with bf16 and checkpointing kept); 4 accumulated steps keep the
    # 4 images per step.
    search = suggest(job, plan, base, _limit(6.0), trace=lambda j, p: _sized(j, p, swappable=0))
    assert [s.changes for s in search.suggestions] == [
        {"precision.mixed_precision": "bf16", "precision.gradient_checkpointing": True, "schedule.batch_size": 1,
         "schedule.gradient_accumulation": 4}]
    bounded = suggest(job, plan, base, _limit(6.0), max_traces=2, trace=lambda j, p: _sized(j, p, swappable=0))
    assert bounded.traces == 2 and bounded.stopped == "stopped after 2 traces" and not bounded.suggestions


def test_suggest_needs_a_memory_figure(demo_job, capsys):
    assert main(["estimate", str(demo_job), "--suggest"]) == 2
    assert "--suggest" in capsys.readouterr().err


def test_estimate_suggest_json_lines(demo_job, capsys, monkeypatch):
    monkeypatch.setattr("trainer.estimate.estimate", _sized)
    assert main(["estimate", str(demo_job), "--set", "schedule.batch_size=4", "--memory", str(_limit(12.0)),
                 "--suggest", "--json"]) == 0
    first, *found, last = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert first["fits"] is False and first["total_gib"] > 12
    # The default 8 traces end the search inside block swap's halving, with the best count found so far.
    assert [s["suggestion"]["set"] for s in found] == [
        ["precision.mixed_precision=bf16", "precision.gradient_checkpointing=true"],
        ["precision.mixed_precision=bf16", "memory.block_swap=10"]]
    assert all(s["suggestion"]["fits"] and s["suggestion"]["total_gib"] <= _limit(12.0) for s in found)
    assert last["search"]["found"] == 2 and last["search"]["stopped"] == "stopped after 8 traces"
    # A job that fits is not searched.
    assert main(["estimate", str(demo_job), "--memory", "100", "--suggest", "--json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_tiny_demo_suggestions_fit_by_their_own_traces(demo_job):
    job = load_job(demo_job, UNCACHED)
    plan = make_plan(job, resume=True)
    base = estimate(job, plan)
    memory = (base.total - 2 * 2**20) / GIB  # 2 MiB short
    search = suggest(job, plan, base, memory, limit=1)
    assert len(search.suggestions) == 1
    for found in search.suggestions:
        assert found.estimate.total / GIB <= memory < base.total / GIB
    # That its changes applied to the job give this same estimate is the Memory tab's test (its Apply).


def test_caching_and_the_fused_backward_where_they_apply(demo_job):
    from trainer.fit import _steps

    job = load_job(demo_job, [*UNCACHED, "network.kind=full", "optimizer.on_nonfinite=skip"])
    plan = make_plan(job, resume=True)
    precision, checkpointing, caching, adamw8bit, fused, fp8, nf4, block_swap, batch = _steps(
        job, plan, _sized(job, plan, swappable=3))
    assert caching == [{"dataset.cache_latents": True, "dataset.cache_text": True}]
    # A full fine-tune: the fused backward with what it needs; no quantized base weights (they would train).
    assert fused == [{"memory.fused_backward": True, "optimizer.max_grad_norm": 0, "optimizer.on_nonfinite": "stop"}]
    assert fp8 == nf4 == []
    assert block_swap == [{"memory.block_swap": n} for n in (1, 2, 3)]
    assert batch == [{"schedule.batch_size": 1, "schedule.gradient_accumulation": 2}]  # the demo's batch is 2
    # Colour jitter renders every image anew: the latents cannot be cached, the text still can.
    jitter = load_job(demo_job, [*UNCACHED, "dataset.color_jitter=0.1", "dataset.cache_text=true"])
    assert _steps(jitter, make_plan(jitter, resume=True), _sized(jitter, plan))[2] == []
