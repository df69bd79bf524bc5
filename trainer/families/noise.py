"""Noise and loss options of DDPM-trained models (SD1.x, SD2.x, SDXL): offset noise, timestep bias, min-SNR-gamma
loss weights and zero-terminal-SNR schedulers, as pure functions; every random draw uses the caller's generator.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch

from ..job import DiffusionSpec, JobError


def draw_noise(latents: torch.Tensor, generator: torch.Generator, offset: float) -> torch.Tensor:
    """Gaussian noise shaped like the latents, plus `offset` times one normal draw per sample and channel
    (offset noise: lets the model shift an image's mean brightness)."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if offset:
        per_channel = latents.shape[:2] + (1,) * (latents.ndim - 2)
        noise = noise + offset * torch.randn(per_channel, generator=generator, device=latents.device,
                                             dtype=latents.dtype)
    return noise


def draw_timesteps(batch: int, num_timesteps: int, generator: torch.Generator, device,
                   weights: torch.Tensor | None) -> torch.Tensor:
    """One timestep per sample: uniform without weights (the draw seeded runs always made), else from `weights`."""
    if weights is None:
        return torch.randint(0, num_timesteps, (batch,), generator=generator, device=device).long()
    return torch.multinomial(weights, batch, replacement=True, generator=generator)


def timestep_weights(diffusion: DiffusionSpec, num_timesteps: int, device=None) -> torch.Tensor | None:
    """Sampling weights over the timesteps for the job's timestep bias (summing to 1), or None without one: the
    first / last `portion` of the timesteps (earlier / later), or [begin, end) (range), are `multiplier` times as
    likely as the rest, as in diffusers' SDXL training script."""
    if diffusion.timestep_bias == "none":
        return None
    return _bias_weights(diffusion.timestep_bias, num_timesteps, diffusion.timestep_bias_multiplier,
                         diffusion.timestep_bias_portion, diffusion.timestep_bias_begin,
                         diffusion.timestep_bias_end, torch.device(device or "cpu"))


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (B,) (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for
    v-prediction. Where SNR is 0 (the last timestep under zero terminal SNR) the weight is 1, as in the diffusers
    training scripts: 0/0 would be NaN, and a weight of 0 would never train the pure-noise step."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    weights = clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr
    return torch.where(snr == 0, torch.ones_like(weights), weights)


def zero_terminal_snr_schedulers(noise_scheduler, sample_scheduler, prediction_type: str):
    """(training DDPM scheduler, sampling scheduler, notes): both rebuilt with betas rescaled so the last timestep
    is pure noise (Lin et al. 2023) and trailing timestep spacing, so sampling starts from that timestep. A
    sampling scheduler that cannot rescale (PNDM, the SD1.5 default) is replaced by DDIM, as diffusers advises."""
    from diffusers import DDIMScheduler, DDPMScheduler

    zero_snr = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    notes = []
    if prediction_type != "v_prediction":
        notes.append("diffusion.zero_terminal_snr: with epsilon prediction the last timestep (pure noise) "
                     "cannot be learned; set model.prediction_type to v_prediction")
    noise = DDPMScheduler.from_config(noise_scheduler.config, **zero_snr)
    cls = type(sample_scheduler)
    if "rescale_betas_zero_snr" in inspect.signature(cls.__init__).parameters:
        sample = cls.from_config(sample_scheduler.config, **zero_snr)
    else:
        # clip_sample must be off: latents are not bounded to [-1, 1], and DDIM clips by default.
        sample = DDIMScheduler.from_config(sample_scheduler.config, clip_sample=False, **zero_snr)
        notes.append(f"diffusion.zero_terminal_snr: validation images use DDIM ({cls.__name__} cannot rescale "
                     "its noise schedule)")
    return noise, sample, notes


def unused_ddpm_options(diffusion: DiffusionSpec, family: str, instead: str) -> list[str]:
    """Notes for the DDPM-schedule options a family without that schedule ignores (flow matching, GDF)."""
    unused = [name for name, on in (("min_snr_gamma", diffusion.min_snr_gamma > 0),
                                    ("zero_terminal_snr", diffusion.zero_terminal_snr),
                                    ("timestep_bias", diffusion.timestep_bias != "none")) if on]
    return [f"diffusion.{name}: not used by {family} ({instead})" for name in unused]


@lru_cache(maxsize=8)
def _bias_weights(strategy: str, num_timesteps: int, multiplier: float, portion: float, begin: int, end: int,
                  device: torch.device) -> torch.Tensor:
    """Cached: the loop asks for the same weights every step."""
    weights = torch.ones(num_timesteps, dtype=torch.float32)
    # At least one timestep: int() of a tiny portion is 0, and slice(-0, None) would bias them all.
    count = max(1, int(portion * num_timesteps))
    if strategy == "earlier":
        biased = slice(0, count)
    elif strategy == "later":
        biased = slice(num_timesteps - count, num_timesteps)
    else:
        if end > num_timesteps:
            raise JobError(f"diffusion.timestep_bias_end: {end} is past the model's {num_timesteps} timesteps")
        biased = slice(begin, end)
    weights[biased] *= multiplier
    return (weights / weights.sum()).to(device)
