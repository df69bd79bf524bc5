"""Non-finite losses and gradients: found at the optimizer step where they appear, before they reach the weights.

The job's `optimizer.on_nonfinite` decides what follows: `stop` ends the run with one line naming the step and
what was not finite (the checkpoints already written stay as they are), `skip` leaves the weights untouched for
that step and warns, stopping after `optimizer.max_skipped_steps` such steps in a row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..events import Reporter
from ..job import OptimizerSpec, RunFailed
from .sharding import local


def find(losses: list[torch.Tensor], groups) -> str | None:
    """What is not finite in this step ('the loss', 'the gradients of GROUP'), or None when all is."""
    return _named(_readings(losses, groups)[1:].tolist(), groups)


@dataclass
class Guard:
    """The policy, the count of skipped steps in a row, and where the run's checkpoints are."""
    spec: OptimizerSpec
    reporter: Reporter
    checkpoints: Path
    in_a_row: int = 0
    grad_norm: float | None = None  # this process's value of `grad_norm` at the last step, read with the loss

    def skip(self, accelerator, losses: list[torch.Tensor], groups, step: int,
             grad_norm: torch.Tensor | None = None) -> tuple[bool, float]:
        """Whether step `step` must leave the weights alone, and its loss (the mean over micro-batches and
        processes). Raises RunFailed when the run must stop. The one read from the device a step makes: the
        gradient norm, when given, rides along in it (kept in `self.grad_norm`)."""
        if getattr(accelerator, "scaler", None) is not None:
            groups = ()  # fp16: overflowing gradients are the loss scaler's business (it skips and rescales)
        readings = _readings(losses, groups)
        if grad_norm is not None:
            readings = torch.cat([readings, grad_norm.detach().float().reshape(1).to(readings.device)])
        count, processes = len(readings), accelerator.num_processes
        if processes > 1:  # every process must take the same branch, and print the same loss
            values = torch.cat([readings, accelerator.reduce(readings.clone(), "sum")]).tolist()
            mine, total = values[:count], values[count:]
            if grad_norm is not None:
                self.grad_norm, _ = mine.pop(), total.pop()
            loss = total[0] / processes
            what = _named(mine[1:], groups) or (
                None if total[1:] == [processes] * (len(total) - 1) else "the loss or gradients of another process")
        else:
            mine = readings.tolist()
            if grad_norm is not None:
                self.grad_norm = mine.pop()
            loss, what = mine[0], _named(mine[1:], groups)
        if what is None:
            self.in_a_row = 0
            return False, loss
        self.in_a_row += 1
        if self.spec.on_nonfinite == "skip" and self.in_a_row < self.spec.max_skipped_steps:
            if accelerator.is_main_process:
                self.reporter.log(f"step {step}: {what} not finite (NaN or inf); step skipped, weights unchanged "
                                  f"({self.in_a_row} in a row, stopping at {self.spec.max_skipped_steps})", "warning")
            return True, loss
        row = f" ({self.in_a_row} steps in a row)" if self.in_a_row > 1 else ""
        raise RunFailed(f"step {step}: {what} not finite (NaN or inf){row}; {self._advice()}")

    def _advice(self) -> str:
        from .checkpoint_files import newest_good

        found, _ = newest_good(self.checkpoints, deep=False)
        lower = f"--set optimizer.learning_rate={self.spec.learning_rate / 10:g}"
        job = self.checkpoints.parent / "job.json"
        if found is None:
            return f"no checkpoint was written yet: start again with a lower learning rate ({lower})"
        return (f"the last good checkpoint {found} is kept: resume from it with a lower learning rate: "
                f"python -m trainer run {job} --resume {lower}")


def _readings(losses: list[torch.Tensor], groups) -> torch.Tensor:
    """On the device, nothing read back yet: the mean loss, then 1.0/0.0 for 'the loss is finite' and for 'each
    group's gradients are finite'. One flag per gradient tensor: no norm, whose square could overflow."""
    loss = torch.stack([loss.detach().float() for loss in losses])
    flags = [torch.isfinite(loss).all()]
    for group in groups:
        grads = [local(p.grad) for p in group.params.values() if p.grad is not None]  # FSDP: this shard's
        flags.append(torch.stack([torch.isfinite(g).all() for g in grads]).all().to(loss.device) if grads
                     else torch.ones((), dtype=torch.bool, device=loss.device))
    return torch.cat([loss.mean().reshape(1), torch.stack(flags).float()])


def _named(flags: list[float], groups) -> str | None:
    if not flags[0]:
        return "the loss"
    for group, ok in zip(groups, flags[1:]):
        if not ok:
            return f"the gradients of {group.name}"
    return None
