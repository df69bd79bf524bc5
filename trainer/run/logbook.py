"""TensorBoard (OUTPUT_DIR/tensorboard) and, when installed and asked for, Weights & Biases: both fed from the
run's own events, so they show what the window shows.

The loop pays nothing for them: the values are the step event's, already on the host, and TensorBoard's
writer queues each record for its own thread. W&B's run also sends from its own process.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from ..events import LOSS_SMOOTHING
from ..job import Job

STEP_SCALARS = {"loss": "loss/train", "grad_norm": "train/grad_norm", "its": "speed/it_per_s",
                "samples_s": "speed/samples_per_s", "peak_mem": "memory/peak_bytes", "tflops": "speed/tflops",
                "mfu": "speed/mfu"}


def wandb_problem(job: Job) -> str:
    """The one line `check` and `run` say when W&B is asked for but cannot log; '' when it can or is not asked."""
    if job.logging.wandb_project and importlib.util.find_spec("wandb") is None:
        return ("logging.wandb_project is set but the wandb package is not installed (pip install wandb); this run "
                "logs to TensorBoard only")
    return ""


class Logbook:
    """An event listener (see Reporter.add_listener) writing scalars and validation images."""

    def __init__(self, job: Job, output_dir: Path):
        self._writer = self._wandb = None
        self._ema, self._n = 0.0, 0
        if job.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(output_dir / "tensorboard"), flush_secs=10)
        if job.logging.wandb_project and not wandb_problem(job):
            import wandb

            self._wandb = wandb.init(project=job.logging.wandb_project,
                                     name=job.logging.wandb_run_name or output_dir.name,
                                     config=job.model_dump(mode="json"), dir=str(output_dir))

    def __call__(self, event: dict) -> None:
        kind = event["type"]
        if kind == "step":
            self._step(event)
        elif kind == "val_loss":
            self._scalars(event["step"], {"loss/validation": event["loss"]})
        elif kind == "sample":
            self._image(event)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._wandb is not None:
            self._wandb.finish()

    def _step(self, event: dict) -> None:
        values = {tag: event[name] for name, tag in STEP_SCALARS.items() if event.get(name) is not None}
        if event["loss"] is not None:
            self._n += 1
            self._ema = LOSS_SMOOTHING * self._ema + (1 - LOSS_SMOOTHING) * event["loss"]
            values["loss/smoothed"] = self._ema / (1 - LOSS_SMOOTHING ** self._n)
        for group, lr in (event.get("lrs") or {"all": event["lr"]}).items():
            values[f"lr/{group}"] = lr
        self._scalars(event["step"], values)

    def _scalars(self, step: int, values: dict) -> None:
        values = {tag: value for tag, value in values.items() if value is not None}  # NaN arrives as None
        if self._writer is not None:
            for tag, value in values.items():
                self._writer.add_scalar(tag, value, step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def _image(self, event: dict) -> None:
        from PIL import Image

        with Image.open(event["path"]) as image:
            pixels = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
        tag = f"validation/{event['seed']}"
        if self._writer is not None:
            self._writer.add_image(tag, pixels, event["step"], dataformats="HWC")
            self._writer.add_text(f"{tag}/prompt", event["prompt"], event["step"])
        if self._wandb is not None:
            import wandb

            self._wandb.log({tag: wandb.Image(pixels, caption=event["prompt"])}, step=event["step"])
