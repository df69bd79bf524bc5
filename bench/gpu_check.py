"""The GPU check: each shipped preset that the memory estimate says fits this GPU trains a few steps of its real-size
model (random weights, nothing downloaded), and the measured peak memory and speed are printed beside the estimate.

    .venv/bin/python bench/gpu_check.py                      # every preset that fits; under 10 minutes on an H100
    .venv/bin/python bench/gpu_check.py --only sdxl_lora_12gb flux_dev_lora_24gb --steps 8 --keep /tmp/gpu-check
    .venv/bin/python bench/gpu_check.py --only sdxl_lora_24gb flux_dev_lora_40gb --compile   # + speed.compile

Per preset: `trainer demo --real-size` writes the model's configs and a small dataset; the preset's job is pointed at
them; `trainer estimate --json` gives the estimated peak (allowance included) and time per step for this GPU; then
`trainer run --random-weights` trains `--steps` steps with the model built from its configs on the GPU, in the
dtype frozen weights are held in. Measured: the largest `peak_mem` of the step events (`torch.cuda.max_memory_
allocated`, the peak of training: the trainer resets it once the encoders have cached and left the GPU) and the
steady speed (steps after the second, from the events' times). Exit 0 when every estimate that ran is within
--tolerance of its measurement, 1 otherwise, 2 without a CUDA GPU.

Then the suite's `gpu`-marked tests run on this GPU (`pytest -m gpu`: the bf16/fused-AdamW/TF32 paths, the SD1.5
estimate within 10%, DeepSpeed ZeRO-2 on the demo when DeepSpeed is installed) and their summary line is printed;
`--no-tests` leaves them out. A failed test makes the exit 1 too.

--compile: each preset that ran trains again with `speed.compile: regional` (torch.compile of the denoiser's
repeated blocks, inductor), and a second table gives both steady speeds and the compiled run's peak; the compile
itself falls in the first two steps, which the steady speed leaves out, and its time is the runs' difference.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
GIB = 2**30

# The real-size model each shipped preset trains (the family and the configs of trainer/real_size.MODELS). A test
# checks that every preset is here, so a new preset cannot be left out of the check.
PRESET_MODELS = {
    "sd15_lora_6gb": ("sd1", "sd15"), "sd15_dreambooth": ("sd1", "sd15"), "sd15_finetune": ("sd1", "sd15"),
    "sd21_lora": ("sd2", "sd21"), "sdxl_lora_8gb": ("sdxl", "sdxl-base"), "sdxl_lora_12gb": ("sdxl", "sdxl-base"),
    "sdxl_lora_24gb": ("sdxl", "sdxl-base"), "sdxl_full_24gb": ("sdxl", "sdxl-base"),
    "sd35_large_lora_16gb": ("sd3", "sd35-large"), "sd35_large_lora_24gb": ("sd3", "sd35-large"),
    "flux_dev_lora_12gb": ("flux", "flux1-dev"), "flux_dev_lora_16gb": ("flux", "flux1-dev"),
    "flux_dev_lora_24gb": ("flux", "flux1-dev"), "flux_dev_lora_40gb": ("flux", "flux1-dev"),
    "cascade_stage_c_lora": ("cascade", "cascade-c")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="PRESET", choices=sorted(PRESET_MODELS),
                        help="these presets only")
    parser.add_argument("--steps", type=int, default=6, help="steps per preset (default 6)")
    parser.add_argument("--tolerance", type=float, default=0.10, help="largest relative error of the memory "
                        "estimate that passes (default 0.10)")
    parser.add_argument("--keep", metavar="DIR", help="work here and keep the runs (default: a temporary folder)")
    parser.add_argument("--no-tests", action="store_true", help="leave out the suite's gpu-marked tests")
    parser.add_argument("--compile", action="store_true", help="also train each preset that ran with "
                        "speed.compile=regional and print both speeds")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("error: no CUDA GPU here; the GPU check measures on one (see bench/README.md)", file=sys.stderr)
        return 2
    card = torch.cuda.get_device_properties(0)
    memory_gib = card.total_memory / GIB
    print(f"GPU: {card.name}, {memory_gib:.1f} GiB")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    rows = []
    try:
        for preset in args.only or sorted(PRESET_MODELS):
            rows.append(check_preset(preset, work / preset, args.steps, memory_gib, card.name))
            print(format_row(rows[-1]), flush=True)
            if args.compile and rows[-1]["measured_s"] is not None:
                rows[-1].update(compiled(work / preset))
                print(compile_row(rows[-1]), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print("\n".join(table(rows)))
    if args.compile:
        print()
        print("\n".join(compile_table(rows)))
    tests_failed = False
    if not args.no_tests:
        tests = gpu_tests()
        print(f"\ngpu-marked tests: {_last_line(tests.stdout)}")
        tests_failed = tests.returncode not in (0, 5)  # 5: none collected
    bad = [r for r in rows if r.get("measured_gib") and abs(error(r)) > args.tolerance]
    failed = [r for r in rows if r["status"] == "failed"]
    return 1 if bad or failed or tests_failed else 0


def gpu_tests() -> subprocess.CompletedProcess:
    """The suite's tests that only a GPU runs (they skip themselves elsewhere)."""
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests"],
                          cwd=ROOT, capture_output=True, text=True)


def check_preset(preset: str, folder: Path, steps: int, memory_gib: float, gpu_name: str) -> dict:
    """Estimate, then (when it fits) train `steps` steps of the preset on its real-size model; a table row."""
    family, name = PRESET_MODELS[preset]
    folder.mkdir(parents=True, exist_ok=True)
    job_path = preset_job(preset, family, name, folder, steps)
    row = {"preset": preset, "status": "", "estimate_gib": None, "measured_gib": None, "estimate_s": None,
           "measured_s": None}
    estimate = _trainer(["estimate", str(job_path), "--json", "--memory", f"{memory_gib:.1f}"]
                        + (["--gpu", gpu_name] if _known_gpu(gpu_name) else []))
    if estimate.returncode != 0:
        return {**row, "status": "failed", "reason": _last_line(estimate.stderr)}
    figures = json.loads(estimate.stdout.strip().splitlines()[-1])
    row["estimate_gib"] = figures["total_gib"]
    row["estimate_s"] = figures.get("gpu", {}).get("step_seconds")
    if not figures["fits"]:
        return {**row, "status": "skipped (does not fit)"}
    started = time.perf_counter()
    run = _trainer(["run", str(job_path), "--random-weights"])
    if run.returncode != 0:
        return {**row, "status": "failed", "reason": _last_line(run.stderr)}
    peak, seconds = measured(folder / "run" / "events.jsonl")
    return {**row, "status": f"ran ({time.perf_counter() - started:.0f} s)", "measured_gib": peak / GIB,
            "measured_s": seconds}


def compiled(folder: Path) -> dict:
    """The preset's job once more with regional compilation: its steady speed, peak and wall time."""
    started = time.perf_counter()
    run = _trainer(["run", str(folder / "job.json"), "--random-weights", "--set", "speed.compile=regional",
                    "--set", f"output.output_dir={folder / 'run-compiled'}"])
    if run.returncode != 0:
        return {"compile_status": f"failed: {_last_line(run.stderr)}"}
    peak, seconds = measured(folder / "run-compiled" / "events.jsonl")
    return {"compile_status": f"ran ({time.perf_counter() - started:.0f} s)", "compiled_gib": peak / GIB,
            "compiled_s": seconds}


def compile_row(row: dict) -> str:
    def sec(v):
        return f"{v:.3f}" if v is not None else "-"

    plain, fast = row.get("measured_s"), row.get("compiled_s")
    ratio = f"{plain / fast:.2f}x" if plain and fast else "-"
    peak = f"{row['compiled_gib']:.1f}" if row.get("compiled_gib") is not None else "-"
    return (f"| {row['preset']} | {sec(plain)} | {sec(fast)} | {ratio} | {peak} | "
            f"{row.get('compile_status', 'not run')} |")


def compile_table(rows: list[dict]) -> list[str]:
    return ["| preset | s/step | compiled s/step | speed-up | compiled peak GiB | status |",
            "|---|---|---|---|---|---|", *(compile_row(r) for r in rows if "compile_status" in r)]


def preset_job(preset: str, family: str, name: str, folder: Path, steps: int) -> Path:
    """The preset's job on the real-size configs and the demo's images (enlarged into the preset's buckets), with
    `steps` steps and nothing but training: no validation images, no checkpoints, a handful of class images."""
    from trainer.demo import build_demo
    from trainer.job import load_preset, merge, save_job, validate

    demo = build_demo(folder / "demo", steps=steps, family=family, real_size=name)
    job = load_preset(preset).model_dump(mode="json")
    job = merge(job, {
        "model": {"path": str(demo.parent / "model"), "decoder": ""},
        "dataset": {"folders": [{"path": str(demo.parent / "dataset"), "instance_prompt": "a photo of sks dog"}],
                    "max_upscale": 16},
        "schedule": {"max_steps": steps, "epochs": 0},
        "validation": {"prompts": []},
        "prior": {"num_class_images": job["schedule"]["batch_size"], "sample_steps": 2},
        "output": {"output_dir": str(folder / "run"), "checkpoint_every": 0},
    })
    path = folder / "job.json"
    save_job(validate(job, preset), path)
    return path


def measured(events_path: Path) -> tuple[int, float | None]:
    """(peak memory in bytes, seconds per step after the second) from a run's step events."""
    steps = [e for e in (json.loads(line) for line in events_path.read_text(encoding="utf-8").splitlines())
             if e.get("type") == "step"]
    if not steps:
        raise ValueError(f"{events_path}: no step events")
    peak = max(int(e.get("peak_mem", 0)) for e in steps)
    steady = steps[2:]
    seconds = (steady[-1]["time"] - steady[0]["time"]) / (len(steady) - 1) if len(steady) > 1 else None
    return peak, seconds


def error(row: dict) -> float:
    """The estimate's relative error against the measured peak."""
    return (row["estimate_gib"] - row["measured_gib"]) / row["measured_gib"]


def format_row(row: dict) -> str:
    def gib(v):
        return f"{v:.1f}" if v is not None else "-"

    def sec(v):
        return f"{v:.2f}" if v is not None else "-"

    err = f"{100 * error(row):+.0f}%" if row["measured_gib"] and row["estimate_gib"] else "-"
    reason = f"  {row['reason']}" if row.get("reason") else ""
    return (f"| {row['preset']} | {gib(row['estimate_gib'])} | {gib(row['measured_gib'])} | {err} | "
            f"{sec(row['estimate_s'])} | {sec(row['measured_s'])} | {row['status']}{reason} |")


def table(rows: list[dict]) -> list[str]:
    return ["| preset | estimated GiB | measured GiB | error | estimated s/step | measured s/step | status |",
            "|---|---|---|---|---|---|---|", *(format_row(r) for r in rows)]


def _trainer(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=ROOT, capture_output=True, text=True)


def _known_gpu(name: str) -> bool:
    from trainer.gpus import find_gpu
    from trainer.job import JobError

    try:
        find_gpu(name)
        return True
    except JobError:
        return False


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


if __name__ == "__main__":
    sys.exit(main())
