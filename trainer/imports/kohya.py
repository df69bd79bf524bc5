"""The kohya_ss GUI's JSON config (LoRA and DreamBooth tabs, which drive sd-scripts) as our job fields.

Field names as the GUI saves them; the tables are the one place a field's mapping is written (the README's table
is checked against them).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from ..job import JobError
from .report import (SD_SCRIPTS, Importer, apply_tables, as_bool, as_float, as_int, as_str, choice_rule, flatten,
                     is_unset)

# Fields the GUI writes that identify its files (any two of them; SimpleTuner shares the generic ones).
SIGNATURE = {"LoRA_type", "network_dim", "network_alpha", "train_data_dir", "reg_data_dir", "max_resolution",
             "save_model_as", "v_parameterization", "enable_bucket"}

# source field -> (our field, parser): the value means the same in both trainers.
EXACT = {
    "pretrained_model_name_or_path": ("model.path", as_str),
    "network_dim": ("network.rank", as_int),
    "network_alpha": ("network.alpha", as_float),
    "network_dropout": ("network.dropout", as_float),
    "enable_bucket": ("dataset.aspect_buckets", as_bool),
    "min_bucket_reso": ("dataset.bucket_min_side", as_int),
    "max_bucket_reso": ("dataset.bucket_max_side", as_int),
    "bucket_reso_steps": ("dataset.bucket_step", as_int),
    "train_batch_size": ("schedule.batch_size", as_int),
    "gradient_accumulation_steps": ("schedule.gradient_accumulation", as_int),
    "lr_warmup_steps": ("schedule.warmup_steps", as_int),
    "seed": ("schedule.seed", as_int),
    "mixed_precision": ("precision.mixed_precision", as_str),
    "gradient_checkpointing": ("precision.gradient_checkpointing", as_bool),
    "cache_latents": ("dataset.cache_latents", as_bool),
    "cache_text_encoder_outputs": ("dataset.cache_text", as_bool),
    "shuffle_caption": ("dataset.shuffle_tags", as_bool),
    "keep_tokens": ("dataset.keep_tokens", as_int),
    "caption_dropout_rate": ("dataset.caption_dropout", as_float),
    "caption_separator": ("dataset.tag_separator", as_str),
    "flip_aug": ("dataset.random_flip", as_bool),
    "max_data_loader_n_workers": ("dataset.num_workers", as_int),
    "noise_offset": ("diffusion.noise_offset", as_float),
    "min_snr_gamma": ("diffusion.min_snr_gamma", as_float),
    "zero_terminal_snr": ("diffusion.zero_terminal_snr", as_bool),
    "max_grad_norm": ("optimizer.max_grad_norm", as_float),
    "output_dir": ("output.output_dir", as_str),
    "save_every_n_steps": ("output.checkpoint_every", as_int),
    "sample_every_n_steps": ("validation.every_n_steps", as_int),
    "prior_loss_weight": ("prior.loss_weight", as_float),
}

OPTIMIZERS = {"AdamW": "adamw", "AdamW8bit": "adamw8bit"}
SCHEDULERS = {"constant": "constant", "constant_with_warmup": "constant_with_warmup", "linear": "linear",
              "cosine": "cosine", "cosine_with_restarts": "cosine_with_restarts", "polynomial": "polynomial"}
# Schedulers we name differently or lack: the nearest curve we have.
NEAREST_SCHEDULER = {"cosine_with_min_lr": "cosine", "adafactor": "constant", "warmup_stable_decay": "linear",
                     "inverse_sqrt": "linear", "piecewise_constant": "constant", "rex": "cosine"}
OPTIMIZER_ARGS = {"weight_decay": "optimizer.weight_decay", "eps": "optimizer.eps", "betas": "optimizer.betas"}
SAMPLE_OPTIONS = {"n": "validation.negative_prompt", "s": "validation.steps", "l": "validation.guidance_scale",
                  "d": "validation.seed"}
_KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")
_IMAGES = (".png", ".jpg", ".jpeg", ".webp")


def looks_like(config: Any) -> bool:
    return isinstance(config, dict) and len(SIGNATURE & set(config)) >= 2


def convert(imp: Importer, path: Path, config: dict) -> None:
    """Every field of `config` into `imp`: a table entry, a rule below, or no equivalent."""
    apply_tables(imp, path, flatten(config), EXACT, RULES)


def _family(imp: Importer, source: str, value: Any, config: dict, path: Path) -> None:
    key = source.rsplit(": ", 1)[1]
    family = {"sdxl": "sdxl", "v2": "sd2", "sd3_checkbox": "sd3", "flux1_checkbox": "flux"}[key]
    if as_bool(value, source):
        imp.exact(source, "model.family", family)
    else:
        imp.approx(source, {}, f"= false: model.family stays auto unless another flag sets it (read from the "
                               "model's files)")


def _v_parameterization(imp: Importer, source: str, value: Any, config: dict, path: Path) -> None:
    imp.exact(source, "model.prediction_type", "v_prediction" if as_bool(value, source) else "epsilon")


def _lora_type(imp: Importer, source: str, value: Any, config: dict, path: Path) -> None:
    kind = as_str(value, source)
    if kind in ("Standard", ""):
        imp.exact(source, "network.kind", "lora")
    else:
        imp.approx(source, {"network.kind": "lora"}, f"{kind} is a LyCORIS kind we do not have: a plain LoRA on "
                   "the attention projections at the same rank and alpha; conv layers are not adapted")


def _resolution(imp: Importer, source: str, value: Any, config: dict, path: Path) -> None:
    # the GUI writes "1024,1024"; sd-scripts' TOML an integer or [width, height]
    parts = value if isinstance(value, list) else [value] if isinstance(value, int) else \
        as_str(value, source).replace("x", ",").split(",")
    sides = [as_int(part, source) for part in parts if str(part).strip()]
    if len(sides) == 1 or (len(sides) == 2 and sides[0] == sides[1]):
        imp.exact(source, "dataset.resolution", sides[0])
    elif len(sides) == 2:
        side = round(math.sqrt(sides[0] * sides[1]) / 8) * 8
        imp.approx(source, {"dataset.resolution": side}, f"{sides[0]}x{sides[1]} as a square of the same area")
    else:
        raise JobError(f"{source}: expected 'WIDTH,HEIGHT', got {value!r}")


def _optimizer(imp: Importer, source: str, value: Any, config: dict, path: Path) -> None:
    name = as_str(value, source)
    if name in OPTIMIZERS:
        imp.exact(source, "optimizer.name", OPTIMIZERS[name])
    else:
        imp.approx(source, {"optimizer.name": "adamw"}, f"we have AdamW and AdamW8bit, not {name}: AdamW at the "
                   "learning rate given; adaptive optimizers (Prodigy, DAdapt) need a real learning rate")


def _optimizer_args(imp: Importer, source: str, value: Any, config: dict, path: Path) -> None:
    text = " ".join(as_str(value, source).split()) if isinstance(value, str) else value
    if isinstance(text, list):
        text = " ".join(as_str(v, source) for v in text)
    if not text:
        imp.none(source, value, "empty")
        return
    mapped, left = {}, []
    for item in text.split(" "):
        name, _, raw = item.partition("=")
        if name in OPTIMIZER_ARGS and raw:
            numbers = [as_float(v, f"{source}: {name}") for v in raw.strip("()[]").split(",") if v]
            mapped[OPTIMIZER_ARGS[name]] = numbers if name == "betas" else numbers[0]
        else:
            left.append(item)
    if not mapped:
        imp.none(source, value, f"= {text!r}: no argument we have")
        return
    imp.approx(source, mapped, f"not mapped: {' '.join(left)}" if left else "each argument mapped")


def _lr_warmup(imp: Importer, source: str, value: Any, config: dict, path: Path) -> None:
    percent = 0.0 if is_unset(value) else as_float(value, source)
    steps = _total_steps(config)
    if not percent:
        imp.none(source, value, "= 0: no warmup")
    elif steps:
        imp.approx(source, {"schedule.warmup_steps": round(steps * percent / 100)},
                   f"{percent:g}% of {steps} steps")
    else:
        imp.none(source, value, f"= {percent:g}%: the run is counted in epochs, so the steps are not known "
                 "here; set schedule.warmup_steps")


def _learning_rate(imp: Importer, source: str, value: Any, config: dict, path: Path) -> None:
    rate = as_float(value, source)
    if _positive(config.get("unet_lr")):
        imp.approx(source, {}, f"= {rate:g}: unet_lr sets the denoiser's rate, as in kohya")
    else:
        imp.exact(source, "optimizer.learning_rate", rate)


def _unet_lr(imp: Importer, source: str, value: Any, config: dict, path: Path) -> None:
    if _positive(value):
        imp.exact(source, "optimizer.learning_rate", as_float(value, source))
    else:
        imp.approx(source, {}, "unset: learning_rate is the denoiser's rate, as in kohya")


def _text_encoder_lr(imp: Importer, source: str, value: Any, config: dict, path: Path) -> None:
    if _positive(value):
        imp.exact(source, "text_encoder.learning_rate", as_float(value, source))
    elif _positive(config.get("learning_rate")):
        imp.approx(source, {"text_encoder.learning_rate": as_float(config["learning_rate"], source)},
                   "unset: the text encoder trains at learning_rate, as in kohya")
    else:
        imp.none(source, value, "unset: our default kept")


def _unet_only(imp: Importer, source: str, value: Any, config: dict, path: Path) -> None:
    imp.exact(source, "text_encoder.mode", "off" if as_bool(value, source) else "lora")


def _stop_text_encoder(imp: Importer, source: str, value: Any, config: dict, path: Path) -> None:
    percent = 0.0 if is_unset(value) else as_float(value, source)
    if percent <= 0:
        imp.none(source, value, "= 0: the text encoder trains throughout (our default)")
    else:
        imp.approx(source, {"text_encoder.stop_fraction": min(percent, 100) / 100}, f"{percent:g}% of the steps")


def _steps(imp: Importer, source: str, value: Any, config: dict, path: Path) -> None:
    steps = 0 if is_unset(value) else as_int(value, source)
    if _epochs(config):
        imp.approx(source, {}, f"= {steps}: epochs are set and win, as in sd-scripts")
    elif steps:
        imp.exact(source, "schedule.max_steps", steps)
    else:
        imp.none(source, value, "unset and no epochs: our default steps kept")


def _epoch(imp: Importer, source: str, value: Any, config: dict, path: Path) -> None:
    epochs = 0 if is_unset(value) else as_int(value, source)
    if epochs and epochs == _epochs(config):
        imp.approx(source, {"schedule.epochs": epochs, "schedule.max_steps": 0}, "counted in epochs")
    else:
        imp.none(source, value, "unset" if not epochs else "the other epoch field wins")


def _train_data_dir(imp: Importer, source: str, value: Any, config: dict, path: Path) -> None:
    folder = _data_dir(imp, source, value, "empty: set dataset.folders")
    if not folder:
        return
    subfolders = _kohya_subfolders(Path(folder).expanduser())
    extension = _caption_extension(config, source)
    if not subfolders:
        imp.exact(source, "dataset.folders", [{"path": folder, "caption_extension": extension}],
                  "its N_name subfolders are read with their repeats")
        return
    folders = [{"path": str(sub), "instance_prompt": name, "caption_extension": extension}
               for sub, name in subfolders]
    imp.approx(source, {"dataset.folders": folders}, "one folder per N_name subfolder, repeated N times; images "
               "without a caption file use the folder's name as kohya does")


def _reg_data_dir(imp: Importer, source: str, value: Any, config: dict, path: Path) -> None:
    folder = _data_dir(imp, source, value, "empty: no prior preservation")
    if not folder:
        return
    root = Path(folder).expanduser()
    subfolders = _kohya_subfolders(root)
    class_dir, prompt = subfolders[0] if subfolders else (root, _KOHYA_FOLDER.sub(r"\2", root.name))
    values = prior_values(class_dir, prompt)
    note = "prior preservation on the class images there (none generated while they suffice)"
    if len(subfolders) > 1:
        note += f"; only the first class folder is used, not {', '.join(str(s) for s, _ in subfolders[1:])}"
    imp.approx(source, values, note)


def _dataset_config(imp: Importer, source: str, value: Any, config: dict, path: Path) -> None:
    if SD_SCRIPTS in imp.formats:
        imp.approx(source, {}, "the dataset TOML given with it is read")
    elif as_str(value, source):
        imp.none(source, value, "import the dataset TOML together with this file")
    else:
        imp.none(source, value, "empty")


def _caption_extension_rule(imp: Importer, source: str, value: Any, config: dict, path: Path) -> None:
    extension = _caption_extension(config, source)
    if SD_SCRIPTS in imp.formats:
        imp.approx(source, {}, "the dataset TOML's folders carry their own caption extension")
    else:
        imp.approx(source, {}, f"{extension!r} on each dataset folder (see train_data_dir)")


def _sample_prompts(imp: Importer, source: str, value: Any, config: dict, path: Path) -> None:
    prompts, options = parse_sample_prompts(as_str(value, source), source)
    if not prompts:
        imp.none(source, value, "empty")
        return
    imp.approx(source, {"validation.prompts": prompts, **options},
               "prompt lines; --n, --s, --l, --d of the first line apply to all, --w/--h use the resolution")


def _output_name(imp: Importer, source: str, value: Any, config: dict, path: Path) -> None:
    name = as_str(value, source)
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).lstrip("._-")
    if not safe:
        imp.none(source, value, "empty: our default name kept")
    elif safe == name:
        imp.exact(source, "output.name", name)
    else:
        imp.approx(source, {"output.name": safe}, "characters a file name should not hold replaced by _")


def _noise_offset_type(imp: Importer, source: str, value: Any, config: dict, path: Path) -> None:
    if as_str(value, source) in ("Original", ""):
        imp.exact(source, "diffusion.noise_offset", _noise_offset(config, source), "plain offset noise")
    else:
        imp.none(source, value, "multires noise: we have the plain offset only")


def _random_crop(imp: Importer, source: str, value: Any, config: dict, path: Path) -> None:
    imp.exact(source, "dataset.crop", "random" if as_bool(value, source) else "center")


def prior_values(class_dir: Path, class_prompt: str) -> dict:
    """Prior preservation on existing class images: as many as the folder holds, so none are generated."""
    count = sum(1 for p in class_dir.iterdir() if p.suffix.lower() in _IMAGES) if class_dir.is_dir() else 0
    return {"prior.enabled": True, "prior.class_dir": str(class_dir), "prior.class_prompt": class_prompt,
            "prior.num_class_images": count}


def parse_sample_prompts(text: str, source: str) -> tuple[list[str], dict]:
    """kohya's prompt file lines: `a dog --n blurry --s 28 --l 7 --d 1` (--w, --h: the size)."""
    prompts, options = [], {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        prompt, *flags = line.split(" --")
        prompts.append(prompt.strip())
        if len(prompts) > 1:
            continue
        for flag in flags:
            name, _, raw = flag.partition(" ")
            if name in SAMPLE_OPTIONS:
                where = f"{source}: --{name}"
                parse = {"n": as_str, "s": as_int, "l": as_float, "d": as_int}[name]
                options[SAMPLE_OPTIONS[name]] = parse(raw.strip(), where)
    return prompts, options


def _data_dir(imp: Importer, source: str, value: Any, empty_note: str) -> str:
    """The folder a *_data_dir field names, or '' once reported as unused (empty, or a dataset TOML given)."""
    folder = as_str(value, source)
    if SD_SCRIPTS in imp.formats:
        imp.approx(source, {}, "the dataset TOML lists the folders instead, as in sd-scripts")
        return ""
    if not folder:
        imp.none(source, value, empty_note)
    return folder


def _kohya_subfolders(root: Path) -> list[tuple[Path, str]]:
    if not root.is_dir():
        return []
    return [(sub, m.group(2)) for sub in sorted(p for p in root.iterdir() if p.is_dir())
            if (m := _KOHYA_FOLDER.match(sub.name))]


def _caption_extension(config: dict, source: str) -> str:
    extension = as_str(config.get("caption_extension") or ".txt", source)
    return extension if extension.startswith(".") else "." + extension


def _noise_offset(config: dict, source: str) -> float:
    value = config.get("noise_offset")
    return 0.0 if is_unset(value) else as_float(value, source)


def _epochs(config: dict) -> int:
    for key in ("max_train_epochs", "epoch"):
        value = config.get(key)
        if not is_unset(value) and as_int(value, key):
            return as_int(value, key)
    return 0


def _total_steps(config: dict) -> int:
    value = config.get("max_train_steps")
    return 0 if _epochs(config) or is_unset(value) else as_int(value, "max_train_steps")


def _positive(value: Any) -> bool:
    try:
        return not is_unset(value) and float(value) > 0
    except (TypeError, ValueError):
        return False


# source field -> rule: what depends on other fields, or is named or counted differently.
RULES = {
    "sdxl": _family, "v2": _family, "sd3_checkbox": _family, "flux1_checkbox": _family,
    "v_parameterization": _v_parameterization,
    "LoRA_type": _lora_type,
    "max_resolution": _resolution,
    "optimizer": _optimizer,
    "optimizer_args": _optimizer_args,
    "lr_scheduler": choice_rule(SCHEDULERS, NEAREST_SCHEDULER, "schedule.lr_scheduler", "scheduler"),
    "lr_warmup": _lr_warmup,
    "learning_rate": _learning_rate,
    "unet_lr": _unet_lr,
    "text_encoder_lr": _text_encoder_lr,
    "network_train_unet_only": _unet_only,
    "stop_text_encoder_training": _stop_text_encoder,
    "max_train_steps": _steps,
    "epoch": _epoch, "max_train_epochs": _epoch,
    "train_data_dir": _train_data_dir,
    "reg_data_dir": _reg_data_dir,
    "dataset_config": _dataset_config,
    "caption_extension": _caption_extension_rule,
    "sample_prompts": _sample_prompts,
    "output_name": _output_name,
    "noise_offset_type": _noise_offset_type,
    "random_crop": _random_crop,
}
