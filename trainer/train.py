"""The training loop, written once: LoRA on the denoiser with accelerate, for every model family.

Runs under plain `python -m trainer run JOB` or `accelerate launch -m trainer run JOB`. What differs between
families comes from `trainer/families/<family>.py`; everything random is seeded by (seed, micro-step), so a
resumed run continues exactly where an uninterrupted one would be.
"""

from __future__ import annotations

import gc
import json
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed

from .data import cache
from .data.buckets import batches_per_epoch, epoch_batches
from .data.dataset import TrainDataset, collate
from .events import Reporter
from .export import lora_files
from .families import precision
from .families.detect import family_module
from .families.table import FAMILIES
from .job import Job, JobError
from .methods import ema, prior, trainable
from .plan import Plan, class_layout, holdout_spec
from .run import checkpoint, nonfinite, optimizers, ranks, sharding, speed, throughput
from .run.block_swap import BlockSwap, Mover, swap_blocks
from .run.checkpoint_files import newest_good
from .run.fused_backward import FusedBackward, stepping
from .sample import render


@dataclass
class Requests:
    """What the window (over the socket), a signal or the pause file asked for; acted on at the next step."""
    stop: bool = False
    save: bool = False
    sample: bool = False
    pause: bool = False
    proceed: bool = False  # the `continue` command (a Python keyword)
    toggle: bool = False  # SIGUSR1: pause, or continue when paused
    held: bool = False  # the run folder holds a file named `pause`
    signals: int = field(default=0)
    pause_file: Path | None = None


FLAGS = ("stop", "save", "sample", "pause", "proceed", "toggle", "held")  # what every process must agree on
PAUSED_POLL_S = 0.2


def train(job: Job, plan: Plan, reporter: Reporter, resume: bool) -> str:
    """Train to the end or until asked to stop; returns 'completed' or 'stopped'."""
    requests = Requests(pause_file=plan.output_dir / "pause")
    previous = {sig: signal.signal(sig, _stop_handler(requests)) for sig in (signal.SIGINT, signal.SIGTERM)}
    if hasattr(signal, "SIGUSR1"):  # not on Windows
        previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, _pause_handler(requests))
    try:
        return _train(job, plan, reporter, resume, requests)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _train(job: Job, plan: Plan, reporter: Reporter, resume: bool, requests: Requests) -> str:
    run = _setup(job, plan, reporter, resume)
    status = _loop(run, requests)
    return _finish(run, status)


@dataclass
class _Run:
    """One run: what setup made, and what the loop and its helpers share, so their signatures stay short."""
    job: Job
    plan: Plan
    reporter: Reporter
    accelerator: Accelerator
    family: Any
    parts: Any
    held: precision.Dtypes
    dataset: TrainDataset
    started_at: float
    noise_notes: list[str] = field(default_factory=list)  # what applying the job's noise options said
    start_step: int = 0
    found: Path | None = None  # the checkpoint resumed from
    class_dataset: TrainDataset | None = None
    holdout: TrainDataset | None = None  # the validation loss's held-out images
    warned: set[str] = field(default_factory=set)  # files already named in a warning
    released: list[str] = field(default_factory=list)  # frozen parts off the accelerator, their outputs cached
    denoiser: Any = None  # as accelerate prepared it
    tr: trainable.Trainable | None = None
    optimizer: Any = None
    lr_scheduler: Any = None
    shadow: dict | None = None  # the EMA weights
    step: int = 0
    epoch: int = 0

    @property
    def out(self) -> Path:
        return self.plan.output_dir

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def num_class_images(self) -> int:
        return len(self.class_dataset.layout.samples) if self.class_dataset is not None else 0


def _setup(job: Job, plan: Plan, reporter: Reporter, resume: bool) -> _Run:
    """The model loaded and placed, the caches filled, what trains set up with its optimizer, a checkpoint
    resumed: everything the loop needs."""
    run = _load(job, plan, reporter, resume)
    _announce(run)
    # The caches fill before the denoiser reaches the accelerator: a big model's text encoders and denoiser
    # need not fit beside each other.
    run.warned = _prepare_data(run, run.dataset)
    class_samples = _class_images(run)
    if class_samples is not None:
        run.class_dataset = TrainDataset(class_samples, prior.class_dataset_spec(job), job.schedule.seed + 1)
        _prepare_data(run, run.class_dataset, quiet=True)
    if plan.holdout is not None:
        run.holdout = TrainDataset(plan.holdout, holdout_spec(job), job.schedule.seed)
        _prepare_data(run, run.holdout, quiet=True)
    whole_model_export = "full" in (job.network.kind, job.text_encoder.mode)
    run.released = _release_frozen(run.parts, plan.caching,
                                   needed_again=bool(job.validation.prompts or whole_model_export))
    _trainables(run)
    if run.found:
        _resume(run)
    if job.validation.prompts and job.validation.at_start and run.start_step == 0:
        _validate(run, 0)
    if run.holdout is not None and run.start_step == 0:
        _val_loss(run, 0)
    throughput.training_starts(run.accelerator.device)
    return run


def _load(job: Job, plan: Plan, reporter: Reporter, resume: bool) -> _Run:
    """The model in the run's dtypes (the VAE and text encoders on the accelerator), and the checkpoint to
    resume from."""
    accelerator = _accelerator(job, reporter)
    family = family_module(plan.family)
    parts = family.load(job.model)
    noise_notes = family.prepare_noise(parts, job.diffusion)
    # About a million long-lived objects from torch/diffusers imports and the model: freezing them keeps each
    # later collection (and interpreter shutdown) from walking them again; this process trains once and exits.
    # `trainer run` keeps the collector off until here (it would walk them again and again while they are made).
    gc.freeze()
    gc.enable()
    held = precision.dtypes(accelerator.mixed_precision)  # whatever dtype the model's files hold
    precision.place(parts.vae, accelerator.device, held.image_encoder)
    precision.place(parts.text_encoder, accelerator.device, held.frozen)
    run = _Run(job, plan, reporter, accelerator, family, parts, held,
               TrainDataset(plan.layout, job.dataset, job.schedule.seed), time.time(), noise_notes)
    if resume:
        run.found = _checkpoint_to_resume(run)
    run.start_step = checkpoint.read_state(run.found)["step"] if run.found else 0
    return run


def _checkpoint_to_resume(run: _Run) -> Path | None:
    """Rank 0 chooses (a checkpoint written while another process was reading it must not split the ranks)."""
    found = None
    if run.main:
        found, passed = newest_good(run.out / "checkpoints")
        for line in passed:
            run.reporter.log(f"{line}; resuming from an older one", "warning")
        if found is None:
            run.reporter.log("no intact checkpoint found; starting from step 0", "warning")
    chosen = ranks.share(str(found) if found else "")
    return Path(chosen) if chosen else None


def _announce(run: _Run) -> None:
    """run_started, and what applying the noise options said."""
    if run.main:
        run.reporter.set_total(run.plan.total_steps, run.start_step)
        run.reporter.emit("run_started", job=run.job.model_dump(mode="json"), total_steps=run.plan.total_steps,
                          start_step=run.start_step, output_dir=str(run.out))
        for note in run.noise_notes:
            run.reporter.log(note, "warning")
        from .run.logbook import Logbook, wandb_problem

        if wandb_problem(run.job):
            run.reporter.log(wandb_problem(run.job), "warning")
        run.reporter.add_listener(Logbook(run.job, run.out))


def _trainables(run: _Run) -> None:
    """The denoiser on the accelerator, the adapters or weights that train (fp32), the optimizer and the
    learning-rate schedule, prepared by accelerate; the EMA when the job keeps one."""
    job, accelerator = run.job, run.accelerator
    swapping = job.memory.block_swap > 0  # set up in CPU memory: the whole denoiser need not fit on the GPU
    precision.place(run.parts.denoiser, "cpu" if swapping else accelerator.device, run.held.frozen)
    set_seed(job.schedule.seed)  # adapters' random init must be the same in every run of this job
    tr = run.tr = trainable.setup(run.family, run.parts, job, run.plan.total_steps)
    if run.main:
        run.reporter.log(f"training {tr.count():,} parameters: " + ", ".join(
            f"{g.name} {sum(p.numel() for p in g.params.values()):,}" for g in tr.groups))
    if job.precision.gradient_checkpointing:
        trainable.gradient_checkpointing(tr)
    for module in tr.modules.values():
        module.train()
    for p in tr.params.values():
        p.data = p.data.to(run.held.trained)  # trained weights stay fp32 under mixed precision
    if swapping:
        _block_swap(run)
    if sharding.active():  # before the optimizer, which must hold the sharded parameters
        units = sharding.shard(run.parts.denoiser, FAMILIES[run.plan.family].swap_blocks)
        trainable.reread(tr)
        if run.main:
            run.reporter.log(f"FSDP: the denoiser's weights, gradients and optimizer state split over "
                             f"{accelerator.num_processes} processes, {units} blocks and the rest as units")
    if job.speed.compile == "regional":  # after the adapters: the compiled blocks include their layers
        note = speed.compile_repeated_blocks(run.parts.denoiser, FAMILIES[run.plan.family].repeated_blocks)
        if run.main:
            run.reporter.log(note)
    optimizer = optimizers.build(job, trainable.optimizer_groups(tr))
    if job.memory.fused_backward:
        if accelerator.num_processes > 1:  # DDP averages gradients after the hooks would have stepped them
            raise JobError("memory.fused_backward: trains on one process only; launch it without accelerate's "
                           "multi-GPU processes")
        FusedBackward(list(tr.params.values()), stepping(optimizer))
    run.lr_scheduler = optimizers.scheduler(job, optimizer, run.plan.total_steps)
    run.denoiser = run.parts.denoiser
    if ranks.deepspeed_launch():  # accelerate reads DeepSpeed's micro-batch from a prepared DataLoader, and we
        # prepare none (each epoch's batches are built by the loop)
        config = accelerator.state.deepspeed_plugin.deepspeed_config
        config["train_micro_batch_size_per_gpu"] = job.schedule.batch_size
    if tr.groups[0].name == "denoiser" and not sharding.active():  # FSDP needs no DDP wrapper; with block
        # swap, the swapped blocks' weights stay where they are
        run.denoiser, run.optimizer = accelerator.prepare(run.denoiser, optimizer,
                                                          device_placement=[not swapping, True])
    else:
        run.optimizer = accelerator.prepare(optimizer)
    run.shadow = ema.create(trainable.ema_params(tr)) if job.ema.enabled else None


def _block_swap(run: _Run) -> None:
    """The swapped blocks' frozen weights stay in CPU memory (trainer/run/block_swap.py); everything else goes to
    the accelerator."""
    count, denoiser = run.job.memory.block_swap, run.parts.denoiser
    blocks = swap_blocks(denoiser, FAMILIES[run.plan.family].swap_blocks)
    if count > len(blocks):
        raise JobError(f"memory.block_swap: {count}, but this model has {len(blocks)} blocks to swap")
    mover = Mover(run.accelerator.device)
    swap = BlockSwap(blocks, count, mover)
    swapped = {id(t) for tensors in swap.tensors for t in tensors}
    mover.to_device(-1, [t for t in (*denoiser.parameters(), *denoiser.buffers()) if id(t) not in swapped])
    if run.main:
        run.reporter.log(f"block swap: {count} of {len(blocks)} blocks stream from CPU memory")


def _resume(run: _Run) -> None:
    _, tensors, ema_tensors = checkpoint.load(run.found, _checkpointed_optimizer(run), run.lr_scheduler)
    trainable.load_tensors(run.tr, tensors, str(run.found))
    if optimizers.has_eval_mode(run.optimizer):  # saved in eval mode: the training point is rebuilt from it
        run.optimizer.optimizer.train()
    if run.shadow is not None and ema_tensors is not None:
        run.shadow.update({k: sharding.like(run.shadow[k], v.to(run.shadow[k].device))
                           for k, v in ema_tensors.items() if k in run.shadow})
    trainable.apply_stops(run.tr, run.optimizer, run.start_step)
    run.reporter.log(f"resumed from {run.found}")


def _loop(run: _Run, requests: Requests) -> str:
    """Optimizer steps to the plan's total, or until a stop request: 'completed' or 'stopped'. A checkpoint is
    saved on stop and every checkpoint_every steps, validation images every every_n_steps."""
    job, plan, accelerator, tr = run.job, run.plan, run.accelerator, run.tr
    sched = job.schedule
    accum = sched.gradient_accumulation
    step, micro = run.start_step, run.start_step * accum
    run.step, run.epoch = step, micro // plan.batches_per_epoch
    losses: list[torch.Tensor] = []
    timer = _StepTimer(plan.total_steps)
    guard = nonfinite.Guard(job.optimizer, run.reporter, run.out / "checkpoints")
    meter = _Meter(run)
    while step < plan.total_steps:
        epoch, offset = divmod(micro, plan.batches_per_epoch)
        run.epoch = epoch
        batches = epoch_batches(plan.layout.bucket_of, sched.batch_size, sched.seed, epoch,
                                accelerator.process_index, accelerator.num_processes)[offset:]
        keys = [[(index, epoch) for index in b] for b in batches]  # a sample's randomness: (seed, epoch, index)
        if accelerator.num_processes > 1:  # which samples this rank trains (its log, or events.jsonl for rank 0)
            run.reporter.log(f"epoch {epoch} from batch {offset}: rank {accelerator.process_index} trains samples "
                             + " ".join(str(index) for b in batches for index in b), "debug")
        loader = torch.utils.data.DataLoader(run.dataset, batch_sampler=keys, collate_fn=collate,
                                             num_workers=job.dataset.num_workers)
        for batch in loader:
            _warn_skipped(batch["skipped"], run.warned, run.reporter, run.main)
            gen = _generator(sched.seed, micro, accelerator)
            with accelerator.accumulate(run.denoiser):
                with_grad = trainable.text_trains(tr, step)
                with meter.counting():  # the first step on a GPU: its FLOPs, for TFLOPS and MFU
                    loss = _batch_loss(run, batch, gen, with_grad)
                    if run.class_dataset is not None:
                        class_batch = _class_batch(run.class_dataset, sched, micro, accelerator)
                        loss = loss + job.prior.loss_weight * _batch_loss(run, class_batch, gen, with_grad)
                    accelerator.backward(loss)
                losses.append(loss.detach())
                skip = False
                if accelerator.sync_gradients:
                    _sync_unprepared_grads(accelerator, tr)
                    norm = _grad_norm(run)
                    skip, step_loss = guard.skip(accelerator, losses, tr.groups, step + 1, norm)  # may raise
                    if job.optimizer.max_grad_norm > 0 and not skip:
                        _clip(run, norm)
                if not skip and not job.memory.fused_backward:  # fused: each weight stepped in the backward
                    run.optimizer.step()
                run.optimizer.zero_grad(set_to_none=True)
            micro += 1
            if not accelerator.sync_gradients:
                continue
            trainable.after_optimizer_step(tr)
            lrs = run.lr_scheduler.get_last_lr()
            lr = lrs[0]
            run.lr_scheduler.step()
            step += 1
            run.step = step
            trainable.apply_stops(tr, run.optimizer, step)
            if run.shadow is not None:
                ema.update(run.shadow, trainable.ema_params(tr), job.ema, step)
            losses.clear()
            its, eta = timer.tick(step)
            if run.main:
                run.reporter.emit("step", step=step, epoch=epoch, loss=step_loss, lr=lr, its=its, eta=eta,
                                  lrs=dict(zip((g.name for g in tr.groups), lrs)),
                                  grad_norm=guard.grad_norm if norm is not None else None, **meter.read(its))
            wants = _gather_requests(accelerator, run.reporter, requests)
            if wants.pause or wants.toggle or wants.held:
                wants = _paused(run, requests, wants.held)
                timer.pause_excluded()
            if wants.stop:
                _save_checkpoint(run)
                return "stopped"
            every = job.output.checkpoint_every
            if wants.save or (every and step % every == 0 and step < plan.total_steps):
                _save_checkpoint(run)
            val_every = job.validation.every_n_steps
            if wants.sample or (job.validation.prompts and val_every and step % val_every == 0
                                and step < plan.total_steps):
                _validate(run, step, asked=wants.sample)
                timer.pause_excluded()
            if run.holdout is not None and step % job.validation.loss_every_n_steps == 0 \
                    and step < plan.total_steps:
                _val_loss(run, step)
                timer.pause_excluded()
            if step >= plan.total_steps:
                break
    return "completed"


def _finish(run: _Run, status: str) -> str:
    """A completed run's last checkpoint, validation images and final files; run_finished either way."""
    outputs: dict = {}
    if status == "completed":
        if run.job.output.checkpoint_every:
            _save_checkpoint(run)
        if run.job.validation.prompts:
            _validate(run, run.step)
        if run.holdout is not None:
            _val_loss(run, run.step)
        if run.main or sharding.active():
            outputs = _export(run)
    if run.main:
        run.reporter.emit("run_finished", status=status, outputs={k: str(v) for k, v in outputs.items()})
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    return status


def _batch_loss(run: _Run, batch: dict, gen: torch.Generator, with_grad: bool, denoiser=None,
                dropout: bool = True) -> torch.Tensor:
    """The weighted denoising loss of one batch (instance, class or held-out images)."""
    device = run.accelerator.device
    family, parts, job = run.family, run.parts, run.job
    latents = _latents(family, parts, batch, gen, device)
    with torch.set_grad_enabled(with_grad):
        cond = _conditioning(run, batch, device)
    if dropout:
        cond = family.drop_conditioning(parts, cond, gen, job.diffusion)
    noisy, timesteps, target, weight = family.noisy_input_and_target(parts, latents, gen, job.diffusion)
    with run.accelerator.autocast():
        pred = family.predict(parts, denoiser or run.denoiser, noisy, timesteps, cond)
    return _loss(pred, target, batch["weight"].to(weight.device) * weight, batch.get("mask"),
                 job.dataset.mask_outside_weight)


@torch.no_grad()
def _val_loss(run: _Run, step: int) -> None:
    """The loss of the weights that would be exported now on the held-out images: each image at
    validation.loss_draws (timestep, noise) draws, each from its own generator seeded by (validation.seed,
    image, draw), so every evaluation, in this run or another, sees the same timesteps and noise."""
    accelerator, val = run.accelerator, run.job.validation
    if run.main or sharding.active():
        with _exported_denoiser(run, accelerator.device) as model:
            if run.main:
                modules = list(run.tr.modules.values()) or [model]
                for module in modules:
                    module.eval()  # no LoRA dropout
                losses = []
                for index in range(len(run.holdout)):
                    batch = collate([run.holdout[(index, 0)]])
                    for draw in range(val.loss_draws):
                        seed = (val.seed * 1_000_003 + index * 7919 + draw) % (2**63)
                        gen = torch.Generator(device=accelerator.device).manual_seed(seed)
                        losses.append(_batch_loss(run, batch, gen, False, denoiser=model, dropout=False))
                for module in modules:
                    module.train()
                value = torch.stack(losses).mean().item()  # one read per evaluation, not per step
                run.reporter.emit("val_loss", step=step, loss=value, images=len(run.holdout))
    accelerator.wait_for_everyone()


def _grad_norm(run: _Run) -> torch.Tensor | None:
    """The total gradient norm, on the device (the guard reads it with the loss). None under fp16's loss
    scaler, whose gradients are scaled until the clip unscales them, and under the fused backward, which freed
    each gradient as it stepped its weight."""
    if getattr(run.accelerator, "scaler", None) is not None or run.job.memory.fused_backward:
        return None
    norm = torch.nn.utils.get_total_norm([p.grad for p in run.tr.params.values() if p.grad is not None])
    return sharding.full(norm)  # under FSDP, the norm of every shard's gradients


def _clip(run: _Run, norm: torch.Tensor | None) -> None:
    """Clip to optimizer.max_grad_norm, with the norm already computed where accelerate would compute the same."""
    from accelerate.utils import DistributedType

    params, limit = list(run.tr.params.values()), run.job.optimizer.max_grad_norm
    plain = run.accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU,
                                                 DistributedType.MULTI_CPU)
    if norm is not None and plain:
        torch.nn.utils.clip_grads_with_norm_(params, limit, norm)
    else:
        run.accelerator.clip_grad_norm_(params, limit)


def _class_images(run: _Run):
    """Prior preservation: generate the missing class images (main process), and lay them out in buckets."""
    job, plan, accelerator, parts = run.job, run.plan, run.accelerator, run.parts
    if not job.prior.enabled:
        return None
    if run.main and prior.missing_count(job, plan.scan.num_images):
        precision.place(parts.denoiser, accelerator.device, run.held.frozen)
        pipe = run.family.pipeline(parts, parts.denoiser)
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            prior.generate_missing(job, pipe, plan.scan.num_images, run.reporter, accelerator.device)
    accelerator.wait_for_everyone()
    images = prior.existing_class_images(prior.class_dir(job))[:prior.class_image_count(job, plan.scan.num_images)]
    return class_layout(job, images)


def _class_batch(dataset: TrainDataset, sched, micro: int, accelerator: Accelerator) -> dict:
    """The class batch paired with micro-step `micro`: the class set is walked in its own seeded order."""
    per_epoch = batches_per_epoch(dataset.layout.bucket_of, sched.batch_size, accelerator.num_processes)
    epoch, offset = divmod(micro, per_epoch)
    batch = epoch_batches(dataset.layout.bucket_of, sched.batch_size, sched.seed + 1, epoch,
                          accelerator.process_index, accelerator.num_processes)[offset]
    return collate([dataset[(index, epoch)] for index in batch])


def _sync_unprepared_grads(accelerator: Accelerator, tr: trainable.Trainable) -> None:
    """Text encoders and token rows are not wrapped for DDP; average their gradients across processes."""
    if accelerator.num_processes == 1:
        return
    for group in tr.groups:
        if group.name == "denoiser":
            continue
        for p in group.params.values():
            if p.grad is not None:
                p.grad = accelerator.reduce(p.grad, "mean")


def _prepare_data(run: _Run, dataset: TrainDataset, quiet: bool = False) -> set[str]:
    """Say which files are left out (unless `quiet`: the class images), fill the latent and text caches (main
    process first), point the dataset at them. Returns the files already warned about."""
    job, plan, accelerator, reporter = run.job, run.plan, run.accelerator, run.reporter
    family, parts, main = run.family, run.parts, run.main
    warned = {path for path, _ in plan.scan.skipped}
    if main and not quiet:
        for path, why in plan.scan.skipped:
            reporter.log(f"skipped {path}: {why}", "warning")
        if plan.scan.skipped:
            reporter.log(f"{len(plan.scan.skipped)} files skipped; training on {plan.scan.num_images} images",
                         "warning")
        for note in plan.caching.notes:
            reporter.log(note)
    if main:
        dataset.index = cache.prepare(job, plan.caching, dataset.layout, dataset.spec, family, parts, reporter)
    accelerator.wait_for_everyone()
    if not main:
        dataset.index = cache.prepare(job, plan.caching, dataset.layout, dataset.spec, family, parts, reporter,
                                      fill=False)
    for item, why in dataset.index.broken:
        _warn_skipped([(str(item.path), f"{why}; its samples train on another image of its bucket")], warned,
                      reporter, main)
    if job.dataset.crop == "face" and main:
        from .data.crops import face_detection_problem

        problem = face_detection_problem(create=not plan.caching.latents)  # cached: only if the pass needed it
        if problem:
            reporter.log(problem, "warning")
    return warned


def _release_frozen(parts, caching: cache.CachePlan, needed_again: bool) -> list[str]:
    """With their outputs cached, the VAE and text encoder leave the accelerator: to the CPU when validation
    or a whole-model export needs them again (and only then moved back), else their weights are dropped. On a
    CPU-only machine the first changes nothing; memory is only returned when they are not needed again."""
    released = [name for name, cached in (("vae", caching.latents), ("text_encoder", caching.text)) if cached]
    for name in released:
        getattr(parts, name).to("cpu" if needed_again else "meta")
    if released:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return released


def _warn_skipped(skipped: list[tuple[str, str]], warned: set[str], reporter: Reporter, main: bool) -> None:
    for path, why in skipped:
        if path not in warned:
            warned.add(path)
            if main:
                reporter.log(f"skipped {path}: {why}", "warning")


def _latents(family, parts, batch: dict, gen: torch.Generator, device) -> torch.Tensor:
    """Scaled latents (B, C, h, w): drawn from the cached distribution, or the images encoded now."""
    if "latent_mean" in batch:
        return family.sample_latents(parts, batch["latent_mean"].to(device), batch["latent_std"].to(device), gen)
    return family.encode_images(parts, batch["pixels"], gen)


def _conditioning(run: _Run, batch: dict, device) -> dict:
    """The caption's encoding (cached or encoded now, with the new tokens spelled out), plus what the family
    reads from the batch itself (SDXL: each sample's size and crop)."""
    family = run.family
    if "cond" in batch:
        cond = {name: value.to(device) for name, value in batch["cond"].items()}
    else:
        cond = family.encode_prompts(run.parts, [_expand(run, c) for c in batch["captions"]])
    cond.update({name: value.to(device) for name, value in family.conditioning_extras(batch).items()})
    return cond


def _expand(run: _Run, text: str) -> str:
    """A multi-vector new token stands for several tokenizer entries; captions and prompts name it once."""
    if run.tr.tokens is None:
        return text
    from .methods.tokens import expand_prompt

    return expand_prompt(text, run.tr.tokens)


def _loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor | None = None,
          outside: float = 0.0) -> torch.Tensor:
    """MSE; a folder's loss weight scales its samples' share.

    With a mask (B, 1, H, W) in [0, 1] (pixels, or already on the latent grid when cached), every family's
    prediction and target are (B, C, h, w) on its latent grid, so the mask is averaged down to (h, w) and each
    latent pixel's squared error weighted by outside + (1 - outside) * mask. A sample's loss is the weighted mean
    (divided by its total weight, not by its pixel count), so a small mask trains as hard as a large one; a
    sample with no weight at all adds zero."""
    if mask is not None:
        error = (pred.float() - target.float()) ** 2  # (B, C, h, w)
        grid = cache.latent_grid(mask.to(error.device), error.shape[-2:])  # (B, 1, h, w)
        pixel_weight = outside + (1.0 - outside) * grid
        total = (pixel_weight.sum(dim=(1, 2, 3)) * error.shape[1]).clamp_min(1e-12)
        per_sample = (error * pixel_weight).sum(dim=(1, 2, 3)) / total
        return (per_sample * weight.to(per_sample.device)).mean()
    if bool((weight == 1).all()):
        return F.mse_loss(pred.float(), target.float())
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
    return (per_sample * weight.to(per_sample.device)).mean()


def _accelerator(job: Job, reporter: Reporter) -> Accelerator:
    precision = job.precision.mixed_precision
    if precision == "fp16" and not torch.cuda.is_available():
        reporter.log("fp16 needs a GPU; training in fp32 on the CPU (bf16 works on CPUs)", "warning")
        precision = "no"
    accelerator = Accelerator(gradient_accumulation_steps=job.schedule.gradient_accumulation,
                              mixed_precision=precision)
    note = speed.enable_tf32(accelerator.device)
    if note and accelerator.is_main_process:
        reporter.log(note)
    return accelerator


def _generator(seed: int, micro: int, accelerator: Accelerator) -> torch.Generator:
    """One generator per micro-step and process, so noise, timesteps and dropout replay exactly on resume."""
    value = (seed * 1_000_003 + micro * 997 + accelerator.process_index) % (2**63)
    torch.manual_seed(value)  # LoRA dropout draws from the global generator
    return torch.Generator(device=accelerator.device).manual_seed(value)


def _pause_handler(requests: Requests):
    """SIGUSR1: pause at the next step, or continue when paused."""

    def handler(signum, frame):
        requests.toggle = True

    return handler


def _stop_handler(requests: Requests):
    """Ctrl-C or SIGTERM: save a checkpoint and stop at the next step; a second one stops at once."""

    def handler(signum, frame):
        requests.signals += 1
        if requests.signals > 1:
            raise KeyboardInterrupt
        requests.stop = True

    return handler


def _paused(run: _Run, requests: Requests, held: bool) -> Requests:
    """Hold the model and step nothing until `continue`, SIGUSR1, or the pause file going away (when it paused
    the run); `sample` and `save` act meanwhile. Returns what ended the pause (a stop, too). Nothing random is
    drawn here that training uses: each micro-step seeds its own generators, so continuing is exact."""
    if run.main:
        run.reporter.emit("paused", step=run.step)
    while True:
        time.sleep(PAUSED_POLL_S)
        wants = _gather_requests(run.accelerator, run.reporter, requests)
        if wants.save:
            _save_checkpoint(run)
        if wants.sample:
            _validate(run, run.step, asked=True)
        if wants.stop or wants.proceed or wants.toggle or (held and not wants.held):
            break
        held = wants.held
    if run.main and requests.pause_file is not None:
        requests.pause_file.unlink(missing_ok=True)  # else the next step would pause again
    if run.main:
        run.reporter.emit("continued", step=run.step)
    return Requests(stop=wants.stop)


def _gather_requests(accelerator: Accelerator, reporter: Reporter, requests: Requests) -> Requests:
    """Commands reach the main process, a signal any process (the launcher passes Ctrl-C to all, `kill` to
    one); every process must act on them at the same step."""
    wants = Requests(stop=requests.stop, toggle=requests.toggle)
    requests.stop = requests.toggle = False
    if accelerator.is_main_process:
        for name in reporter.commands():
            setattr(wants, _COMMAND_FIELDS.get(name, name), True)
        wants.held = requests.pause_file is not None and requests.pause_file.exists()
    if accelerator.num_processes > 1:
        flags = torch.tensor([getattr(wants, name) for name in FLAGS], device=accelerator.device, dtype=torch.int32)
        flags = accelerator.reduce(flags, "sum")  # whichever process heard it
        wants = Requests(**{name: bool(f) for name, f in zip(FLAGS, flags.tolist())})
    return wants


_COMMAND_FIELDS = {"continue": "proceed"}


def _save_checkpoint(run: _Run) -> None:
    """Rank 0 writes it; under FSDP every process first helps make the sharded tensors whole."""
    if ranks.deepspeed_launch():  # a stop or a Save under DeepSpeed (ranks.deepspeed_checkpoints)
        if run.main:
            run.reporter.log("no checkpoint under DeepSpeed: its optimizer state is split in its own layout",
                             "warning")
        return
    if run.main or sharding.active():
        # The weights to use; resume rebuilds the training point. They are written inside the context: outside it
        # the tensors (the parameters themselves, not copies) hold the training point again.
        with optimizers.eval_mode(run.optimizer):
            weights, optimizer_state, shadow = _checkpointed(run)
            if run.main:
                info = {"epoch": run.epoch, "job": run.job.model_dump(mode="json")}
                path = checkpoint.save(run.out / "checkpoints", run.step, weights, optimizer_state,
                                       run.lr_scheduler, info, run.job.output.keep_last, ema=shadow)
                run.reporter.emit("checkpoint", step=run.step, path=str(path))
    run.accelerator.wait_for_everyone()


def _checkpointed(run: _Run) -> tuple[dict, dict, dict | None]:
    """The trained tensors, the optimizer state and the EMA, whole (on rank 0 under FSDP)."""
    weights, shadow = trainable.tensors(run.tr), run.shadow
    optimizer_state = _checkpointed_optimizer(run).state_dict()
    if not sharding.active():
        return weights, optimizer_state, shadow
    return (sharding.whole(weights, run.main), optimizer_state,
            sharding.whole(shadow, run.main) if shadow is not None else None)


def _checkpointed_optimizer(run: _Run):
    """What a checkpoint saves and loads the optimizer state through: the optimizer, or under FSDP its
    shards seen as one optimizer."""
    return sharding.WholeOptimizer(run.denoiser, run.optimizer.optimizer) if sharding.active() else run.optimizer


@contextmanager
def _exported_denoiser(run: _Run, device):
    """The denoiser as one module holding the weights to export, to render or export with. Under FSDP every
    process enters it: they gather an unsharded copy, which rank 0 gets (on `device`) and the others do not
    (None); otherwise only rank 0 enters it and gets the prepared denoiser itself."""
    if not sharding.active():
        with _exported_weights(run):
            yield run.accelerator.unwrap_model(run.denoiser)
        return
    with _exported_weights(run):
        copy = sharding.whole_module(run.denoiser, run.main)
    yield copy.to(device) if copy is not None else None


@contextmanager
def _exported_weights(run: _Run):
    """A context in which the model holds what gets exported: the EMA weights when the job says so, else the
    optimizer's weights in eval mode (a schedule-free optimizer's average)."""
    with optimizers.eval_mode(run.optimizer):
        if run.shadow is not None and run.job.ema.export_ema:
            with ema.swapped_in(run.shadow, trainable.ema_params(run.tr)):
                yield
        else:
            yield


@torch.no_grad()
def _validate(run: _Run, step: int, asked: bool = False) -> None:
    """Render the validation prompts with the weights that would be exported now; `asked`: a `sample` command,
    whose own prompts (rank 0 holds them) replace the validation prompts. Every process comes here together."""
    accelerator = run.accelerator
    prompts = run.job.validation.prompts
    if run.main and asked:
        prompts = run.reporter.take_prompts() or prompts
        if not prompts:
            run.reporter.log("sample: the job has no validation prompts and the command sent none", "warning")
    if run.main or sharding.active():
        with _exported_denoiser(run, accelerator.device) as model:
            if run.main and prompts:
                _render_prompts(run, step, model, prompts, "asked" if prompts != run.job.validation.prompts else "")
    accelerator.wait_for_everyone()


def _render_prompts(run: _Run, step: int, model, prompts: list[str], tag: str) -> None:
    """Rank 0: images of `model` (holding the weights to export) for `prompts`, saved and announced; `tag` keeps
    the files of prompts sent with a `sample` command apart from the validation prompts' own."""
    accelerator, parts, job = run.accelerator, run.parts, run.job
    val = job.validation
    modules = list(run.tr.modules.values()) or [model]
    for module in modules:
        module.eval()
    for name in run.released:  # the VAE / text encoder wait on the CPU while their outputs are cached
        getattr(parts, name).to(accelerator.device)
    pipe = run.family.validation_pipeline(parts, model)
    samples = run.out / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    res = job.dataset.resolution
    for i, prompt in enumerate(prompts):
        seed = val.seed + i
        with accelerator.autocast():
            image = render(pipe, model, FAMILIES[run.plan.family].cfg_halves, _expand(run, prompt), val, seed,
                           res, res)
        path = samples / f"step-{step:06d}-{tag + '-' if tag else ''}{i:02d}.png"
        image.save(path)
        run.reporter.emit("sample", step=step, prompt=prompt, seed=seed, path=str(path))
    for name in run.released:
        getattr(parts, name).to("cpu")
    for module in modules:
        module.train()


def _export(run: _Run) -> dict:
    """The final files: LoRA files for adapters, whole models for full fine-tunes, embeddings for new tokens.
    Rank 0 writes them; under FSDP the others help gather the fine-tuned denoiser and return nothing."""
    if not run.main:
        with _exported_denoiser(run, "cpu"):
            return {}
    job, plan, tr, final = run.job, run.plan, run.tr, run.out / "final"
    captions: dict[str, list[str]] = {}
    for item in plan.scan.items:
        captions.setdefault(str(item.folder), []).append(item.caption)
    info = {"num_train_images": len(plan.layout.samples), "started_at": run.started_at, "step": run.step,
            "epoch": run.epoch,
            "total_steps": plan.total_steps, "captions_by_folder": captions,
            "num_class_images": run.num_class_images,
            "folders": {str(s.folder): (s.repeats, s.images) for s in plan.scan.subsets}}
    outputs: dict = {}
    with _exported_denoiser(run, "cpu") as denoiser:
        if tr.lora_configs:
            outputs.update(lora_files.write_lora(final, run.family, run.parts, trainable.lora_states(tr),
                                             tr.lora_configs, job, info))
        if tr.full:
            pipe = run.family.pipeline(run.parts, denoiser)
            from .export.single_file import original_layout

            single = job.output.save_single_file and original_layout(pipe) is not None
            if job.output.save_single_file and not single:
                run.reporter.log(f"no original single-file layout for {plan.family} models: wrote the "
                                 "diffusers folder only", "warning")
            outputs.update(lora_files.write_full(final, pipe, job, single))
    if tr.tokens is not None:
        from .methods.tokens import save_embeddings

        metadata = {lora_files.JOB_METADATA_KEY: json.dumps(job.model_dump(mode="json"), separators=(",", ":"))}
        for i, path in enumerate(save_embeddings(tr.tokens, final / "embeddings", metadata)):
            outputs[f"embedding_{i}"] = path
    return outputs


class _Meter:
    """What a step event adds about throughput: samples/s, peak memory, and on a GPU TFLOPS and MFU (per
    device) from the FLOPs of the run's first step, counted while it runs."""

    def __init__(self, run: _Run):
        self.run = run
        device = run.accelerator.device
        self.samples_per_step = (run.job.schedule.batch_size * run.job.schedule.gradient_accumulation
                                 * run.accelerator.num_processes)
        self.gpu = throughput.gpu_of(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        self.flops = throughput.FlopCount() if device.type == "cuda" else None
        self._counted = False

    def counting(self):
        """The FLOP counter around the first micro-step on a GPU; nothing otherwise."""
        from contextlib import nullcontext

        if self.flops is None or self._counted:
            return nullcontext()
        self._counted = True
        return self.flops

    def read(self, its: float) -> dict:
        out = {"samples_s": round(its * self.samples_per_step, 3),
               "peak_mem": throughput.peak_memory(self.run.accelerator.device)}
        if self.flops is not None and self.flops.total:
            step_flops = self.flops.total * self.run.job.schedule.gradient_accumulation
            out["tflops"], out["mfu"] = throughput.achieved(step_flops, its, self.gpu)
        return out


class _StepTimer:
    """Steady-state it/s (an exponential average, so one slow step does not swing the ETA)."""

    def __init__(self, total: int):
        self.total = total
        self.last = time.perf_counter()
        self.rate = 0.0

    def tick(self, step: int) -> tuple[float, float]:
        now = time.perf_counter()
        dt, self.last = now - self.last, now
        inst = 1.0 / dt if dt > 0 else 0.0
        self.rate = inst if self.rate == 0 else 0.9 * self.rate + 0.1 * inst
        eta = (self.total - step) / self.rate if self.rate else 0.0
        return round(self.rate, 3), round(eta, 1)

    def pause_excluded(self) -> None:
        """Validation time is not training time."""
        self.last = time.perf_counter()
