"""What a base model's files hold, read from safetensors headers and JSON without torch: the dtype stored, and
whether a single-file checkpoint bundles its text encoders and VAE. `trainer check` reports it; the loader uses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..job import JobError, ModelSpec
from .detect import check_model_path, safetensors_header

# Key prefixes of what an original-layout single file may bundle beside its denoiser: SD1/SD2's CLIP or OpenCLIP,
# SDXL's two embedders, and SD3/Flux's ComfyUI-style text_encoders.*; the VAE as CompVis named it or as ComfyUI does.
TEXT_ENCODER_PREFIXES = ("cond_stage_model.", "conditioner.embedders.", "text_encoders.")
VAE_PREFIXES = ("first_stage_model.", "vae.")
DENOISER_PREFIXES = ("model.diffusion_model.", "double_blocks.", "single_blocks.")  # the denoiser alone: Flux's


@dataclass
class StoredModel:
    form: str  # "folder", "file", "hub", or "configs" (a folder without weights)
    dtypes: list[str]  # floating-point dtypes stored, the most used first (F32, F16, BF16, F8_E4M3, ...)
    text_encoders: bool | None  # bundled (a file) or present (a folder); None: not known before download
    vae: bool | None

    def describe(self) -> str:
        if self.form == "hub":
            return "model files: a hub model id (read when the run downloads it)"

        def has(present: bool | None) -> str:
            return "present" if present else "missing"

        if self.form == "configs":
            return ("model files: a diffusers folder of configs without weights (its memory can be estimated; "
                    "training needs the weights)")
        stored = " + ".join(self.dtypes) or "no floating-point tensors"
        return (f"model files: {'single file' if self.form == 'file' else 'diffusers folder'}, stored {stored}; "
                f"text encoders {has(self.text_encoders)}, VAE {has(self.vae)}; loaded in the run's precision")


def stored_model(spec: ModelSpec) -> StoredModel:
    """What `spec.path` holds (a folder's files of `spec.variant`, or a single file's tensors)."""
    kind = check_model_path(spec)
    path = Path(spec.path).expanduser()
    if kind == "hub":
        return StoredModel("hub", [], None, None)
    if kind == "file":
        header = safetensors_header(path)
        return StoredModel("file", stored_dtypes(header),
                           any(k.startswith(TEXT_ENCODER_PREFIXES) for k in header),
                           any(k.startswith(VAE_PREFIXES) for k in header))
    if not has_weights(path):
        return StoredModel("configs", [], None, None)
    files = _weight_files(path, spec.variant)
    header = {f"{file}:{k}": v for file in files for k, v in safetensors_header(file).items()}
    folders = {f.parent.name for f in files}
    return StoredModel("folder", stored_dtypes(header), any(f.startswith("text_encoder") for f in folders),
                       bool(folders & {"vae", "effnet"}))


def has_weights(folder: Path) -> bool:
    """Whether a diffusers folder holds any component's weights (safetensors, or the older .bin), or only configs."""
    return any(folder.glob("*/*.safetensors")) or any(folder.glob("*/*.bin"))


def require_weights(spec: ModelSpec) -> None:
    """Training needs weights: a folder of configs alone (the real-size demo) is refused in one line."""
    if stored_model(spec).form == "configs":
        raise JobError(f"model.path: {Path(spec.path).expanduser()}: holds configs but no weights (no .safetensors "
                       "files); `python -m trainer estimate` works on it, training needs the model's weights")


def check_bundled_parts(spec: ModelSpec) -> None:
    """A single file without its text encoders (some are shared as the denoiser alone) trains only with
    model.config naming a folder or model id that has them; refused here, before anything loads."""
    if check_model_path(spec) != "file" or spec.config:
        return
    model = stored_model(spec)
    if not any(k.startswith(DENOISER_PREFIXES) for k in safetensors_header(Path(spec.path).expanduser())):
        return  # not a model checkpoint: family detection says so
    missing = [name for name, present in (("text encoders", model.text_encoders), ("VAE", model.vae))
               if not present]
    if missing:
        raise JobError(f"model.path: {spec.path}: this checkpoint holds no {' and no '.join(missing)} (only the "
                       "denoiser); set model.config to a diffusers folder or model id of the same model that has "
                       "them, or train from that folder")


def stored_dtypes(header: dict[str, dict]) -> list[str]:
    """The floating-point dtypes in a safetensors header (`F32`, `F16`, `BF16`, `F8_E4M3`, ...), the most used
    (by tensor count) first."""
    counts: dict[str, int] = {}
    for info in header.values():
        if info["dtype"].startswith(("F", "BF")):
            counts[info["dtype"]] = counts.get(info["dtype"], 0) + 1
    return sorted(counts, key=lambda dtype: -counts[dtype])


def _weight_files(folder: Path, variant: str) -> list[Path]:
    """The component weights `from_pretrained(variant=...)` reads: `name.<variant>.safetensors` (shards too), or
    without a variant the files whose name carries none."""
    files = []
    for file in sorted(folder.glob("*/*.safetensors")):
        infix = file.name[:-len(".safetensors")].split(".")[1:]  # model.fp16.safetensors -> ["fp16"]
        if infix == ([variant] if variant else []) or (variant and file.parent.name == "effnet"):
            files.append(file)
    return files
