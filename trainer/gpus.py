"""Common GPUs as data: peak dense bf16 tensor throughput and memory, for `estimate --gpu` (no torch).

Figures are NVIDIA's (architecture whitepapers for GeForce Ampere and Ada, datasheets for A100, H100, L4 and
T4): dense (no sparsity) FP16/BF16 tensor TFLOPS with FP32 accumulation, which is what bf16 mixed-precision
training runs at (GeForce cards run FP32 accumulation at half their FP16-accumulate figure). The T4 has no bf16:
its fp16 figure. Memory is the card's nominal size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .job import JobError


@dataclass(frozen=True)
class Gpu:
    name: str
    tflops: float  # peak dense bf16 (T4: fp16) tensor TFLOPS, FP32 accumulate
    memory_gib: float


GPUS = {g.name: g for g in (
    Gpu("RTX 3060 12GB", 25.4, 12), Gpu("RTX 3090", 71.0, 24), Gpu("RTX 4060 Ti 16GB", 44.1, 16),
    Gpu("RTX 4070", 58.3, 12), Gpu("RTX 4080", 97.5, 16), Gpu("RTX 4090", 165.2, 24),
    Gpu("A100 40GB", 312.0, 40), Gpu("A100 80GB", 312.0, 80), Gpu("H100 SXM", 989.4, 80),
    Gpu("L4", 121.0, 24), Gpu("T4", 65.0, 16),
)}


def find_gpu(name: str) -> Gpu:
    """The GPU called `name`, or the one whose name starts so (case, spaces and dashes ignored: "rtx4090",
    "h100", "a100-80gb"); a JobError listing the known ones otherwise."""
    wanted = _key(name)
    exact = [g for g in GPUS.values() if _key(g.name) == wanted]
    starting = [g for g in GPUS.values() if wanted and _key(g.name).startswith(wanted)]
    found = exact or starting
    if len(found) != 1:
        raise JobError(f"--gpu: {name!r} is {'ambiguous' if found else 'not in the table'}; known: "
                       f"{', '.join(GPUS)}")
    return found[0]


def match_gpu(device_name: str) -> Gpu | None:
    """The table's entry for a name the driver reports ("NVIDIA GeForce RTX 4090", "NVIDIA A100-SXM4-80GB"), or
    None when no entry or several agree with it. An entry agrees when its model ("4090", "a100") is a word of the
    name, both or neither say "Ti", and a memory size in both ("80GB") is the same (and an SXM entry is no PCIe card)."""
    words = set(re.split(r"[^a-z0-9]+", device_name.lower()))
    sizes = {w for w in words if re.fullmatch(r"\d+gb", w)}

    def agrees(gpu: Gpu) -> bool:
        table = gpu.name.lower().split()
        model = next(w for w in table if any(c.isdigit() for c in w))
        own_sizes = {w for w in table if re.fullmatch(r"\d+gb", w)}
        return model in words and ("ti" in table) == ("ti" in words) and \
            not (own_sizes and sizes and not own_sizes & sizes) and not ("sxm" in table and "pcie" in words)

    found = [g for g in GPUS.values() if agrees(g)]
    return found[0] if len(found) == 1 else None


def _key(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum())
