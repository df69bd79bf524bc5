"""Speed benchmark: our trainer against a bare training loop on the same tiny work. Prints figures; not a test.

    .venv/bin/python bench/bench_train.py [--steps 100] [--repeats 3] [--keep DIR] [--threads N]

The work, built once: the demo's tiny SD1.5 model, 16 demo images at 64 px, batch 4, LoRA rank 4 alpha 4 on
to_q/to_k/to_v/to_out.0, AdamW lr 1e-3, no validation images, a checkpoint every 25 steps.
- ours: `python -m trainer run JOB --events tcp://127.0.0.1:PORT` as the window starts it, this script listening
  (step times are the events' `time`); each run gets its own empty cache folder, so it starts cold.
- bare: `python bench/bench_train.py --bare WORK`: the same math and nothing else (parts loaded one by one, latents
  and text embeddings cached once in memory, no events or checkpoints, the LoRA saved once at the end).
Per side (fresh processes, the two sides alternating and taking turns to go first; each figure the median of
--repeats runs): spawn to end of step 1, and the CPU time the process had used by then (sampled from /proc: it
suffers far less than wall time when other processes compete for the CPU); steps/s over steps 11..N
(checkpoints included) and 2..N; median step; last step to exit (final save, export, anything reloaded); wall;
CPU; peak RSS; other processes' share of the CPU meanwhile (above 10%: noise).
Targets (the issue): steps/s >= 0.95 x bare; first step <= bare; `trainer check` imports no torch.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `trainer` from this checkout, for building the work and listening to events
PY = sys.executable
WARMUP = 10  # steps left out of the steady-state rate
# The work, shared by both sides. Set explicitly so that a change to the demo preset cannot change the benchmark.
IMAGES, RES, BATCH, RANK, ALPHA, LR, SEED = 16, 64, 4, 4, 4.0, 1e-3, 42
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
OTHERS = "others' CPU (%)"  # other processes' share of the machine during a run
FIRST, FIRST_CPU = "first step (s)", "first step CPU (s)"


def build_work(root: Path, steps: int) -> dict:
    """The tiny model, 16 images and the job template (written per run: each run needs an empty output folder)."""
    from trainer.demo import build_demo_dataset, build_tiny_sd15
    from trainer.job import load_preset, merge

    build_tiny_sd15(root / "model")
    build_demo_dataset(root / "dataset", count=IMAGES)
    return merge(load_preset("demo").model_dump(mode="json"), {  # validated by write_job
        "model": {"path": str(root / "model")},
        "dataset": {"resolution": RES, "aspect_buckets": False, "crop": "center", "random_flip": False,
                    "num_workers": 0, "folders": [{"path": str(root / "dataset"), "instance_prompt": "a shape"}]},
        "network": {"rank": RANK, "alpha": ALPHA, "dropout": 0.0, "target_modules": TARGETS},
        "optimizer": {"name": "adamw", "learning_rate": LR, "weight_decay": 1e-2, "max_grad_norm": 1.0},
        "schedule": {"batch_size": BATCH, "max_steps": steps, "gradient_accumulation": 1,
                     "lr_scheduler": "constant", "warmup_steps": 0, "seed": SEED},
        "precision": {"mixed_precision": "no", "gradient_checkpointing": False},
        "validation": {"prompts": []}, "output": {"checkpoint_every": 25}})


def write_job(job: dict, path: Path, out: Path) -> Path:
    """The job of one run: its own output folder and cache folder (cold, as the bare loop; ~/.cache left alone)."""
    from trainer.job import merge, save_job, validate

    save_job(validate(merge(job, {"output": {"output_dir": str(out)}, "dataset": {"cache_dir": f"{out}-cache"}}),
                      "bench job"), path)
    return path


def spawn(cmd: list[str], log: Path, env: dict | None = None) -> tuple[float, float, dict, list]:
    """Run a child to its end: its spawn and exit times, the figures only the OS knows, and (wall time, CPU
    seconds used) samples of the child taken every few milliseconds."""
    with open(log, "wb") as out:
        busy0, t0 = _busy_cpu_seconds(), time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        samples: list[tuple[float, float]] = []
        sampler = threading.Thread(target=_sample_cpu, args=(proc.pid, samples), daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)  # the rusage of this child alone
        busy1, t1 = _busy_cpu_seconds(), time.time()
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{log.read_text()[-3000:]}")
    cpu = usage.ru_utime + usage.ru_stime
    return t0, t1, {"CPU time (s)": cpu, "peak RSS (MB)": usage.ru_maxrss / 1024,  # ru_maxrss is in KiB on Linux
                    OTHERS: max(0.0, 100 * (busy1 - busy0 - cpu) / ((t1 - t0) * os.cpu_count()))}, samples


def _sample_cpu(pid: int, samples: list) -> None:
    """(time, utime + stime) of a process from /proc/PID/stat until it is gone."""
    tick = os.sysconf("SC_CLK_TCK")
    stat = Path(f"/proc/{pid}/stat")
    while True:
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return
        if fields[0] in ("Z", "X"):  # exited: its times are final, and it is about to be reaped
            return
        samples.append((time.time(), (int(fields[11]) + int(fields[12])) / tick))
        time.sleep(0.005)


def _cpu_at(samples: list, when: float) -> float:
    """The CPU seconds a process had used at wall time `when`, from the first sample at or after it (so a
    figure errs by at most a sampling interval, the same way for both sides)."""
    return next((cpu for t, cpu in samples if t >= when), samples[-1][1] if samples else float("nan"))


def _busy_cpu_seconds() -> float:
    """CPU seconds all processes have used since boot (/proc/stat), to see whether anything else ran meanwhile."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def figures(name: str, t0: float, t1: float, os_figures: dict, samples: list, stamps: list[float],
            note: str = "") -> dict:
    """A run's figures from its step end times; prints one line, so the spread between runs shows."""
    n, gaps = len(stamps), [b - a for a, b in zip(stamps, stamps[1:])]
    fig = {FIRST: stamps[0] - t0, FIRST_CPU: _cpu_at(samples, stamps[0]),
           f"steps/s (steps {WARMUP + 1}..{n})": (n - WARMUP) / (stamps[-1] - stamps[WARMUP - 1]),
           f"steps/s (steps 2..{n})": (n - 1) / (stamps[-1] - stamps[0]),
           "median step (ms)": 1000 * statistics.median(gaps),
           "after last step (s)": t1 - stamps[-1],
           "wall (s)": t1 - t0, **os_figures}
    first, first_cpu, rate, _, median, *_ = fig.values()
    print(f"  {name}: first step {first:.2f} s ({first_cpu:.2f} s CPU), {rate:.2f} steps/s steady, median step "
          f"{median:.0f} ms, wall {t1 - t0:.1f} s, others used {fig[OTHERS]:.0f}% of the CPU{note}", flush=True)
    return fig


def run_ours(job: dict, work: Path, index: int) -> dict:
    from trainer.events import TOKEN_ENV, EventListener

    job_path = write_job(job, work / f"job-{index}.json", work / f"run-{index}")
    listener = EventListener(secrets.token_hex(8))  # serves on a daemon thread
    child = spawn([PY, "-m", "trainer", "run", str(job_path), "--events", listener.address],
                  work / f"ours-{index}.log", {TOKEN_ENV: listener.token})
    finished = listener.wait_for("run_finished", timeout=10)
    listener.close()
    if finished is None:
        sys.exit("ours: no run_finished event reached the listener")
    events = listener.events
    checkpoints = [e["step"] for e in events if e["type"] == "checkpoint"]
    return figures(f"ours #{index}", *child, [e["time"] for e in events if e["type"] == "step"],
                   f"; checkpoints at {checkpoints}")


def run_bare(work: Path, steps: int, index: int) -> dict:
    log = work / f"bare-{index}.log"
    child = spawn([PY, str(Path(__file__).resolve()), "--bare", str(work), "--steps", str(steps)], log)
    line = [ln for ln in log.read_text().splitlines() if ln.startswith('{"stamps"')][-1]
    return figures(f"bare #{index}", *child, json.loads(line)["stamps"])


def bare_loop(work: Path, steps: int) -> None:
    """The same math as ours with nothing around it. Runs in its own process (`--bare`)."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from PIL import Image, ImageOps
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTokenizer

    model = work / "model"
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    unet.requires_grad_(False)  # only the LoRA trains; the VAE and text encoder run once, under no_grad
    torch.manual_seed(SEED)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=TARGETS))
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=1e-2)

    # Cache the latent distributions and text embeddings of all images once (centre crop, resize).
    pixels, captions = [], []
    for path in sorted(p for p in (work / "dataset").iterdir() if p.suffix in (".png", ".jpg")):
        img = ImageOps.fit(Image.open(path).convert("RGB"), (RES, RES), Image.Resampling.BICUBIC)
        pixels.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1))
        txt = path.with_suffix(".txt")
        captions.append(txt.read_text().strip() if txt.exists() else "a shape")
    with torch.no_grad():
        dist = vae.encode(torch.stack(pixels)).latent_dist  # mean, std: (16, 4, 32, 32); this VAE halves
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        embeds = text_encoder(ids)[0]  # (16, 77, 32)

    gen = torch.Generator().manual_seed(SEED)
    stamps, order = [], []
    for _ in range(steps):
        if len(order) < BATCH:  # a new epoch: reshuffle, drop the last partial batch
            order = torch.randperm(len(pixels), generator=gen).tolist()
        idx, order = order[:BATCH], order[BATCH:]
        mean, std = dist.mean[idx], dist.std[idx]
        latents = (mean + std * torch.randn(mean.shape, generator=gen)) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=gen)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (BATCH,), generator=gen)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        pred = unet(noisy, timesteps, encoder_hidden_states=embeds[idx]).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        stamps.append(time.time())
    save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(unet).items()}, work / "bare_lora.safetensors")
    print(json.dumps({"stamps": stamps}), flush=True)


def time_check(job_path: Path) -> tuple[float, bool]:
    """Wall time of `trainer check` in a fresh process (what `-m trainer` runs), and whether it imported torch."""
    code = ("import sys; from trainer.cli import main; rc = main(['check', sys.argv[1]]); "
            "print('torch' in sys.modules); sys.exit(rc)")
    t0 = time.time()
    out = subprocess.run([PY, "-c", code, str(job_path)], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return time.time() - t0, out.strip().endswith("True")


def report(ours: dict, bare: dict, check_wall: float, check_torch: bool) -> None:
    print(f"\n{'metric':<24}{'ours':>10}{'bare':>10}{'ours/bare':>11}")
    for key in ours:
        ratio = f"{ours[key] / bare[key]:.2f}" if bare[key] and key != OTHERS else "-"
        print(f"{key:<24}{ours[key]:>10.2f}{bare[key]:>10.2f}{ratio:>11}")
    rate, _, med = list(ours)[2:5]  # figure names, in the order figures() makes them
    print(f"\n`trainer check`: {check_wall:.2f} s, imports torch: {'yes' if check_torch else 'no'}")
    if max(ours[OTHERS], bare[OTHERS]) > 10:
        print("WARNING: other processes took over 10% of the CPU in the median run: the wall-time ratios mean "
              "little; the CPU-time ones suffer less")
    print("targets:")
    for name, met in ((f"{rate} >= 0.95 x bare", ours[rate] >= 0.95 * bare[rate]),
                      ("median step <= bare / 0.95 (cross-check: robust to noise)", ours[med] <= bare[med] / 0.95),
                      ("first step <= bare", ours[FIRST] <= bare[FIRST]),
                      ("first step CPU <= bare (cross-check: robust to noise)", ours[FIRST_CPU] <= bare[FIRST_CPU]),
                      ("`trainer check` without torch", not check_torch)):
        print(f"  {'met    ' if met else 'NOT met'}  {name}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3, help="runs per side; figures are the median (default 3)")
    p.add_argument("--keep", metavar="DIR", help="build and keep the work here instead of a temp folder")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for both sides (default: torch's own choice); "
                   "1 suffers least when other processes compete for the CPU")
    p.add_argument("--bare", metavar="WORK", help=argparse.SUPPRESS)  # internal: run the bare loop on WORK
    args = p.parse_args()
    if args.bare:
        return bare_loop(Path(args.bare), args.steps)
    if args.steps <= WARMUP + 1:
        sys.exit(f"--steps must be more than {WARMUP + 1}")
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the children inherit it

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(args.keep).resolve() if args.keep else Path(tmp)
        if args.keep and work.exists() and any(work.iterdir()):
            sys.exit(f"--keep {work}: not empty; choose a new folder")
        work.mkdir(parents=True, exist_ok=True)
        print(f"building the work in {work}", flush=True)
        job = build_work(work, args.steps)
        check_wall, check_torch = time_check(write_job(job, work / "job-check.json", work / "run-check"))
        ours_runs, bare_runs = [], []
        # Alternate, so a slow spell of the machine hits both sides; take turns going first, so neither side
        # always runs right after the other (files in the page cache, the CPU's clock).
        for i in range(1, args.repeats + 1):
            turns = [lambda: ours_runs.append(run_ours(job, work, i)),
                     lambda: bare_runs.append(run_bare(work, args.steps, i))]
            for turn in turns if i % 2 else turns[::-1]:
                turn()
        medians = [{k: statistics.median(r[k] for r in runs) for k in runs[0]} for runs in (ours_runs, bare_runs)]
        report(*medians, check_wall, check_torch)


if __name__ == "__main__":
    main()
