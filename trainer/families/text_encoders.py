"""Several text encoders held as one module, for the families that have more than one (SDXL, SD3, Flux).

The loop moves `parts.text_encoder` to a device and dtype, and off the accelerator once captions are cached;
as one module, all of a model's encoders move together without the loop knowing how many there are.
"""

from __future__ import annotations

import torch


class TextEncoders(torch.nn.Module):
    """`TextEncoders(one=clip_l, two=clip_g)`: each encoder an attribute; None for one not loaded (SD3's T5)."""

    def __init__(self, **encoders):
        super().__init__()
        for name, encoder in encoders.items():
            setattr(self, name, encoder)
        self._first = next(iter(encoders))

    @property
    def dtype(self) -> torch.dtype:
        return getattr(self, self._first).dtype

    @property
    def device(self) -> torch.device:
        return getattr(self, self._first).device
