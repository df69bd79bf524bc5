"""The forms users store a model in, made from one diffusers folder: its weights in another dtype, a `variant`
set of files, an original-layout single file. Shared by the precision matrix and the `check` tests."""

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
# Folders beside the pipeline's components that are not loaded by `from_pretrained(variant=...)`: Stable Cascade's
# EfficientNet encoder (read by name) and its stage B.
_NOT_COMPONENTS = {"effnet", "decoder"}


def in_dtype(folder: Path, out: Path, dtype: str) -> Path:
    """A copy of the diffusers folder with every floating-point tensor stored in `dtype`, and the transformers
    configs saying so, as `save_pretrained` writes them (transformers loads in the dtype the config names)."""
    shutil.copytree(folder, out)
    for file in out.rglob("*.safetensors"):
        recast(file, file, DTYPES[dtype])
    for file in out.rglob("config.json"):
        config = json.loads(file.read_text(encoding="utf-8"))
        named = {k: str(DTYPES[dtype]).removeprefix("torch.") for k in ("dtype", "torch_dtype") if k in config}
        if named:
            file.write_text(json.dumps({**config, **named}, indent=2), encoding="utf-8")
    return out


def as_variant(folder: Path, out: Path, variant: str = "fp16") -> Path:
    """A copy whose components' weights carry the variant's name (`model.fp16.safetensors`), as the hub's fp16
    branches do: loads only with `variant=`."""
    shutil.copytree(folder, out)
    for file in out.glob("*/*.safetensors"):
        if file.parent.name not in _NOT_COMPONENTS:
            file.rename(file.with_name(f"{file.stem}.{variant}.safetensors"))
    return out


def recast(src: Path, dst: Path, dtype: torch.dtype, drop_prefixes: tuple[str, ...] = ()) -> Path:
    """`src`'s tensors with the floating-point ones in `dtype` (and none under `drop_prefixes`), metadata kept."""
    with safe_open(src, "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(drop_prefixes)}
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}, dst, metadata=metadata)
    return dst


def single_file(folder: Path, path: Path) -> Path:
    """The folder's SD1/SD2/SDXL pipeline (fp32) as one original-layout file (our writer); `recast` stores it in
    another dtype."""
    from diffusers import DiffusionPipeline

    from trainer.export.single_file import write_single_file

    return write_single_file(DiffusionPipeline.from_pretrained(folder), path, {})
