"""The job file: one versioned, strict schema holding everything a training run needs.

The window edits it, the trainer runs it; both import this module, so it must never import torch.
Presets are sparse JSON overrides of the defaults; `load_job` merges, migrates and validates in one place.
"""

from __future__ import annotations

import copy
import json
import os
import typing
import unicodedata
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .families.table import FAMILIES

CURRENT_VERSION = 1
PROVENANCE_KEY = "provenance"  # written into a run's job.json by the trainer (versions, time); ignored on input
PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"
FamilyChoice = Literal[("auto", *FAMILIES)]  # the family table's names (trainer/families/table.py)
# The training methods `python -m trainer demo --method` builds: the window's label for each, and what it trains.
DEMO_METHODS = {
    "lora": ("LoRA", "a LoRA on the UNet"),
    "dreambooth": ("DreamBooth", "LoRA on the UNet and text encoder, with prior preservation on generated class "
                                 "images"),
    "full": ("Full fine-tune", "full fine-tuning of the UNet with an EMA, exported as a diffusers folder and one "
                               "original-layout file"),
    "textual_inversion": ("Textual inversion", "a new token <shape>, initialised from the letters' embeddings; "
                                               "only it trains"),
}


def essential(position: int, step: str) -> dict:
    """Marks a field as one of the essentials (pass as `json_schema_extra`): the window's Essentials page shows
    these, at `position` in the order a person fills them in, under the heading `step`. Inside a list of small
    sections (dataset folders) it marks the columns that page shows."""
    return {"essential": {"position": position, "step": step}}


PRIOR_STEP = "Class images (DreamBooth prior preservation)"  # an essentials heading too long to repeat


def essential_mark(info) -> dict | None:
    """A field's essential marker ({"position", "step"}), or None."""
    extra = info.json_schema_extra
    return extra.get("essential") if isinstance(extra, dict) else None


class _OneLineError(Exception):
    # The message quotes what the user wrote (a key, a path): a control character or line separator in it must
    # not split the one line the window and scripts read.
    def __str__(self) -> str:
        return "".join(ch.encode("unicode_escape").decode("ascii")
                       if unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp") else ch
                       for ch in super().__str__())


class JobError(_OneLineError):
    """An invalid job, preset or data: one line that names the field or file. Exit code 2."""


class RunFailed(_OneLineError):
    """Training stopped for a reason one line explains (a non-finite loss, a full disk): exit code 1, the
    checkpoints already written intact, no traceback on the terminal."""


class _Section(BaseModel):
    # Strict: "5" is not a number and an unknown key is a typo, not something to ignore.
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


class ModelSpec(_Section):
    path: str = Field("", description="Base model: a local diffusers folder, a Hugging Face model id, "
                      "or a single-file .safetensors checkpoint.", json_schema_extra=essential(1, "Model"))
    family: FamilyChoice = Field(
        "auto", description="Model family; 'auto' reads it from the model's configs.")
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = Field(
        "auto", description="What the model predicts; 'auto' takes it from the model's scheduler config.")
    config: str = Field("", description="For a single-file checkpoint: a local diffusers folder or model id "
                        "whose configs describe it (needed offline).")
    revision: str = Field("", description="Hub revision (branch, tag or commit) when path is a model id.")
    variant: str = Field("", description="Hub weight variant, e.g. 'fp16', when path is a model id.")
    load_t5: bool = Field(True, description="SD3: load the T5 text encoder; off saves ~10 GB and the prompt uses "
                          "the two CLIP encoders only")
    decoder: str = Field("", description="Stable Cascade: the stage B decoder (diffusers folder or id, e.g. "
                         "'stabilityai/stable-cascade') used only for validation images; empty: validation shows "
                         "stage C's latents (their first three channels) instead of an image.")


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
                      "each repeated N times.", json_schema_extra=essential(1, "Dataset"))
    repeats: int = Field(0, ge=0, le=10000, description="Times each image is seen per epoch; 0 takes N from "
                         "an 'N_name' folder name, else 1.", json_schema_extra=essential(3, "Dataset"))
    caption_extension: str = Field(".txt", description="Extension of the caption file beside each image. A file "
                                   "with several lines holds several captions; one is picked each epoch.",
                                   json_schema_extra=essential(4, "Dataset"))
    caption_column: str = Field("text", min_length=1, max_length=200, description="A Hugging Face imagefolder "
                                "(metadata.jsonl or metadata.csv beside the images, a file_name column): the "
                                "column holding the captions.")
    instance_prompt: str = Field("", description="Caption used for images that have no caption file; it also "
                                 "replaces the instance token (dataset.instance_token) inside captions.",
                                 json_schema_extra=essential(2, "Dataset"))
    weight: float = Field(1.0, gt=0, le=100, description="Loss weight of this folder's images: 2 pulls twice "
                          "as hard as the other folders, 0.5 half as hard.")
    mask: Literal["none", "folder", "alpha"] = Field(
        "none", description="Masked loss: train only where a mask is white. folder: a same-stem image in a "
        "'masks' folder beside the images (masks/foo.png for foo.jpg); alpha: the image's own alpha channel. "
        "An image without a mask trains everywhere.")
    filters: list[MetadataFilter] = Field(default_factory=list, description="Keep only images whose .json "
                                          "metadata (NAME.json in a shard, or beside the image) passes every "
                                          "filter; an image without the key is left out.")


class DatasetSpec(_Section):
    folders: list[DatasetFolder] = Field(default_factory=list, description="Image folders to train on.",
                                         json_schema_extra=essential(2, "Dataset"))
    resolution: int = Field(512, ge=64, le=4096, multiple_of=8,
                            description="Training resolution: each bucket holds about resolution x resolution "
                            "pixels (a square crop when aspect buckets are off).",
                            json_schema_extra=essential(15, "Training"))
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
    mask_outside_weight: float = Field(0.0, ge=0, le=1, description="Masked loss: the weight of the pixels "
                                       "outside a mask (0: they do not train; a small weight such as 0.1 keeps "
                                       "some of the background).")
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


ADAPTER_KINDS = ("lora", "loha", "lokr")  # network kinds that train an adapter (peft's LoRA, LoHa, LoKr)
LYCORIS_ONLY = ("loha", "lokr")  # written only in the kohya/LyCORIS layout: diffusers' pipelines load neither


class NetworkSpec(_Section):
    kind: Literal["lora", "loha", "lokr", "full", "none"] = Field(
        "lora", description="What trains in the denoiser (UNet or transformer): a LoRA, a LoHa (Hadamard "
        "product of two low-rank pairs), a LoKr (Kronecker product), all of its selected weights (full "
        "fine-tuning), or nothing (only new tokens: textual inversion).", json_schema_extra=essential(7, "Network"))
    rank: int = Field(16, ge=1, le=1024, description="Adapter rank (network dim): capacity of the adapter.",
                      json_schema_extra=essential(8, "Network"))
    alpha: float = Field(16.0, gt=0, le=4096, description="Adapter alpha: the update is scaled by alpha/rank.",
                         json_schema_extra=essential(9, "Network"))
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA path during training (LoHa and "
                           "LoKr: dropout over the rank, peft's rank_dropout).")
    dora: bool = Field(False, description="LoRA only: DoRA, which trains each output row's magnitude apart "
                       "from its direction (peft's use_dora); slower per step.")
    lokr_factor: int = Field(-1, ge=-1, le=4096, description="LoKr: the Kronecker factor, the size of the "
                             "small matrix's sides (e.g. 8 or 16); -1: as near square as possible.")
    lokr_decompose_both: bool = Field(False, description="LoKr: split the small Kronecker matrix into a "
                                      "low-rank pair too (the large one always is, when the rank is small "
                                      "enough).")
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        description="LoRA: module names (suffixes) that get an adapter; the default is the attention "
        "projections. Empty: every layer the layer selection keeps.")


class LayerSpec(_Section):
    """Which parts of the denoiser train (LoRA and full fine-tuning); `trainer inspect-model` lists the blocks."""
    train_blocks: list[str] = Field(default_factory=list, description="Train only inside these blocks, e.g. "
                                    "'down_blocks.1', 'mid_block', 'up_blocks.*', 'transformer_blocks.12-23' "
                                    "(an inclusive index range) or 'transformer_blocks[-8:]' (the last 8). "
                                    "Empty: all blocks.", json_schema_extra=essential(10, "Layer freezing"))
    freeze_blocks: list[str] = Field(default_factory=list, description="Blocks that stay frozen, in the same "
                                     "notation; wins over train_blocks.",
                                     json_schema_extra=essential(11, "Layer freezing"))
    module_kinds: Literal["all", "attention", "attention_mlp"] = Field(
        "all", description="Kinds of layers that train: all, attention projections only, or attention and "
        "feed-forward (MLP) layers.")
    exclude_adanorm: bool = Field(False, description="Keep the adaptive-norm (timestep modulation) linear "
                                  "layers frozen, as the SD3.5 training guide advises for LoRA.")
    include_patterns: list[str] = Field(default_factory=list, description="Only modules whose full name matches "
                                        "one of these glob patterns train, e.g. '*attn2*' (empty: no filter).")
    exclude_patterns: list[str] = Field(default_factory=list, description="Modules whose full name matches "
                                        "one of these glob patterns stay frozen, e.g. '*time_emb*'.")


class TextEncoderSpec(_Section):
    """Training the text encoder(s) alongside the denoiser."""
    mode: Literal["off", "lora", "full"] = Field(
        "off", description="Train the text encoders with a LoRA (the network's rank and alpha), fully, or not.")
    learning_rate: float = Field(5e-5, gt=0, le=1, description="Learning rate of the (first) text encoder.")
    learning_rate_2: float = Field(0.0, ge=0, le=1, description="Learning rate of the second text encoder "
                                   "(SDXL, SD3); 0: the same as the first.")
    stop_fraction: float = Field(1.0, gt=0, le=1, description="Stop training the text encoders after this "
                                 "fraction of the steps (e.g. 0.3); the denoiser trains on.")
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"],
                                      description="LoRA: text-encoder module names (suffixes) that get an "
                                      "adapter.")


class NewToken(_Section):
    token: str = Field(min_length=1, max_length=100, pattern=r"^\S+$",
                       description="The new token as written in captions, e.g. '[fernando]' (no spaces).")
    init_pattern: str = Field("", max_length=200, description="Regular expression over the tokenizer's "
                              "vocabulary; the new embedding starts as the mean of the matching tokens' "
                              "embeddings, e.g. '^dog</w>$' (empty: the mean of all).")
    vectors: int = Field(1, ge=1, le=75, description="Embedding vectors the token stands for.")


class TokensSpec(_Section):
    """New tokens (textual inversion; with a LoRA, pivotal tuning): only their embedding rows train."""
    new: list[NewToken] = Field(default_factory=list, description="Tokens to add to every text encoder.")
    learning_rate: float = Field(5e-3, gt=0, le=10, description="Learning rate of the new embeddings.")
    stop_fraction: float = Field(1.0, gt=0, le=1, description="Stop training the embeddings after this "
                                 "fraction of the steps.")


class PriorSpec(_Section):
    """DreamBooth prior preservation: images of the class, generated by the base model, keep it from forgetting."""
    enabled: bool = Field(False, description="Train on class images alongside the instance images.",
                          json_schema_extra=essential(3, PRIOR_STEP))
    class_prompt: str = Field("", description="Prompt of the class, e.g. 'a photo of a dog'; also the class "
                              "images' caption.", json_schema_extra=essential(4, PRIOR_STEP))
    class_dir: str = Field("", description="Folder of class images; the missing ones are generated there with "
                           "the base model and reused by later runs (empty: a folder in the cache directory "
                           "named for the model and prompt).", json_schema_extra=essential(6, PRIOR_STEP))
    num_class_images: int = Field(0, ge=0, le=100000, description="Class images to train with; 0: "
                                  "images_per_instance for each instance image, capped by max_class_images.",
                                  json_schema_extra=essential(5, PRIOR_STEP))
    images_per_instance: int = Field(200, ge=1, le=10000, description="Class images per instance image when "
                                     "num_class_images is 0 (the DreamBooth recipe's 200).")
    max_class_images: int = Field(1000, ge=1, le=100000, description="Cap on the class images when counted "
                                  "per instance image.")
    loss_weight: float = Field(1.0, ge=0, le=100, description="Weight of the class images' loss against the "
                                "instance images'.")
    sample_steps: int = Field(25, ge=1, le=500, description="Sampling steps per generated class image.")
    guidance_scale: float = Field(7.5, ge=0, le=50, description="Guidance scale for generating class images.")
    batch_size: int = Field(4, ge=1, le=256, description="Class images generated per batch.")
    seed: int = Field(0, ge=0, description="Seed of the generated class images (image i uses seed + i).")


class EmaSpec(_Section):
    """An exponential moving average of the trained weights: smoother results, and what is exported."""
    enabled: bool = Field(False, description="Keep an EMA of the trained weights.")
    decay: float = Field(0.9999, gt=0, lt=1, description="EMA decay per update (0.999 to 0.9999 are usual).")
    start_step: int = Field(0, ge=0, description="Updates begin after this step; before it the EMA copies the "
                            "weights.")
    every_n_steps: int = Field(1, ge=1, description="Update the EMA every N optimizer steps.")
    export_ema: bool = Field(True, description="Export the EMA weights (off: the raw trained weights).")


class DiffusionSpec(_Section):
    """Noise, timesteps and loss weighting."""
    noise_offset: float = Field(0.0, ge=0, le=1, description="Add this much per-channel offset noise (helps "
                                "very dark and bright images; 0.05-0.1 are usual).")
    min_snr_gamma: float = Field(0.0, ge=0, le=100, description="Min-SNR-gamma loss weighting (5 is usual; 0: "
                                 "off).")
    zero_terminal_snr: bool = Field(False, description="Rescale the noise schedule so the last timestep is pure "
                                    "noise (use with v-prediction).")
    timestep_bias: Literal["none", "earlier", "later", "range"] = Field(
        "none", description="Sample some timesteps more often: earlier (less noise, detail), later (more "
        "noise, composition) or a range.")
    timestep_bias_multiplier: float = Field(1.0, gt=0, le=100, description="How much more often the biased "
                                            "timesteps are drawn.")
    timestep_bias_portion: float = Field(0.25, gt=0, le=1, description="Fraction of the timesteps biased "
                                         "(earlier/later).")
    timestep_bias_begin: int = Field(0, ge=0, le=1000, description="First biased timestep (range).")
    timestep_bias_end: int = Field(1000, ge=0, le=1000, description="End of the biased range (range; not included).")
    weighting_scheme: Literal["none", "logit_normal", "mode", "uniform"] = Field(
        "logit_normal", description="Flow-matching models (SD3): how timesteps are sampled.")
    logit_mean: float = Field(0.0, ge=-10, le=10, description="Mean of the logit-normal timestep density.")
    logit_std: float = Field(1.0, gt=0, le=10, description="Std of the logit-normal timestep density.")
    mode_scale: float = Field(1.29, ge=0, le=10, description="Scale of the 'mode' timestep density.")
    flow_shift: float = Field(0.0, ge=0, le=100, description="Flow-matching timestep shift; 0: the model "
                              "scheduler's (3.0 for SD3).")
    encoder_dropout: list[float] = Field(default_factory=list, description="Per text encoder, the probability "
                                         "of training with its embedding zeroed (SD3: e.g. [0.316, 0.316, "
                                         "0.316]); empty: none.")
    pooled_dropout: float = Field(0.0, ge=0, le=1, description="Probability of zeroing the pooled text "
                                  "embedding (SDXL, SD3).")
    flux_guidance: float = Field(1.0, ge=0, le=50, description="Flux: the guidance value fed to the "
                                 "transformer's guidance embedding during training (1.0 is usual for "
                                 "FLUX.1-dev LoRAs; validation uses validation.guidance_scale).")

    @model_validator(mode="after")
    def _range(self) -> "DiffusionSpec":
        if self.timestep_bias == "range" and self.timestep_bias_begin >= self.timestep_bias_end:
            raise ValueError("timestep_bias_begin must be below timestep_bias_end")
        if any(not 0 <= p <= 1 for p in self.encoder_dropout):
            raise ValueError("encoder_dropout: each probability must be between 0 and 1")
        return self


class _OptimizerCommon(_Section):
    """What every optimizer shares: the learning rate, clipping and what a non-finite step does."""
    name: str = Field(description="The optimizer (each kind narrows this to its own names).")
    # The kinds that redefine learning_rate (another default or range) keep this mark: the window reads it here.
    learning_rate: float = Field(1e-4, gt=0, le=1, description="Peak learning rate.",
                                 json_schema_extra=essential(14, "Training"))
    max_grad_norm: float = Field(1.0, ge=0, description="Clip the gradient norm to this (0 turns clipping off).")
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="A NaN or infinite loss or gradient: stop the run (the last checkpoint is kept), or "
        "skip that step with a warning.")
    max_skipped_steps: int = Field(3, ge=1, le=1000, description="With on_nonfinite skip: stop after this many "
                                   "non-finite steps in a row.")


class AdamWOptions(_OptimizerCommon):
    """AdamW (torch), or 8-bit AdamW from bitsandbytes."""
    name: Literal["adamw", "adamw8bit"] = Field(
        "adamw", description="The optimizer: AdamW, 8-bit AdamW (bitsandbytes; less memory, GPU recommended), "
        "Prodigy, Adafactor, CAME, schedule-free AdamW or Lion. Each has its own fields.")
    weight_decay: float = Field(1e-2, ge=0, le=1, description="Decoupled weight decay.")
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.999], min_length=2, max_length=2,
                               description="Adam beta1 and beta2.")
    eps: float = Field(1e-8, gt=0, le=1e-2, description="Adam epsilon.")


class ProdigyOptions(_OptimizerCommon):
    """Prodigy (prodigyopt): Adam that estimates its own step size; leave the learning rate at 1."""
    name: Literal["prodigy"] = Field("prodigy", description=AdamWOptions.model_fields["name"].description)
    learning_rate: float = Field(1.0, gt=0, le=10, description="Multiplier on Prodigy's estimated step size "
                                 "(1 as its authors advise; schedules still apply).")
    weight_decay: float = Field(0.0, ge=0, le=1, description="Weight decay (decoupled, AdamW-style).")
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.999], min_length=2, max_length=2,
                               description="Adam beta1 and beta2.")
    beta3: float = Field(0.0, ge=0, lt=1, description="Decay of Prodigy's step-size estimate; 0: the square "
                         "root of beta2 (its default).")
    eps: float = Field(1e-8, gt=0, le=1e-2, description="Adam epsilon.")
    d_coef: float = Field(1.0, gt=0, le=100, description="Scales the estimated step size: below 1 for a "
                          "smaller, safer one (0.5 is common for LoRA), above 1 for a larger one.")
    d0: float = Field(1e-6, gt=0, le=1, description="Initial step-size estimate.")
    growth_rate: float = Field(0.0, ge=0, description="Limit on how fast the estimate may grow per step "
                               "(e.g. 1.02); 0: no limit.")
    safeguard_warmup: bool = Field(False, description="Keep warmup from inflating the estimate (advised with "
                                   "a warmup schedule).")
    use_bias_correction: bool = Field(False, description="Adam's bias correction on the estimate (its authors "
                                      "advise it for diffusion fine-tunes).")


class AdafactorOptions(_OptimizerCommon):
    """Adafactor (transformers): factored second moments, the least optimizer memory."""
    name: Literal["adafactor"] = Field("adafactor", description=AdamWOptions.model_fields["name"].description)
    relative_step: bool = Field(False, description="Adafactor's own time-dependent learning rate: "
                                "learning_rate and schedule.lr_scheduler are then not used.")
    scale_parameter: bool = Field(False, description="Scale the step by each weight's RMS.")
    warmup_init: bool = Field(False, description="With relative_step: start its learning rate near 0 and warm "
                              "it up.")
    clip_threshold: float = Field(1.0, gt=0, le=100, description="Clip each update's RMS to this.")
    decay_rate: float = Field(-0.8, ge=-1, lt=0, description="Exponent of the second moments' running "
                              "average decay.")
    beta1: float = Field(0.0, ge=0, lt=1, description="First-moment decay; 0: none (the memory-saving "
                         "default).")
    weight_decay: float = Field(0.0, ge=0, le=1, description="Weight decay.")
    eps: list[float] = Field(default_factory=lambda: [1e-30, 1e-3], min_length=2, max_length=2,
                             description="Regularisation of the squared gradient, and of the step's scale.")

    @model_validator(mode="after")
    def _warmup_init_needs_relative_step(self) -> "AdafactorOptions":
        if self.warmup_init and not self.relative_step:
            raise ValueError("warmup_init needs relative_step")
        return self


class CameOptions(_OptimizerCommon):
    """CAME (pytorch_optimizer): Adafactor's memory with Adam-like updates, confidence-guided."""
    name: Literal["came"] = Field("came", description=AdamWOptions.model_fields["name"].description)
    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="Decoupled weight decay.")
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.999, 0.9999], min_length=3, max_length=3,
                               description="Beta1, beta2 and CAME's confidence beta3.")
    clip_threshold: float = Field(1.0, gt=0, le=100, description="Clip each update's RMS to this.")
    eps1: float = Field(1e-30, gt=0, le=1e-2, description="Regularisation of the squared gradient.")
    eps2: float = Field(1e-16, gt=0, le=1e-2, description="Regularisation of the instability matrix.")


class ScheduleFreeOptions(_OptimizerCommon):
    """Schedule-free AdamW (schedulefree): no learning-rate schedule; put in eval mode for sampling and saving."""
    name: Literal["adamw_schedulefree"] = Field("adamw_schedulefree",
                                                description=AdamWOptions.model_fields["name"].description)
    learning_rate: float = Field(1e-3, gt=0, le=1, description="Learning rate (schedule-free AdamW takes "
                                 "higher ones than AdamW); its warmup is schedule.warmup_steps.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="Weight decay.")
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.999], min_length=2, max_length=2,
                               description="beta1 (the interpolation between the averaged and the current "
                               "weights) and beta2.")
    eps: float = Field(1e-8, gt=0, le=1e-2, description="Adam epsilon.")
    r: float = Field(0.0, ge=0, le=10, description="Polynomial weighting of the average (0: uniform).")
    weight_lr_power: float = Field(2.0, ge=0, le=10, description="Weighting of the average by the learning "
                                   "rate to this power.")


class LionOptions(_OptimizerCommon):
    """Lion (pytorch_optimizer): sign updates, one moment; use a learning rate 3-10x below AdamW's."""
    name: Literal["lion"] = Field("lion", description=AdamWOptions.model_fields["name"].description)
    learning_rate: float = Field(3e-5, gt=0, le=1, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, le=10, description="Decoupled weight decay (3-10x AdamW's, as the "
                                "learning rate is smaller).")
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.99], min_length=2, max_length=2,
                               description="Lion beta1 (the update's interpolation) and beta2 (the moment's "
                               "decay).")


# optimizer.name -> the fields that apply to it. The window and `from_sparse` read this: a section whose fields
# depend on one of its values is a pydantic discriminated union.
OPTIMIZERS: dict[str, type[_OptimizerCommon]] = {
    tag: model for model in (AdamWOptions, ProdigyOptions, AdafactorOptions, CameOptions, ScheduleFreeOptions,
                             LionOptions)
    for tag in typing.get_args(model.model_fields["name"].annotation)}
OptimizerSpec = Annotated[AdamWOptions | ProdigyOptions | AdafactorOptions | CameOptions | ScheduleFreeOptions
                          | LionOptions, Field(discriminator="name")]
# Sections whose fields depend on a choice: section -> (the choosing field, {choice: model}).
UNIONS: dict[str, tuple[str, dict[str, type[_Section]]]] = {"optimizer": ("name", OPTIMIZERS)}
# What stays when the choice changes (`--set optimizer.name=...`, the window): the rest takes the new one's defaults.
# (Not the learning rate: Prodigy's 1.0 and Lion's 3e-5 are different quantities.)
UNION_SHARED = {"optimizer": ("max_grad_norm", "on_nonfinite", "max_skipped_steps")}


class ScheduleSpec(_Section):
    max_steps: int = Field(1000, ge=0, description="Optimizer steps to train; 0 means use epochs instead.",
                           json_schema_extra=essential(12, "Training"))
    epochs: int = Field(0, ge=0, description="Epochs to train when max_steps is 0.",
                        json_schema_extra=essential(13, "Training"))
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


class MemorySpec(_Section):
    """What trades time or precision for GPU memory; `trainer estimate` shows what each one saves."""
    fused_backward: bool = Field(False, description="Step each trained weight inside the backward pass, as soon "
                                 "as its gradient is ready, and free that gradient: the gradients never all exist "
                                 "at once (a full fine-tune saves the size of its trained weights). Needs "
                                 "gradient_accumulation 1, max_grad_norm 0, on_nonfinite 'stop' and no fp16.")
    base_weights: Literal["auto", "fp8", "nf4"] = Field(
        "auto", description="How the denoiser's frozen Linear weights are held while a LoRA trains: auto (the "
        "mixed-precision dtype), fp8 (e4m3 with a per-tensor scale, upcast layer by layer: half of bf16) or nf4 "
        "(4-bit NormalFloat through bitsandbytes, as QLoRA: about a quarter of bf16).")
    block_swap: int = Field(0, ge=0, le=256, description="Keep the frozen weights of the denoiser's first N blocks "
                            "in CPU memory and stream each to the GPU just before it runs (forward and backward): "
                            "less GPU memory, more time for the copies (0: off).")


class SpeedSpec(_Section):
    """What may make a GPU run faster at no cost in memory or results; each is off until measured on a GPU."""
    compile: Literal["none", "regional"] = Field(
        "none", description="regional: torch.compile each of the denoiser's repeated blocks (its transformer "
        "blocks) after the LoRA is attached: one compilation serves every block of a kind, so it compiles in "
        "seconds to minutes rather than the whole model's. Off by default: not yet measured on a GPU.")


class ValidationSpec(_Section):
    prompts: list[str] = Field(default_factory=list, description="Prompts rendered at each validation.",
                               json_schema_extra=essential(16, "Validation"))
    negative_prompt: str = Field("", description="Negative prompt for validation images.")
    every_n_steps: int = Field(0, ge=0, description="Render validation images every N steps (0: only at "
                               "the start and the end).")
    at_start: bool = Field(True, description="Render a step-0 baseline before training.")
    seed: int = Field(0, ge=0, description="Seed for validation images, so steps compare like for like.")
    steps: int = Field(25, ge=1, le=500, description="Sampling steps per validation image.")
    guidance_scale: float = Field(7.5, ge=0, le=50, description="Classifier-free guidance scale.")
    guidance: Literal["cfg", "apg"] = Field(
        "cfg", description="How validation images are guided: classifier-free guidance, or adaptive projected "
        "guidance (Sadat et al. 2024), which keeps high guidance scales from oversaturating. Families whose "
        "pipeline does no CFG (Flux) ignore it.")
    apg_eta: float = Field(0.0, ge=0, le=1, description="APG: weight of the guidance update's component "
                           "parallel to the conditional prediction (0 drops it, 1 keeps it).")
    apg_norm_threshold: float = Field(15.0, ge=0, le=1000, description="APG: the guidance update is scaled "
                                      "down to at most this norm (0: no limit).")
    apg_momentum: float = Field(-0.5, ge=-1, le=1, description="APG: momentum of the running guidance update "
                                "(the paper's beta; negative pushes away from the previous step's).")
    holdout_folder: str = Field("", description="Validation loss: a folder of images with captions, never "
                                "trained on (empty: none; with holdout_images, both are held out).")
    holdout_images: int = Field(0, ge=0, le=10000, description="Validation loss: set aside this many images "
                                "of the training folders (chosen by validation.seed) and train without them.")
    loss_every_n_steps: int = Field(50, ge=1, description="Validation loss on the held-out images every N "
                                    "steps (and at the start and the end).")
    loss_draws: int = Field(4, ge=1, le=64, description="Validation loss: (timestep, noise) draws per "
                            "held-out image, the same seeded draws at every evaluation, so the curve is "
                            "smooth and runs compare.")


class OutputSpec(_Section):
    output_dir: str = Field("", description="Run folder: checkpoints, samples, events and final weights.",
                            json_schema_extra=essential(17, "Output"))
    name: str = Field("lora", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="File name of the exported LoRA (kohya format: NAME.safetensors).",
                      json_schema_extra=essential(18, "Output"))
    checkpoint_every: int = Field(500, ge=0, description="Save a resumable checkpoint every N steps (0: off).")
    keep_last: int = Field(3, ge=1, le=1000, description="Checkpoints kept; older ones are deleted.")
    save_kohya: bool = Field(True, description="Also write the LoRA in kohya format for ComfyUI and A1111.")
    save_single_file: bool = Field(True, description="Full fine-tuning: also write NAME.safetensors, one file "
                                   "in the original Stable Diffusion layout that ComfyUI and A1111 load.")


class LoggingSpec(_Section):
    tensorboard: bool = Field(True, description="Write TensorBoard logs to OUTPUT_DIR/tensorboard: loss, "
                              "learning rates, gradient norm, validation loss, speed, memory and the "
                              "validation images.")
    wandb_project: str = Field("", max_length=128, description="Also log to this Weights & Biases project "
                               "(needs the wandb package); the run's config is the job. Empty: no W&B.")
    wandb_run_name: str = Field("", max_length=128, description="The W&B run's name (empty: the output "
                                "folder's name).")


class Job(_Section):
    version: int = Field(CURRENT_VERSION, description="Job file format version.")
    model: ModelSpec = Field(default_factory=ModelSpec)
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    network: NetworkSpec = Field(default_factory=NetworkSpec)
    layers: LayerSpec = Field(default_factory=LayerSpec)
    text_encoder: TextEncoderSpec = Field(default_factory=TextEncoderSpec)
    tokens: TokensSpec = Field(default_factory=TokensSpec)
    prior: PriorSpec = Field(default_factory=PriorSpec)
    ema: EmaSpec = Field(default_factory=EmaSpec)
    diffusion: DiffusionSpec = Field(default_factory=DiffusionSpec)
    optimizer: OptimizerSpec = Field(default_factory=AdamWOptions)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    precision: PrecisionSpec = Field(default_factory=PrecisionSpec)
    memory: MemorySpec = Field(default_factory=MemorySpec)
    speed: SpeedSpec = Field(default_factory=SpeedSpec)
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    logging: LoggingSpec = Field(default_factory=LoggingSpec)

    @model_validator(mode="after")
    def _something_trains(self) -> "Job":
        if self.network.kind == "none" and not self.tokens.new and self.text_encoder.mode == "off":
            raise ValueError("network.kind: 'none' trains nothing unless tokens.new or text_encoder.mode is set")
        if self.prior.enabled and not self.prior.class_prompt.strip():
            raise ValueError("prior.class_prompt: prior preservation needs a class prompt")
        return self

    @model_validator(mode="after")
    def _base_weights(self) -> "Job":
        if self.memory.base_weights != "auto" and self.network.kind == "full":
            raise ValueError(f"memory.base_weights: {self.memory.base_weights} holds frozen weights; a full "
                             "fine-tune trains them: use 'auto', or network.kind 'lora'")
        return self

    @model_validator(mode="after")
    def _fused_backward(self) -> "Job":
        # Each weight steps inside the backward pass, before the other gradients exist: nothing can sum them over
        # micro-batches, clip their common norm, skip the step or unscale fp16's loss scale.
        if not self.memory.fused_backward:
            return self
        for wrong, what in ((self.schedule.gradient_accumulation > 1, "schedule.gradient_accumulation 1"),
                            (self.optimizer.max_grad_norm > 0, "optimizer.max_grad_norm 0 (no clipping)"),
                            (self.optimizer.on_nonfinite == "skip", "optimizer.on_nonfinite 'stop'"),
                            (self.precision.mixed_precision == "fp16", "precision.mixed_precision 'bf16' or 'no'"),
                            # steps weight by weight: no optimizer that reads all weights at once (Prodigy's d)
                            (self.optimizer.name not in ("adamw", "adamw8bit"), "optimizer.name 'adamw' or "
                             "'adamw8bit'")):
            if wrong:
                raise ValueError(f"memory.fused_backward: each weight steps as soon as its gradient is ready, so it "
                                 f"needs {what}")
        return self

    @model_validator(mode="after")
    def _compile_without_swap(self) -> "Job":
        # Block swap's hooks move the weights of the very blocks regional compilation compiles (SD3's, Flux's):
        # the two together are not tried yet.
        if self.speed.compile != "none" and self.memory.block_swap:
            raise ValueError("speed.compile: regional compilation with memory.block_swap is not supported yet; set "
                             "one of them off")
        return self

    @model_validator(mode="after")
    def _dora_on_lora(self) -> "Job":
        if self.network.dora and self.network.kind != "lora":
            raise ValueError(f"network.dora: DoRA applies to network.kind 'lora' only (got "
                             f"{self.network.kind!r})")
        return self

    @model_validator(mode="after")
    def _optimizer_fits_schedule(self) -> "Job":
        opt = self.optimizer
        own_schedule = opt.name == "adamw_schedulefree" or (opt.name == "adafactor" and opt.relative_step)
        if own_schedule and self.schedule.lr_scheduler != "constant":
            what = "schedule-free AdamW" if opt.name == "adamw_schedulefree" else "Adafactor's relative_step"
            raise ValueError(f"schedule.lr_scheduler: {what} schedules its own learning rate; set it to "
                             f"'constant' (got {self.schedule.lr_scheduler!r})")
        stops = self.text_encoder.stop_fraction < 1 or (self.tokens.new and self.tokens.stop_fraction < 1)
        if opt.name == "adafactor" and opt.relative_step and stops:
            raise ValueError("optimizer.relative_step: Adafactor's own learning rate cannot be set to 0 to stop "
                             "the text encoders or tokens early; set their stop_fraction to 1")
        return self


def essential_fields() -> list[tuple[str, str, dict]]:
    """(section, field, marker) of every field marked `essential`, in the order of their positions. A section
    whose fields follow a choice (optimizer) counts a field marked in any of its kinds."""
    found: dict[tuple[str, str], dict] = {}
    for section, info in Job.model_fields.items():
        if section in UNIONS:
            models = list(UNIONS[section][1].values())
        elif isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            models = [info.annotation]
        else:
            continue
        for model in models:
            for name, field in model.model_fields.items():
                mark = essential_mark(field)
                if mark is not None:
                    found.setdefault((section, name), mark)
    return sorted(((s, n, m) for (s, n), m in found.items()), key=lambda item: item[2]["position"])


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
        raise JobError(f"{source}: {first_error(exc)}") from None


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


def defaults_for(data: dict) -> dict:
    """The defaults a sparse job is read against: those of the choices it makes (optimizer.name), whose fields
    and default values differ from the default choice's."""
    out = defaults()
    for section, (key, models) in UNIONS.items():
        chosen = data.get(section, {}).get(key) if isinstance(data.get(section), dict) else None
        if isinstance(chosen, str) and chosen in models and chosen != out[section][key]:
            out[section] = models[chosen]().model_dump(mode="json")
    return out


def switch_choice(section_data: dict, section: str, value) -> dict:
    """A union section with its choice changed: the shared fields kept, the rest the new choice's defaults (an
    AdamW's betas would be an unknown key to Adafactor)."""
    key, models = UNIONS[section]
    if value not in models or models.get(section_data.get(key)) is models[value]:  # adamw and adamw8bit: one model
        return {**section_data, key: value}
    kept = {k: v for k, v in section_data.items() if k in UNION_SHARED[section]}
    return {**models[value]().model_dump(mode="json"), **kept, key: value}


def from_sparse(data: dict, source: str = "job") -> Job:
    """A preset or job file may be sparse: what it omits takes the defaults (of the optimizer it names)."""
    if not isinstance(data, dict):
        raise JobError(f"{source}: expected a JSON object at the top level")
    _check_document(data, source)
    data = {k: v for k, v in data.items() if k != PROVENANCE_KEY}
    return validate(merge(defaults_for(data), data), source)


def load_job(path: str | Path, overrides: list[str] | None = None) -> Job:
    """Read a job or preset file, apply `--set dotted.key=value` overrides, and validate. Relative paths in the
    file are read from the file's folder (see `resolve_relative`); those given with --set, from the working folder."""
    data = resolve_relative(read_json(path), Path(path).parent)
    for item in overrides or []:
        data = apply_override(data, item)
    return from_sparse(data, str(path))


# Fields naming local files. A relative one in a job file means "beside this job file", so a job travels with its
# data (a bundle, a folder copied to another machine) and works from any working folder.
LOCAL_PATHS = (("dataset", "cache_dir"), ("prior", "class_dir"), ("output", "output_dir"))
# These may also name a Hugging Face model ('org/name' looks like a relative path): they are read from the job's
# folder only when they start with ./ or ../ or name something that is there.
MODEL_PATHS = (("model", "path"), ("model", "config"), ("model", "decoder"))


def resolve_relative(data, folder: Path):
    """The job dict with its relative local paths joined to `folder` (absolute paths, ~ paths, hub ids and
    anything malformed are left for validation to judge)."""
    if not isinstance(data, dict):
        return data
    data = dict(data)  # copies only what it changes: a hostile document may be nested too deep for deepcopy

    def fix(section: dict, key: str, model: bool) -> None:
        value = section.get(key)
        if not isinstance(value, str) or not value or value.startswith("~") or Path(value).is_absolute():
            return
        if model and not value.startswith(("./", "../", ".\\", "..\\")):
            try:
                if not (folder / value).exists():
                    return
            except (OSError, ValueError):  # a NUL or a lone surrogate: validation names the field
                return
        section[key] = os.path.normpath(os.path.join(os.path.abspath(folder), value))

    for fields, model in ((LOCAL_PATHS, False), (MODEL_PATHS, True)):
        for section_name, key in fields:
            if isinstance(data.get(section_name), dict):
                data[section_name] = dict(data[section_name])
                fix(data[section_name], key, model)
    folders = data["dataset"].get("folders") if isinstance(data.get("dataset"), dict) else None
    if isinstance(folders, list):
        data["dataset"]["folders"] = [dict(e) if isinstance(e, dict) else e for e in folders]
        for entry in data["dataset"]["folders"]:
            if isinstance(entry, dict):
                fix(entry, "path", False)
    return data


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
    data = job.model_dump(mode="json")
    out = {"version": CURRENT_VERSION, **_diff(data, defaults_for(data))}
    for section, (key, _) in UNIONS.items():
        if data[section][key] != defaults()[section][key]:  # the choice decides what the rest is read against
            out[section] = {key: data[section][key], **out.get(section, {})}
    return out


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


def run_leftovers(output_dir: Path) -> list[str]:
    """What a run folder holds besides the job file the window writes into it before starting (and a `pause`
    file, which starts the run paused, or a `commands` folder, whose commands wait for the run's first step): a
    run that only `--resume` may continue."""
    if not output_dir.is_dir():
        return []
    return sorted(p.name for p in output_dir.iterdir() if p.name not in ("job.json", "pause", "commands"))


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
    if len(parts) == 2 and parts[0] in UNIONS and parts[1] == UNIONS[parts[0]][0]:
        out[parts[0]] = switch_choice(node, parts[0], value)  # `--set optimizer.name=...` on a full job file
    else:
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
    except RecursionError:
        raise JobError(f"{path}: nested more than {MAX_DEPTH} levels deep; not a job") from None


MAX_DEPTH = 32  # a job is about four levels deep; copying or validating a deeper one could exhaust the stack


def _check_document(data, source: str) -> None:
    """Refuse a document nested deeper than MAX_DEPTH or holding text no file system takes: not Unicode (a lone
    surrogate, which JSON's \\u escapes allow) or holding a NUL character. Walks it without recursion."""
    stack = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth >= MAX_DEPTH:
            raise JobError(f"{source}: nested more than {MAX_DEPTH} levels deep; not a job")
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise JobError(f"{source}: {path.strip('.')}: not valid Unicode text (a lone surrogate)") from None
            if "\x00" in value:
                raise JobError(f"{source}: {path.strip('.')}: holds a NUL character") from None
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        stack.extend((child, f"{path}.{key}", depth + 1) for key, child in items)


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


def first_error(exc: ValidationError) -> str:
    """The first validation error as `dotted.field: message (got value)` (the importer names its source field)."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in union_loc(err["loc"]))
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "union_tag_invalid":  # pydantic names no field: the choosing one is wrong
        key, models = UNIONS[loc]
        return f"{loc}.{key}: expected one of {', '.join(models)} (got {err['ctx']['tag']!r})"
    if not loc:  # a check across sections: its message names the field itself
        return msg
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif "input" in err and err["type"] != "missing" and not isinstance(err["input"], (dict, list)):
        msg = f"{msg} (got {err['input']!r})"
    return f"{loc}: {msg}"


def union_loc(loc: tuple) -> tuple:
    """An error's field path without the choice pydantic puts in it (`optimizer.prodigy.d_coef`)."""
    if len(loc) >= 2 and loc[0] in UNIONS and loc[1] in UNIONS[loc[0]][1]:
        return (loc[0], *loc[2:])
    return tuple(loc)
