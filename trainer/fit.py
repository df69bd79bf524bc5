"""Settings that make a job fit a GPU's memory, each with its own traced estimate (`trainer estimate --suggest`).

The settings are tried in the order a kohya or OneTrainer user reaches for them, cheapest in time and quality
first: bf16 mixed precision, gradient checkpointing, cached latents and text (the encoders leave the GPU), 8-bit
AdamW, the fused backward pass (full fine-tunes), fp8 then NF4 base weights (LoRA), block swap (the fewest blocks
that fit) and a smaller batch (gradient accumulation keeps the images per step). A setting that fits on its own,
with the ones before it that did not, is a suggestion; one that does not fit is kept and the next is tried on top
of it, so each suggestion is a set of `--set` changes. Every suggestion's figure is its own trace of the step,
never a sum of savings; the search stops after a few suggestions, a number of traces or a time budget.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Callable

from pydantic import ValidationError

from .estimate import GIB, Estimate
from .job import JobError, Job, apply_override, validate
from .plan import Plan, make_plan

Changes = dict[str, object]  # dotted job path: value, as `--set` takes them


@dataclass
class Suggestion:
    changes: Changes
    estimate: Estimate

    def set_args(self) -> list[str]:
        # Words as they are (`--set` reads a value that is not JSON as a string): nothing to quote in a shell.
        return [f"{key}={value if isinstance(value, str) else json.dumps(value)}"
                for key, value in self.changes.items()]


@dataclass
class Search:
    suggestions: list[Suggestion]
    traces: int
    seconds: float
    stopped: str = ""  # why the search ended before trying every setting ("" when it did not)


def suggest(job: Job, plan: Plan, base: Estimate, memory_gib: float, limit: int = 3, max_traces: int = 8,
            budget_s: float = 120.0, trace: Callable[[Job, Plan], Estimate] | None = None,
            found_one: Callable[[Suggestion], None] | None = None) -> Search:
    """Up to `limit` sets of changes under which `job` fits `memory_gib` by its own estimate (`base` is the job's
    as it is), each given to `found_one` as soon as it is found. At most `max_traces` traces and about `budget_s`
    seconds (a trace of a real-size model takes tens of seconds on a small CPU)."""
    from .estimate import estimate

    trace = trace or estimate
    started = time.perf_counter()
    found: list[Suggestion] = []
    kept: Changes = {}  # settings that did not fit on their own but saved memory, under every later one
    kept_total = base.total
    traces = 0

    def fits(est: Estimate) -> bool:
        return est.total / GIB <= memory_gib

    def measure(changes: Changes) -> Estimate | None:
        nonlocal traces
        changed = _changed(job, changes)
        if changed is None:
            return None
        traces += 1
        try:
            return trace(*changed)
        except JobError:  # a setting this model refuses (block swap beyond its blocks): not a suggestion
            return None

    def out_of_time() -> str:
        if traces >= max_traces:
            return f"stopped after {traces} traces"
        if time.perf_counter() - started > budget_s:
            return f"stopped after {budget_s:g} s"
        return ""

    stopped = ""
    for step in _steps(job, plan, base):
        if len(found) >= limit:
            break
        stopped = out_of_time()
        if stopped:
            break
        options = [{**kept, **option} for option in step]
        if not options:
            continue
        # The options of a step save more memory the later they come: trace the last, then halve the range for
        # the first one that fits (block swap's fewest blocks, the largest batch).
        last = measure(options[-1])
        if last is None:
            continue
        if not fits(last):
            if last.total < kept_total:
                kept, kept_total = options[-1], last.total
            continue
        best, low, high = Suggestion(options[-1], last), 0, len(options) - 1
        while low < high and not out_of_time():
            middle = (low + high) // 2
            est = measure(options[middle])
            if est is not None and fits(est):
                best, high = Suggestion(options[middle], est), middle
            else:
                low = middle + 1
        found.append(best)
        if found_one:
            found_one(best)
    return Search(found, traces, time.perf_counter() - started, stopped)


def _changed(job: Job, changes: Changes) -> tuple[Job, Plan] | None:
    """The job and its plan with `changes` applied, or None when the schema or the plan refuses them (fused
    backward with gradient accumulation, say): such a set is no suggestion."""
    data = job.model_dump(mode="json")
    try:
        for key, value in changes.items():
            data = apply_override(data, f"{key}={json.dumps(value)}")
        changed = validate(data)
        return changed, make_plan(changed, resume=True)
    except (JobError, ValidationError):
        return None


def _steps(job: Job, plan: Plan, base: Estimate) -> list[list[Changes]]:
    """The settings in the order they are tried, each as its options (several only where more of it saves more:
    block swap's block counts, smaller batches), none where it does not apply to this job."""
    adapter = job.network.kind != "full"
    precision = [{"precision.mixed_precision": "bf16"}] if job.precision.mixed_precision == "no" else []
    checkpointing = [] if job.precision.gradient_checkpointing else [{"precision.gradient_checkpointing": True}]
    # Caching only where the plan would then cache (random crops, colour jitter and shuffled tags keep it live).
    uncached = {f"dataset.{name}": True for name, on in (("cache_latents", plan.caching.latents),
                                                          ("cache_text", plan.caching.text)) if not on}
    changed = _changed(job, uncached) if uncached else None
    caching = [uncached] if changed is not None and (changed[1].caching.latents, changed[1].caching.text) != \
        (plan.caching.latents, plan.caching.text) else []
    adamw8bit = [{"optimizer.name": "adamw8bit"}] if job.optimizer.name == "adamw" else []
    fused = [] if adapter or job.memory.fused_backward else [
        {"memory.fused_backward": True, "optimizer.max_grad_norm": 0,
         **({"optimizer.on_nonfinite": "stop"} if job.optimizer.on_nonfinite == "skip" else {})}]
    fp8, nf4 = ([[{"memory.base_weights": kind}] if adapter and job.memory.base_weights == "auto" else []
                 for kind in ("fp8", "nf4")])
    block_swap = [{"memory.block_swap": n} for n in range(job.memory.block_swap + 1, base.swappable + 1)]
    size, accumulation = job.schedule.batch_size, job.schedule.gradient_accumulation
    batch = [{"schedule.batch_size": d, "schedule.gradient_accumulation": accumulation * size // d}
             for d in range(size - 1, 0, -1) if size % d == 0]
    return [precision, checkpointing, caching, adamw8bit, fused, fp8, nf4, block_swap, batch]


def lines(search: Search, memory_gib: float, gpu=None) -> list[str]:
    """The suggestions as `estimate` prints them: each with the `--set` options that apply it."""
    if not search.suggestions:
        out = [f"no settings found that fit {memory_gib:g} GiB"]
    else:
        out = [f"settings that fit {memory_gib:g} GiB:"]
    for suggestion in search.suggestions:
        speed = f", {suggestion.estimate.step_seconds(gpu):.2f} s per step" if gpu else ""
        out.append(f"  {suggestion.estimate.total / GIB:.2f} GiB{speed}: " +
                   " ".join(f"--set {item}" for item in suggestion.set_args()))
    if search.stopped:
        out.append(f"  (the search {search.stopped}; {search.seconds:.0f} s)")
    return out


def suggestion_json(suggestion: Suggestion, gpu=None, memory_gib: float | None = None) -> dict:
    return {"changes": suggestion.changes, "set": suggestion.set_args(), **suggestion.estimate.as_json(gpu, memory_gib)}


def search_json(search: Search) -> dict:
    return {"found": len(search.suggestions), "traces": search.traces, "seconds": round(search.seconds, 2),
            "stopped": search.stopped}
