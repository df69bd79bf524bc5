"""A stand-in for `python -m trainer`: same CLI, same handshake, scripted events, no torch.

    python tests/fake_trainer.py run JOB --events tcp://127.0.0.1:PORT [--resume]
    python tests/fake_trainer.py demo DIR

Behaviour comes from the environment:
  FAKE_STEPS (20)        steps to stream
  FAKE_DELAY (0.005)     seconds per step
  FAKE_SAMPLE_EVERY (5)  write a sample PNG per prompt every N steps (and at step 0)
  FAKE_EXIT (0)          exit code after the last step (3 on a stop command)
  FAKE_STOP_EXIT (3)     exit code on a stop command (torchrun exits 1 when its workers exit 3)
  FAKE_MODE              "" | "crash" (traceback at step 3) | "error" (error event then exit 1) |
                         "kill" (SIGKILL itself at step 3) | "invalid" (exit 2 before connecting) |
                         "wrongtoken" (connect with a wrong token) | "forever" (run until stopped)
  FAKE_FAIL_IF           a job whose output_dir ends with this runs in mode "error" (one failing job of a queue)
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from trainer.events import TOKEN_ENV, Reporter  # noqa: E402


def main(argv: list[str]) -> int:
    if argv[0] == "demo":
        return demo(Path(argv[1]))
    assert argv[0] == "run", argv
    job_path = Path(argv[1])
    address = argv[argv.index("--events") + 1] if "--events" in argv else None
    mode = os.environ.get("FAKE_MODE", "")
    steps = int(os.environ.get("FAKE_STEPS", "20"))
    delay = float(os.environ.get("FAKE_DELAY", "0.005"))
    sample_every = int(os.environ.get("FAKE_SAMPLE_EVERY", "5"))
    exit_code = int(os.environ.get("FAKE_EXIT", "0"))
    print(f"fake trainer: {job_path}", file=sys.stderr, flush=True)
    job = json.loads(job_path.read_text())
    if mode == "invalid":
        print("optimizer.learning_rate: Input should be greater than 0 (got -1.0)", file=sys.stderr)
        return 2
    if mode == "wrongtoken":
        os.environ[TOKEN_ENV] = "not-the-token"
    out = Path(job["output"]["output_dir"])
    if os.environ.get("FAKE_FAIL_IF") and str(out).endswith(os.environ["FAKE_FAIL_IF"]):
        mode = "error"
    prompts = job["validation"]["prompts"] or ["a prompt"]
    reporter = Reporter(out / "events.jsonl", address, total_steps=steps, stream=sys.stderr)
    reporter.emit("run_started", job=job, total_steps=steps, start_step=0, output_dir=str(out))
    _samples(reporter, out, 0, prompts)
    step = 0
    while mode == "forever" or step < steps:
        step += 1
        time.sleep(delay)
        for name in _commands(reporter, step):
            if name == "stop":
                reporter.emit("checkpoint", step=step, path=str(out / "checkpoints" / f"step-{step}"))
                reporter.emit("run_finished", status="stopped", outputs={})
                reporter.close()
                return int(os.environ.get("FAKE_STOP_EXIT", "3"))
            if name == "save":
                reporter.emit("checkpoint", step=step, path=str(out / "checkpoints" / f"step-{step}"))
            if name == "sample":
                _samples(reporter, out, step, reporter.take_prompts() or prompts)
        if step == 3 and mode == "crash":
            raise RuntimeError("CUDA out of memory (fake)")
        if step == 3 and mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if step == 3 and mode == "error":
            reporter.emit("error", message="NaN loss at step 3 (fake)", traceback="")
            reporter.emit("run_finished", status="failed", outputs={})
            reporter.close()
            return 1
        reporter.emit("step", step=step, epoch=step // 10, loss=1.0 / step, lr=1e-4, its=1 / delay,
                      eta=(steps - step) * delay)
        if sample_every and step % sample_every == 0:
            _samples(reporter, out, step, prompts)
    reporter.emit("run_finished", status="completed" if exit_code == 0 else "failed", outputs={})
    reporter.close()
    return exit_code


def _commands(reporter: Reporter, step: int) -> list[str]:
    """The commands since the last step; a `pause` holds here, passing on the others, until `continue`."""
    names = reporter.commands()
    if "pause" not in names:
        return names
    reporter.emit("paused", step=step - 1)
    held = [n for n in names if n not in ("pause", "continue")]
    while "continue" not in names and "stop" not in held:
        time.sleep(0.01)
        names = reporter.commands()
        held += [n for n in names if n not in ("pause", "continue")]
    reporter.emit("continued", step=step - 1)
    return held


def demo(folder: Path) -> int:
    """Like `trainer demo`: a dataset and a job.json (no model: the fake trainer needs none)."""
    from PIL import Image

    (folder / "dataset").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (64, 64), (60 * i, 90, 200)).save(folder / "dataset" / f"{i}.png")
        (folder / "dataset" / f"{i}.txt").write_text(f"shape {i}")
    job = {"version": 1, "model": {"path": str(folder / "model")},
           "dataset": {"folders": [{"path": str(folder / "dataset")}], "resolution": 64},
           "schedule": {"max_steps": 6}, "output": {"output_dir": str(folder / "run")}}
    (folder / "job.json").write_text(json.dumps(job))
    print(f"wrote the demo model, dataset and job: {folder / 'job.json'}")
    return 0


def _samples(reporter: Reporter, out: Path, step: int, prompts: list[str]) -> None:
    from PIL import Image

    (out / "samples").mkdir(parents=True, exist_ok=True)
    for i, prompt in enumerate(prompts):
        path = out / "samples" / f"step-{step:06d}-{i}.png"
        Image.new("RGB", (64, 64), ((step * 40) % 256, 80 + 60 * i, 160)).save(path)
        reporter.emit("sample", step=step, prompt=prompt, seed=i, path=str(path))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
