"""Stable Cascade stage C (Würstchen v3): a LoRA or fine-tune of the text-conditioned prior, trained as Stability's
train_c does; stages A and B stay frozen and only turn stage C's latents into validation images.

What differs from the other families: the latents are not a VAE's but an EfficientNetV2-S encoder's (16 channels,
1/32 of the image side: 24x24 for the 768 px images stage C trains on, which stage B renders at 1024 px); the noise
is Würstchen's GDF (a cosine schedule on a continuous t in [0, 1], an epsilon target, the P2 loss weight); and
diffusers has no LoRA loader for the prior, so its LoRA file is read by trainer/export/cascade_lora.py.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ..job import DiffusionSpec, JobError, ModelSpec
from . import empty_models, noise
from .noise import draw_noise
from .sd import drop_rows
from .table import FAMILIES

DENOISER = FAMILIES["cascade"].denoiser
LORA_FILE = "pytorch_lora_weights.safetensors"
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' name for the adapter configs in a LoRA file
IMAGE_ENCODER = FAMILIES["cascade"].image_encoder  # the folder of its EfficientNet; names the latent cache
EFFNET_FOLDER, EFFNET_FILE = IMAGE_ENCODER, "effnet_encoder.safetensors"  # inside the model folder
# Where Stability publishes the encoder stage C was trained on (their models/download_models.sh fetches this file).
EFFNET_HUB = ("stabilityai/stable-cascade", "effnet_encoder.safetensors")
EFFNET_STRIDE = 32  # image pixels per stage C latent, a side
DECODER_STEPS = 10  # stage B's sampling steps, diffusers' default for StableCascadeDecoderPipeline
# torchvision's efficientnet_v2_s: the stem's width, then per stage (kind, expansion, kernel, stride, in, out,
# blocks), the last 1x1 conv's width, and the latent channels of Stability's mapper. A model folder's
# effnet/config.json may give another (the tiny test models do); Stability's file has these.
EFFICIENTNET_V2_S = {"stem": 24, "stages": [["fused", 1, 3, 1, 24, 24, 2], ["fused", 4, 3, 2, 24, 48, 4],
                                            ["fused", 4, 3, 2, 48, 64, 4], ["mb", 4, 3, 2, 64, 128, 6],
                                            ["mb", 6, 3, 1, 128, 160, 9], ["mb", 6, 3, 2, 160, 256, 15]],
                     "last": 1280, "latent_channels": 16}
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class EfficientNetEncoder(nn.Module):
    """Stability's EfficientNetEncoder (modules/effnet.py) in plain torch: torchvision's EfficientNetV2 feature
    layers as `backbone`, then a 1x1 conv to the latent channels and a BatchNorm without affine (`mapper`), under
    the same state-dict names, so Stability's effnet_encoder.safetensors loads into it."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        layers = [_conv_bn(3, config["stem"], 3, 2)]
        for kind, expansion, kernel, stride, c_in, c_out, blocks in config["stages"]:
            layers.append(nn.Sequential(*(_MBConv(kind, expansion, kernel, stride if i == 0 else 1,
                                                  c_in if i == 0 else c_out, c_out) for i in range(blocks))))
        layers.append(_conv_bn(config["stages"][-1][5], config["last"], 1, 1))
        self.backbone = nn.Sequential(*layers)
        self.mapper = nn.Sequential(nn.Conv2d(config["last"], config["latent_channels"], 1, bias=False),
                                    nn.BatchNorm2d(config["latent_channels"], affine=False))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.mapper(self.backbone(pixels))

    @property
    def dtype(self) -> torch.dtype:
        return self.mapper[0].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.mapper[0].weight.device


@dataclass
class Parts:
    denoiser: Any  # StableCascadeUNet: stage C, the prior
    vae: Any  # EfficientNetEncoder: images to stage C latents (the loop moves and caches it as the image encoder)
    text_encoder: Any  # CLIPTextModelWithProjection
    tokenizer: Any
    noise_scheduler: Any  # a copy of the model's DDPMWuerstchenScheduler: its `s` shapes the training noise
    sample_scheduler: Any  # the model's own: validation images
    decoder: str = ""  # model.decoder: stage B for validation images; "" without one
    stage_b: Any = None  # its StableCascadeDecoderPipeline, loaded at the first validation (or with the model)


def load(spec: ModelSpec) -> Parts:
    """Stage C from a diffusers folder or hub id (a StableCascadePriorPipeline, or a combined pipeline, whose
    stage B then renders the validation images unless model.decoder names another), and the EfficientNet encoder:
    the model folder's effnet/effnet_encoder.safetensors, else Stability's from the hub."""
    from diffusers import DDPMWuerstchenScheduler

    if spec.prediction_type == "v_prediction":
        raise JobError("model.prediction_type: Stable Cascade stage C predicts the noise (epsilon); leave it on auto")
    _check_decoder(spec.decoder)
    prior_pipe, stage_b = load_pipelines(spec.path, spec.revision, spec.variant)
    scheduler = prior_pipe.scheduler
    if scheduler.config.scaler != 1:
        raise JobError(f"model.path: {spec.path}: the scheduler's scaler is {scheduler.config.scaler}; stage C "
                       "trains on the plain cosine schedule (scaler 1)")
    effnet = load_effnet(spec)
    for frozen in (effnet, prior_pipe.text_encoder):
        frozen.requires_grad_(False)
        frozen.eval()
    return Parts(prior_pipe.prior, effnet, prior_pipe.text_encoder, prior_pipe.tokenizer,
                 DDPMWuerstchenScheduler.from_config(scheduler.config), scheduler, spec.decoder,
                 None if spec.decoder else stage_b)


def load_pipelines(path: str, revision: str = "", variant: str = ""):
    """(StableCascadePriorPipeline, the combined pipeline's stage B as a StableCascadeDecoderPipeline, or None)
    from a diffusers folder or hub id. Built from their components: diffusers' Stable Cascade pipelines are
    deprecated and their `from_pretrained` no longer resolves stage A's class (PaellaVQModel). The prior's CLIP
    image encoder is not loaded: stage C trains and samples from text."""
    if Path(path).suffix.lower() == ".safetensors":
        raise JobError(f"model.path: {path}: Stable Cascade loads from a diffusers folder or model id, not a "
                       "single file")
    index = Path(path).expanduser() / "model_index.json"
    combined = index.is_file() and \
        json.loads(index.read_text(encoding="utf-8")).get("_class_name") == "StableCascadeCombinedPipeline"
    prior_pipe = _load_stage_c(path, "prior_" if combined else "", revision, variant)
    return prior_pipe, (load_decoder(path, torch.float32, "model.path", revision, variant) if combined else None)


def load_effnet(spec: ModelSpec) -> EfficientNetEncoder:
    """The EfficientNet encoder: architecture from effnet/config.json (EfficientNetV2-S without one), weights from
    effnet/effnet_encoder.safetensors in the model folder, else Stability's file from the hub."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(spec.path).expanduser() / EFFNET_FOLDER
    config_file, weights = folder / "config.json", folder / EFFNET_FILE
    try:
        encoder = EfficientNetEncoder(json.loads(config_file.read_text(encoding="utf-8"))
                                      if config_file.is_file() else EFFICIENTNET_V2_S)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise JobError(f"model.path: {config_file}: not an EfficientNet layout ({_first_line(exc)})") from None
    if empty_models.wanted(spec.path):
        return encoder.to(empty_models.device())  # configs only: its shapes, no weights
    if not weights.is_file():
        weights = _hub_effnet(weights)
    try:
        missing, unexpected = encoder.load_state_dict(load_file(weights), strict=False)
    except (OSError, SafetensorError, RuntimeError) as exc:  # unreadable, or a tensor of another shape
        raise JobError(f"model.path: {weights}: not Stable Cascade's EfficientNet encoder ({_first_line(exc)})") \
            from None
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]  # a counter, unused in eval mode
    if missing or unexpected:
        raise JobError(f"model.path: {weights}: not Stable Cascade's EfficientNet encoder ("
                       f"{len(missing)} tensors missing, {len(unexpected)} unexpected, e.g. "
                       f"{(missing + unexpected)[0]})")
    return encoder


def save_effnet(encoder: EfficientNetEncoder, model_folder: Path) -> Path:
    """Write effnet/config.json and effnet/effnet_encoder.safetensors into a model folder (what `load` reads)."""
    from safetensors.torch import save_file

    folder = Path(model_folder) / EFFNET_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(encoder.config, indent=1) + "\n", encoding="utf-8")
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, folder / EFFNET_FILE)
    return folder


def text_encoders(parts: Parts) -> dict:
    """{pipeline component name: (tokenizer, text encoder)}: stage C's CLIP ViT-bigG."""
    return {"text_encoder": (parts.tokenizer, parts.text_encoder)}


def pipeline(parts: Parts, denoiser):
    """Stage C's diffusers pipeline over these parts (a full fine-tune's export, prompt encoding, validation)."""
    from diffusers import StableCascadePriorPipeline

    return StableCascadePriorPipeline(tokenizer=parts.tokenizer, text_encoder=parts.text_encoder, prior=denoiser,
                                      scheduler=parts.sample_scheduler)


def prepare_noise(parts: Parts, diffusion: DiffusionSpec) -> list[str]:
    """Notes for the DDPM options that GDF's continuous schedule has no use for (noise_offset is used)."""
    return noise.unused_ddpm_options(diffusion, "Stable Cascade", "Würstchen's cosine schedule on a continuous t, "
                                     "weighted by P2 as in Stability's train_c")


def encode_prompts(parts: Parts, captions: list[str]) -> dict:
    """{"clip_text": (B, 77, D) the CLIP's last hidden states, "clip_text_pooled": (B, 1, P) its projected
    embedding}, from diffusers' own `encode_prompt` (not under no_grad: the text encoder may train)."""
    pipe = pipeline(parts, parts.denoiser)
    hidden, pooled, _, _ = pipe.encode_prompt(parts.text_encoder.device, len(captions), 1, False, prompt=captions)
    return {"clip_text": hidden, "clip_text_pooled": pooled}


@torch.no_grad()
def encode_images(parts: Parts, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] to stage C latents (B, 16, H/32, W/32)."""
    return sample_latents(parts, *encode_image_dists(parts, pixels), generator)


@torch.no_grad()
def encode_image_dists(parts: Parts, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The EfficientNet's latents as (mean, std = 0): the encoder is deterministic. Pixels go in as train_c
    feeds them: in [0, 1], normalised with ImageNet's mean and std."""
    encoder = parts.vae
    pixels = pixels.to(encoder.device, encoder.dtype)
    mean = torch.tensor(_IMAGENET_MEAN, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
    std = torch.tensor(_IMAGENET_STD, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
    latents = encoder(((pixels + 1) / 2 - mean) / std)
    return latents, torch.zeros_like(latents)


def sample_latents(parts: Parts, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The latents themselves: nothing to draw from a deterministic encoder (so no generator draw either)."""
    return mean


def noisy_input_and_target(parts: Parts, latents: torch.Tensor, generator: torch.Generator, diffusion):
    """Würstchen's GDF as train_c sets it up: noise ε (with the job's noise offset), then t = 1 - U[0, 1) + 0.001
    clamped to [0.001, 1]; ᾱ(t) = cos²((t + s)/(1 + s)·π/2) / cos²(s/(1 + s)·π/2) clamped to [1e-4, 0.9999] (the
    cosine schedule DDPMWuerstchenScheduler samples with); noisy = √ᾱ·x + √(1 − ᾱ)·ε; the target is ε; the prior is
    told t recovered from the clamped ᾱ (GDF's CosineTNoiseCond); each sample's loss weight is P2's
    1 / (1 + SNR) = 1 − ᾱ. Returns (noisy, t, target, weight)."""
    s = parts.noise_scheduler.config.s
    noise = draw_noise(latents, generator, diffusion.noise_offset)
    u = torch.rand(latents.shape[0], generator=generator, device=generator.device)
    t = (1 - u).add(0.001).clamp(0.001, 1.0).to(latents.device, torch.float32)
    alpha_bar = (torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / _min_var(s)).clamp(1e-4, 0.9999)
    shape = (-1,) + (1,) * (latents.ndim - 1)
    noisy = alpha_bar.sqrt().view(shape) * latents + (1 - alpha_bar).sqrt().view(shape) * noise
    ratio = torch.acos((alpha_bar * _min_var(s)).sqrt()) / (math.pi / 2) * (1 + s) - s
    return noisy.to(latents.dtype), ratio, noise, 1 - alpha_bar


def conditioning_extras(batch: dict) -> dict:
    """Conditioning taken from the batch rather than the caption: none for this family."""
    return {}


def drop_conditioning(parts: Parts, cond: dict, generator: torch.Generator, diffusion) -> dict:
    """Embedding dropout: each sample's CLIP hidden states zeroed with diffusion.encoder_dropout[0], its pooled
    embedding with diffusion.pooled_dropout. (train_c instead drops 5% of captions to "": dataset.caption_dropout.)"""
    probability = diffusion.encoder_dropout[0] if diffusion.encoder_dropout else 0.0
    return {**cond, "clip_text": drop_rows(cond["clip_text"], probability, generator),
            "clip_text_pooled": drop_rows(cond["clip_text_pooled"], diffusion.pooled_dropout, generator)}


def predict(parts: Parts, prior, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
    """The prior's noise prediction; the CLIP image embedding is zeros, as in train_c for text-only samples."""
    clip_img = noisy.new_zeros(noisy.shape[0], 1, parts.denoiser.config.clip_image_in_channels)
    return prior(sample=noisy, timestep_ratio=timesteps, clip_text_pooled=cond["clip_text_pooled"],
                 clip_text=cond["clip_text"], clip_img=clip_img).sample


def validation_pipeline(parts: Parts, denoiser):
    """A callable like a diffusers pipeline (prompt, negative_prompt, num_inference_steps, guidance_scale, height,
    width, generator) whose `.images` holds one image. Stage C samples latents for a height x width training image
    (height/32 x width/32, as the EfficientNet encodes it); with a stage B decoder (model.decoder, or the combined
    model's) StableCascadeDecoderPipeline renders them (at about 4/3 of that size, as Stable Cascade does);
    without one the image shows the latents themselves (see `latent_image`), so the window still shows progress."""
    prior_pipe = pipeline(parts, denoiser)
    prior_pipe.set_progress_bar_config(disable=True)
    stage_b = _stage_b(parts, denoiser.dtype)

    def render_validation(prompt, negative_prompt=None, num_inference_steps=20, guidance_scale=4.0, height=768,
                          width=768, generator=None):
        size = (height // EFFNET_STRIDE, width // EFFNET_STRIDE)
        return SimpleNamespace(images=[render(prior_pipe, stage_b, prompt, size, negative_prompt,
                                              num_inference_steps, guidance_scale, generator)])

    return render_validation


def render(prior_pipe, stage_b, prompt: str, latent_size: tuple[int, int], negative_prompt: str | None = None,
           steps: int = 20, guidance_scale: float = 4.0, generator: torch.Generator | None = None):
    """One image: stage C's latents of `latent_size` (h, w) for the prompt, through stage B (and A) when
    `stage_b` is a StableCascadeDecoderPipeline, else shown by `latent_image`. Stage B runs on stage C's device
    and goes back to where it was afterwards, so it holds no accelerator memory between validations."""
    # The pipeline takes pixels and makes ceil(pixels / resolution_multiple) latents a side; half a latent
    # short of each side keeps rounding from reaching the next one.
    multiple = prior_pipe.config.resolution_multiple
    height, width = (round((n - 0.5) * multiple) for n in latent_size)
    latents = prior_pipe(prompt, negative_prompt=negative_prompt, height=height, width=width,
                         num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator,
                         output_type="pt").image_embeddings
    if stage_b is None:
        return latent_image(latents[0], EFFNET_STRIDE)
    home = stage_b.decoder.device
    stage_b.to(latents.device)
    try:
        return stage_b(image_embeddings=latents.to(stage_b.decoder.dtype), prompt=prompt,
                       negative_prompt=negative_prompt, num_inference_steps=DECODER_STEPS, guidance_scale=0.0,
                       generator=generator, output_type="pil").images[0]
    finally:
        stage_b.to(home)


def latent_image(latents: torch.Tensor, scale: int):
    """A picture of stage C latents (C, h, w): channels 0-2 as red, green and blue, each stretched to 0-255 over
    its own range, each latent a `scale` x `scale` square (the image area it encodes)."""
    from PIL import Image

    rgb = latents[:3].float().cpu()
    low = rgb.amin(dim=(1, 2), keepdim=True)
    high = rgb.amax(dim=(1, 2), keepdim=True)
    rgb = ((rgb - low) / (high - low).clamp(min=1e-8) * 255).round().to(torch.uint8)
    image = Image.fromarray(rgb.permute(1, 2, 0).numpy(), "RGB")
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def load_decoder(path: str, dtype: torch.dtype, field: str = "model.decoder", revision: str = "",
                 variant: str = ""):
    """Stage B with stage A (the VQGAN) as a StableCascadeDecoderPipeline, from a diffusers folder or hub id
    holding a decoder pipeline (or a combined one: its stage B components carry no prefix)."""
    from diffusers import DDPMWuerstchenScheduler, StableCascadeDecoderPipeline, StableCascadeUNet
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    hub = {"revision": revision or None}
    weights = {**hub, "variant": variant or None, "dtype": dtype}
    try:
        pipe = StableCascadeDecoderPipeline(
            decoder=StableCascadeUNet.from_pretrained(path, subfolder="decoder", **weights),
            tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **hub),
            text_encoder=CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder", **weights),
            scheduler=DDPMWuerstchenScheduler.from_pretrained(path, subfolder="scheduler", **hub),
            vqgan=PaellaVQModel.from_pretrained(path, subfolder="vqgan", **weights),
            latent_dim_scale=StableCascadeDecoderPipeline.load_config(path, **hub).get("latent_dim_scale", 10.67))
    except (OSError, ValueError) as exc:
        raise JobError(f"{field}: {path}: cannot load a Stable Cascade stage B decoder ({_first_line(exc)})") \
            from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_lora_diffusers(directory: Path, states: dict[str, dict], adapter_configs: dict[str, dict]) -> Path:
    """DIRECTORY/pytorch_lora_weights.safetensors in PEFT form (`prior.<module>.lora_A.weight`, and
    `text_encoder.` for the CLIP), with diffusers' adapter metadata ("prior.r", "prior.lora_alpha", ...). diffusers
    loads no Stable Cascade LoRA: trainer/export/cascade_lora.py reads this file."""
    from safetensors.torch import save_file

    tensors = {f"{component}.{key}": value.detach().cpu().contiguous()
               for component, state in states.items() for key, value in state.items()}
    adapters = {f"{component}.{key}": value for component, config in adapter_configs.items()
                for key, value in config.items()}
    path = Path(directory) / LORA_FILE
    save_file(tensors, path, metadata={"format": "pt", ADAPTER_METADATA_KEY: json.dumps(adapters, sort_keys=True)})
    return path


def kohya_state_dict(states: dict[str, dict], alpha: float) -> dict:
    """Refused: no kohya format for Stable Cascade LoRAs is established (ComfyUI and A1111 read none for it)."""
    raise JobError("output.save_kohya: Stable Cascade has no kohya LoRA format; set output.save_kohya to false "
                   "(final/pytorch_lora_weights.safetensors is written, and trainer/export/cascade_lora.py applies it)")


def kohya_metadata(parts: Parts) -> dict[str, str]:
    """Nothing: `kohya_state_dict` refuses before a kohya file is written."""
    return {}


def _stage_b(parts: Parts, dtype: torch.dtype):
    if parts.stage_b is None and parts.decoder:
        parts.stage_b = load_decoder(parts.decoder, dtype)
    return parts.stage_b


def _load_stage_c(path: str, prefix: str, revision: str, variant: str):
    from diffusers import DDPMWuerstchenScheduler, StableCascadePriorPipeline, StableCascadeUNet
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    hub = {"revision": revision or None}
    if empty_models.wanted(path):  # configs only: the models on the meta device, nothing read
        models = {name: empty_models.build(path, f"{prefix}{name}", library, cls.__name__) for name, library, cls in
                  (("prior", "diffusers", StableCascadeUNet), ("text_encoder", "transformers",
                                                                 CLIPTextModelWithProjection))}
    else:
        models = {}
    try:
        config = StableCascadePriorPipeline.load_config(path, **hub)
        return StableCascadePriorPipeline(
            prior=models.get("prior") or StableCascadeUNet.from_pretrained(
                path, subfolder=f"{prefix}prior", variant=variant or None, **hub),
            text_encoder=models.get("text_encoder") or CLIPTextModelWithProjection.from_pretrained(
                path, subfolder=f"{prefix}text_encoder", variant=variant or None, **hub),
            tokenizer=CLIPTokenizer.from_pretrained(path, subfolder=f"{prefix}tokenizer", **hub),
            scheduler=DDPMWuerstchenScheduler.from_pretrained(path, subfolder=f"{prefix}scheduler", **hub),
            resolution_multiple=config.get("resolution_multiple", 42.67))
    except (OSError, ValueError) as exc:
        raise JobError(f"model.path: {path}: cannot load Stable Cascade stage C ({_first_line(exc)})") from None


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _check_decoder(decoder: str) -> None:
    """A bad model.decoder fails when the run starts, not at the first validation."""
    if not decoder:
        return
    path = Path(decoder).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise JobError(f"model.decoder: {path}: not a diffusers pipeline folder (no model_index.json)")
    elif decoder.startswith((".", "/", "~")) or decoder.count("/") != 1:
        raise JobError(f"model.decoder: {decoder}: not found")


def _hub_effnet(local: Path) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(*EFFNET_HUB))
    except (OSError, ValueError, EntryNotFoundError) as exc:
        raise JobError(f"model.path: {local} not found, and Stability's encoder could not be fetched from "
                       f"{'/'.join(EFFNET_HUB)} ({type(exc).__name__}); stage C trains on EfficientNet latents: put "
                       f"{EFFNET_FILE} there") from None


def _min_var(s: float) -> float:
    return math.cos(s / (1 + s) * math.pi / 2) ** 2


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int, groups: int = 1, act: bool = True) -> nn.Sequential:
    """torchvision's Conv2dNormActivation as EfficientNetV2 builds it (BatchNorm eps 1e-3, SiLU)."""
    layers = [nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
              nn.BatchNorm2d(c_out, eps=1e-3)]
    return nn.Sequential(*layers, nn.SiLU(inplace=True)) if act else nn.Sequential(*layers)


class _MBConv(nn.Module):
    """torchvision's FusedMBConv ("fused") or MBConv ("mb") block; stochastic depth is training-only, so absent."""

    def __init__(self, kind: str, expansion: int, kernel: int, stride: int, c_in: int, c_out: int):
        super().__init__()
        wide = c_in * expansion
        if kind == "fused":
            layers = [_conv_bn(c_in, wide, kernel, stride), _conv_bn(wide, c_out, 1, 1, act=False)] if wide != c_in \
                else [_conv_bn(c_in, c_out, kernel, stride)]
        else:
            layers = [_conv_bn(c_in, wide, 1, 1)] if wide != c_in else []
            layers += [_conv_bn(wide, wide, kernel, stride, groups=wide), _SqueezeExcitation(wide, max(1, c_in // 4)),
                       _conv_bn(wide, c_out, 1, 1, act=False)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.residual else out


class _SqueezeExcitation(nn.Module):
    """torchvision's SqueezeExcitation with SiLU: channels rescaled by a gate computed from their spatial means."""

    def __init__(self, channels: int, squeezed: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.fc2 = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc2(nn.functional.silu(self.fc1(x.mean(dim=(2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)
