"""What a step event reports about speed and memory: samples/s, peak memory, and on a GPU the achieved TFLOPS
and MFU (model FLOPs utilisation), from the FLOPs of the run's own first step counted by torch's FlopCounterMode,
the formulas `trainer estimate` counts its fake-tensor step with. Nothing here reads from the device: a step stays
as asynchronous as it was.
"""

from __future__ import annotations

import re
import sys

import torch

from ..gpus import GPUS, Gpu


class FlopCount:
    """A context counting the FLOPs of its block (forward and backward); `total` holds them after it."""

    def __init__(self):
        from torch.utils.flop_counter import FlopCounterMode

        self.total: int | None = None
        self._mode = FlopCounterMode(display=False)

    def __enter__(self) -> "FlopCount":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        self.total = int(self._mode.get_total_flops())


def training_starts(device: torch.device) -> None:
    """On a GPU, forget the memory peak of loading and caching (every encoder on the device, which the training
    step no longer holds): the step events then report the peak of training, what `trainer estimate` predicts."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int:
    """Bytes: the most the CUDA allocator has held since training started (`training_starts`), or the process's
    peak RSS on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS counts bytes, Linux KiB


def gpu_of(device_name: str) -> Gpu | None:
    """The GPU table's row for a CUDA device name ('NVIDIA H100 80GB HBM3' is the H100), or None."""
    words = set(re.findall(r"[a-z0-9]+", device_name.lower()))
    found = [g for g in GPUS.values() if _model(g.name) in words]
    if len({g.tflops for g in found}) != 1:  # unknown, or two rows that disagree
        return None
    return found[0]


def achieved(step_flops: int, steps_per_s: float, gpu: Gpu | None) -> tuple[float, float | None]:
    """(TFLOPS achieved, MFU: their fraction of the GPU's peak dense bf16 tensor TFLOPS, None if unknown)."""
    tflops = step_flops * steps_per_s / 1e12
    return round(tflops, 2), (round(tflops / gpu.tflops, 4) if gpu else None)


def _model(name: str) -> str:
    """'RTX 4090' -> '4090', 'H100 SXM' -> 'h100', 'A100 80GB' -> 'a100'."""
    words = name.lower().split()
    return words[1] if words[0] == "rtx" else words[0]
