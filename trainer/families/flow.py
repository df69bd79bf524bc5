"""Flow matching (rectified flow) for training: noise levels, the shifted sigma schedule, the noisy input and
the velocity target. Shared by the flow-matching families (SD3, Flux); every draw uses the caller's
generator, so a resumed run replays exactly.

The forward process is x_σ = (1 − σ)·x0 + σ·ε and the model predicts the velocity ε − x0 (the SD3 paper's
rectified flow). A sample's noise level t is drawn from the job's density (`diffusion.weighting_scheme`), then
looked up in the model's discrete schedule, shifted as its scheduler shifts it: σ = shift·t / (1 + (shift − 1)·t).
Flux's shift depends on the image's size (`resolution_shift`).
"""

from __future__ import annotations

import math

import torch

from ..job import DiffusionSpec
from .noise import draw_noise

# What shapes a flow-matching run's timesteps, where DDPM options (min-SNR, timestep bias) would.
TIMESTEP_OPTIONS = "flow matching; weighting_scheme, logit_mean/std, mode_scale and flow_shift shape its timesteps"


def noisy_input_and_target(latents: torch.Tensor, generator: torch.Generator, diffusion: DiffusionSpec,
                           num_train_timesteps: int, shift: float):
    """(noisy latents, timesteps (B,) as the model takes them (σ·N), velocity target, loss weight (B,)).

    The loss weight is what diffusers' `compute_loss_weighting_for_sd3` gives for the scheme: 1 for every
    scheme the job offers. logit_normal and mode put the SD3 paper's weighting into the sampling density
    (its rf/lognorm recipe trains with weight 1), and uniform is plain rectified flow."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    noise = draw_noise(latents, generator, diffusion.noise_offset)
    t = sample_noise_levels(diffusion, latents.shape[0], generator, latents.device)
    sigmas, timesteps = sigmas_for(t, num_train_timesteps, shift)
    sigma = sigmas.to(latents.dtype).view(-1, *([1] * (latents.ndim - 1)))  # (B, 1, 1, 1)
    noisy = (1 - sigma) * latents + sigma * noise
    target = noise - latents
    weight = compute_loss_weighting_for_sd3(diffusion.weighting_scheme, sigmas)
    return noisy, timesteps, target, weight


def resolution_shift(config, image_seq_len: int) -> float:
    """The shift a dynamically shifting scheduler (Flux's; `config` is its config) uses for an image of
    `image_seq_len` tokens: μ from diffusers' `calculate_shift` (linear in the token count, base_shift at
    base_image_seq_len, max_shift at max_image_seq_len), as the pipeline computes it. The scheduler's exponential
    time shift σ = e^μ / (e^μ + 1/t − 1) is the shift formula above with shift = e^μ (its linear one: shift = μ)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = calculate_shift(image_seq_len, config.get("base_image_seq_len", 256),
                         config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                         config.get("max_shift", 1.15))
    return math.exp(mu) if config.get("time_shift_type", "exponential") == "exponential" else mu


def sample_noise_levels(diffusion: DiffusionSpec, batch_size: int, generator: torch.Generator,
                        device) -> torch.Tensor:
    """Noise levels t in [0, 1] (B,), before the shift, from the job's density: logit_normal (sigmoid of a normal
    with logit_mean and logit_std), mode (the SD3 paper's f_mode with mode_scale) or uniform ("none" too).

    t is the SD3 paper's t: 1 is pure noise, so logit_mean > 0 trains more on noisy steps. (diffusers' training
    scripts index the descending timestep table with it, which flips the sign of logit_mean; at the default mean
    of 0 both agree.)"""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    scheme = "uniform" if diffusion.weighting_scheme == "none" else diffusion.weighting_scheme
    t = compute_density_for_timestep_sampling(scheme, batch_size, logit_mean=diffusion.logit_mean,
                                              logit_std=diffusion.logit_std, mode_scale=diffusion.mode_scale,
                                              device=device, generator=generator)
    return t.clamp(0, 1)  # a mode_scale above 2/(π−2) bends f_mode outside [0, 1]


def shifted_schedule(num_train_timesteps: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas, timesteps), least noise first: t = i/N for i = 1..N, shifted. The table diffusers'
    FlowMatchEulerDiscreteScheduler builds at construction (its `sigmas` and `timesteps` run the other way)."""
    t = torch.arange(1, num_train_timesteps + 1, dtype=torch.float32) / num_train_timesteps
    sigmas = shift * t / (1 + (shift - 1) * t)
    return sigmas, sigmas * num_train_timesteps


def sigmas_for(t: torch.Tensor, num_train_timesteps: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each noise level's entry in the shifted schedule: (sigmas (B,), timesteps (B,)), on t's device."""
    sigmas, timesteps = shifted_schedule(num_train_timesteps, shift)
    index = (t * num_train_timesteps).long().clamp(0, num_train_timesteps - 1).cpu()
    return sigmas[index].to(t.device), timesteps[index].to(t.device)
