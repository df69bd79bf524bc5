"""Which dtype each part of a model is held in while it trains, decided here once for every family.

A model file may hold fp32, fp16, bf16 or fp8 weights, and the loaders keep some of that (transformers loads text
encoders in the stored dtype); this puts every part in the dtype the run computes in, whatever the file held.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dtypes:
    frozen: torch.dtype  # the denoiser's and text encoders' weights that do not train
    image_encoder: torch.dtype  # the VAE (Stable Cascade: its EfficientNet encoder)
    trained: torch.dtype = torch.float32  # LoRA, full fine-tune and new-token weights: the optimizer's updates


def dtypes(mixed_precision: str) -> Dtypes:
    """The run's dtypes, from accelerate's resolved `mixed_precision` ("no", "fp16" or "bf16").

    Frozen weights take the autocast dtype, on a GPU and on a CPU alike: under bf16 autocast every matmul runs in
    bf16 anyway, so fp32 copies would only double the memory (a 2.6B SDXL UNet: 5 GB instead of 10 GB) and the time
    spent casting. With "no" they are fp32, so a half-precision file trains in full precision. The VAE stays fp32
    always: SDXL's overflows in fp16, and fp32 needs no fp16-fixed VAE. Trained weights are fp32 under every
    precision (accelerate's autocast computes with them, the optimizer keeps full-precision updates)."""
    frozen = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)
    return Dtypes(frozen=frozen, image_encoder=torch.float32)


def place(module, device, dtype: torch.dtype) -> None:
    """Move `module` to `device` with every floating-point weight and buffer in `dtype` (fp8 and half-precision
    weights upcast). The cast is skipped when nothing would change: diffusers warns on every dtype `.to()`."""
    tensors = [*module.parameters(), *module.buffers()]
    if all(t.dtype == dtype for t in tensors if t.is_floating_point()):
        module.to(device)
    else:
        module.to(device, dtype=dtype)

