"""Disk space: what a run will write, checked against the free space before training, and one clear line when a
disk fills anyway.

No torch: the estimate is counted from the model's safetensors headers and the plan, so `trainer check` shows it
too. It is a rough lower bound; a run is refused only when even that does not fit.
"""

from __future__ import annotations

import errno
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..job import JobError, RunFailed

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
MB = 1 << 20


@dataclass
class Estimate:
    """Bytes a run writes, by what writes them."""
    checkpoints: int
    samples: int
    final: int
    caches: int

    @property
    def total(self) -> int:
        return self.checkpoints + self.samples + self.final + self.caches

    def describe(self, free: int) -> str:
        return (f"disk: the run writes about {_mb(self.total)} (checkpoints {_mb(self.checkpoints)}, samples "
                f"{_mb(self.samples)}, final files {_mb(self.final)}, caches {_mb(self.caches)}); {_mb(free)} free")


def estimate(plan) -> Estimate:
    """What `plan`'s run writes at its largest moment: `keep_last` checkpoints plus the one being written, every
    validation image, the final files, the latent cache."""
    job = plan.job
    trained = _trained_params(job, plan.family)
    state = 3 + (1 if job.ema.enabled else 0)  # fp32 weights, Adam's two moments, the EMA
    saves = plan.total_steps // job.output.checkpoint_every + 1 if job.output.checkpoint_every else 0
    checkpoints = min(saves, job.output.keep_last + 1) * trained * 4 * state
    val = job.validation
    renders = (1 if val.at_start else 0) + 1 + (plan.total_steps // val.every_n_steps if val.every_n_steps else 0)
    samples = len(val.prompts) * renders * job.dataset.resolution ** 2  # a PNG: about a byte a pixel
    full = "full" in (job.network.kind, job.text_encoder.mode)
    copies = 1 + (1 if job.output.save_single_file else 0)
    final = (_folder_bytes(job.model.path) * copies) if full else trained * 4 * (1 + int(job.output.save_kohya))
    latent_side = job.dataset.resolution // 8
    # Mean and std in fp32, four latent channels (SD; SD3 and Flux have 16): a lower bound like the rest.
    caches = plan.scan.num_images * latent_side ** 2 * 4 * 2 * 4 if plan.caching.latents else 0
    return Estimate(checkpoints, samples, final, caches)


def free_bytes(path: Path) -> int:
    """Free space where `path` is (or would be) created."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def check_space(plan) -> None:
    """Refuse (exit 2) a run whose estimated output clearly does not fit."""
    need, free = estimate(plan), free_bytes(plan.output_dir)
    if need.total > free:
        raise JobError(f"output.output_dir: {plan.output_dir} has {_mb(free)} free; the run writes about "
                       f"{_mb(need.total)} (checkpoints {_mb(need.checkpoints)}, final files {_mb(need.final)}, "
                       f"samples {_mb(need.samples)}, caches {_mb(need.caches)}): free space, lower "
                       "output.keep_last, or choose a bigger disk")


def is_full(exc: BaseException) -> bool:
    """An OSError of a full disk or quota, or safetensors' error for one (it reports the OS error as text)."""
    if isinstance(exc, OSError):
        return exc.errno in FULL_ERRNOS
    return "No space left on device" in str(exc) or "os error 28" in str(exc)


@contextmanager
def reporting_full(path: Path, needed: int):
    """Writing `path` (a checkpoint's file, `needed` bytes in all): a full disk becomes one line that says so."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - only a full disk is turned into RunFailed; others go on up
        if not is_full(exc):
            raise
        raise RunFailed(full_message(path, needed)) from exc


def full_message(path: Path | str, needed: int | None = None) -> str:
    size = f": it needs about {_mb(needed)}" if needed else ""
    try:
        free = f", {_mb(free_bytes(Path(path)))} free"
    except OSError:
        free = ""
    return (f"disk full writing {path}{size}{free}; free space there (or set output.output_dir to a bigger disk), "
            "then run again with --resume: the previous checkpoint is intact")


def _trained_params(job, family: str) -> int:
    """Parameters trained in the denoiser, from the model's headers; 0 when they cannot be counted yet."""
    from ..families.table import FAMILIES
    from ..methods.layers import count_trainable, table_from_folder

    root, denoiser = Path(job.model.path).expanduser(), FAMILIES[family].denoiser
    if job.network.kind == "none" or not (root / denoiser).is_dir():
        return 0
    try:
        return count_trainable(table_from_folder(root, denoiser, job.model.variant), job)
    except JobError:
        return 0  # `check` names the problem with the model on its own line


def _folder_bytes(path: str) -> int:
    root = Path(path).expanduser()
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0


def _mb(n: int) -> str:
    return f"{n / MB:,.1f} MB"
