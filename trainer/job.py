"""The job file: one versioned, strict schema holding everything a training run needs.

The window edits it, the trainer runs it; both import this module, so it must never import torch.
Presets are sparse JSON overrides of the defaults; `load_job` merges, migrates and validates in one place.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CURRENT_VERSION = 1
PROVENANCE_KEY = "provenance"  # written into a run's job.json by the trainer (versions, time); ignored on input
PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"


class JobError(Exception):
    """An invalid job, preset or data: one line that names the field or file. Exit code 2."""


class _Section(BaseModel):
    # Strict: "5" is not a number and an unknown key is a typo, not something to ignore.
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


class ModelSpec(_Section):
    path: str = Field("", description="Base model: a local diffusers folder, a Hugging Face model id, "
                      "or a single-file .safetensors checkpoint.")
    family: Literal["auto", "sd1", "sd2", "sdxl"] = Field(
        "auto", description="Model family; 'auto' reads it from the model's configs.")
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = Field(
        "auto", description="What the model predicts; 'auto' takes it from the model's scheduler config.")
    config: str = Field("", description="For a single-file checkpoint: a local diffusers folder or model id "
                        "whose configs describe it (needed offline).")
    revision: str = Field("", description="Hub revision (branch, tag or commit) when path is a model id.")
    variant: str = Field("", description="Hub weight variant, e.g. 'fp16', when path is a model id.")


FilterOp = Literal["==", "!=", ">", ">=", "<", "<=", "in", "not_in", "contains"]  # data, never code


class MetadataFilter(_Section):
    key: str = Field(min_length=1, description="Metadata key in the sample's .json, e.g. 'aesthetic_score' "
                     "(a dotted key such as 'meta.width' looks inside nested objects).")
    op: FilterOp = Field(
        description="Comparison: ==, !=, >, >=, <, <= (numbers), in / not_in (value is a list), contains "
                    "(the metadata text or list holds value).")
    value: bool | int | float | str | list[bool | int | float | str] = Field(
        description="What the metadata value is compared with.")

    @model_validator(mode="after")
    def _value_fits_op(self) -> "MetadataFilter":
        if self.op in ("in", "not_in") and not isinstance(self.value, list):
            raise ValueError(f"op {self.op!r} needs a list value")
        if self.op in (">", ">=", "<", "<=") and (isinstance(self.value, (bool, list, str))):
            raise ValueError(f"op {self.op!r} needs a number value")
        if self.op in ("==", "!=", "contains") and isinstance(self.value, list):
            raise ValueError(f"op {self.op!r} needs a single value, not a list")
        return self


class DatasetFolder(_Section):
    path: str = Field(description="A folder of images with same-stem caption files (and any webdataset .tar "
                      "shards in it), or one .tar shard. Subfolders named 'N_name' (kohya style) are read too, "
                      "each repeated N times.")
    repeats: int = Field(0, ge=0, le=10000, description="Times each image is seen per epoch; 0 takes N from "
                         "an 'N_name' folder name, else 1.")
    caption_extension: str = Field(".txt", description="Extension of the caption file beside each image. A file "
                                   "with several lines holds several captions; one is picked each epoch.")
    instance_prompt: str = Field("", description="Caption used for images that have no caption file; it also "
                                 "replaces the instance token (dataset.instance_token) inside captions.")
    weight: float = Field(1.0, gt=0, le=100, description="Loss weight of this folder's images: 2 pulls twice "
                          "as hard as the other folders, 0.5 half as hard.")
    filters: list[MetadataFilter] = Field(default_factory=list, description="Keep only images whose .json "
                                          "metadata (NAME.json in a shard, or beside the image) passes every "
                                          "filter; an image without the key is left out.")


class DatasetSpec(_Section):
    folders: list[DatasetFolder] = Field(default_factory=list, description="Image folders to train on.")
    resolution: int = Field(512, ge=64, le=4096, multiple_of=8,
                            description="Training resolution: each bucket holds about resolution x resolution "
                            "pixels (a square crop when aspect buckets are off).")
    aspect_buckets: bool = Field(True, description="Group images by aspect ratio so wide and tall images are "
                                 "not cropped square; a batch always comes from one bucket.")
    bucket_step: int = Field(64, ge=8, le=256, multiple_of=8, description="Bucket sides are multiples of this "
                             "(64 for UNet models, 16 for transformer models).")
    bucket_min_side: int = Field(0, ge=0, le=8192, description="Shortest bucket side in pixels; 0: half the "
                                 "resolution.")
    bucket_max_side: int = Field(0, ge=0, le=16384, description="Longest bucket side in pixels; 0: twice the "
                                 "resolution.")
    max_upscale: float = Field(2.0, ge=1, le=16, description="Largest enlargement used to fill a bucket; a "
                               "smaller image is skipped with a warning (1: never upscale).")
    crop: Literal["center", "random", "face"] = Field(
        "center", description="Where an image is cropped to its bucket: the centre, a random window each "
        "epoch (turns latent caching off), or around the largest face, else the most salient region.")
    random_flip: bool = Field(False, description="Flip each image horizontally with probability 0.5.")
    color_jitter: float = Field(0.0, ge=0, le=0.5, description="Random brightness, contrast and saturation "
                                "change of up to this fraction (0: off; on turns latent caching off).")
    caption_dropout: float = Field(0.0, ge=0, le=1, description="Probability of training a sample with an "
                                   "empty caption (helps classifier-free guidance).")
    shuffle_tags: bool = Field(False, description="Shuffle the comma-separated tags of each caption every epoch "
                               "(turns text caching off).")
    tag_separator: str = Field(",", min_length=1, max_length=8, description="What separates tags in a caption.")
    keep_tokens: int = Field(0, ge=0, le=1000, description="Leading tags that stay in place when tags are "
                             "shuffled (e.g. 1 keeps the trigger word first).")
    instance_token: str = Field("[instance]", max_length=100, description="Placeholder in captions replaced by "
                                "the folder's instance prompt, e.g. 'photo of [instance], smiling' (empty: "
                                "no replacement).")
    cache_latents: bool = Field(True, description="Encode each image with the VAE once and keep it on disk, "
                                "so later epochs and runs skip the VAE (not with random crops or colour "
                                "jitter).")
    cache_text: bool = Field(True, description="Encode each caption once and keep it on disk (not when tags "
                             "are shuffled).")
    cache_dir: str = Field("", description="Folder for the latent and text caches, shared by runs; empty: "
                           "~/.cache/sdtrainer (never inside the dataset folders).")
    num_workers: int = Field(0, ge=0, le=64, description="DataLoader worker processes (0 decodes in the "
                             "training process).")


class NetworkSpec(_Section):
    kind: Literal["lora"] = Field("lora", description="What is trained: a LoRA on the UNet.")
    rank: int = Field(16, ge=1, le=1024, description="LoRA rank (network dim): capacity of the adapter.")
    alpha: float = Field(16.0, gt=0, le=4096, description="LoRA alpha: the update is scaled by alpha/rank.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA path during training.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        description="Module names (suffixes) that get a LoRA; the default is the attention projections.")


class OptimizerSpec(_Section):
    name: Literal["adamw", "adamw8bit"] = Field(
        "adamw", description="AdamW, or 8-bit AdamW from bitsandbytes (less memory, GPU recommended).")
    learning_rate: float = Field(1e-4, gt=0, le=1, description="Peak learning rate.")
    weight_decay: float = Field(1e-2, ge=0, le=1, description="Decoupled weight decay.")
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.999], min_length=2, max_length=2,
                               description="Adam beta1 and beta2.")
    eps: float = Field(1e-8, gt=0, le=1e-2, description="Adam epsilon.")
    max_grad_norm: float = Field(1.0, ge=0, description="Clip the gradient norm to this (0 turns clipping off).")


class ScheduleSpec(_Section):
    max_steps: int = Field(1000, ge=0, description="Optimizer steps to train; 0 means use epochs instead.")
    epochs: int = Field(0, ge=0, description="Epochs to train when max_steps is 0.")
    batch_size: int = Field(1, ge=1, le=1024, description="Images per forward pass.")
    gradient_accumulation: int = Field(1, ge=1, le=1024,
                                       description="Forward passes summed into one optimizer step.")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                          "polynomial"] = Field("constant", description="Learning-rate curve over the run.")
    warmup_steps: int = Field(0, ge=0, description="Steps over which the learning rate ramps up from 0.")
    seed: int = Field(42, ge=0, description="Seed for data order, noise and timesteps: the same seed "
                      "gives the same run.")

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> "ScheduleSpec":
        if self.max_steps == 0 and self.epochs == 0:
            raise ValueError("set max_steps or epochs (both are 0)")
        return self


class PrecisionSpec(_Section):
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "no", description="Autocast precision for the forward pass; trained weights stay fp32.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass: "
                                         "less memory, about 30% slower.")


class ValidationSpec(_Section):
    prompts: list[str] = Field(default_factory=list, description="Prompts rendered at each validation.")
    negative_prompt: str = Field("", description="Negative prompt for validation images.")
    every_n_steps: int = Field(0, ge=0, description="Render validation images every N steps (0: only at "
                               "the start and the end).")
    at_start: bool = Field(True, description="Render a step-0 baseline before training.")
    seed: int = Field(0, ge=0, description="Seed for validation images, so steps compare like for like.")
    steps: int = Field(25, ge=1, le=500, description="Sampling steps per validation image.")
    guidance_scale: float = Field(7.5, ge=0, le=50, description="Classifier-free guidance scale.")


class OutputSpec(_Section):
    output_dir: str = Field("", description="Run folder: checkpoints, samples, events and final weights.")
    name: str = Field("lora", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="File name of the exported LoRA (kohya format: NAME.safetensors).")
    checkpoint_every: int = Field(500, ge=0, description="Save a resumable checkpoint every N steps (0: off).")
    keep_last: int = Field(3, ge=1, le=1000, description="Checkpoints kept; older ones are deleted.")
    save_kohya: bool = Field(True, description="Also write the LoRA in kohya format for ComfyUI and A1111.")


class Job(_Section):
    version: int = Field(CURRENT_VERSION, description="Job file format version.")
    model: ModelSpec = Field(default_factory=ModelSpec)
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    network: NetworkSpec = Field(default_factory=NetworkSpec)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    precision: PrecisionSpec = Field(default_factory=PrecisionSpec)
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)


# A migration takes a job dict of version N and returns it as version N+1. Each one stays forever, so a job
# file written by any earlier release still loads.
MIGRATIONS: dict[int, Any] = {}


def migrate(data: dict) -> dict:
    """Bring a job dict of any earlier version up to CURRENT_VERSION."""
    data = copy.deepcopy(data)
    version = data.get("version", CURRENT_VERSION)
    if not isinstance(version, int) or version < 1:
        raise JobError(f"version: expected a positive integer, got {version!r}")
    if version > CURRENT_VERSION:
        raise JobError(f"version: job version {version} is newer than this trainer understands "
                       f"({CURRENT_VERSION}); update the trainer")
    while version < CURRENT_VERSION:
        data = MIGRATIONS[version](data)
        version += 1
        data["version"] = version
    return data


def validate(data: dict, source: str = "job") -> Job:
    """Validate a full job dict (after merging and migrating); errors name the field path."""
    try:
        return Job.model_validate(migrate(data))
    except ValidationError as exc:
        raise JobError(f"{source}: {_first_error(exc)}") from None


def merge(base: dict, override: dict) -> dict:
    """Deep-merge a sparse override into base. Lists are replaced, not merged."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def defaults() -> dict:
    return Job().model_dump(mode="json")


def from_sparse(data: dict, source: str = "job") -> Job:
    """A preset or job file may be sparse: what it omits takes the defaults."""
    if not isinstance(data, dict):
        raise JobError(f"{source}: expected a JSON object at the top level")
    data = {k: v for k, v in data.items() if k != PROVENANCE_KEY}
    return validate(merge(defaults(), data), source)


def load_job(path: str | Path, overrides: list[str] | None = None) -> Job:
    """Read a job or preset file, apply `--set dotted.key=value` overrides, and validate."""
    data = read_json(path)
    for item in overrides or []:
        data = apply_override(data, item)
    return from_sparse(data, str(path))


def load_preset(name_or_path: str) -> Job:
    """A shipped preset by name (see presets/) or any preset file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESETS_DIR / f"{name_or_path}.json"
    return load_job(path)


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def to_sparse(job: Job) -> dict:
    """The job as a preset: only what differs from the defaults, plus the version."""
    return {"version": CURRENT_VERSION, **_diff(job.model_dump(mode="json"), defaults())}


def save_job(job: Job, path: str | Path, sparse: bool = False, extra: dict | None = None) -> None:
    """Write a job file atomically (a crash mid-write never leaves a half file)."""
    data = to_sparse(job) if sparse else job.model_dump(mode="json")
    if extra:
        data = {**data, **extra}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def apply_override(data: dict, item: str) -> dict:
    """`optimizer.learning_rate=3e-4`: the value is read as JSON, or taken as a string if it is not JSON."""
    if "=" not in item:
        raise JobError(f"--set {item}: expected dotted.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    out = copy.deepcopy(data)
    node = out
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise JobError(f"--set {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value
    return out


def read_json(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JobError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise JobError(f"{path}: cannot read ({exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise JobError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None


def _diff(value: dict, base: dict) -> dict:
    out = {}
    for key, item in value.items():
        if isinstance(item, dict) and isinstance(base.get(key), dict):
            sub = _diff(item, base[key])
            if sub:
                out[key] = sub
        elif key not in base or base[key] != item:
            out[key] = item
    out.pop("version", None)
    return out


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "job"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif "input" in err and err["type"] != "missing" and not isinstance(err["input"], (dict, list)):
        msg = f"{msg} (got {err['input']!r})"
    return f"{loc}: {msg}"
