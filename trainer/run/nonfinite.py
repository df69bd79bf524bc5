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


def find(losses: list[torch.Tensor], groups) -> str | None:
    """What is not finite in this step ('the loss', 'the gradients of GROUP'), or None when all is."""
    if not bool(torch.isfinite(torch.stack([loss.float() for loss in losses])).all()):
        return "the loss"
    for group in groups:
        grads = [p.grad for p in group.params.values() if p.grad is not None]
        # One flag per tensor, read once: no norm, whose square could overflow on finite gradients.
        if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            return f"the gradients of {group.name}"
    return None


@dataclass
class Guard:
    """The policy, the count of skipped steps in a row, and where the run's checkpoints are."""
    spec: OptimizerSpec
    reporter: Reporter
    checkpoints: Path
    in_a_row: int = 0

    def skip(self, accelerator, losses: list[torch.Tensor], groups, step: int) -> bool:
        """True when step `step` must leave the weights alone; raises RunFailed when the run must stop."""
        if getattr(accelerator, "scaler", None) is not None:
            groups = ()  # fp16: overflowing gradients are the loss scaler's business (it skips and rescales)
        what = find(losses, groups)
        if accelerator.num_processes > 1:  # every process must take the same branch
            flag = accelerator.reduce(torch.tensor(float(what is not None), device=accelerator.device), "sum")
            what = what or ("the loss or gradients of another process" if flag.item() else None)
        if what is None:
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        if self.spec.on_nonfinite == "skip" and self.in_a_row < self.spec.max_skipped_steps:
            if accelerator.is_main_process:
                self.reporter.log(f"step {step}: {what} not finite (NaN or inf); step skipped, weights unchanged "
                                  f"({self.in_a_row} in a row, stopping at {self.spec.max_skipped_steps})", "warning")
            return True
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
