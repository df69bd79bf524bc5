"""Resumable checkpoints: the trained tensors (and their EMA), the optimizer and LR-scheduler state, and the step, in
safetensors + JSON.

No pickle anywhere, so a checkpoint copied from a rented GPU is safe to open. A checkpoint is written under a
temporary name and renamed when complete; its state.json, written last, records every file's size and hash
(trainer/run/checkpoint_files.py), so a damaged one is found before it is loaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import disk
from .checkpoint_files import STATE_FILE, complete, latest, manifest, rotate

__all__ = ["STATE_FILE", "complete", "latest", "save", "load", "read_state", "load_weights"]
EMA_FILE = "ema.safetensors"


def save(root: Path, step: int, weights: dict[str, torch.Tensor], optimizer_state: dict, lr_scheduler, info: dict,
         keep_last: int, ema: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoints/step-N atomically and keep the newest `keep_last` intact ones. `weights` are keyed
    "component.parameter" (see trainer/methods/trainable.py); `optimizer_state` is a one-process optimizer's
    `state_dict()` (under FSDP, trainer/run/sharding.py's whole one, made by every process before rank 0 saves);
    `info` (epoch, the job) goes into state.json. A write that fails (a full disk) leaves no partial checkpoint and
    every earlier one as it was."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    opt_tensors, opt_meta = _flatten_optimizer(optimizer_state)
    files = {"weights.safetensors": _cpu(weights), "optimizer.safetensors": opt_tensors}
    if ema is not None:
        files[EMA_FILE] = _cpu(ema)
    needed = sum(t.numel() * t.element_size() for tensors in files.values() for t in tensors.values())
    try:
        tmp.mkdir()
        for name, tensors in files.items():
            with disk.reporting_full(tmp / name, needed):
                save_file(tensors, tmp / name)
        state = {"step": step, "optimizer": opt_meta, "lr_scheduler": _jsonable(lr_scheduler.state_dict()),
                 **info, "files": manifest(tmp)}
        with disk.reporting_full(tmp / STATE_FILE, needed):
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    rotate(root, keep_last)
    return final


def load(path: Path, optimizer, lr_scheduler) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Restore the optimizer and scheduler in place; returns the saved state (step and info), the trained
    tensors and the EMA tensors (None when the run kept no EMA) for the caller to put back."""
    state = read_state(path)
    opt_state = _unflatten_optimizer(load_file(path / "optimizer.safetensors"), state["optimizer"])
    optimizer.load_state_dict(opt_state)
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    weights, ema = load_weights(path)
    return state, weights, ema


def read_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """The trained tensors and, when kept, their EMA."""
    ema = load_file(path / EMA_FILE) if (path / EMA_FILE).is_file() else None
    return load_file(path / "weights.safetensors"), ema


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors go to safetensors as `state.N`, their places in the (possibly nested: bitsandbytes keeps its
    quantisation state in a dict) per-parameter state to JSON under `paths`; numbers and param groups to JSON."""
    tensors: dict[str, torch.Tensor] = {}
    paths: dict[str, list[list]] = {}
    seen: dict[tuple, str] = {}  # bitsandbytes shares one quantisation map between parameters: stored once

    def walk(value, path: list):
        if torch.is_tensor(value):
            identity = (value.data_ptr(), tuple(value.shape), value.dtype)
            if identity not in seen:
                seen[identity] = f"state.{len(tensors)}"
                tensors[seen[identity]] = value.detach().to("cpu").contiguous()
            paths.setdefault(seen[identity], []).append(path)
            return None
        if isinstance(value, dict):
            return {str(k): walk(v, path + [str(k)]) for k, v in value.items()}
        return _jsonable(value)

    scalars = {str(pid): walk(entries, [str(pid)]) for pid, entries in state_dict["state"].items()}
    return tensors, {"scalars": scalars, "paths": paths, "param_groups": _jsonable(state_dict["param_groups"])}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {int(pid): entries for pid, entries in meta["scalars"].items()}
    for name, places in meta["paths"].items():
        for path in places:
            node = state[int(path[0])]
            for key in path[1:-1]:
                node = node[key]
            node[path[-1]] = tensors[name]
    return {"state": state, "param_groups": meta["param_groups"]}


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def _jsonable(value):
    """State dicts hold tuples, tensors of one number and the odd function reference; JSON keeps the data."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items() if not callable(v)}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if torch.is_tensor(value):
        return value.item()
    return value
