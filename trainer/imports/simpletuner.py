"""SimpleTuner's config.json (its command-line options, with or without the leading `--`) and its
multidatabackend.json (one entry per dataset; image datasets become our folders, the regularisation one prior
preservation).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..job import JobError
from . import kohya
from .report import (SIMPLETUNER_DATA, Importer, apply_tables, as_bool, as_float, as_int, as_str, choice_rule, flatten,
                     folder_rule, is_unset)

# Options only SimpleTuner has (any two of them); kohya's GUI shares the generic ones.
SIGNATURE = {"model_family", "model_type", "lora_type", "data_backend_config", "resolution_type", "snr_gamma",
             "validation_steps", "caption_dropout_probability"}

EXACT = {
    "pretrained_model_name_or_path": ("model.path", as_str),
    "output_dir": ("output.output_dir", as_str),
    "lora_rank": ("network.rank", as_int),
    "lora_alpha": ("network.alpha", as_float),
    "lora_dropout": ("network.dropout", as_float),
    "learning_rate": ("optimizer.learning_rate", as_float),
    "text_encoder_lr": ("text_encoder.learning_rate", as_float),
    "adam_weight_decay": ("optimizer.weight_decay", as_float),
    "adam_epsilon": ("optimizer.eps", as_float),
    "max_grad_norm": ("optimizer.max_grad_norm", as_float),
    "lr_warmup_steps": ("schedule.warmup_steps", as_int),
    "train_batch_size": ("schedule.batch_size", as_int),
    "gradient_accumulation_steps": ("schedule.gradient_accumulation", as_int),
    "seed": ("schedule.seed", as_int),
    "gradient_checkpointing": ("precision.gradient_checkpointing", as_bool),
    "checkpointing_steps": ("output.checkpoint_every", as_int),
    "checkpoints_total_limit": ("output.keep_last", as_int),
    "validation_steps": ("validation.every_n_steps", as_int),
    "validation_negative_prompt": ("validation.negative_prompt", as_str),
    "validation_guidance": ("validation.guidance_scale", as_float),
    "validation_num_inference_steps": ("validation.steps", as_int),
    "validation_seed": ("validation.seed", as_int),
    "caption_dropout_probability": ("dataset.caption_dropout", as_float),
    "noise_offset": ("diffusion.noise_offset", as_float),
    "snr_gamma": ("diffusion.min_snr_gamma", as_float),
    "rescale_betas_zero_snr": ("diffusion.zero_terminal_snr", as_bool),
    "flow_schedule_shift": ("diffusion.flow_shift", as_float),
    "flux_guidance_value": ("diffusion.flux_guidance", as_float),
    "use_ema": ("ema.enabled", as_bool),
    "ema_decay": ("ema.decay", as_float),
}
FAMILIES = {"sd1x": "sd1", "legacy": "sd1", "sd2x": "sd2", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux"}
METHODS = {"lora": "lora", "full": "full"}
PRECISIONS = {"no": "no", "fp16": "fp16", "bf16": "bf16"}
PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v_prediction"}
CROPS = {"center": "center", "centre": "center", "random": "random"}


def looks_like(config: Any) -> bool:
    return isinstance(config, dict) and len(SIGNATURE & {k.removeprefix("--") for k in config}) >= 2


def looks_like_backends(config: Any) -> bool:
    return (isinstance(config, list) and bool(config) and all(isinstance(c, dict) for c in config)
            and all("id" in c and ("instance_data_dir" in c or "dataset_type" in c or "type" in c) for c in config))


def convert(imp: Importer, path: Path, config: dict) -> None:
    apply_tables(imp, path, flatten(config), _both(EXACT), _both(RULES))


def convert_backends(imp: Importer, path: Path, backends: list) -> None:
    """Image datasets on local disk as our folders; the first regularisation dataset as prior preservation."""
    index, prior = 0, False
    for i, backend in enumerate(backends):
        where = f"{path.name}: {i}."
        flat = flatten(backend)
        skip = _skipped(backend)
        if not skip and as_bool(backend.get("is_regularisation_data", False), where + "is_regularisation_data"):
            skip = "only the first regularisation dataset is used" if prior else ""
            if not skip:
                _prior(imp, where, flat)
                prior = True
                continue
        if skip:
            for key, value in flat.items():
                imp.none(where + key, value, skip)
            continue
        if not isinstance(backend.get("instance_data_dir"), str):
            raise JobError(f"{where}instance_data_dir: an image dataset needs its folder")
        for key, value in flat.items():
            rule = BACKEND_RULES.get(key)
            if rule is None:
                imp.none(where + key, value)
            else:
                rule(imp, where + key, value, flat, f"dataset.folders.{index}")
        index += 1


def _skipped(backend: dict) -> str:
    if backend.get("disabled") is True or backend.get("disable") is True:
        return "a disabled dataset"
    kind = backend.get("dataset_type", "image")
    if kind != "image":
        return f"a {kind} dataset: our caches need no configuring" if kind.endswith("embeds") else \
            f"a {kind} dataset: we train on images"
    if backend.get("type", "local") != "local":
        return f"a {backend.get('type')} backend: we read local folders"
    return ""


def _prior(imp: Importer, where: str, flat: dict) -> None:
    folder = Path(as_str(flat["instance_data_dir"], where + "instance_data_dir")).expanduser()
    prompt = as_str(flat.get("instance_prompt") or folder.name, where + "instance_prompt")
    values = kohya.prior_values(folder, prompt)
    imp.approx(where + "is_regularisation_data", values, "prior preservation on the class images there, as many "
               "as it holds (none generated)")
    for key, value in flat.items():
        if key == "instance_data_dir":
            imp.approx(where + key, {}, "the class images folder (see is_regularisation_data)")
        elif key == "instance_prompt":
            imp.approx(where + key, {}, "the class prompt (see is_regularisation_data)")
        elif key != "is_regularisation_data":
            imp.none(where + key, value, "a regularisation dataset's other settings are not used")


def _both(table: dict) -> dict:
    """SimpleTuner reads its config keys with and without the leading `--`."""
    return {**table, **{f"--{key}": value for key, value in table.items()}}


def _get(flat: dict, key: str, default: Any = None) -> Any:
    return flat.get(key, flat.get(f"--{key}", default))


def _lora_type(imp: Importer, source: str, value: Any, flat: dict, path: Path) -> None:
    kind = as_str(value, source)
    if kind == "standard":
        imp.exact(source, "network.kind", "lora")
    else:
        imp.approx(source, {"network.kind": "lora"}, f"{kind}: a plain LoRA (we have no LyCORIS kinds)")


def _optimizer(imp: Importer, source: str, value: Any, flat: dict, path: Path) -> None:
    name = as_str(value, source)
    ours = "adamw8bit" if "adamw8bit" in name else "adamw"
    note = f"{name}: the same optimizer" if "adamw" in name else f"we have no {name}: AdamW"
    imp.approx(source, {"optimizer.name": ours}, note + " (its precision and kernels are our own)")


def _steps(imp: Importer, source: str, value: Any, flat: dict, path: Path) -> None:
    steps = 0 if is_unset(value) else as_int(value, source)
    if steps:
        imp.exact(source, "schedule.max_steps", steps)
    else:
        imp.none(source, value, "= 0: counted in epochs")


def _epochs(imp: Importer, source: str, value: Any, flat: dict, path: Path) -> None:
    epochs = 0 if is_unset(value) else as_int(value, source)
    steps = _get(flat, "max_train_steps")
    if not is_unset(steps) and as_int(steps, source):
        imp.approx(source, {}, f"= {epochs}: max_train_steps is set and wins")
    elif epochs:
        imp.exact(source, "schedule.epochs", epochs, also={"schedule.max_steps": 0})
    else:
        imp.none(source, value, "unset")


def _resolution(imp: Importer, source: str, value: Any, flat: dict, path: Any) -> None:
    if _get(flat, "resolution_type", "pixel") == "area":
        side = round(math.sqrt(as_float(value, source)) * 1024 / 64) * 64  # megapixels: 1.0 is 1024x1024
        imp.approx(source, {"dataset.resolution": side}, f"{value} megapixels as a square side")
    else:
        imp.exact(source, "dataset.resolution", as_int(value, source))


def _resolution_type(imp: Importer, source: str, value: Any, flat: dict, path: Any) -> None:
    imp.approx(source, {}, f"= {value!r}: read with resolution")


def _validation_prompt(imp: Importer, source: str, value: Any, flat: dict, path: Path) -> None:
    prompt = as_str(value, source)
    if prompt:
        imp.exact(source, "validation.prompts", [prompt])
    else:
        imp.none(source, value, "empty")


def _betas(imp: Importer, source: str, value: Any, flat: dict, path: Path) -> None:
    imp.exact(source, "optimizer.betas", [as_float(_get(flat, "adam_beta1", 0.9), source),
                                          as_float(_get(flat, "adam_beta2", 0.999), source)])


def _train_text_encoder(imp: Importer, source: str, value: Any, flat: dict, path: Path) -> None:
    full = _get(flat, "model_type") == "full"
    imp.exact(source, "text_encoder.mode", ("full" if full else "lora") if as_bool(value, source) else "off")


def _data_config(imp: Importer, source: str, value: Any, flat: dict, path: Path) -> None:
    if SIMPLETUNER_DATA in imp.formats:
        imp.approx(source, {}, "the dataset file given with it is read")
    else:
        imp.none(source, value, "import the multidatabackend file together with this one")


# --- a dataset entry's fields; `target` is the dataset folder it becomes -------------------------------------

def _repeats(imp: Importer, source: str, value: Any, flat: dict, target: str) -> None:
    imp.exact(source, f"{target}.repeats", as_int(value, source) + 1, "SimpleTuner's 0 is once: ours counts passes")


def _caption_strategy(imp: Importer, source: str, value: Any, flat: dict, target: str) -> None:
    kind = as_str(value, source)
    if kind == "textfile":
        imp.exact(source, f"{target}.caption_extension", ".txt", "a .txt file beside each image")
    elif kind == "instanceprompt":
        imp.approx(source, {}, "the instance prompt captions only the images without a caption file")
    else:
        imp.none(source, value, f"= {kind!r}: captions from {kind} are not read")


def _crop_style(imp: Importer, source: str, value: Any, flat: dict, target: str) -> None:
    style = as_str(value, source)
    if style in CROPS:
        imp.exact(source, "dataset.crop", CROPS[style])
    else:
        imp.approx(source, {"dataset.crop": "center"}, f"we have no {style} crop: the centre")


RULES = {
    "model_family": choice_rule(FAMILIES, {}, "model.family", "model family"),
    "model_type": choice_rule(METHODS, {}, "network.kind", "training kind"),
    "lora_type": _lora_type,
    "mixed_precision": choice_rule(PRECISIONS, {}, "precision.mixed_precision", "precision"),
    "prediction_type": choice_rule(PREDICTIONS, {}, "model.prediction_type", "prediction type"),
    "optimizer": _optimizer,
    "lr_scheduler": choice_rule(kohya.SCHEDULERS, kohya.NEAREST_SCHEDULER, "schedule.lr_scheduler", "scheduler"),
    "max_train_steps": _steps,
    "num_train_epochs": _epochs,
    "resolution": _resolution, "resolution_type": _resolution_type,
    "validation_prompt": _validation_prompt,
    "adam_beta1": _betas, "adam_beta2": _betas,
    "train_text_encoder": _train_text_encoder,
    "data_backend_config": _data_config,
}
BACKEND_RULES = {
    "instance_data_dir": folder_rule("path", as_str),
    "instance_prompt": folder_rule("instance_prompt", as_str),
    "repeats": _repeats,
    "caption_strategy": _caption_strategy,
    "crop_style": _crop_style,
    "resolution": _resolution, "resolution_type": _resolution_type,
}
