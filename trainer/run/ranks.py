"""Several processes (`torchrun`, `accelerate launch`): who writes the run folder, what they agree on, who failed.

One process (rank 0, the main one) owns the run folder: it checks and creates it and writes job.json,
events.jsonl, checkpoints, samples and final files. Every other rank logs its events to
`output_dir/logs/rank-N.log`, so a rank that fails leaves its reason where rank 0 can name it. Everything a rank
decides alone (is the folder usable, which checkpoint to resume, the plan from the files it sees) is decided by
rank 0 and shared, so no rank trains on a different idea of the run.

Importing this module is torch-free: one process (WORLD_SIZE unset or 1) never imports anything here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, TypeVar

from ..job import JobError

TIMEOUT_ENV = "SDTRAINER_PROCESS_TIMEOUT"
# Rank 0 fills the caches and renders samples while the others wait at a barrier: the wait must outlast that on a
# big dataset, yet a rank whose peer died silently (NCCL sees no closed socket) must not wait for ever.
DEFAULT_TIMEOUT_S = 1800
T = TypeVar("T")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def log_path(output_dir: Path, index: int) -> Path:
    return output_dir / "logs" / f"rank-{index}.log"


def join() -> None:
    """Start the process group when launched as several processes; nothing for one.

    Without CUDA, accelerate treats a torchrun or `accelerate launch --multi_gpu` child as alone
    (DistributedType.NO) unless ACCELERATE_USE_CPU is set: every process would train the same run by itself.
    Setting it makes them one data-parallel run over gloo. An FSDP launch is taken over from accelerate here
    (trainer/run/sharding.py), before accelerate reads it."""
    from . import sharding

    deepspeed_missing()
    if world_size() == 1:
        return
    sharding.claim()
    from datetime import timedelta

    import torch
    from accelerate import PartialState

    cpu = not torch.cuda.is_available()
    if cpu:
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        timeout = float(raw)
    except ValueError:
        timeout = -1
    if timeout <= 0:
        raise JobError(f"{TIMEOUT_ENV}: {raw!r} is not a number of seconds")
    state = PartialState(cpu=cpu, timeout=timedelta(seconds=timeout))
    if state.num_processes != world_size():
        raise JobError(f"launched as {world_size()} processes, but accelerate sees {state.num_processes} "
                       f"({state.distributed_type}); check the launcher's config")


DEEPSPEED_ENV = "ACCELERATE_USE_DEEPSPEED"  # what `accelerate launch` sets for a config with distributed_type DEEPSPEED


def deepspeed_launch() -> bool:
    return os.environ.get(DEEPSPEED_ENV, "false").lower() == "true"


def deepspeed_missing() -> None:
    """A launch that asks for DeepSpeed where it is not installed: one line, before anything loads."""
    import importlib.util

    if deepspeed_launch() and importlib.util.find_spec("deepspeed") is None:
        raise JobError("DeepSpeed was chosen (presets/accelerate/deepspeed_zero2.yaml) but is not installed: "
                       "`pip install deepspeed` on a machine with CUDA, or launch with "
                       "presets/accelerate/fsdp.yaml (FSDP needs nothing more)")


def deepspeed_checkpoints(job) -> None:
    """ZeRO-2 splits the optimizer state by rank in DeepSpeed's own layout, which this trainer's whole-file
    checkpoints do not gather: a DeepSpeed run must not promise checkpoints it cannot resume exactly."""
    if deepspeed_launch() and job.output.checkpoint_every:
        raise JobError(f"output.checkpoint_every: {job.output.checkpoint_every}; under DeepSpeed no checkpoints are "
                       "written (set 0: the final files are still written), or launch with "
                       "presets/accelerate/fsdp.yaml, whose checkpoints resume exactly")


def on_main(decide: Callable[[], T]) -> T | None:
    """`decide()` on rank 0 only; a JobError it raises is raised on every rank, so all leave together with
    the same reason (exit 2). Returns its result on rank 0, None elsewhere."""
    result, error = None, ""
    if is_main():
        try:
            result = decide()
        except JobError as exc:
            error = str(exc)
    error = share(error)
    if error:
        raise JobError(error)
    return result


def share(text: str) -> str:
    """Rank 0's `text` on every rank (a path, a message, a JSON summary)."""
    if world_size() == 1:
        return text
    import torch
    from accelerate import PartialState
    from accelerate.utils import broadcast

    device = PartialState().device
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8, device=device)
    size = broadcast(torch.tensor([data.numel()], dtype=torch.int64, device=device), from_process=0)
    if not is_main():
        data = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)
    return bytes(broadcast(data, from_process=0).tolist()).decode("utf-8") if int(size.item()) else ""


def agree(summary: dict, what: str) -> None:
    """Every rank must have worked out the same `summary`; if any differs from rank 0's, every rank raises one
    line naming those that differ."""
    if world_size() == 1:
        return
    import torch
    from accelerate import PartialState
    from accelerate.utils import gather

    mine = json.dumps(summary, sort_keys=True)
    same = share(mine) == mine
    flags = gather(torch.tensor([int(not same)], device=PartialState().device)).tolist()
    differ = [index for index, bad in enumerate(flags) if bad]
    if differ:
        ranks = ", ".join(str(i) for i in differ)
        mine_here = ", ".join(f"{k} {v}" for k, v in sorted(summary.items()))
        raise JobError(f"{what}: rank {ranks} worked out a different plan from rank 0's (this rank: {mine_here}); "
                       "every machine needs the same job, model and dataset files at the same paths")


def blame(output_dir: Path, since: float) -> str | None:
    """Rank 0's line when the run broke off: the first other rank that logged an error since `since`, with its
    reason and log; None when none did (then rank 0's own reason stands)."""
    from ..events import read_events

    found = []
    for index in range(1, world_size()):
        path = log_path(output_dir, index)
        if not path.exists():
            continue
        events, _ = read_events(path)
        errors = [e for e in events if e["type"] == "error" and e["time"] >= since]
        if errors:
            found.append((errors[0]["time"], index, errors[0]["message"], path))
    if not found:
        return None
    _, index, message, path = min(found)
    return f"rank {index} failed: {message} (its log: {path})"
