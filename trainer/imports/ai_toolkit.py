"""ai-toolkit's job YAML (`job: extension`, `config.process[0]` with network, train, model, datasets, save,
sample). command.py reads it with yaml.safe_load, which builds plain data and runs nothing.

Only the first process trains here; the others are listed as having no equivalent.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from . import kohya
from .report import (Importer, apply_tables, as_bool, as_float, as_int, as_str, choice_rule, flatten, folder_rule,
                     shared_rule)

EXACT = {
    "model.name_or_path": ("model.path", as_str),
    "network.linear": ("network.rank", as_int),
    "network.linear_alpha": ("network.alpha", as_float),
    "network.dropout": ("network.dropout", as_float),
    "train.batch_size": ("schedule.batch_size", as_int),
    "train.steps": ("schedule.max_steps", as_int),
    "train.gradient_accumulation_steps": ("schedule.gradient_accumulation", as_int),
    "train.gradient_accumulation": ("schedule.gradient_accumulation", as_int),
    "train.lr": ("optimizer.learning_rate", as_float),
    "train.gradient_checkpointing": ("precision.gradient_checkpointing", as_bool),
    "train.noise_offset": ("diffusion.noise_offset", as_float),
    "train.min_snr_gamma": ("diffusion.min_snr_gamma", as_float),
    "train.max_grad_norm": ("optimizer.max_grad_norm", as_float),
    "train.ema_config.use_ema": ("ema.enabled", as_bool),
    "train.ema_config.ema_decay": ("ema.decay", as_float),
    "save.save_every": ("output.checkpoint_every", as_int),
    "save.max_step_saves_to_keep": ("output.keep_last", as_int),
    "sample.sample_every": ("validation.every_n_steps", as_int),
    "sample.neg": ("validation.negative_prompt", as_str),
    "sample.seed": ("validation.seed", as_int),
    "sample.guidance_scale": ("validation.guidance_scale", as_float),
    "sample.sample_steps": ("validation.steps", as_int),
}
FAMILY_FLAGS = {"model.is_flux": "flux", "model.is_xl": "sdxl", "model.is_v2": "sd2", "model.is_v3": "sd3"}
NETWORKS = {"lora": "lora"}
NEAREST_NETWORK = {"locon": "lora", "lokr": "lora", "lycoris": "lora"}
OPTIMIZERS = {"adamw": "adamw", "adamw8bit": "adamw8bit"}
DTYPES = {"bf16": "bf16", "fp16": "fp16", "float16": "fp16", "bfloat16": "bf16", "fp32": "no", "float32": "no"}
_PROCESS = re.compile(r"^config\.process\.(\d+)\.(.+)$")
_DATASET = re.compile(r"^datasets\.(\d+)\.(.+)$")


def looks_like(config: Any) -> bool:
    """A job file with a process list, as ai-toolkit's run.py takes."""
    return isinstance(config, dict) and isinstance(config.get("config"), dict) and \
        isinstance(config["config"].get("process"), list)


def convert(imp: Importer, path: Path, config: dict) -> None:
    flat = flatten(config)
    first = {m.group(2): value for key, value in flat.items() if (m := _PROCESS.match(key)) and m.group(1) == "0"}
    for key, value in flat.items():
        process = _PROCESS.match(key)
        if process is not None and process.group(1) == "0":
            continue
        source = f"{path.name}: {key}"
        if key == "config.name":
            kohya.RULES["output_name"](imp, source, value, flat, path)
        else:
            imp.none(source, value, "" if process is None else "only the first process is imported")
    settings = {key: value for key, value in first.items() if not _DATASET.match(key)}
    apply_tables(imp, path, settings, EXACT, RULES, prefix="config.process.0.", context=first)
    for key, value in first.items():
        if dataset := _DATASET.match(key):
            source = f"{path.name}: config.process.0.{key}"
            rule = DATASET_RULES.get(dataset.group(2))
            if rule is None:
                imp.none(source, value)
            else:
                rule(imp, source, value, first, f"dataset.folders.{dataset.group(1)}")


def _family(family: str):
    def rule(imp: Importer, source: str, value: Any, first: dict, path: Path) -> None:
        if as_bool(value, source):
            imp.exact(source, "model.family", family)
        else:
            imp.approx(source, {}, "= false: model.family stays auto unless another flag sets it")
    return rule


def _prompts(imp: Importer, source: str, value: Any, first: dict, path: Path) -> None:
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        imp.none(source, value, "not a list of prompts")
        return
    trigger = first.get("trigger_word")
    prompts = [p.replace("[trigger]", trigger) if isinstance(trigger, str) else p for p in value]
    imp.exact(source, "validation.prompts", prompts, "[trigger] replaced by the trigger word")


def _text_encoder(imp: Importer, source: str, value: Any, first: dict, path: Path) -> None:
    imp.exact(source, "text_encoder.mode", "lora" if as_bool(value, source) else "off")


def _training_folder(imp: Importer, source: str, value: Any, first: dict, path: Path) -> None:
    imp.approx(source, {"output.output_dir": as_str(value, source)}, "ai-toolkit writes into a subfolder named "
               "for the job; ours writes here")


def _trigger(imp: Importer, source: str, value: Any, first: dict, path: Path) -> None:
    word = as_str(value, source)
    folders = sorted({int(m.group(1)) for key in first if (m := _DATASET.match(key))})
    values = {"dataset.instance_token": "[trigger]",
              **{f"dataset.folders.{i}.instance_prompt": word for i in folders}}
    imp.approx(source, values, "[trigger] in captions becomes the word, and captionless images take it; "
               "ai-toolkit also adds it to captions that lack it, which we do not")


# --- a dataset entry's fields; `target` is the dataset folder it becomes -------------------------------------

def _caption_ext(imp: Importer, source: str, value: Any, first: dict, target: str) -> None:
    extension = as_str(value, source)
    imp.exact(source, f"{target}.caption_extension", extension if extension.startswith(".") else "." + extension)


def _resolutions(imp: Importer, source: str, value: Any, first: dict, target: str) -> None:
    sides = [as_int(v, source) for v in value] if isinstance(value, list) else [as_int(value, source)]
    if len(sides) == 1:
        imp.exact(source, "dataset.resolution", sides[0])
    else:
        imp.approx(source, {"dataset.resolution": max(sides)}, f"ai-toolkit trains at each of {sides}: the largest")


RULES = {
    **{flag: _family(family) for flag, family in FAMILY_FLAGS.items()},
    "network.type": choice_rule(NETWORKS, NEAREST_NETWORK, "network.kind", "network kind"),
    "train.optimizer": choice_rule(OPTIMIZERS, {}, "optimizer.name", "optimizer"),
    "train.lr_scheduler": choice_rule(kohya.SCHEDULERS, kohya.NEAREST_SCHEDULER, "schedule.lr_scheduler",
                                      "scheduler"),
    "train.dtype": choice_rule(DTYPES, {}, "precision.mixed_precision", "precision"),
    "train.train_text_encoder": _text_encoder,
    "sample.prompts": _prompts,
    "training_folder": _training_folder,
    "trigger_word": _trigger,
}
DATASET_RULES = {
    "folder_path": folder_rule("path", as_str),
    "num_repeats": folder_rule("repeats", as_int),
    "caption_ext": _caption_ext,
    "resolution": _resolutions,
    "caption_dropout_rate": shared_rule("dataset.caption_dropout", as_float),
    "shuffle_tokens": shared_rule("dataset.shuffle_tags", as_bool),
    "cache_latents_to_disk": shared_rule("dataset.cache_latents", as_bool),
    "cache_latents": shared_rule("dataset.cache_latents", as_bool),
    "flip_x": shared_rule("dataset.random_flip", as_bool),
}
