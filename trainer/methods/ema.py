"""An exponential moving average of the trained weights, kept as plain tensors so checkpoints stay safetensors.

Updated every N optimizer steps from a start step; before it the average just follows the weights. Exported
(and rendered at validation) instead of the raw weights when the job says so.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..job import EmaSpec


def create(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """The average starts as a copy of the weights, on their device, in fp32."""
    return {name: p.detach().float().clone() for name, p in params.items()}


@torch.no_grad()
def update(shadow: dict[str, torch.Tensor], params: dict[str, torch.nn.Parameter], spec: EmaSpec,
           step: int) -> None:
    """Call after optimizer step `step` (1-based)."""
    if step % spec.every_n_steps:
        return
    if step <= spec.start_step:
        for name, value in shadow.items():
            value.copy_(params[name].detach())
        return
    for name, value in shadow.items():
        value.lerp_(params[name].detach().float(), 1.0 - spec.decay)


@contextmanager
def swapped_in(shadow: dict[str, torch.Tensor], params: dict[str, torch.nn.Parameter]):
    """The model runs with the averaged weights inside the block and gets its own back after it."""
    saved = {name: params[name].detach().clone() for name in shadow}
    with torch.no_grad():
        for name, value in shadow.items():
            params[name].copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)
