"""Models built from their configs alone, on the meta device: shapes and dtypes, no weights read or allocated.

Used for a model folder that holds configs but no weights (the real-size demo, or configs downloaded from a hub),
and by the memory estimate, which never reads weights even when they are there (and, to check itself against a
measurement, builds them on the CPU with their constructors' random weights).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from contextvars import ContextVar
from importlib import import_module
from pathlib import Path

from ..job import JobError

_FROM_CONFIGS = ContextVar("from_configs", default="")  # the device models are built on; "": not asked
_DTYPE = ContextVar("from_configs_dtype", default=None)  # the dtype they are built in; None: the default's


@contextmanager
def from_configs(device: str = "meta", dtype=None):
    """Within this, the family loaders build every model from its config on `device` (in `dtype`, a torch
    floating-point dtype, when given)."""
    tokens = _FROM_CONFIGS.set(device), _DTYPE.set(dtype)
    try:
        yield
    finally:
        _FROM_CONFIGS.reset(tokens[0])
        _DTYPE.reset(tokens[1])


def wanted(path: str) -> bool:
    """Whether the model at `path` is built from configs: asked for, or a local pipeline folder (its
    model_index.json there) without any weights. An empty folder is no model: its loaders say what is missing."""
    from .model_files import has_weights

    folder = Path(path).expanduser()
    return bool(_FROM_CONFIGS.get()) or ((folder / "model_index.json").is_file() and not has_weights(folder))


def device() -> str:
    """The device models are built on: "meta" unless `from_configs` names another."""
    return _FROM_CONFIGS.get() or "meta"


def pipeline_models(folder: str, skip: set[str]) -> dict:
    """{component: model on the meta device} for every model component that model_index.json names (not the
    tokenizers and schedulers, which load from their small files), except those in `skip`."""
    index_path = Path(folder).expanduser() / "model_index.json"
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise JobError(f"model.path: {index_path}: cannot read ({exc})") from None
    out = {}
    for name, entry in index.items():
        if name in skip or not isinstance(entry, list) or entry[0] is None:
            continue
        model = build(folder, name, entry[0], entry[1])
        if model is not None:
            out[name] = model
    return out


def build(folder: str, subfolder: str, library: str, class_name: str):
    """The `library.class_name` model of `folder/subfolder` from its config.json on the meta device (or the one
    `from_configs` names), or None when that class is not a model (a tokenizer or scheduler)."""
    import torch
    from diffusers import ModelMixin
    from transformers import AutoConfig, PreTrainedModel

    try:
        cls = getattr(import_module(library), class_name)
    except (ImportError, AttributeError):
        return None  # a class this environment does not have: the pipeline's own loader says so
    path = Path(folder).expanduser() / subfolder
    try:
        if isinstance(cls, type) and issubclass(cls, ModelMixin):
            with torch.device(device()), _default_dtype(torch):
                return cls.from_config(cls.load_config(str(path)))
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            config = AutoConfig.from_pretrained(str(path))
            with torch.device(device()), _default_dtype(torch):
                return cls(config)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise JobError(f"model.path: {path}: cannot build the model from its config ({first})") from None
    return None


@contextmanager
def _default_dtype(torch):
    """The dtype `from_configs` names as torch's default while a constructor runs (its weights are made in it)."""
    wanted, before = _DTYPE.get(), torch.get_default_dtype()
    if wanted is not None:
        torch.set_default_dtype(wanted)
    try:
        yield
    finally:
        torch.set_default_dtype(before)

