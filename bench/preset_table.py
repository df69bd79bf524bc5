"""The README's table of presets, generated rather than typed: each shipped preset's estimated peak GPU memory on its
real-size model (`trainer estimate`, fake tensors: no GPU, no weights) against the memory tier in its name, and its
time per step on a reference GPU.

    .venv/bin/python bench/preset_table.py              # print the table (30-60 s per preset on a 2-core CPU)
    .venv/bin/python bench/preset_table.py --write      # and replace the table in README.md between its markers

A preset named `..._<N>gb` promises to fit an N GB card; the table says whether its estimate does (the estimate
includes the CUDA context and allocator allowance). Exit 1 when a preset's estimate is over its tier.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
README = ROOT / "README.md"
BEGIN, END = "<!-- preset-table: begin (bench/preset_table.py --write) -->", "<!-- preset-table: end -->"
REFERENCE_GPU = "RTX 4090"
GIB = 2**30  # a "24 GB" card holds 24 GiB (24,564 MiB on an RTX 4090)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="replace the table in README.md")
    parser.add_argument("--only", nargs="+", metavar="PRESET", help="these presets only (no --write)")
    args = parser.parse_args(argv)
    import gpu_check
    from trainer.gpus import find_gpu

    gpu = find_gpu(REFERENCE_GPU)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.only or sorted(gpu_check.PRESET_MODELS):
            rows.append(preset_row(preset, Path(tmp) / preset, gpu))
            print(rows[-1], flush=True)
    table = "\n".join(markdown(rows))
    print("\n" + table)
    if args.write and not args.only:
        README.write_text(replace_table(README.read_text(encoding="utf-8"), table), encoding="utf-8")
        print(f"written to {README}")
    return 1 if any(r["fits"] is False for r in rows) else 0


def tier_gb(preset: str) -> int | None:
    """The card size a preset's name promises to fit (`sdxl_lora_12gb`: 12), or None."""
    found = re.search(r"_(\d+)gb$", preset)
    return int(found.group(1)) if found else None


def preset_row(preset: str, folder: Path, gpu) -> dict:
    import gpu_check
    from trainer.estimate import estimate
    from trainer.job import load_job
    from trainer.plan import make_plan

    family, name = gpu_check.PRESET_MODELS[preset]
    job = load_job(gpu_check.preset_job(preset, family, name, folder, steps=1))
    result = estimate(job, make_plan(job, resume=True))
    tier = tier_gb(preset)
    return {"preset": preset, "model": name, "trains": _trains(job), "size": job.dataset.resolution,
            "batch": job.schedule.batch_size, "settings": _settings(job), "peak_gib": result.total / GIB,
            "tier": tier, "fits": None if tier is None else result.total <= tier * GIB,
            "step_s": result.step_seconds(gpu)}


def markdown(rows: list[dict]) -> list[str]:
    out = [f"| preset | model | trains | px | batch | memory settings | estimated peak | tier | fits | s/step on "
           f"{REFERENCE_GPU} |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tier = f"{r['tier']} GB" if r["tier"] else "-"
        fits = "-" if r["fits"] is None else ("yes" if r["fits"] else "**no**")
        out.append(f"| `{r['preset']}` | {r['model']} | {r['trains']} | {r['size']} | {r['batch']} | "
                   f"{r['settings']} | {r['peak_gib']:.1f} GiB | {tier} | {fits} | {r['step_s']:.2f} |")
    return out


def replace_table(readme: str, table: str) -> str:
    """README.md with the text between the markers replaced by `table`; a ValueError if the markers are missing."""
    if BEGIN not in readme or END not in readme:
        raise ValueError(f"README.md lacks the markers {BEGIN!r} ... {END!r}")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table}\n{END}{tail}"


def _trains(job) -> str:
    if job.network.kind == "full":
        return "full"
    return f"LoRA rank {job.network.rank}" + (" + text encoder" if job.text_encoder.mode != "off" else "")


def _settings(job) -> str:
    """The settings that trade time or precision for memory, as the job names them."""
    memory = job.memory
    parts = [job.precision.mixed_precision]
    parts += ["checkpointing"] if job.precision.gradient_checkpointing else []
    parts += [job.optimizer.name] if job.optimizer.name != "adamw" else []
    parts += [f"{memory.base_weights} base"] if memory.base_weights != "auto" else []
    parts += [f"{memory.block_swap} blocks swapped"] if memory.block_swap else []
    parts += ["fused backward"] if memory.fused_backward else []
    return ", ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
