"""Adaptive projected guidance (APG; Sadat et al. 2024, "Eliminating Oversaturation and Artifacts of High Guidance
Scales in Diffusion Models") for validation images, with the families' own diffusers pipelines.

The math is diffusers' (`diffusers.guiders.adaptive_projected_guidance`), but diffusers 0.42's classic pipelines
take no guider: they run the denoiser once on a [uncond; cond] batch and combine the halves as
`uncond + s * (cond - uncond)`. So a forward hook on the denoiser replaces both halves of its output with the
APG prediction g: every such combination of (g, g) is g, whatever the scale. Which half is which is the family
table's `cfg_halves`.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance


def apg(cond: torch.Tensor, uncond: torch.Tensor, scale: float, eta: float, norm_threshold: float,
        momentum: MomentumBuffer | None) -> torch.Tensor:
    """One APG step: the update cond - uncond (averaged with momentum, its norm capped at `norm_threshold`),
    its component parallel to `cond` weighted by `eta`, added to `uncond` times `scale`."""
    return normalized_guidance(cond, uncond, scale, momentum, eta, norm_threshold)


@contextmanager
def guided(denoiser, validation, cfg_halves: tuple[str, ...]):
    """While open, the denoiser's classifier-free-guidance batches give the APG prediction in both halves (one
    image: open it once per image, its momentum starts afresh). Does nothing for `guidance: cfg`, for a scale at
    which the pipeline batches no CFG (1 or less), or for a family without batched CFG."""
    if validation.guidance != "apg" or not cfg_halves or validation.guidance_scale <= 1:
        yield
        return
    momentum = MomentumBuffer(validation.apg_momentum) if validation.apg_momentum else None
    cond_first = cfg_halves[0] == "cond"

    def hook(module, args, output):
        pred = output if isinstance(output, torch.Tensor) else output[0] if isinstance(output, tuple) \
            else output.sample
        if pred.shape[0] % 2:  # not a CFG batch
            return output
        first, second = pred.chunk(2)
        cond, uncond = (first, second) if cond_first else (second, first)
        g = apg(cond, uncond, validation.guidance_scale, validation.apg_eta, validation.apg_norm_threshold,
                momentum)
        both = torch.cat([g, g])
        if isinstance(output, torch.Tensor):
            return both
        if isinstance(output, tuple):
            return (both, *output[1:])
        output.sample = both
        return output

    handle = denoiser.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
