"""GPU speed settings a run gets by default: TF32 matmuls on Ampere and newer, and the fused AdamW kernel on CUDA.
Attention needs nothing here: every family's diffusers attention processor already calls PyTorch's SDPA. And one a
job asks for: regional torch.compile of the denoiser's repeated blocks (speed.compile).
"""

from __future__ import annotations

import torch

TF32_FROM = (8, 0)  # Ampere: the first GPUs whose tensor cores run TF32


def enable_tf32(device: torch.device) -> str:
    """Let fp32 matmuls and convolutions use TF32 tensor cores (10-bit mantissa, fp32 range) where the GPU has
    them: what a LoRA's fp32 weights and an fp32 run compute in. Returns a line for the log, '' if nothing changed.
    Under bf16/fp16 autocast the matmuls are half precision already; this touches the fp32 rest."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < TF32_FROM:
        return ""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return f"TF32 matmuls on ({torch.cuda.get_device_name(device)})"


def fused_adamw(groups: list[dict]) -> bool:
    """Whether torch's fused AdamW kernel can step these parameter groups: every parameter a floating-point CUDA
    tensor. One kernel launch for all parameters instead of several per tensor."""
    params = [p for group in groups for p in group["params"]]
    return bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)


COMPILE_BACKEND = "inductor"  # torch.compile's default; the CPU tests use "aot_eager" (no C++ code generated)


def compile_repeated_blocks(denoiser: torch.nn.Module, family_blocks: tuple[str, ...]) -> str:
    """Regional compilation through diffusers' `ModelMixin.compile_repeated_blocks`: each block whose class is in
    the model's `_repeated_blocks` (or, where diffusers names none, the family table's `repeated_blocks`) is
    compiled in place, so its weights, state dict and LoRA keep their names. Blocks of one kind and shape share
    one compiled graph. Returns a line for the log."""
    if not getattr(denoiser, "_repeated_blocks", None):
        denoiser._repeated_blocks = list(family_blocks)
    names = set(denoiser._repeated_blocks)
    count = sum(type(m).__name__ in names for m in denoiser.modules())
    denoiser.compile_repeated_blocks(backend=COMPILE_BACKEND)
    return f"torch.compile ({COMPILE_BACKEND}) of {count} repeated blocks ({', '.join(sorted(names))})"
