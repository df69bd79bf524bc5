"""The plan of a run, worked out from the job and the files on disk before any model is loaded.

`trainer check` prints it; `trainer run` trains by it. No torch here, so checking a job takes a moment.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from .data import images
from .data.buckets import Layout, batches_per_epoch, layout
from .data.cache import CachePlan, decide
from .data.files import Scan, scan_dataset
from .families.detect import detect_family
from .families.model_files import check_bundled_parts, stored_model
from .families.table import FAMILIES
from .job import ADAPTER_KINDS, LYCORIS_ONLY, UNION_SHARED, Job, JobError, run_leftovers
from .methods import prior
from .methods.layers import describe_trainable

MAX_LISTED = 200  # skipped files listed by `check` one per line; the rest are counted


@dataclass
class Plan:
    family: str
    scan: Scan
    world_size: int
    batches_per_epoch: int  # per process
    steps_per_epoch: float  # optimizer steps
    total_steps: int
    output_dir: Path
    layout: Layout  # the samples of an epoch and their buckets
    caching: CachePlan
    job: Job

    def describe(self) -> list[str]:
        s, spec = self.scan, self.job.dataset
        lines = [f"model family: {self.family}", stored_model(self.job.model).describe(),
                 *describe_trainable(self.job, self.family),
                 f"images: {s.num_images} ({s.captions_found} with captions, {s.captions_missing} missing: "
                 f"those use the instance prompt)"]
        for sub in s.subsets:
            weight = f", weight {sub.weight:g}" if sub.weight != 1 else ""
            filtered = f", {sub.filtered_out} left out by filters" if sub.filtered_out else ""
            lines.append(f"  {sub.folder}: {sub.images} images x {sub.repeats} repeats{weight}, "
                         f"{sub.captions_found} captions found, {sub.images - sub.captions_found} missing{filtered}")
        multi = sum(1 for i in s.items if len(i.captions) > 1)
        if multi:
            lines.append(f"captions: {multi} images have several captions (one is picked each epoch)")
        if s.filter_reasons:
            lines.append(f"filters left out {s.filtered_out} images:")
            lines += [f"  {n} x {why}" for why, n in s.filter_reasons.most_common()]
        if s.skipped:
            lines.append(f"skipped {len(s.skipped)} files (not trained):")
            lines += [f"  {path}: {why}" for path, why in s.skipped[:MAX_LISTED]]
            if len(s.skipped) > MAX_LISTED:
                lines.append(f"  ... and {len(s.skipped) - MAX_LISTED} more")
        lines += [f"warning: {w}" for w in s.warnings]
        hist = self.layout.histogram()
        lines.append(f"buckets: {len(hist)} in use (about {spec.resolution}x{spec.resolution} pixels, sides a "
                     f"multiple of {spec.bucket_step}{'' if spec.aspect_buckets else ', aspect buckets off'})")
        per = self.job.schedule.batch_size * self.world_size
        for (w, h), n_images, n_samples in hist:
            lines.append(f"  {w}x{h}: {n_images} images, {n_samples} samples, {-(-n_samples // per)} batches")
        lines.append(f"crop: {spec.crop}, flip: {'random' if spec.random_flip else 'off'}, colour jitter: "
                     f"{spec.color_jitter:g}, caption dropout: {spec.caption_dropout:g}, tag shuffle: "
                     f"{'on (keep ' + str(spec.keep_tokens) + ')' if spec.shuffle_tags else 'off'}")
        c = self.caching
        lines.append(f"cache: latents {'on' if c.latents else 'off'}, text {'on' if c.text else 'off'}"
                     + (f", in {c.root}" if c.latents or c.text else ""))
        lines += [f"  note: {note}" for note in c.notes]
        if self.job.prior.enabled:
            lines.append(f"prior preservation: {prior.class_image_count(self.job, s.num_images)} class images in "
                         f"{prior.class_dir(self.job)} ({prior.missing_count(self.job, s.num_images)} to generate)")
        lines += [f"samples per epoch (with repeats): {len(self.layout.samples)}",
                  f"processes: {self.world_size}",
                  f"batches per epoch: {self.batches_per_epoch}",
                  f"steps per epoch: {self.steps_per_epoch:g}",
                  f"total steps: {self.total_steps}",
                  optimizer_line(self.job),
                  f"outputs: {self.output_dir}"]
        return lines


def make_plan(job: Job, resume: bool = False) -> Plan:
    check_bundled_parts(job.model)
    family = detect_family(job.model)
    _check_family_rules(job, family)
    scan = scan_dataset(job.dataset)
    scan.require_images(job.dataset)
    sizes = _probe(scan)
    epoch, too_small = layout(scan.items, sizes, job.dataset)
    scan.drop(too_small)
    scan.require_images(job.dataset)  # every image found may have been broken or too small
    output_dir = _check_output_dir(job, resume)
    return _counted(job, family, scan, epoch, output_dir)


def class_layout(job: Job, images: list[Path]) -> Layout:
    """DreamBooth's class images (`images`, as trainer/methods/prior.py chose them) in buckets, like the instances."""
    spec = prior.class_dataset_spec(job)
    scan = scan_dataset(spec)
    keep = {Path(p).resolve() for p in images}
    scan.drop([(item, "not among the class images used") for item in scan.items if item.path.resolve() not in keep])
    sizes = _probe(scan)
    epoch, _ = layout(scan.items, sizes, spec)
    if not epoch.samples:
        raise JobError(f"prior.class_dir: no usable class images in {spec.folders[0].path}")
    return epoch


def _counted(job: Job, family: str, scan: Scan, epoch: Layout, output_dir: Path) -> Plan:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    sched = job.schedule
    batches = batches_per_epoch(epoch.bucket_of, sched.batch_size, world)
    steps_per_epoch = batches / sched.gradient_accumulation
    total = sched.max_steps or math.ceil(sched.epochs * steps_per_epoch)
    return Plan(family, scan, world, batches, steps_per_epoch, total, output_dir, epoch, decide(job), job)


def _check_family_rules(job: Job, family: str) -> None:
    """What the family cannot do fails here, not at the first step or at export. A transformer family patches
    its latents, so image sides must divide."""
    can = FAMILIES[family]
    if not can.kohya and job.output.save_kohya and job.network.kind in ADAPTER_KINDS:
        raise JobError(f"output.save_kohya: {family} models have no kohya LoRA format; set it to false")
    net = job.network
    if net.kind in LYCORIS_ONLY and not can.lycoris:
        raise JobError(f"network.kind: {net.kind} files are written in the kohya/LyCORIS layout, which this trainer "
                       f"writes for SD1, SD2 and SDXL only (not {family})")
    if net.kind in LYCORIS_ONLY and not job.output.save_kohya:
        raise JobError(f"output.save_kohya: {net.kind} is written only in the kohya/LyCORIS layout (diffusers' "
                       "pipelines load no LoHa or LoKr); set it to true")
    if net.dora and job.output.save_kohya and not can.lycoris:
        raise JobError(f"output.save_kohya: no kohya DoRA layout for {family} models; set it to false (the "
                       "diffusers file holds the DoRA)")
    if not can.class_images and job.prior.enabled:
        raise JobError(f"prior.enabled: prior preservation is not available for {family} models")
    multiple = can.size_multiple
    for name in ("bucket_step", "resolution"):
        value = getattr(job.dataset, name)
        if value % multiple:
            raise JobError(f"dataset.{name}: {value} is not a multiple of {multiple}, which {family} models need")


def _probe(scan: Scan) -> list[tuple[int, int]]:
    """Header reads only (no decode): broken files leave the scan with their reason; sizes of the rest."""
    sizes, bad = [], []
    for item in scan.items:
        try:
            sizes.append(images.probe(item))
        except images.BadImage as exc:
            bad.append((item, str(exc)))
    scan.drop(bad)
    return sizes


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
    if not resume:
        leftovers = run_leftovers(out)
        if leftovers:
            raise JobError(f"output.output_dir: {out} already holds a run ({', '.join(leftovers[:3])}); "
                           "pass --resume to continue it or choose an empty folder")
    return out


def optimizer_line(job: Job) -> str:
    """`check`'s optimizer line: the optimizer, its own settings, and the learning-rate schedule it runs with."""
    opt = job.optimizer
    own = {k: v for k, v in opt.model_dump(mode="json").items()
           if k not in ("name", "learning_rate", *UNION_SHARED["optimizer"])}
    settings = ", ".join(f"{k} {_value(v)}" for k, v in own.items())
    sched = job.schedule
    if opt.name == "adafactor" and opt.relative_step:
        rate = "its own relative-step learning rate"
    else:
        rate = f"learning rate {opt.learning_rate:g}, schedule {sched.lr_scheduler}"
        if opt.name == "adamw_schedulefree":
            rate = f"learning rate {opt.learning_rate:g}, no schedule (schedule-free)"
        if sched.warmup_steps:
            rate += f", warmup {sched.warmup_steps} steps"
    return f"optimizer: {opt.name} ({rate}; {settings}), gradient clipping " + \
        (f"at norm {opt.max_grad_norm:g}" if opt.max_grad_norm > 0 else "off")


def _value(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return "/".join(_value(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)
