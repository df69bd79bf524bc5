"""Stable Diffusion 1.x and 2.x: everything the training loop needs to know about this family.

Loading the parts, encoding prompts, the noisy input and its target (epsilon or v-prediction), the validation
pipeline, and how its LoRA files are named and labelled for kohya-format tools.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..job import DiffusionSpec, JobError, ModelSpec
from . import empty_models
from .noise import draw_noise, draw_timesteps, min_snr_weights, timestep_weights, zero_terminal_snr_schedulers
from .table import FAMILIES

DENOISER = FAMILIES["sd1"].denoiser
IMAGE_ENCODER = FAMILIES["sd1"].image_encoder


@dataclass
class Parts:
    denoiser: Any  # the UNet
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any  # DDPM with the model's betas: adds noise during training
    sample_scheduler: Any  # the model's own scheduler: used for validation images
    prediction_type: str
    base_version: str  # kohya's ss_base_model_version


def load(spec: ModelSpec) -> Parts:
    """The model's parts from a local diffusers folder, a hub id, or a single-file checkpoint."""
    from diffusers import StableDiffusionPipeline

    pipe = _load_pipeline(StableDiffusionPipeline, spec, safety_checker=None, requires_safety_checker=False)
    noise_scheduler, prediction_type = noise_scheduler_for(pipe, spec)
    is_v2 = pipe.unet.config.cross_attention_dim == 1024
    for frozen in (pipe.vae, pipe.text_encoder):
        frozen.requires_grad_(False)
        frozen.eval()
    return Parts(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, noise_scheduler, pipe.scheduler,
                 prediction_type, "sd_v2" if is_v2 else "sd_v1")


def text_encoders(parts: Parts) -> dict:
    """{pipeline component name: (tokenizer, text encoder)} for every text encoder of the model."""
    return {"text_encoder": (parts.tokenizer, parts.text_encoder)}


def pipeline(parts: Parts, denoiser):
    """The family's diffusers pipeline over these parts (for saving, class images and validation)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                   unet=denoiser, scheduler=parts.sample_scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def noise_scheduler_for(pipe, spec: ModelSpec):
    """A DDPM scheduler with the model's betas for training noise, and the prediction type: the job's, or the
    model's scheduler config's when the job says auto. The sampling scheduler is told the same."""
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction_type = spec.prediction_type
    if prediction_type == "auto":
        prediction_type = noise_scheduler.config.get("prediction_type", "epsilon")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise JobError(f"model.prediction_type: the model's scheduler says {prediction_type!r}; "
                       "set epsilon or v_prediction")
    noise_scheduler.register_to_config(prediction_type=prediction_type)
    pipe.scheduler.register_to_config(prediction_type=prediction_type)
    return noise_scheduler, prediction_type


def prepare_noise(parts: Parts, diffusion: DiffusionSpec) -> list[str]:
    """Apply the job's diffusion options to loaded parts (once, after `load`): zero terminal SNR rescales the
    training and sampling schedulers, and the timestep-bias weights are computed now, so a bad range fails before
    training. Returns notes for the log (warnings)."""
    notes = []
    if diffusion.zero_terminal_snr:
        parts.noise_scheduler, parts.sample_scheduler, notes = zero_terminal_snr_schedulers(
            parts.noise_scheduler, parts.sample_scheduler, parts.prediction_type)
    timestep_weights(diffusion, parts.noise_scheduler.config.num_train_timesteps)
    return notes


def encode_prompts(parts: Parts, captions: list[str]) -> dict:
    """Not under no_grad: gradients reach the text encoder when it trains; callers that cache wrap it."""
    tok = parts.tokenizer(captions, padding="max_length", max_length=parts.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt")
    ids = tok.input_ids.to(parts.text_encoder.device)
    return {"encoder_hidden_states": parts.text_encoder(ids)[0]}


@torch.no_grad()
def encode_images(parts: Parts, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] to scaled latents (B, 4, H/8, W/8)."""
    return sample_latents(parts, *encode_image_dists(parts, pixels), generator)


@torch.no_grad()
def encode_image_dists(parts: Parts, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's latent distribution, mean and std (B, 4, H/8, W/8): what the latent cache keeps."""
    dist = parts.vae.encode(pixels.to(parts.vae.device, parts.vae.dtype)).latent_dist
    return dist.mean, dist.std


def sample_latents(parts: Parts, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A draw from the latent distribution, scaled: the same draw diffusers' `latent_dist.sample` makes."""
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * noise) * parts.vae.config.scaling_factor


def noisy_input_and_target(parts: Parts, latents: torch.Tensor, generator: torch.Generator, diffusion):
    """DDPM forward process: a random timestep per sample, the noised latents, what the UNet must predict, and
    each sample's loss weight (B,), with the job's noise offset, timestep bias and min-SNR-gamma weighting."""
    sched = parts.noise_scheduler
    if diffusion.zero_terminal_snr and not sched.config.get("rescale_betas_zero_snr"):
        raise RuntimeError("diffusion.zero_terminal_snr is set but prepare_noise(parts, diffusion) was not called")
    num_timesteps = sched.config.num_train_timesteps
    noise = draw_noise(latents, generator, diffusion.noise_offset)
    timesteps = draw_timesteps(latents.shape[0], num_timesteps, generator, latents.device,
                               timestep_weights(diffusion, num_timesteps, latents.device))
    noisy = sched.add_noise(latents, noise, timesteps)
    if parts.prediction_type == "v_prediction":
        target = sched.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    if diffusion.min_snr_gamma > 0:
        weight = min_snr_weights(sched, timesteps, diffusion.min_snr_gamma, parts.prediction_type)
    else:
        weight = torch.ones(latents.shape[0], device=latents.device)
    return noisy, timesteps, target, weight


def conditioning_extras(batch: dict) -> dict:
    """Conditioning taken from the batch rather than the caption: none for this family."""
    return {}


def drop_conditioning(parts: Parts, cond: dict, generator: torch.Generator, diffusion) -> dict:
    """Embedding dropout for classifier-free guidance: the text embedding zeroed per sample with probability
    diffusion.encoder_dropout[0] (caption dropout, the usual way for this family, trains the empty prompt)."""
    if diffusion.encoder_dropout:
        cond = {**cond, "encoder_hidden_states": drop_rows(cond["encoder_hidden_states"],
                                                           diffusion.encoder_dropout[0], generator)}
    return cond


def drop_rows(tensor: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """Each sample (first dim) zeroed with `probability`; draws nothing when it is 0, so seeded runs replay."""
    if probability <= 0:
        return tensor
    keep = torch.rand(tensor.shape[0], generator=generator, device=generator.device) >= probability
    return tensor * keep.to(tensor.device, tensor.dtype).view(-1, *([1] * (tensor.ndim - 1)))


def predict(parts: Parts, unet, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
    return unet(noisy, timesteps, encoder_hidden_states=cond["encoder_hidden_states"]).sample


def validation_pipeline(parts: Parts, denoiser):
    pipe = pipeline(parts, denoiser)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_lora_diffusers(directory: Path, states: dict[str, dict], adapter_configs: dict[str, dict]) -> Path:
    return save_lora_with(FAMILIES["sd1"].pipeline_class, directory, states, adapter_configs)


def save_lora_with(pipeline_class: str, directory: Path, states: dict[str, dict],
                   adapter_configs: dict[str, dict]) -> Path:
    """DIRECTORY/pytorch_lora_weights.safetensors, written by the family pipeline's own `save_lora_weights`, so its
    `load_lora_weights(directory)` reads it; `states` and `adapter_configs` (alpha, travelling in the file's
    metadata) are keyed by component ("unet", "transformer", "text_encoder", ...).

    Keys stay in PEFT form (`unet.<module>.lora_A.weight`): diffusers' older-format conversion renames only the
    attention projections, and its loader then drops them when other modules (convs, feed-forward) are trained.
    """
    import diffusers

    getattr(diffusers, pipeline_class).save_lora_weights(directory, **_lora_kwargs(states, adapter_configs),
                                                         safe_serialization=True)
    return Path(directory) / "pytorch_lora_weights.safetensors"


def kohya_state_dict(states: dict[str, dict], alpha: float) -> dict:
    """PEFT LoRA keys to kohya names (`lora_unet_down_blocks_0_..._to_q.lora_down.weight` + `.alpha`; text
    encoders `lora_te1_text_model_encoder_layers_0_self_attn_q_proj...`, SDXL's second `lora_te2_...`); a LoHa,
    LoKr or DoRA in the LyCORIS layout under the same module names (`lora_unet_..._to_q.hada_w1_a`, `.lokr_w1`,
    `.dora_scale`), which ComfyUI and A1111 read."""
    from diffusers.utils import convert_state_dict_to_kohya

    from ..export.lora_files import LYCORIS_NAMES, lycoris_state_dict

    prefixed = {f"{component}.{_clip_path(component, k)}": v for component, state in states.items()
                for k, v in state.items() if k.rpartition(".")[2] not in LYCORIS_NAMES}
    out = convert_state_dict_to_kohya(prefixed) if prefixed else {}
    # diffusers writes alpha = rank; the network was trained with the job's alpha, so that is what tools need.
    for key in out:
        if key.endswith(".alpha"):
            out[key] = torch.tensor(float(alpha))
    for component, state in states.items():
        out.update(lycoris_state_dict(KOHYA_PREFIXES[component], state, alpha))
    return {k: v.contiguous() for k, v in out.items()}


# kohya's name for each component's modules (diffusers' converter writes the same for LoRA keys).
KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}


def alpha_folded(states: dict[str, dict], alpha: float) -> dict:
    """PEFT LoRA keys with diffusers' component prefixes and the job's alpha/rank folded into lora_B, for the
    families whose tools read diffusers' names (SD3, Flux): without `.alpha` keys both ComfyUI and diffusers
    apply scale 1, so the folded weights give the trained strength in each."""
    out = {}
    for component, state in states.items():
        for key, value in state.items():
            if ".lora_B." in key:
                rank = state[key.replace(".lora_B.", ".lora_A.")].shape[0]
                value = value * (alpha / rank)
            out[f"{component}.{_clip_path(component, key)}"] = value.contiguous()
    return out


def _clip_path(component: str, key: str) -> str:
    """transformers 5 names CLIPTextModel's weights without the `text_model.` level that A1111 and ComfyUI
    expect in kohya text-encoder names (they skip `lora_te1_encoder_...` silently); put it back."""
    if component.startswith("text_encoder") and not key.startswith("text_model."):
        return f"text_model.{key}"
    return key


def kohya_metadata(parts: Parts) -> dict[str, str]:
    is_v2 = parts.base_version == "sd_v2"
    return {"ss_base_model_version": parts.base_version, "ss_v2": str(is_v2),
            "ss_v_parameterization": str(parts.prediction_type == "v_prediction")}


def _lora_kwargs(states: dict[str, dict], adapter_configs: dict[str, dict]) -> dict:
    """save_lora_weights' keyword arguments: `unet_lora_layers=...`, `unet_lora_adapter_metadata=...`, ..."""
    out = {}
    for component, state in states.items():
        out[f"{component}_lora_layers"] = state
        out[f"{component}_lora_adapter_metadata"] = adapter_configs[component]
    return out


def _load_pipeline(pipeline_cls, spec: ModelSpec, **common):
    """`pipeline_cls` from a diffusers folder, hub id or single .safetensors file; `common` goes to the loader."""
    path = spec.path
    try:
        if Path(path).suffix.lower() in (".safetensors", ".ckpt", ".pt", ".bin"):
            if Path(path).suffix.lower() != ".safetensors":
                raise JobError(f"model.path: {path}: only .safetensors checkpoints are loaded (pickled "
                               "checkpoints can run code); convert it first")
            config = spec.config or None
            local = bool(config) and Path(config).is_dir()
            common = {**_unbundled_parts(spec, local, skip=set(common)), **common}
            return pipeline_cls.from_single_file(path, config=config, local_files_only=local, **common)
        if empty_models.wanted(path):  # configs only: every model on the meta device, nothing read
            common = {**empty_models.pipeline_models(path, skip=set(common)), **common}
        return pipeline_cls.from_pretrained(path, revision=spec.revision or None, variant=spec.variant or None,
                                            **common)
    except JobError:
        raise
    except (OSError, ValueError, EnvironmentError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise JobError(f"model.path: {path}: cannot load ({first})") from None


def _unbundled_parts(spec: ModelSpec, local: bool, skip: set[str]) -> dict:
    """The text encoders and VAE a single file does not bundle (some share the denoiser alone), loaded from the
    folder or model id in model.config: {component name: model}, for `from_single_file`'s keyword arguments."""
    from importlib import import_module

    from diffusers import DiffusionPipeline

    from .model_files import check_bundled_parts, stored_model

    check_bundled_parts(spec)  # without model.config: the one line that says what is missing
    found = stored_model(spec)
    if found.text_encoders and found.vae:
        return {}
    index = DiffusionPipeline.load_config(spec.config, local_files_only=local)
    wanted = [name for name, entry in index.items() if isinstance(entry, list) and entry[0] is not None
              and name not in skip and ((name.startswith("text_encoder") and not found.text_encoders)
                                        or (name == "vae" and not found.vae))]
    return {name: getattr(import_module(index[name][0]), index[name][1]).from_pretrained(
        spec.config, subfolder=name, local_files_only=local) for name in wanted}
