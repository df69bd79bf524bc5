"""Stable Diffusion XL: two text encoders, the pooled embedding and size micro-conditioning.

What differs from SD1.x/2.x: the prompt is encoded by both CLIP encoders (their penultimate hidden states
concatenated, as diffusers' pipeline does) plus text_encoder_2's pooled projection, and the UNet also gets each
sample's original size, crop offset and target size (`time_ids`), which the batch carries from the buckets.

The VAE: SDXL's original VAE overflows in fp16 (NaN latents, black images). The loop keeps the VAE in fp32
always: for caching, for encoding uncached images, and for decoding validation images (taken out of the loop's
autocast), so no fp16-fixed VAE is needed; a model that ships one is loaded like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..job import JobError, ModelSpec
from .sd import (DENOISER, IMAGE_ENCODER, _load_pipeline, drop_rows, encode_image_dists, encode_images,
                 noise_scheduler_for, noisy_input_and_target, prepare_noise, sample_latents, save_lora_with)
from .table import FAMILIES
from .text_encoders import TextEncoders

__all__ = ["DENOISER", "IMAGE_ENCODER", "Parts", "load", "text_encoders", "pipeline", "encode_prompts", "encode_images",
           "encode_image_dists", "sample_latents", "prepare_noise", "noisy_input_and_target",
           "conditioning_extras", "predict", "validation_pipeline", "save_lora_diffusers", "kohya_state_dict",
           "kohya_metadata"]

@dataclass
class Parts:
    denoiser: Any  # the UNet
    vae: Any
    text_encoder: TextEncoders
    tokenizer: Any
    tokenizer_2: Any
    noise_scheduler: Any  # DDPM with the model's betas: adds noise during training
    sample_scheduler: Any  # the model's own scheduler (Euler for SDXL base): validation images
    prediction_type: str
    base_version: str = "sdxl_base_v1-0"  # kohya's ss_base_model_version


def load(spec: ModelSpec) -> Parts:
    """The model's parts from a local diffusers folder, a hub id, or a single-file checkpoint (with config)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = _load_pipeline(StableDiffusionXLPipeline, spec, add_watermarker=False)
    if pipe.text_encoder is None or getattr(pipe.unet.config, "addition_embed_type", None) != "text_time":
        raise JobError(f"model.path: {spec.path}: not an SDXL base model (the refiner has one text encoder "
                       "and is not supported)")
    noise_scheduler, prediction_type = noise_scheduler_for(pipe, spec)
    encoders = TextEncoders(one=pipe.text_encoder, two=pipe.text_encoder_2)
    for frozen in (pipe.vae, encoders):
        frozen.requires_grad_(False)
        frozen.eval()
    return Parts(pipe.unet, pipe.vae, encoders, pipe.tokenizer, pipe.tokenizer_2, noise_scheduler,
                 pipe.scheduler, prediction_type)


def text_encoders(parts: Parts) -> dict:
    """{pipeline component name: (tokenizer, text encoder)} for both CLIP encoders."""
    return {"text_encoder": (parts.tokenizer, parts.text_encoder.one),
            "text_encoder_2": (parts.tokenizer_2, parts.text_encoder.two)}


def encode_prompts(parts: Parts, captions: list[str]) -> dict:
    """{"encoder_hidden_states": (B, 77, d1 + d2), "pooled": (B, p)} from diffusers' own `encode_prompt`
    (not under no_grad: gradients reach the text encoders when they train)."""
    pipe = pipeline(parts, None)
    embeds, _, pooled, _ = pipe.encode_prompt(captions, device=parts.text_encoder.device,
                                              do_classifier_free_guidance=False)
    return {"encoder_hidden_states": embeds, "pooled": pooled}


def conditioning_extras(batch: dict) -> dict:
    """SDXL's micro-conditioning per sample: original (h, w) + crop (top, left) + target (h, w): (B, 6).

    The same six numbers diffusers' pipeline builds in `_get_add_time_ids`, but from each sample's own image
    and bucket, as SDXL was trained."""
    sizes = (batch["original_size"], batch["crop_top_left"], batch["target_size"])  # each (B, 2)
    return {"time_ids": torch.cat(sizes, dim=1).float()}


def drop_conditioning(parts: Parts, cond: dict, generator: torch.Generator, diffusion) -> dict:
    """Per-encoder embedding dropout: CLIP-L's and CLIP-G's parts of the hidden states (concatenated along the
    feature axis) each zeroed per sample with its own probability, and the pooled embedding with its own."""
    probs = list(diffusion.encoder_dropout)[:2]
    if not probs and not diffusion.pooled_dropout:
        return cond
    probs += [probs[-1] if probs else 0.0] * (2 - len(probs))
    split = parts.text_encoder.one.config.hidden_size
    hidden = cond["encoder_hidden_states"]
    one = drop_rows(hidden[..., :split], probs[0], generator)
    two = drop_rows(hidden[..., split:], probs[1], generator)
    pooled = drop_rows(cond["pooled"], diffusion.pooled_dropout, generator)
    return {**cond, "encoder_hidden_states": torch.cat([one, two], dim=-1), "pooled": pooled}


def predict(parts: Parts, unet, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
    added = {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}
    return unet(noisy, timesteps, encoder_hidden_states=cond["encoder_hidden_states"],
                added_cond_kwargs=added).sample


def validation_pipeline(parts: Parts, denoiser):
    pipe = pipeline(parts, denoiser)
    pipe.set_progress_bar_config(disable=True)
    return _Fp32Decode(pipe)


class _Fp32Decode:
    """The SDXL pipeline with its VAE decode taken out of autocast: the loop renders validation images under
    the training precision, and SDXL's VAE overflows in fp16 even with fp32 weights (autocast computes its
    convolutions in fp16). Called like the pipeline; returns its output type."""

    def __init__(self, pipe):
        self.pipe = pipe

    def __getattr__(self, name):  # the pipeline's own LoRA methods (trainer sample loads a LoRA file through them)
        return getattr(self.pipe, name)

    def __call__(self, *args, output_type: str = "pil", **kwargs):
        from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput

        latents = self.pipe(*args, **kwargs, output_type="latent").images  # (B, 4, h, w), scaled
        vae = self.pipe.vae
        with torch.autocast(latents.device.type, enabled=False):
            image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return StableDiffusionXLPipelineOutput(images=self.pipe.image_processor.postprocess(image, output_type))


def save_lora_diffusers(directory: Path, states: dict[str, dict], adapter_configs: dict[str, dict]) -> Path:
    return save_lora_with(FAMILIES["sdxl"].pipeline_class, directory, states, adapter_configs)


def kohya_state_dict(states: dict[str, dict], alpha: float) -> dict:
    """UNet LoRA keys to kohya names (`lora_unet_down_blocks_1_..._to_q.lora_down.weight` + `.alpha`).

    The names follow diffusers' UNet layout, which diffusers, ComfyUI and A1111 all map for SDXL; kohya's own
    sd-scripts writes the original layout (`lora_unet_input_blocks_...`)."""
    from .sd import kohya_state_dict as sd_kohya

    return sd_kohya(states, alpha)


def kohya_metadata(parts: Parts) -> dict[str, str]:
    return {"ss_base_model_version": parts.base_version, "ss_v2": "False",
            "ss_v_parameterization": str(parts.prediction_type == "v_prediction")}


def pipeline(parts: Parts, denoiser):
    """The family's diffusers pipeline over these parts (for saving, class images and validation)."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder.one, text_encoder_2=parts.text_encoder.two,
        tokenizer=parts.tokenizer, tokenizer_2=parts.tokenizer_2, unet=denoiser, scheduler=parts.sample_scheduler,
        add_watermarker=False)
