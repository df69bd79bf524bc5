"""OneTrainer's training config (a preset or a saved config, nested sections) and its concepts.json.

Enum values are OneTrainer's upper-case names; each concept becomes one of our dataset folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..job import JobError
from . import kohya
from .report import (ONETRAINER_CONCEPTS, Importer, apply_tables, as_bool, as_float, as_int, as_str, choice_rule,
                     flatten, folder_rule, is_unset, shared_rule)

SIGNATURE = {"training_method", "model_type", "base_model_name", "concept_file_name", "output_model_destination",
             "learning_rate_scheduler", "lora_rank", "workspace_dir"}
CONCEPT_SIGNATURE = {"path", "name", "enabled", "balancing", "repeats", "image", "text", "include_subdirectories"}

EXACT = {
    "base_model_name": ("model.path", as_str),
    "cache_dir": ("dataset.cache_dir", as_str),
    "batch_size": ("schedule.batch_size", as_int),
    "gradient_accumulation_steps": ("schedule.gradient_accumulation", as_int),
    "learning_rate": ("optimizer.learning_rate", as_float),
    "learning_rate_warmup_steps": ("schedule.warmup_steps", as_int),
    "weight_decay": ("optimizer.weight_decay", as_float),
    "optimizer.weight_decay": ("optimizer.weight_decay", as_float),
    "optimizer.eps": ("optimizer.eps", as_float),
    "lora_rank": ("network.rank", as_int),
    "lora_alpha": ("network.alpha", as_float),
    "dropout_probability": ("network.dropout", as_float),
    "ema_decay": ("ema.decay", as_float),
    "ema_update_step_interval": ("ema.every_n_steps", as_int),
    "offset_noise_weight": ("diffusion.noise_offset", as_float),
    "rescale_noise_scheduler_to_zero_terminal_snr": ("diffusion.zero_terminal_snr", as_bool),
    "latent_caching": ("dataset.cache_latents", as_bool),
    "aspect_ratio_bucketing": ("dataset.aspect_buckets", as_bool),
}
FAMILIES = {"STABLE_DIFFUSION_15": "sd1", "STABLE_DIFFUSION_20": "sd2", "STABLE_DIFFUSION_20_BASE": "sd2",
            "STABLE_DIFFUSION_21": "sd2", "STABLE_DIFFUSION_21_BASE": "sd2", "STABLE_DIFFUSION_XL_10_BASE": "sdxl",
            "STABLE_DIFFUSION_3": "sd3", "STABLE_DIFFUSION_35": "sd3", "FLUX_DEV_1": "flux",
            "STABLE_CASCADE_1": "cascade"}
METHODS = {"LORA": "lora", "FINE_TUNE": "full"}
OPTIMIZERS = {"ADAMW": "adamw", "ADAMW_8BIT": "adamw8bit"}
SCHEDULERS = {"CONSTANT": "constant", "LINEAR": "linear", "COSINE": "cosine",
              "COSINE_WITH_RESTARTS": "cosine_with_restarts"}
NEAREST_SCHEDULER = {"COSINE_WITH_HARD_RESTARTS": "cosine_with_restarts", "REX": "cosine",
                     "ADAFACTOR": "constant"}
PRECISIONS = {"FLOAT_32": "no", "FLOAT_16": "fp16", "BFLOAT_16": "bf16"}


def looks_like(config: Any) -> bool:
    return isinstance(config, dict) and len(SIGNATURE & set(config)) >= 2


def looks_like_concepts(config: Any) -> bool:
    return (isinstance(config, list) and bool(config) and all(isinstance(c, dict) for c in config)
            and all(len(CONCEPT_SIGNATURE & set(c)) >= 2 and "path" in c for c in config))


def convert(imp: Importer, path: Path, config: dict) -> None:
    """The preset's fields; its inline `concepts` and `samples` (a saved config holds them) as their files'."""
    rest = {k: v for k, v in config.items() if k not in ("concepts", "samples")}
    apply_tables(imp, path, flatten(rest), EXACT, RULES)
    for key, convert_list in (("concepts", convert_concepts), ("samples", convert_samples)):
        value = config.get(key)
        if isinstance(value, list) and all(isinstance(item, dict) for item in value):
            convert_list(imp, path, value, prefix=f"{key}.")
        elif key in config:
            imp.none(f"{path.name}: {key}", value)


def convert_samples(imp: Importer, path: Path, samples: list, prefix: str = "") -> None:
    """Each enabled sample's prompt becomes a validation prompt; sizes, seeds and steps are per sample there."""
    count = 0
    for i, sample in enumerate(samples):
        for key, value in flatten(sample).items():
            source = f"{path.name}: {prefix}{i}.{key}"
            if key == "prompt" and sample.get("enabled", True) is not False:
                imp.approx(source, {f"validation.prompts.{count}": as_str(value, source)}, "a validation prompt")
                count += 1
            else:
                imp.none(source, value, "a disabled sample" if sample.get("enabled", True) is False else "")


def convert_concepts(imp: Importer, path: Path, concepts: list, prefix: str = "") -> None:
    """Each enabled training concept as a dataset folder: its path, repeats, loss weight and caption source."""
    index = 0
    for i, concept in enumerate(concepts):
        flat = flatten(concept)
        where = f"{path.name}: {prefix}{i}."
        skip = _skipped(concept)
        if skip:
            for key, value in flat.items():
                imp.none(where + key, value, skip)
            continue
        for key, value in flat.items():
            source = where + key
            rule = CONCEPT_RULES.get(key)
            if rule is None:
                imp.none(source, value)
            else:
                rule(imp, source, value, flat, f"dataset.folders.{index}")
        if "path" not in flat:
            raise JobError(f"{where}path: a concept needs a path")
        index += 1


def _skipped(concept: dict) -> str:
    if concept.get("enabled") is False:
        return "a disabled concept: not imported"
    if concept.get("validation_concept") is True or concept.get("type") in ("VALIDATION", "PRIOR_PREDICTION"):
        return "a validation or prior-prediction concept: not a training folder here"
    return ""


def _model_type(imp: Importer, source: str, value: Any, flat: dict, path: Path) -> None:
    name = as_str(value, source)
    if name in FAMILIES:
        imp.exact(source, "model.family", FAMILIES[name])
    else:
        imp.none(source, value, f"= {name!r}: a model family we do not train; model.family stays auto")


def _epochs(imp: Importer, source: str, value: Any, flat: dict, path: Path) -> None:
    imp.exact(source, "schedule.epochs", as_int(value, source), also={"schedule.max_steps": 0})


def _denoiser_lr(imp: Importer, source: str, value: Any, flat: dict, path: Path) -> None:
    if is_unset(value):
        imp.none(source, value, "unset: learning_rate is the denoiser's rate, as in OneTrainer")
    else:
        imp.exact(source, "optimizer.learning_rate", as_float(value, source), "wins over learning_rate")


def _train_text_encoder(imp: Importer, source: str, value: Any, flat: dict, path: Path) -> None:
    full = flat.get("training_method") == "FINE_TUNE"
    imp.exact(source, "text_encoder.mode", ("full" if full else "lora") if as_bool(value, source) else "off")


def _text_encoder_lr(target: str):
    def rule(imp: Importer, source: str, value: Any, flat: dict, path: Path) -> None:
        if is_unset(value):
            imp.none(source, value, "unset: OneTrainer uses learning_rate; ours keeps its own default")
        else:
            imp.exact(source, target, as_float(value, source))
    return rule


def _betas(imp: Importer, source: str, value: Any, flat: dict, path: Path) -> None:
    betas = [as_float(flat.get("optimizer.beta1", 0.9) or 0.9, source),
             as_float(flat.get("optimizer.beta2", 0.999) or 0.999, source)]
    imp.exact(source, "optimizer.betas", betas)


def _ema(imp: Importer, source: str, value: Any, flat: dict, path: Path) -> None:
    imp.exact(source, "ema.enabled", as_str(value, source) != "OFF", "GPU or CPU: on")


def _prediction(imp: Importer, source: str, value: Any, flat: dict, path: Path) -> None:
    kind = "v_prediction" if source.endswith("force_v_prediction") else "epsilon"
    if as_bool(value, source):
        imp.exact(source, "model.prediction_type", kind)
    else:
        imp.approx(source, {}, "= false: model.prediction_type stays auto unless the other flag sets it")


def _checkpointing(imp: Importer, source: str, value: Any, flat: dict, path: Path) -> None:
    # older configs hold a bool, newer ones ON / OFF / CPU_OFFLOADED
    if isinstance(value, bool) or value in ("ON", "OFF"):
        imp.exact(source, "precision.gradient_checkpointing", value is True or value == "ON")
    else:
        imp.approx(source, {"precision.gradient_checkpointing": True}, f"{value}: plain checkpointing")


def _min_snr(imp: Importer, source: str, value: Any, flat: dict, path: Path) -> None:
    name = as_str(value, source)
    strength = flat.get("loss_weight_strength", 5.0)
    if name == "MIN_SNR_GAMMA":
        imp.exact(source, "diffusion.min_snr_gamma", as_float(strength, source), "at loss_weight_strength")
    elif name == "CONSTANT":
        imp.exact(source, "diffusion.min_snr_gamma", 0.0, "no loss weighting")
    else:
        imp.none(source, value, f"= {name!r}: a loss weighting we do not have")


def _loss_strength(imp: Importer, source: str, value: Any, flat: dict, path: Path) -> None:
    if flat.get("loss_weight_fn") == "MIN_SNR_GAMMA":
        imp.exact(source, "diffusion.min_snr_gamma", as_float(value, source))
    else:
        imp.none(source, value, "used by Min-SNR weighting only")


def _per_step(target: str, unit_key: str):
    """OneTrainer's `X_after` with `X_after_unit`: a cadence in steps maps, in minutes or epochs it does not."""
    def rule(imp: Importer, source: str, value: Any, flat: dict, path: Path) -> None:
        unit = flat.get(unit_key)
        if unit == "STEP":
            imp.exact(source, target, as_int(value, source))
        elif unit == "NEVER":
            imp.exact(source, target, 0, "never")
        else:
            imp.none(source, value, f"every {value} {str(unit).lower()}: we count in steps")
    return rule


def _unit(imp: Importer, source: str, value: Any, flat: dict, where: Any) -> None:
    """A field read together with another one (a unit, a strategy, a prompt file): reported, mapped there."""
    imp.approx(source, {}, f"= {value!r}: read with its value field")


def _output(imp: Importer, source: str, value: Any, flat: dict, path: Path) -> None:
    destination = Path(as_str(value, source))
    values = {"output.name": destination.stem} if destination.stem else {}
    if "workspace_dir" not in flat and str(destination.parent) not in ("", "."):
        values["output.output_dir"] = str(destination.parent)
    imp.approx(source, values, "our final files are OUTPUT_DIR/final/NAME.safetensors")


def _workspace(imp: Importer, source: str, value: Any, flat: dict, path: Path) -> None:
    imp.approx(source, {"output.output_dir": as_str(value, source)}, "the run folder: backups (our "
               "checkpoints), samples, and our final files")


def _concept_file(imp: Importer, source: str, value: Any, flat: dict, path: Path) -> None:
    if ONETRAINER_CONCEPTS in imp.formats:
        imp.approx(source, {}, "the concepts file given with it is read")
    else:
        imp.none(source, value, "import the concepts file together with this one")


# --- a concept's fields; `target` is the dataset folder it becomes -------------------------------------------

def _balancing(imp: Importer, source: str, value: Any, flat: dict, target: str) -> None:
    amount = as_float(value, source)
    if flat.get("balancing_strategy", "REPEATS") != "REPEATS":
        imp.none(source, value, "balanced to a number of samples: we repeat whole folders")
    elif amount == int(amount) and amount >= 1:
        imp.exact(source, f"{target}.repeats", int(amount))
    else:
        imp.approx(source, {f"{target}.repeats": max(1, round(amount))}, f"{amount:g} rounded to whole repeats")


def _prompt_source(imp: Importer, source: str, value: Any, flat: dict, target: str) -> None:
    kind = as_str(value, source)
    if kind == "sample":
        imp.exact(source, f"{target}.caption_extension", ".txt", "a .txt file beside each image")
        return
    prompt_file = Path(as_str(flat.get("text.prompt_path", ""), source)).expanduser()
    if kind == "concept" and prompt_file.is_file():
        lines = [line.strip() for line in prompt_file.read_text(encoding="utf-8", errors="replace").splitlines()
                 if line.strip()]
        imp.approx(source, {f"{target}.instance_prompt": lines[0] if lines else ""},
                   "the concept's prompt file: its first line captions the images that have no caption file")
    else:
        imp.none(source, value, f"= {kind!r}: captions from {'file names' if kind == 'filename' else 'a file'} "
                 "are not read")


RULES = {
    "training_method": choice_rule(METHODS, {}, "network.kind", "training method"),
    "model_type": _model_type,
    "resolution": kohya.RULES["max_resolution"],
    "epochs": _epochs,
    "unet.learning_rate": _denoiser_lr, "unet_learning_rate": _denoiser_lr,
    "prior.learning_rate": _denoiser_lr, "transformer.learning_rate": _denoiser_lr,
    "text_encoder.train": _train_text_encoder, "train_text_encoder": _train_text_encoder,
    "text_encoder.learning_rate": _text_encoder_lr("text_encoder.learning_rate"),
    "text_encoder_learning_rate": _text_encoder_lr("text_encoder.learning_rate"),
    "text_encoder_2.learning_rate": _text_encoder_lr("text_encoder.learning_rate_2"),
    "learning_rate_scheduler": choice_rule(SCHEDULERS, NEAREST_SCHEDULER, "schedule.lr_scheduler", "scheduler"),
    "optimizer": choice_rule(OPTIMIZERS, {}, "optimizer.name", "optimizer"),
    "optimizer.optimizer": choice_rule(OPTIMIZERS, {}, "optimizer.name", "optimizer"),
    "optimizer.beta1": _betas, "optimizer.beta2": _betas,
    "ema": _ema,
    "force_v_prediction": _prediction, "force_epsilon_prediction": _prediction,
    "train_dtype": choice_rule(PRECISIONS, {}, "precision.mixed_precision", "training precision"),
    "gradient_checkpointing": _checkpointing,
    "loss_weight_fn": _min_snr, "loss_weight_strength": _loss_strength,
    "sample_after": _per_step("validation.every_n_steps", "sample_after_unit"),
    "backup_after": _per_step("output.checkpoint_every", "backup_after_unit"),
    "sample_after_unit": _unit, "backup_after_unit": _unit,
    "output_model_destination": _output,
    "workspace_dir": _workspace,
    "concept_file_name": _concept_file,
}
CONCEPT_RULES = {
    "path": folder_rule("path", as_str),
    "balancing": _balancing, "repeats": _balancing,
    "balancing_strategy": _unit,
    "loss_weight": folder_rule("weight", as_float),
    "text.prompt_source": _prompt_source,
    "text.prompt_path": _unit,
    "text.enable_tag_shuffling": shared_rule("dataset.shuffle_tags", as_bool),
    "text.tag_delimiter": shared_rule("dataset.tag_separator", as_str),
    "text.keep_tags_count": shared_rule("dataset.keep_tokens", as_int),
    "image.enable_random_flip": shared_rule("dataset.random_flip", as_bool),
}
