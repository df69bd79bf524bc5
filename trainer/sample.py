"""`trainer sample`: render prompts with a base model and, optionally, a LoRA file at several strengths, through
the family's validation pipeline and the guidance validation uses (CFG or APG), so the images match a run's.

`render` is the one place a prompt becomes an image: training's validation calls it too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .families import precision
from .families.detect import detect_family, family_module
from .families.table import FAMILIES
from .job import JobError, ModelSpec, ValidationSpec
from .run import guidance

ADAPTER = "sample"  # the adapter name the LoRA file is loaded under


def render(pipe, denoiser, cfg_halves: tuple[str, ...], prompt: str, val: ValidationSpec, seed: int,
           height: int | None, width: int | None):
    """One image of `prompt` with `val`'s negative prompt, steps, guidance scale and guidance (CFG or APG)."""
    with guidance.guided(denoiser, val, cfg_halves):
        return pipe(prompt, negative_prompt=val.negative_prompt or None, num_inference_steps=val.steps,
                    guidance_scale=val.guidance_scale, height=height, width=width,
                    generator=torch.Generator().manual_seed(seed)).images[0]


@dataclass
class Sample:
    path: Path
    prompt: str
    scale: float
    seed: int


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:40] or "prompt"


def _check_lora_file(lora: str) -> Path:
    path = Path(lora).expanduser()
    if not path.is_file():
        raise JobError(f"--lora: {lora}: no such file")
    if path.suffix.lower() != ".safetensors":
        raise JobError(f"--lora: {lora}: expected a .safetensors LoRA file")
    return path


def sample(model: ModelSpec, prompts: list[str], out: Path, val: ValidationSpec, lora: str = "",
           scales: tuple[float, ...] = (1.0,), height: int | None = None, width: int | None = None):
    """Yield each image as it is written: every prompt (seed val.seed + its index) at every LoRA scale (0: the
    base model; without a LoRA only the base model)."""
    lora_path = _check_lora_file(lora) if lora else None
    family_name = detect_family(model)
    family = FAMILIES[family_name]
    import diffusers

    if not hasattr(getattr(diffusers, family.pipeline_class), "load_lora_weights"):
        raise JobError(f"--model: {family.title} has no diffusers LoRA loader; use `python -m trainer "
                       "sample-cascade` for it")
    for side, value in (("--height", height), ("--width", width)):
        if value is not None and (value <= 0 or value % family.size_multiple):
            raise JobError(f"{side}: {value} is not a positive multiple of {family.size_multiple} "
                           f"({family.title})")
    module = family_module(family_name)
    parts = module.load(model.model_copy(update={"family": family_name}))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # bf16 where the GPU has it (as training's validation renders), fp32 on the CPU
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    for part in (parts.vae, parts.text_encoder, parts.denoiser):
        precision.place(part, device, dtype)
    pipe = module.validation_pipeline(parts, parts.denoiser)
    if lora_path is not None:
        try:
            pipe.load_lora_weights(str(lora_path.parent), weight_name=lora_path.name, adapter_name=ADAPTER)
        except (ValueError, KeyError, OSError) as exc:
            raise JobError(f"--lora: {lora_path}: not a {family.title} LoRA ({str(exc).splitlines()[0][:200]})") \
                from None
    else:
        scales = (0.0,)
    out.mkdir(parents=True, exist_ok=True)
    for i, prompt in enumerate(prompts):
        seed = val.seed + i
        for scale in scales:
            if lora_path is not None:
                if scale == 0:  # off, not weighted 0: the base model's image exactly
                    pipe.disable_lora()
                else:
                    pipe.enable_lora()
                    pipe.set_adapters([ADAPTER], adapter_weights=[scale])
            image = render(pipe, parts.denoiser, family.cfg_halves, prompt, val, seed, height, width)
            path = out / f"{i:02d}-{_slug(prompt)}-{scale:g}.png"
            image.save(path)
            yield Sample(path, prompt, scale, seed)
