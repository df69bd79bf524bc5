"""Flux.1 (dev, schnell): a guidance-distilled transformer on 2x2-packed latents, trained by flow matching, with a
CLIP-L pooled embedding and T5 token embeddings for the prompt, and a 16-channel VAE.

What differs from SD3: the latents are packed into tokens (with position ids) before the transformer and unpacked
after; the transformer takes its timestep in [0, 1] and, for dev, a guidance value through its guidance embedding
(diffusion.flux_guidance while training); the flow shift grows with the image's token count, as Flux's scheduler
shifts it; only CLIP can train (T5 stays frozen); and LoRA files carry diffusers' transformer names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..job import DiffusionSpec, JobError, ModelSpec
from . import flow, noise
from .sd import _load_pipeline, alpha_folded, drop_rows, encode_image_dists, save_lora_with  # noqa: F401
from .sd3 import encode_images, sample_latents  # noqa: F401  (the same VAE layout as SD3: shifted, then scaled)
from .table import FAMILIES
from .text_encoders import TextEncoders

DENOISER = FAMILIES["flux"].denoiser
IMAGE_ENCODER = FAMILIES["flux"].image_encoder
T5_TOKENS = FAMILIES["flux"].t5_tokens


@dataclass
class Parts:
    denoiser: Any  # FluxTransformer2DModel
    vae: Any
    text_encoder: TextEncoders
    tokenizer: Any  # CLIP's
    tokenizer_2: Any  # T5's
    noise_scheduler: Any  # a copy of the model's flow-matching scheduler: its config holds N and the shift rule
    sample_scheduler: Any  # the model's own scheduler: validation images
    prediction_type: str = "flow_prediction"
    base_version: str = "flux1"  # kohya's ss_base_model_version
    guidance: float = 1.0  # what the guidance embedding is fed while training; prepare_noise sets the job's


def load(spec: ModelSpec) -> Parts:
    """The model's parts from a local diffusers folder, a hub id, or a single-file checkpoint (with config)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    if spec.prediction_type != "auto":
        raise JobError(f"model.prediction_type: Flux is trained by flow matching, not {spec.prediction_type}; "
                       "leave it on auto")
    if not spec.load_t5:
        raise JobError("model.load_t5: Flux reads the prompt's tokens through T5 alone (CLIP gives only a pooled "
                       "vector); it cannot be left out")
    pipe = _load_pipeline(FluxPipeline, spec)
    encoders = TextEncoders(clip=pipe.text_encoder, t5=pipe.text_encoder_2)
    for frozen in (pipe.vae, encoders):
        frozen.requires_grad_(False)
        frozen.eval()
    noise_scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return Parts(pipe.transformer, pipe.vae, encoders, pipe.tokenizer, pipe.tokenizer_2, noise_scheduler,
                 pipe.scheduler)


def text_encoders(parts: Parts) -> dict:
    """{pipeline component name: (tokenizer, text encoder)} of the encoders that can train (LoRA, full, new
    tokens): CLIP only. T5 always stays frozen: diffusers' FluxPipeline and ComfyUI load no T5 LoRA, and at 4.7B
    parameters training it is not what Flux LoRAs do; a new token reaches T5 as plain text."""
    return {"text_encoder": (parts.tokenizer, parts.text_encoder.clip)}


def pipeline(parts: Parts, denoiser):
    """The family's diffusers pipeline over these parts (for saving, class images and validation)."""
    from diffusers import FluxPipeline

    enc = parts.text_encoder
    return FluxPipeline(scheduler=parts.sample_scheduler, vae=parts.vae, text_encoder=enc.clip,
                        tokenizer=parts.tokenizer, text_encoder_2=enc.t5, tokenizer_2=parts.tokenizer_2,
                        transformer=denoiser)


def prepare_noise(parts: Parts, diffusion: DiffusionSpec) -> list[str]:
    """Keep the job's training guidance on the parts (predict feeds it to the guidance embedding); notes for the
    DDPM options that flow matching has no use for, and for a guidance the model cannot take (schnell)."""
    parts.guidance = diffusion.flux_guidance
    notes = noise.unused_ddpm_options(diffusion, "Flux", flow.TIMESTEP_OPTIONS)
    if diffusion.flux_guidance != 1.0 and not parts.denoiser.config.guidance_embeds:
        notes.append("diffusion.flux_guidance: this model has no guidance embedding (e.g. FLUX.1-schnell); "
                     "it is not used")
    return notes


def encode_prompts(parts: Parts, captions: list[str]) -> dict:
    """{"encoder_hidden_states": (B, 512, D_t5) T5's tokens, "pooled": (B, D_clip) CLIP's pooled output} from
    diffusers' own `encode_prompt` (not under no_grad: gradients reach CLIP when it trains)."""
    pipe = pipeline(parts, parts.denoiser)
    embeds, pooled, _ = pipe.encode_prompt(captions, None, device=parts.text_encoder.device,
                                           max_sequence_length=T5_TOKENS)
    return {"encoder_hidden_states": embeds, "pooled": pooled}


def noisy_input_and_target(parts: Parts, latents: torch.Tensor, generator: torch.Generator, diffusion):
    """Rectified flow: noise levels from the job's density on the model's schedule, shifted by
    diffusion.flow_shift, or (0) as the model's scheduler shifts them: with dynamic shifting (dev, schnell's
    config says not) by e^μ, μ growing linearly with the image's token count (h/2 · w/2), else by its fixed
    shift. The target is the velocity noise − latents."""
    config = parts.noise_scheduler.config
    shift = diffusion.flow_shift
    if not shift:
        tokens = (latents.shape[-2] // 2) * (latents.shape[-1] // 2)
        shift = flow.resolution_shift(config, tokens) if config.use_dynamic_shifting else config.shift
    return flow.noisy_input_and_target(latents, generator, diffusion, config.num_train_timesteps, shift)


def conditioning_extras(batch: dict) -> dict:
    """Conditioning taken from the batch rather than the caption: none for this family."""
    return {}


def drop_conditioning(parts: Parts, cond: dict, generator: torch.Generator, diffusion) -> dict:
    """Per-encoder embedding dropout for classifier-free guidance, each sample on its own draw:
    diffusion.encoder_dropout is [CLIP, T5] (one value serves both). CLIP's only part in Flux is the pooled
    embedding, so its probability and diffusion.pooled_dropout both zero that (a sample is zeroed when either
    draw says so); T5's zeroes encoder_hidden_states."""
    probs = list(diffusion.encoder_dropout)[:2]
    if not probs and not diffusion.pooled_dropout:
        return cond
    probs += [probs[-1] if probs else 0.0] * (2 - len(probs))
    pooled = drop_rows(cond["pooled"], probs[0], generator)
    hidden = drop_rows(cond["encoder_hidden_states"], probs[1], generator)
    return {**cond, "encoder_hidden_states": hidden,
            "pooled": drop_rows(pooled, diffusion.pooled_dropout, generator)}


def predict(parts: Parts, transformer, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
    """The velocity for latents (B, 16, h, w): packed into (h/2 · w/2) tokens of 64 with their position ids, as
    FluxPipeline does; the timestep in [0, 1] and, when the model has a guidance embedding, parts.guidance."""
    from diffusers import FluxPipeline

    batch, channels, height, width = noisy.shape
    if height % 2 or width % 2:
        raise JobError(f"dataset.bucket_step: latents of {width}x{height} do not pack into Flux's 2x2 patches; "
                       "use bucket sides that are multiples of 16")
    tokens = FluxPipeline._pack_latents(noisy, batch, channels, height, width)
    img_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, noisy.device, noisy.dtype)
    hidden = cond["encoder_hidden_states"]
    txt_ids = torch.zeros(hidden.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
    guidance = None
    if transformer.config.guidance_embeds:
        guidance = torch.full((batch,), parts.guidance, device=noisy.device, dtype=torch.float32)
    out = transformer(hidden_states=tokens, timestep=timesteps / parts.noise_scheduler.config.num_train_timesteps,
                      guidance=guidance, pooled_projections=cond["pooled"], encoder_hidden_states=hidden,
                      txt_ids=txt_ids, img_ids=img_ids).sample
    return FluxPipeline._unpack_latents(out, height, width, vae_scale_factor=1)  # h, w are latent sizes already


def validation_pipeline(parts: Parts, denoiser):
    """FluxPipeline itself: the loop's `negative_prompt` is accepted and left unused (it only acts with
    true_cfg_scale > 1, which a guidance-distilled model does not need); guidance_scale feeds the guidance
    embedding."""
    pipe = pipeline(parts, denoiser)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_lora_diffusers(directory: Path, states: dict[str, dict], adapter_configs: dict[str, dict]) -> Path:
    return save_lora_with(FAMILIES["flux"].pipeline_class, directory, states, adapter_configs)


def kohya_state_dict(states: dict[str, dict], alpha: float) -> dict:
    """The LoRA for ComfyUI: diffusers' names (`transformer.transformer_blocks.0.attn.to_q.lora_A.weight`,
    `text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight`), each lora_B scaled by alpha/rank
    and no `.alpha` keys.

    Why not kohya's own Flux layout (`lora_unet_double_blocks_0_img_attn_qkv`, BFL's fused qkv, and
    `single_blocks_N_linear1` fusing q, k, v and the MLP): ComfyUI maps diffusers' `transformer.*` Flux names
    onto the slices of those fused weights (its lora.py, `model_lora_keys_unet` via `flux_to_diffusers`) and
    `text_encoder.text_model.*` onto CLIP-L (`model_lora_keys_clip`), while diffusers' kohya-Flux converter
    assumes FLUX.1's exact sizes (3072-wide slices of linear1), so the fused layout would not load back into
    other Flux-shaped models. Diffusers reads these names directly, so one file serves both. Without `.alpha`
    keys ComfyUI applies scale 1 and diffusers takes alpha = rank, also scale 1: the job's alpha is folded into
    lora_B so both apply it."""
    return alpha_folded(states, alpha)


def kohya_metadata(parts: Parts) -> dict[str, str]:
    return {"ss_base_model_version": parts.base_version, "ss_v2": "False", "ss_v_parameterization": "False"}
