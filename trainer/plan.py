"""The plan of a run, worked out from the job and the files on disk before any model is loaded.

`trainer check` prints it; `trainer run` trains by it. No torch here, so checking a job takes a moment.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .data import images, masks
from .data.buckets import Layout, batches_per_epoch, layout
from .data.cache import CachePlan, decide
from .data.files import Scan, scan_dataset
from .families.detect import detect_family
from .families.model_files import check_bundled_parts, stored_model
from .families.table import FAMILIES
from .job import ADAPTER_KINDS, LYCORIS_ONLY, UNION_SHARED, DatasetFolder, Job, JobError, run_leftovers
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
    holdout: Layout | None = None  # the held-out images of the validation loss, never trained on

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step over all processes."""
        return self.job.schedule.batch_size * self.world_size * self.job.schedule.gradient_accumulation

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
        with_mask, without = masks.count(s.items)
        if with_mask or without:
            lines.append(f"masks: {with_mask} images with a mask, {without} without (those train everywhere); "
                         f"weight outside a mask: {spec.mask_outside_weight:g}")
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
        lines.append(memory_line(self.job))
        if self.job.speed.compile == "regional":
            lines.append("speed: torch.compile of the denoiser's repeated blocks (regional), at the first steps")
        if self.job.prior.enabled:
            lines.append(f"prior preservation: {prior.class_image_count(self.job, s.num_images)} class images in "
                         f"{prior.class_dir(self.job)} ({prior.missing_count(self.job, s.num_images)} to generate)")
        if self.holdout is not None:
            val = self.job.validation
            source = " and ".join(
                ([f"{val.holdout_images} set aside from the training folders by validation.seed {val.seed}"]
                 if val.holdout_images else []) + ([val.holdout_folder] if val.holdout_folder else []))
            lines.append(f"validation loss: {len(self.holdout.samples)} held-out images ({source}), every "
                         f"{val.loss_every_n_steps} steps, {val.loss_draws} seeded draws each")
        lines += [f"samples per epoch (with repeats): {len(self.layout.samples)}",
                  f"processes: {self.world_size}",
                  f"global batch: {self.global_batch} (batch_size {self.job.schedule.batch_size} x "
                  f"{self.world_size} processes x gradient_accumulation {self.job.schedule.gradient_accumulation})",
                  f"batches per epoch: {self.batches_per_epoch}",
                  f"steps per epoch: {self.steps_per_epoch:g}",
                  f"total steps: {self.total_steps}",
                  optimizer_line(self.job),
                  f"outputs: {self.output_dir}"]
        return lines


def memory_line(job: Job) -> str:
    """Which of the settings that lower GPU memory are on (README: Fitting in memory)."""
    m = job.memory
    on = [f"base weights {m.base_weights}"] if m.base_weights != "auto" else []
    on += [f"block swap of {m.block_swap} blocks"] if m.block_swap else []
    on += ["fused backward"] if m.fused_backward else []
    on += ["gradient checkpointing"] if job.precision.gradient_checkpointing else []
    on += ["8-bit AdamW"] if job.optimizer.name == "adamw8bit" else []
    return f"memory: {', '.join(on) if on else 'no memory-saving setting on'}"


def make_plan(job: Job, resume: bool = False, processes: int | None = None) -> Plan:
    """`processes`: how many data-parallel processes will train (default: the launcher's WORLD_SIZE, else 1)."""
    check_bundled_parts(job.model)
    family = detect_family(job.model)
    _check_family_rules(job, family)
    scan = scan_dataset(job.dataset)
    scan.require_images(job.dataset)
    set_aside = _set_aside(job, scan)
    sizes = _probe(scan)
    epoch, too_small = layout(scan.items, sizes, job.dataset)
    scan.drop(too_small)
    scan.require_images(job.dataset)  # every image found may have been broken or too small
    output_dir = _check_output_dir(job, resume)
    plan = _counted(job, family, scan, epoch, output_dir, processes or int(os.environ.get("WORLD_SIZE", "1")))
    plan.holdout = _holdout_layout(job, set_aside)
    return plan


def holdout_spec(job: Job):
    """How held-out images are rendered: the job's dataset without its random changes (flip, colour jitter,
    caption dropout, tag shuffling), each image once."""
    spec = job.dataset.model_copy(deep=True)
    spec.random_flip, spec.color_jitter, spec.caption_dropout, spec.shuffle_tags = False, 0.0, 0.0, False
    return spec


def _set_aside(job: Job, scan: Scan) -> list:
    """validation.holdout_images: that many images taken out of the scan (chosen by validation.seed, so the
    same job always holds out the same ones); they are never trained on."""
    count = job.validation.holdout_images
    if not count:
        return []
    if count >= scan.num_images:
        raise JobError(f"validation.holdout_images: {count} would leave none of the {scan.num_images} images "
                       "to train on")
    chosen = set(np.random.default_rng([job.validation.seed, 0x401D]).choice(scan.num_images, count,
                                                                            replace=False).tolist())
    held = [item for i, item in enumerate(scan.items) if i in chosen]
    scan.items = [item for i, item in enumerate(scan.items) if i not in chosen]
    for item in held:
        for sub in scan.subsets:
            if sub.folder == item.folder:
                sub.images -= 1
                sub.captions_found -= item.caption_path is not None
    return [replace(item, repeats=1) for item in held]


def _holdout_layout(job: Job, set_aside: list) -> Layout | None:
    """The held-out images in buckets: those set aside and validation.holdout_folder's."""
    val = job.validation
    if not (val.holdout_folder or set_aside):
        return None
    spec = holdout_spec(job)
    scan = Scan(items=list(set_aside))
    if val.holdout_folder:
        train_roots = {Path(f.path).expanduser().resolve() for f in job.dataset.folders}
        if Path(val.holdout_folder).expanduser().resolve() in train_roots:
            raise JobError(f"validation.holdout_folder: {val.holdout_folder} is also a training folder; its "
                           "images would not be held out")
        found = scan_dataset(spec.model_copy(update={"folders": [DatasetFolder(path=val.holdout_folder,
                                                                              repeats=1)]}))
        if not found.num_images:
            raise JobError(f"validation.holdout_folder: no images (png, jpg, jpeg, webp) found in "
                           f"{val.holdout_folder}")
        scan.items += [replace(item, repeats=1) for item in found.items]
    sizes = _probe(scan)
    held, _ = layout(scan.items, sizes, spec)
    if not held.samples:
        raise JobError(f"validation: none of the held-out images can be used ({scan.skipped_summary()})")
    return held


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


def _counted(job: Job, family: str, scan: Scan, epoch: Layout, output_dir: Path, world: int) -> Plan:
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
    if job.memory.block_swap and not can.swap_blocks:
        raise JobError(f"memory.block_swap: block swap is not available for {family} models; set it to 0")
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
