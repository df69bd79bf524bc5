"""Stable Diffusion 3 and 3.5: an MMDiT transformer trained by flow matching, three text encoders, a 16-channel VAE.

What differs from the UNet families: the prompt goes through CLIP-L, CLIP-G and (optionally) T5, joined as
diffusers' pipeline joins them; the VAE's latents are shifted as well as scaled; the noisy input and the target
come from rectified flow (trainer/families/flow.py); and its LoRA files are written with diffusers' transformer names,
which is what ComfyUI reads for SD3.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..job import DiffusionSpec, JobError, ModelSpec
from . import flow, noise
from .sd import _load_pipeline, alpha_folded, drop_rows, encode_image_dists, save_lora_with
from .table import FAMILIES
from .text_encoders import TextEncoders

DENOISER = FAMILIES["sd3"].denoiser
IMAGE_ENCODER = FAMILIES["sd3"].image_encoder
T5_TOKENS = FAMILIES["sd3"].t5_tokens


@dataclass
class Parts:
    denoiser: Any  # SD3Transformer2DModel
    vae: Any
    text_encoder: TextEncoders
    tokenizer: Any
    tokenizer_2: Any
    tokenizer_3: Any  # None without T5
    noise_scheduler: Any  # a copy of the model's flow-matching scheduler: its config holds N and the shift
    sample_scheduler: Any  # the model's own scheduler: validation images
    prediction_type: str = "flow_prediction"
    base_version: str = "sd3"  # kohya's ss_base_model_version


def load(spec: ModelSpec) -> Parts:
    """The model's parts from a local diffusers folder, a hub id, or a single-file checkpoint (with config).
    Without `spec.load_t5` the T5 encoder is not loaded: its part of the prompt is zeros, as in diffusers."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    if spec.prediction_type != "auto":
        raise JobError(f"model.prediction_type: SD3 is trained by flow matching, not {spec.prediction_type}; "
                       "leave it on auto")
    without_t5 = {} if spec.load_t5 else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = _load_pipeline(StableDiffusion3Pipeline, spec, **without_t5)
    encoders = TextEncoders(one=pipe.text_encoder, two=pipe.text_encoder_2, three=pipe.text_encoder_3)
    for frozen in (pipe.vae, encoders):
        frozen.requires_grad_(False)
        frozen.eval()
    noise_scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return Parts(pipe.transformer, pipe.vae, encoders, pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3,
                 noise_scheduler, pipe.scheduler)


def text_encoders(parts: Parts) -> dict:
    """{pipeline component name: (tokenizer, text encoder)} of the encoders that can train (LoRA, full, new
    tokens): both CLIPs. T5 always stays frozen: diffusers and ComfyUI load no T5 LoRA, and at 4.7B parameters
    training it is not what SD3 LoRAs do; a new token reaches T5 as plain text."""
    return {"text_encoder": (parts.tokenizer, parts.text_encoder.one),
            "text_encoder_2": (parts.tokenizer_2, parts.text_encoder.two)}


def pipeline(parts: Parts, denoiser):
    """The family's diffusers pipeline over these parts (for saving, class images and validation)."""
    from diffusers import StableDiffusion3Pipeline

    enc = parts.text_encoder
    return StableDiffusion3Pipeline(
        transformer=denoiser, scheduler=parts.sample_scheduler, vae=parts.vae, text_encoder=enc.one,
        tokenizer=parts.tokenizer, text_encoder_2=enc.two, tokenizer_2=parts.tokenizer_2, text_encoder_3=enc.three,
        tokenizer_3=parts.tokenizer_3)


def prepare_noise(parts: Parts, diffusion: DiffusionSpec) -> list[str]:
    """Notes for the DDPM options that flow matching has no use for (the flow options need no preparing)."""
    return noise.unused_ddpm_options(diffusion, "SD3", flow.TIMESTEP_OPTIONS)


def encode_prompts(parts: Parts, captions: list[str]) -> dict:
    """{"encoder_hidden_states": (B, 77 + 256, D_t5), "pooled": (B, P_L + P_G)} from diffusers' own
    `encode_prompt` (not under no_grad: gradients reach the text encoders when they train).

    encoder_hidden_states is CLIP-L's then CLIP-G's penultimate hidden states side by side (77 tokens), zero-padded
    to T5's width, followed by T5's 256 tokens (zeros without T5); `drop_conditioning` relies on this layout."""
    pipe = pipeline(parts, parts.denoiser)  # the transformer's config gives the zeros' width without T5
    embeds, _, pooled, _ = pipe.encode_prompt(captions, None, None, device=parts.text_encoder.device,
                                              do_classifier_free_guidance=False, max_sequence_length=T5_TOKENS)
    return {"encoder_hidden_states": embeds, "pooled": pooled}


@torch.no_grad()
def encode_images(parts: Parts, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] to shifted and scaled latents (B, 16, H/8, W/8)."""
    return sample_latents(parts, *encode_image_dists(parts, pixels), generator)


def sample_latents(parts: Parts, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A draw from the latent distribution, then (x − shift_factor) · scaling_factor, the inverse of what the
    pipeline does before decoding."""
    config = parts.vae.config
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * noise - (config.shift_factor or 0.0)) * config.scaling_factor


def noisy_input_and_target(parts: Parts, latents: torch.Tensor, generator: torch.Generator, diffusion):
    """Rectified flow: noise levels from the job's density on the model's schedule, shifted by
    diffusion.flow_shift (0: the scheduler's own shift, 3.0 for SD3); the target is the velocity noise − latents."""
    config = parts.noise_scheduler.config
    shift = diffusion.flow_shift or config.shift
    return flow.noisy_input_and_target(latents, generator, diffusion, config.num_train_timesteps, shift)


def conditioning_extras(batch: dict) -> dict:
    """Conditioning taken from the batch rather than the caption: none for this family."""
    return {}


def drop_conditioning(parts: Parts, cond: dict, generator: torch.Generator, diffusion) -> dict:
    """Per-encoder embedding dropout for classifier-free guidance: each sample's CLIP-L slice
    (encoder_hidden_states[:, :77, :d_L]), CLIP-G slice ([:, :77, d_L:d_L + d_G]) and T5 slice ([:, 77:, :]) are
    zeroed with diffusion.encoder_dropout's three probabilities (a shorter list repeats its last value, as for
    SDXL), and the pooled embedding with diffusion.pooled_dropout. The zero padding after the CLIP slices stays."""
    probs = list(diffusion.encoder_dropout)[:3]
    if not probs and not diffusion.pooled_dropout:
        return cond
    probs += [probs[-1] if probs else 0.0] * (3 - len(probs))
    tokens = parts.tokenizer.model_max_length  # CLIP's 77
    width_l = parts.text_encoder.one.config.hidden_size
    width_lg = width_l + parts.text_encoder.two.config.hidden_size
    hidden = cond["encoder_hidden_states"]
    clip = torch.cat([drop_rows(hidden[:, :tokens, :width_l], probs[0], generator),
                      drop_rows(hidden[:, :tokens, width_l:width_lg], probs[1], generator),
                      hidden[:, :tokens, width_lg:]], dim=-1)
    t5 = drop_rows(hidden[:, tokens:], probs[2], generator)
    return {**cond, "encoder_hidden_states": torch.cat([clip, t5], dim=1),
            "pooled": drop_rows(cond["pooled"], diffusion.pooled_dropout, generator)}


def predict(parts: Parts, transformer, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
    patch = parts.denoiser.config.patch_size
    if noisy.shape[-1] % patch or noisy.shape[-2] % patch:
        raise JobError(f"dataset.bucket_step: latents of {noisy.shape[-1]}x{noisy.shape[-2]} do not split into "
                       f"the transformer's {patch}x{patch} patches; use bucket sides that are multiples of 16")
    return transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=cond["encoder_hidden_states"],
                       pooled_projections=cond["pooled"]).sample


def validation_pipeline(parts: Parts, denoiser):
    pipe = pipeline(parts, denoiser)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_lora_diffusers(directory: Path, states: dict[str, dict], adapter_configs: dict[str, dict]) -> Path:
    _refuse_t5(states)
    return save_lora_with(FAMILIES["sd3"].pipeline_class, directory, states, adapter_configs)


def kohya_state_dict(states: dict[str, dict], alpha: float) -> dict:
    """The LoRA for ComfyUI: diffusers' names (`transformer.transformer_blocks.0.attn.to_q.lora_A.weight`,
    `text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight`), each lora_B scaled by alpha/rank
    and no `.alpha` keys.

    Why this and not kohya's own SD3 layout (`lora_unet_joint_blocks_0_x_block_attn_qkv`, the original MMDiT's
    fused qkv): ComfyUI maps diffusers' `transformer.*` and `text_encoder(_2).text_model.*` names for SD3 (its
    lora.py `model_lora_keys_unet` / `model_lora_keys_clip`), and diffusers' SD3 loader reads only these names (it
    converts no kohya SD3 keys), so one file serves both. Without `.alpha` keys ComfyUI applies scale 1 and
    diffusers takes alpha = rank, also scale 1: the job's alpha is folded into lora_B so both apply it."""
    _refuse_t5(states)
    return alpha_folded(states, alpha)


def kohya_metadata(parts: Parts) -> dict[str, str]:
    return {"ss_base_model_version": parts.base_version, "ss_v2": "False", "ss_v_parameterization": "False"}


def _refuse_t5(states: dict[str, dict]) -> None:
    if "text_encoder_3" in states:
        raise JobError("text_encoder.mode: SD3 LoRA files hold the transformer and the two CLIP encoders only "
                       "(diffusers and ComfyUI load no T5 LoRA); set model.load_t5 to false to train the CLIPs")
