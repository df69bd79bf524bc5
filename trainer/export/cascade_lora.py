"""Stable Cascade stage C LoRA files for inference: diffusers has no LoRA loader for its Stable Cascade pipelines,
so this applies the trainer's pytorch_lora_weights.safetensors to a StableCascadeUNet (and its CLIP) with peft.

In your own script, after `pipe = StableCascadePriorPipeline.from_pretrained(...)`:
    from trainer.export.cascade_lora import apply_lora
    lora = "RUN/final/pytorch_lora_weights.safetensors"
    apply_lora(pipe.prior, lora, scale=1.0)
    apply_lora(pipe.text_encoder, lora, component="text_encoder")  # only if the text encoder was trained
then run the prior and the decoder as usual (diffusers 0.42 no longer loads stage B by `from_pretrained`:
`trainer.families.cascade.load_decoder` builds it); `remove_lora(pipe.prior)` gives the plain model back. From the
command line: `python -m trainer sample-cascade --model MODEL --lora FILE --prompt TEXT --out image.png
[--decoder STAGE_B]`.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..job import JobError

ADAPTER = "cascade_lora"  # the applied layers' peft adapter name (not "default", which training uses)


def apply_lora(module, path: str | Path, scale: float = 1.0, component: str = "prior") -> int:
    """Attach the file's LoRA for `component` ("prior" or "text_encoder") to `module` as peft layers, their
    update scaled by `scale` times alpha/rank. Returns the number of layers adapted; a file that does not fit the
    module is a JobError naming it."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    state, config = _read(Path(path), component)
    for key in state:
        if ".lora_B." in key:
            state[key] = state[key] * scale
    lora_config = LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"], target_modules=config["target_modules"],
                             lora_dropout=0.0)
    try:
        inject_adapter_in_model(lora_config, module, adapter_name=ADAPTER)
    except ValueError as exc:
        raise JobError(f"{path}: its {component} LoRA does not fit this model ({str(exc).splitlines()[0]})") from None
    result = set_peft_model_state_dict(module, state, adapter_name=ADAPTER)
    missing = [k for k in result.missing_keys if f".{ADAPTER}." in k]
    if result.unexpected_keys or missing:
        remove_lora(module)
        raise JobError(f"{path}: its {component} LoRA does not fit this model "
                       f"({len(missing)} tensors missing, {len(result.unexpected_keys)} unexpected)")
    return len({k.rsplit(".lora_", 1)[0] for k in state})


def remove_lora(module) -> None:
    """Take every peft layer out of `module`: each wrapped layer is put back as it was, weights untouched."""
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    recurse_remove_peft_layers(module)
    if hasattr(module, "peft_config"):
        del module.peft_config


def lora_components(path: str | Path) -> list[str]:
    """The components a LoRA file holds ("prior", "text_encoder"), from its tensor names."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return sorted({key.split(".", 1)[0] for key in f.keys()})


def sample(model: str, prompt: str, out: Path, lora: str = "", decoder: str = "", scale: float = 1.0,
           negative_prompt: str = "", steps: int = 20, guidance_scale: float = 4.0, height: int = 1024,
           width: int = 1024, seed: int = 0, guidance=None) -> Path:
    """`trainer sample-cascade`: render one prompt with stage C (with the LoRA file applied) and, given a stage B
    decoder (or a combined model), decode it to an image of about height x width; without one, write the picture
    of the latents that validation shows. The latents are ceil(side / 42.67) a side, as diffusers computes them.
    `guidance`: a ValidationSpec whose guidance, apg_* fields say how stage C is guided (None: CFG)."""
    import math

    import torch

    from ..families.cascade import load_decoder, load_pipelines, render
    from ..families.table import FAMILIES
    from ..job import ValidationSpec
    from ..run.guidance import guided

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    prior_pipe, stage_b = load_pipelines(model)
    prior_pipe.to(device, dtype)
    prior_pipe.set_progress_bar_config(disable=True)
    if lora:
        for component in lora_components(lora):
            if component not in ("prior", "text_encoder"):
                raise JobError(f"{lora}: holds a {component} LoRA; stage C has a prior and a text_encoder")
            apply_lora(getattr(prior_pipe, component), lora, scale, component)
    if decoder:
        stage_b = load_decoder(decoder, dtype)
    elif stage_b is not None:
        stage_b.set_progress_bar_config(disable=True)
    multiple = prior_pipe.config.resolution_multiple
    size = (math.ceil(height / multiple), math.ceil(width / multiple))
    spec = (guidance or ValidationSpec()).model_copy(update={"guidance_scale": guidance_scale})
    with guided(prior_pipe.prior, spec, FAMILIES["cascade"].cfg_halves):
        image = render(prior_pipe, stage_b, prompt, size, negative_prompt or None, steps, guidance_scale,
                       torch.Generator().manual_seed(seed))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return out


def _read(path: Path, component: str) -> tuple[dict, dict]:
    """The component's LoRA tensors (keys without the component prefix) and its adapter config from the file."""
    from safetensors import SafetensorError, safe_open

    from ..families.cascade import ADAPTER_METADATA_KEY

    if not path.is_file():
        raise JobError(f"{path}: LoRA file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            prefix = f"{component}."
            state = {key[len(prefix):]: f.get_tensor(key) for key in f.keys() if key.startswith(prefix)}
    except (OSError, SafetensorError) as exc:
        raise JobError(f"{path}: not a readable safetensors file ({exc})") from None
    if not state:
        raise JobError(f"{path}: holds no {component} LoRA")
    try:
        adapters = json.loads(metadata[ADAPTER_METADATA_KEY])
        config = {name: adapters[f"{component}.{name}"] for name in ("r", "lora_alpha", "target_modules")}
    except (KeyError, ValueError):
        raise JobError(f"{path}: no adapter metadata for its {component} LoRA (rank, alpha, target modules); "
                       "was it written by this trainer?") from None
    return state, config
