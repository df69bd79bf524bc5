"""Final LoRA files: diffusers/PEFT format for `load_lora_weights`, kohya format with `ss_` metadata for ComfyUI/A1111;
and whole models: a diffusers folder and one original-layout .safetensors (trainer/export/single_file.py).

All embed the resolved job, so any file can be traced back to how it was made.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..job import LYCORIS_ONLY, Job

JOB_METADATA_KEY = "sdtrainer_job"
JOB_FILE = "sdtrainer_job.json"  # the resolved job inside an exported diffusers folder


def write_lora(final_dir: Path, family, parts, states: dict[str, dict], configs: dict[str, dict], job: Job,
               info: dict) -> dict[str, Path]:
    """Write final/pytorch_lora_weights.safetensors and final/NAME.safetensors; returns their paths. `states`
    and `configs` (adapter metadata) are keyed by component: the denoiser's and any text encoder's LoRA. A LoHa
    or LoKr is written in the kohya/LyCORIS layout only: diffusers' pipelines load neither (their
    `load_lora_weights` takes `lora` keys only; LoKr loads only through a model's own `load_lora_adapter`)."""
    outputs = {}
    if job.network.kind not in LYCORIS_ONLY:
        outputs["diffusers"] = write_lora_diffusers(final_dir, family, states, configs, job)
    if job.output.save_kohya:
        outputs["kohya"] = write_lora_kohya(final_dir / f"{job.output.name}.safetensors", family, parts, states,
                                            job, info)
    return outputs


def write_lora_diffusers(directory: Path, family, states: dict[str, dict], configs: dict[str, dict],
                         job: Job) -> Path:
    """DIRECTORY/pytorch_lora_weights.safetensors, which `pipe.load_lora_weights(directory)` reads."""
    directory.mkdir(parents=True, exist_ok=True)
    path = family.save_lora_diffusers(directory, states, configs)
    _add_metadata(path, {JOB_METADATA_KEY: job_json(job)})
    return path


def write_lora_kohya(path: Path, family, parts, states: dict[str, dict], job: Job, info: dict) -> Path:
    """One kohya-format LoRA file with the `ss_` metadata (see `kohya_metadata` for what `info` holds)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {**kohya_metadata(job, info), **family.kohya_metadata(parts), JOB_METADATA_KEY: job_json(job)}
    states = {c: fold_full_lokr_scale(s, job.network.alpha, job.network.rank) for c, s in states.items()}
    save_file(family.kohya_state_dict(states, job.network.alpha), path, metadata=metadata)
    return path


# peft's parameter names and LyCORIS's, for the adapters beside plain LoRA (whose lora_A/lora_B diffusers'
# converter renames to lora_down/lora_up). LoHa's and LoKr's names are the same in both.
LYCORIS_NAMES = {"lora_magnitude_vector": "dora_scale",
                 **{n: n for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1", "lokr_w1_a",
                                   "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")}}


def fold_full_lokr_scale(state: dict, alpha: float, rank: int) -> dict:
    """A LoKr module whose Kronecker factors are both full matrices has no rank in the file, so LyCORIS, ComfyUI
    and A1111 apply it at scale 1 (they scale by alpha / rank only when a factor is a low-rank pair); peft scales
    by alpha / rank always. Fold that scale into lokr_w2 so the file gives the trained weight."""
    out = dict(state)
    for key in state:
        if key.endswith(".lokr_w2") and f"{key[:-len('.lokr_w2')]}.lokr_w1" in state:
            out[key] = state[key] * (alpha / rank)
    return out


def lycoris_state_dict(prefix: str, state: dict, alpha: float) -> dict:
    """A component's LoHa, LoKr or DoRA tensors (peft's state-dict keys) in the LyCORIS key layout:
    `{prefix}_{module with _ for .}.hada_w1_a`, `.lokr_w1`, `.dora_scale`, ... and `.alpha` per LoHa or LoKr
    module (plain lora_A/lora_B keys are left to the caller). DoRA's magnitude is per output row, as peft trains
    it, so dora_scale is written (out, 1) (a conv's (out, 1, 1, 1)): the output-axis layout of LyCORIS (wd_on_out),
    which ComfyUI tells apart from the input-axis one by its first dimension."""
    out = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        if param not in LYCORIS_NAMES:
            continue
        name = f"{prefix}_{module.replace('.', '_')}"
        if param == "lora_magnitude_vector":
            ndim = state[f"{module}.lora_A.weight"].ndim
            value = value.reshape(-1, *[1] * (ndim - 1))  # peft keeps a conv's as (1, out, 1, 1)
        else:
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
        out[f"{name}.{LYCORIS_NAMES[param]}"] = value.contiguous()
    return out


def write_full(final_dir: Path, pipe, job: Job, single_file: bool) -> dict[str, Path]:
    """A whole model (fully fine-tuned or merged): final/diffusers, a folder `from_pretrained` loads, and with
    `single_file` final/NAME.safetensors in the original layout; both carry the resolved job."""
    outputs = {"diffusers": write_pipeline_folder(final_dir / "diffusers", pipe, job)}
    if single_file:
        from .single_file import write_single_file

        outputs["single_file"] = write_single_file(pipe, final_dir / f"{job.output.name}.safetensors",
                                                   {JOB_METADATA_KEY: job_json(job)})
    return outputs


def write_pipeline_folder(folder: Path, pipe, job: Job) -> Path:
    """`pipe.save_pretrained(folder)` in safetensors, with the resolved job beside it as JOB_FILE."""
    pipe.save_pretrained(folder, safe_serialization=True)
    (folder / JOB_FILE).write_text(json.dumps(job.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
    return folder


def job_json(job: Job) -> str:
    """The resolved job as compact JSON: what every exported file carries under JOB_METADATA_KEY."""
    return json.dumps(job.model_dump(mode="json"), separators=(",", ":"))


def kohya_metadata(job: Job, info: dict) -> dict[str, str]:
    """The `ss_` fields kohya's sd-scripts write, which A1111's and ComfyUI's LoRA browsers read."""
    res = job.dataset.resolution
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(job.network.rank),
        "ss_network_alpha": _number(job.network.alpha),
        "ss_network_dropout": _number(job.network.dropout),
        "ss_resolution": f"({res}, {res})",
        "ss_num_train_images": str(info["num_train_images"]),
        "ss_num_reg_images": str(info.get("num_class_images", 0)),
        "ss_training_started_at": str(info["started_at"]),
        "ss_training_finished_at": str(time.time()),
        "ss_steps": str(info["step"]),
        "ss_max_train_steps": str(info["total_steps"]),
        "ss_epoch": str(info["epoch"]),
        "ss_learning_rate": _number(job.optimizer.learning_rate),
        "ss_unet_lr": _number(job.optimizer.learning_rate),
        "ss_text_encoder_lr": _number(job.text_encoder.learning_rate) if job.text_encoder.mode == "lora" else "0",
        "ss_lr_scheduler": job.schedule.lr_scheduler,
        "ss_lr_warmup_steps": str(job.schedule.warmup_steps),
        "ss_optimizer": job.optimizer.name,
        "ss_batch_size_per_device": str(job.schedule.batch_size),
        "ss_gradient_accumulation_steps": str(job.schedule.gradient_accumulation),
        "ss_mixed_precision": job.precision.mixed_precision,
        "ss_gradient_checkpointing": str(job.precision.gradient_checkpointing),
        "ss_seed": str(job.schedule.seed),
        "ss_max_grad_norm": _number(job.optimizer.max_grad_norm),
        "ss_sd_model_name": Path(job.model.path).name or job.model.path,
        "ss_output_name": job.output.name,
        "ss_tag_frequency": json.dumps(tag_frequency(info["captions_by_folder"])),
        "ss_dataset_dirs": json.dumps({Path(f).name: {"n_repeats": r, "img_count": n}
                                       for f, (r, n) in info["folders"].items()}),
        "ss_training_comment": "trained with sdtrainer",
    }
    return meta


def tag_frequency(captions_by_folder: dict[str, list[str]]) -> dict[str, dict[str, int]]:
    """kohya's ss_tag_frequency: per dataset folder, how often each comma-separated tag appears."""
    out = {}
    for folder, captions in captions_by_folder.items():
        counts = Counter(tag.strip() for caption in captions for tag in caption.split(",") if tag.strip())
        out[Path(folder).name] = dict(counts.most_common())
    return out


def read_job_metadata(path: Path) -> dict | None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(JOB_METADATA_KEY)
    return json.loads(raw) if raw else None


def _add_metadata(path: Path, extra: dict[str, str]) -> None:
    """Rewrite a small safetensors file with more metadata (a LoRA is megabytes, so this is cheap)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    tensors = load_file(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata={**metadata, **extra})
    tmp.replace(path)


def _number(value: float) -> str:
    return f"{value:g}"
