"""Model families: which module handles a model, and finding the family from the model's files.

Detection reads JSON configs and safetensors headers only, so `trainer check` needs no torch. What each family is
and can do is one row of table.py; what its module provides is contract.py. Adding a family means its module, a
row in table.FAMILIES, and a rule in `detect_family` when its files need one.
"""

from __future__ import annotations

import json
import re
import struct
from importlib import import_module
from pathlib import Path

from ..job import JobError, ModelSpec
from .table import FAMILIES

# Stable Cascade stage C: the prior pipeline, or the combined one whose components include it (prior_prior, ...).
CASCADE_CLASSES = ("StableCascadePriorPipeline", "StableCascadeCombinedPipeline")
# Pipelines whose class alone names the family (SD1/SD2/SDXL need a closer look at their configs).
PIPELINE_FAMILIES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux",
                     **{c: "cascade" for c in CASCADE_CLASSES}}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def family_module(name: str):
    """The module that implements a family (imports torch: call only when training)."""
    return import_module(f"trainer.families.{FAMILIES[name].module}")


def check_model_path(spec: ModelSpec) -> str:
    """What kind of model path this is ('folder', 'file', 'hub'), or a JobError naming model.path."""
    if not spec.path:
        raise JobError("model.path: no base model given")
    path = Path(spec.path).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise JobError(f"model.path: {path}: not a diffusers model folder (no model_index.json)")
        return "folder"
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise JobError(f"model.path: {path}: expected a .safetensors checkpoint or a diffusers folder")
        return "file"
    if _HUB_ID.match(spec.path) and not spec.path.startswith((".", "/", "~")):
        return "hub"
    raise JobError(f"model.path: {spec.path}: not found")


def detect_family(spec: ModelSpec) -> str:
    """The job's family, or the one the model's files say; a hub id is read from the local hub cache, and
    one not downloaded yet defaults to sd1 (presets for other families name theirs)."""
    if spec.family != "auto":
        return spec.family
    kind = check_model_path(spec)
    path = Path(spec.path).expanduser()
    if kind == "folder":
        return _family_from_folder(path)
    if kind == "file":
        if spec.config and Path(spec.config).is_dir():
            return _family_from_folder(Path(spec.config))
        return _family_from_checkpoint_keys(path)
    return _family_from_hub_cache(spec) or "sd1"


def _family_from_folder(path: Path) -> str:
    index = _read_json(path / "model_index.json")
    cls = index.get("_class_name", "")
    has_text_encoder = (index.get("text_encoder") or [None])[0] is not None  # the XL refiner has only the 2nd
    if cls in PIPELINE_FAMILIES:
        return PIPELINE_FAMILIES[cls]
    if cls in ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline") and has_text_encoder:
        return "sdxl"
    if cls not in ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"):
        raise JobError(f"model.path: {path}: {cls or 'this pipeline'} is not a supported family yet "
                       f"(supported: {', '.join(sorted(FAMILIES))})")
    unet = _read_json(path / "unet" / "config.json")
    return "sd2" if unet.get("cross_attention_dim") == 1024 else "sd1"


def _family_from_hub_cache(spec: ModelSpec) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(spec.path, "model_index.json", revision=spec.revision or None)
    if not isinstance(found, str):
        return None
    folder = Path(found).parent  # a snapshot folder: unet/config.json sits beside it once downloaded
    if (folder / "unet" / "config.json").is_file():
        return _family_from_folder(folder)
    cls = _read_json(Path(found)).get("_class_name", "")
    if cls in PIPELINE_FAMILIES:
        return PIPELINE_FAMILIES[cls]
    return "sdxl" if cls.startswith("StableDiffusionXL") else None


def _family_from_checkpoint_keys(path: Path) -> str:
    keys = _safetensors_keys(path)
    if any(k.startswith("model.diffusion_model.joint_blocks.") for k in keys):
        return "sd3"  # the MMDiT's joint blocks (its text encoders sit under text_encoders.*, when bundled)
    if any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in keys):
        return "flux"  # BFL's transformer alone, or bundled with the VAE and text encoders (ComfyUI's layout)
    if any(k.startswith("conditioner.embedders.1.model.") for k in keys):
        return "sdxl"  # CLIP ViT-L, then OpenCLIP bigG (the refiner has only the latter, as embedders.0)
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"  # OpenCLIP text encoder
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    raise JobError(f"model.path: {path}: not a Stable Diffusion 1.x/2.x/XL/3 or Flux checkpoint (no text "
                   "encoder, MMDiT or Flux transformer keys)")


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors header: no torch, and no need to read the weights."""
    return {k: tuple(v["shape"]) for k, v in safetensors_header(path).items()}


def safetensors_header(path: Path) -> dict[str, dict]:
    """{tensor name: {"dtype", "shape", ...}} from the header (an 8-byte little-endian length, then JSON)."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(f.read(size))
        return {k: {"dtype": str(v["dtype"]), "shape": v["shape"]} for k, v in header.items()
                if k != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise JobError(f"model.path: {path}: not a readable safetensors file ({exc})") from None


def _safetensors_keys(path: Path) -> list[str]:
    return list(safetensors_shapes(path))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise JobError(f"model.path: {path}: cannot read ({exc})") from None
