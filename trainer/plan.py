"""The plan of a run, worked out from the job and the files on disk before any model is loaded.

`trainer check` prints it; `trainer run` trains by it. No torch here, so checking a job takes a moment.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from .data_files import Scan, scan_dataset
from .families import detect_family
from .job import Job, JobError

RUN_FILES_ALLOWED_BEFORE_START = {"job.json"}  # the window writes the job into the run folder, then starts


@dataclass
class Plan:
    family: str
    scan: Scan
    world_size: int
    batches_per_epoch: int  # per process
    steps_per_epoch: float  # optimizer steps
    total_steps: int
    output_dir: Path

    def describe(self) -> list[str]:
        s = self.scan
        lines = [f"model family: {self.family}",
                 f"images: {s.num_images} ({s.captions_found} with captions, {s.captions_missing} missing: "
                 f"those use the instance prompt)"]
        for sub in s.subsets:
            lines.append(f"  {sub.folder}: {sub.images} images x {sub.repeats} repeats, "
                         f"{sub.captions_found} captions found, {sub.images - sub.captions_found} missing")
        lines += [f"warning: {w}" for w in s.warnings]
        lines += [f"samples per epoch (with repeats): {s.num_samples}",
                  f"processes: {self.world_size}",
                  f"batches per epoch: {self.batches_per_epoch}",
                  f"steps per epoch: {self.steps_per_epoch:g}",
                  f"total steps: {self.total_steps}",
                  f"outputs: {self.output_dir}"]
        return lines


def make_plan(job: Job, resume: bool = False) -> Plan:
    family = detect_family(job.model)
    scan = scan_dataset(job.dataset)
    if scan.num_images == 0:
        folders = ", ".join(f.path for f in job.dataset.folders)
        raise JobError(f"dataset.folders: no images (png, jpg, jpeg, webp) found in {folders}")
    output_dir = _check_output_dir(job, resume)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    sched = job.schedule
    batches = scan.num_samples // (sched.batch_size * world)
    if batches == 0:
        raise JobError(f"schedule.batch_size: {sched.batch_size} x {world} process(es) is more than the "
                       f"{scan.num_samples} samples per epoch")
    steps_per_epoch = batches / sched.gradient_accumulation
    total = sched.max_steps or math.ceil(sched.epochs * steps_per_epoch)
    return Plan(family, scan, world, batches, steps_per_epoch, total, output_dir)


def _check_output_dir(job: Job, resume: bool) -> Path:
    if not job.output.output_dir:
        raise JobError("output.output_dir: not set")
    out = Path(job.output.output_dir).expanduser().resolve()
    for index, folder in enumerate(job.dataset.folders):
        root = Path(folder.path).expanduser().resolve()
        if out == root or root in out.parents:
            raise JobError(f"output.output_dir: {out} is inside dataset folder {root} "
                           f"(dataset.folders.{index}); its samples would become training images")
    if out.exists() and not out.is_dir():
        raise JobError(f"output.output_dir: {out} is a file")
    if out.is_dir() and not resume:
        leftovers = [p.name for p in out.iterdir() if p.name not in RUN_FILES_ALLOWED_BEFORE_START]
        if leftovers:
            raise JobError(f"output.output_dir: {out} already holds a run ({', '.join(sorted(leftovers)[:3])}); "
                           "pass --resume to continue it or choose an empty folder")
    return out
