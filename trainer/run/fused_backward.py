"""The optimizer step fused into the backward pass (`memory.fused_backward`): each trained weight is stepped in its
post-accumulate-grad hook and its gradient freed there, so at most a few gradients exist at any time instead of one
per trained weight (a full fine-tune of a 2.6 B UNet: 10 GB of fp32 gradients).

One optimizer still holds every weight, its state and its parameter groups: the learning-rate schedule, the groups'
stops and the checkpoints (optimizer.state_dict) see the same object as in an unfused run, and a resumed run is
exact. The job refuses what needs all gradients at once (accumulation, clipping their common norm, skipping a step,
fp16's loss scale): trainer/job.py.
"""

from __future__ import annotations

from typing import Callable

import torch


class FusedBackward:
    """Registers the hooks; `step_one(p)` steps one weight whose `.grad` is ready (`stepping(optimizer)` for a run,
    the estimate's stand-in for its fake trace). The gradient is set to None right after."""

    def __init__(self, params: list[torch.nn.Parameter], step_one: Callable[[torch.nn.Parameter], None]):
        self.step_one = step_one
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in params]

    def _hook(self, p: torch.nn.Parameter) -> None:
        self.step_one(p)
        p.grad = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def stepping(optimizer: torch.optim.Optimizer) -> Callable[[torch.nn.Parameter], None]:
    """`step_one` for a torch optimizer: its own `step()` on a view of its groups that holds only `p` (with that
    group's learning rate and settings), so its state and update are exactly what a whole step gives `p`. The
    index of each weight's group is taken once; `load_state_dict` replaces the group dicts but keeps their order."""
    group_of = {id(p): i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}

    def step_one(p: torch.nn.Parameter) -> None:
        groups = optimizer.param_groups
        optimizer.param_groups = [{**groups[group_of[id(p)]], "params": [p]}]
        try:
            optimizer.step()
        finally:
            optimizer.param_groups = groups

    return step_one
