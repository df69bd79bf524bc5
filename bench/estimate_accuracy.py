"""The memory estimate against a measurement on this CPU: one LoRA step of a real-size SD1.5 (0.86 B-parameter
UNet, CLIP-L and the VAE at full size, the constructors' random weights) at 256 px, fp32, batch 1, encoders not
cached (so everything the estimate counts is really in memory).

    .venv/bin/python bench/estimate_accuracy.py           # about 5 GB of memory, a minute or two

Estimated: `trainer estimate`'s counted peak (fake tensors; without the GPU allowance, which a CPU has not).
Measured, in a fresh process running the same step on real tensors:
  - the same storage counter on the real tensors (what the fake trace is meant to reproduce), and
  - the growth of peak resident memory (`ru_maxrss`) over the resident memory after the imports: the operating
    system's figure, which also holds the allocator's overhead and whatever else the step keeps (tracemalloc
    cannot see torch's allocations, which bypass Python's allocator).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SETTINGS = ["dataset.resolution=256", "dataset.aspect_buckets=false", "schedule.batch_size=1",
            "precision.mixed_precision=no", "dataset.cache_latents=false", "dataset.cache_text=false"]
GIB = 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", metavar="JOB", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(_measure(Path(args.measure))))
        return
    from trainer.cli import main as trainer

    with tempfile.TemporaryDirectory() as tmp:
        trainer(["demo", f"{tmp}/demo", "--family", "sd1", "--real-size"])
        job_path = Path(tmp) / "demo" / "job.json"
        started = time.perf_counter()
        estimated = _estimate(job_path, real=False)
        took = time.perf_counter() - started
        child = subprocess.run([sys.executable, __file__, "--measure", str(job_path)], capture_output=True,
                               text=True, check=True)
        measured = json.loads(child.stdout.strip().splitlines()[-1])
    counted = estimated.counted
    print(f"job: real-size SD1.5 LoRA ({estimated.trainable:,} trained parameters), {estimated.bucket[0]}x"
          f"{estimated.bucket[1]}, batch 1, fp32, encoders on the device")
    print(f"estimated peak (fake tensors, {took:.1f} s):      {counted / GIB:6.3f} GiB  "
          + ", ".join(f"{k} {v / GIB:.3f}" for k, v in estimated.peak.items()))
    for name, key in (("counter on real tensors", "counted"), ("peak RSS growth", "rss_growth")):
        value = measured[key]
        print(f"measured, {name + ':':<28} {value / GIB:6.3f} GiB  estimate {100 * (counted - value) / value:+.1f}%")


def _estimate(job_path: Path, real: bool):
    from trainer.estimate import estimate
    from trainer.job import load_job
    from trainer.plan import make_plan

    job = load_job(job_path, SETTINGS)
    return estimate(job, make_plan(job, resume=True), real=real)


def _measure(job_path: Path) -> dict:
    import torch  # noqa: F401 - imported before the baseline, as everything else the step needs
    from trainer import estimate  # noqa: F401
    import diffusers.pipelines.stable_diffusion  # noqa: F401

    baseline = _rss_now()
    result = _estimate(job_path, real=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"counted": result.counted, "rss_growth": peak - baseline}


def _rss_now() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


if __name__ == "__main__":
    main()
