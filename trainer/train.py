"""The training loop, written once: LoRA on the denoiser with accelerate, for every model family.

Runs under plain `python -m trainer run JOB` or `accelerate launch -m trainer run JOB`. What differs between
families comes from `trainer/families/<family>.py`; everything random is seeded by (seed, micro-step), so a
resumed run continues exactly where an uninterrupted one would be.
"""

from __future__ import annotations

import gc
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast, set_seed

from . import cache, checkpoint
from .buckets import epoch_batches
from .dataset import TrainDataset, collate
from .events import Reporter
from .export import write_lora
from .families import family_module
from .job import Job, JobError
from .plan import Plan


@dataclass
class Requests:
    """What the window (over the socket) or a signal asked for; acted on at the next step."""
    stop: bool = False
    save: bool = False
    sample: bool = False
    signals: int = field(default=0)


def train(job: Job, plan: Plan, reporter: Reporter, resume: bool) -> str:
    """Train to the end or until asked to stop; returns 'completed' or 'stopped'."""
    requests = Requests()
    previous = {sig: signal.signal(sig, _stop_handler(requests)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _train(job, plan, reporter, resume, requests)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _train(job: Job, plan: Plan, reporter: Reporter, resume: bool, requests: Requests) -> str:
    out = plan.output_dir
    sched = job.schedule
    accelerator = _accelerator(job, reporter)
    main = accelerator.is_main_process

    family = family_module(plan.family)
    parts = family.load(job.model)
    # Half a million long-lived objects from torch/diffusers imports: freezing them keeps each later collection
    # (and interpreter shutdown) from walking them again; this process trains once and exits.
    gc.freeze()
    frozen_dtype = torch.float32 if accelerator.device.type == "cpu" else _autocast_dtype(accelerator)
    parts.vae.to(accelerator.device)  # fp32 always: the SD VAE overflows in fp16
    _to(parts.text_encoder, accelerator.device, frozen_dtype)

    unet = parts.denoiser
    unet.requires_grad_(False)
    _to(unet, accelerator.device, frozen_dtype)
    set_seed(sched.seed)  # the LoRA's random init must be the same in every run of this job
    _add_lora(unet, job)
    if job.precision.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    trained = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    for p in trained.values():
        p.data = p.data.float()  # trained weights stay fp32 under mixed precision
    optimizer = _optimizer(job, list(trained.values()))
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler(sched.lr_scheduler, optimizer, num_warmup_steps=sched.warmup_steps,
                                 num_training_steps=plan.total_steps)
    unet, optimizer = accelerator.prepare(unet, optimizer)

    start_step = 0
    if resume:
        found = checkpoint.latest(out / "checkpoints")
        if found is None:
            reporter.log("no complete checkpoint found; starting from step 0", "warning")
        else:
            start_step = checkpoint.load(found, trained, optimizer, lr_scheduler)["step"]
            reporter.log(f"resumed from {found}")

    dataset = TrainDataset(plan.layout, job.dataset, sched.seed)
    started_at = time.time()
    if main:
        reporter.set_total(plan.total_steps, start_step)
        reporter.emit("run_started", job=job.model_dump(mode="json"), total_steps=plan.total_steps,
                      start_step=start_step, output_dir=str(out))
    warned = _prepare_data(job, plan, dataset, family, parts, accelerator, reporter)
    if job.validation.prompts and job.validation.at_start and start_step == 0:
        _validate(accelerator, family, parts, unet, job, out, 0, reporter)
    released = _release_frozen(parts, plan.caching, job)

    accum = sched.gradient_accumulation
    step, micro = start_step, start_step * accum
    epoch = micro // plan.batches_per_epoch
    losses: list[torch.Tensor] = []
    timer = _StepTimer(plan.total_steps)
    status = "completed"
    while step < plan.total_steps and status == "completed":
        epoch, offset = divmod(micro, plan.batches_per_epoch)
        batches = epoch_batches(plan.layout.bucket_of, sched.batch_size, sched.seed, epoch,
                                accelerator.process_index, accelerator.num_processes)[offset:]
        keys = [[(index, epoch) for index in b] for b in batches]  # a sample's randomness: (seed, epoch, index)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=keys, collate_fn=collate,
                                             num_workers=job.dataset.num_workers)
        for batch in loader:
            _warn_skipped(batch["skipped"], warned, reporter, main)
            gen = _generator(sched.seed, micro, accelerator)
            with accelerator.accumulate(unet):
                latents = _latents(family, parts, batch, gen, accelerator.device)
                cond = _conditioning(family, parts, batch, accelerator.device)
                noisy, timesteps, target, _ = family.noisy_input_and_target(parts, latents, gen, job.diffusion)
                with accelerator.autocast():
                    pred = family.predict(parts, unet, noisy, timesteps, cond)
                loss = _loss(pred, target, batch["weight"])
                accelerator.backward(loss)
                if accelerator.sync_gradients and job.optimizer.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(list(trained.values()), job.optimizer.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro += 1
            losses.append(loss.detach())
            if not accelerator.sync_gradients:
                continue
            lr = lr_scheduler.get_last_lr()[0]
            lr_scheduler.step()
            step += 1
            step_loss = accelerator.reduce(torch.stack(losses).mean(), "mean").item()
            losses.clear()
            its, eta = timer.tick(step)
            if main:
                reporter.emit("step", step=step, epoch=epoch, loss=step_loss, lr=lr, its=its, eta=eta)
            wants = _gather_requests(accelerator, reporter, requests)
            if wants.stop:
                _save_checkpoint(accelerator, trained, optimizer, lr_scheduler, job, out, step, epoch, reporter)
                status = "stopped"
                break
            every = job.output.checkpoint_every
            if wants.save or (every and step % every == 0 and step < plan.total_steps):
                _save_checkpoint(accelerator, trained, optimizer, lr_scheduler, job, out, step, epoch, reporter)
            val_every = job.validation.every_n_steps
            if job.validation.prompts and (wants.sample or (val_every and step % val_every == 0
                                                            and step < plan.total_steps)):
                _validate(accelerator, family, parts, unet, job, out, step, reporter, released)
                timer.pause_excluded()
            if step >= plan.total_steps:
                break

    outputs: dict = {}
    if status == "completed":
        if job.output.checkpoint_every:
            _save_checkpoint(accelerator, trained, optimizer, lr_scheduler, job, out, step, epoch, reporter)
        if job.validation.prompts:
            _validate(accelerator, family, parts, unet, job, out, step, reporter, released)
        if main:
            outputs = _export(accelerator, family, parts, unet, job, plan, out, step, epoch, started_at)
    if main:
        reporter.emit("run_finished", status=status, outputs={k: str(v) for k, v in outputs.items()})
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return status


def _prepare_data(job: Job, plan: Plan, dataset: TrainDataset, family, parts, accelerator: Accelerator,
                  reporter: Reporter) -> set[str]:
    """Say which files are left out, fill the latent and text caches (main process first), point the dataset
    at them. Returns the files already warned about."""
    main = accelerator.is_main_process
    warned = {path for path, _ in plan.scan.skipped}
    if main:
        for path, why in plan.scan.skipped:
            reporter.log(f"skipped {path}: {why}", "warning")
        if plan.scan.skipped:
            reporter.log(f"{len(plan.scan.skipped)} files skipped; training on {plan.scan.num_images} images",
                         "warning")
        for note in plan.caching.notes:
            reporter.log(note)
    broken = []
    if main:
        broken = cache.prepare(job, plan.caching, dataset, family, parts, reporter, fill=True)
    accelerator.wait_for_everyone()
    if not main:
        broken = cache.prepare(job, plan.caching, dataset, family, parts, reporter, fill=False)
    for item, why in broken:
        _warn_skipped([(str(item.path), f"{why}; its samples train on another image of its bucket")], warned,
                      reporter, main)
    if job.dataset.crop == "face" and main:
        from .crops import face_detection_problem

        problem = face_detection_problem(create=not plan.caching.latents)  # cached: only if the pass needed it
        if problem:
            reporter.log(problem, "warning")
    return warned


def _release_frozen(parts, caching: cache.CachePlan, job: Job) -> list[str]:
    """With their outputs cached, the VAE and text encoder leave the accelerator: to the CPU when validation
    needs them again (and only then moved back), else their weights are dropped. On a CPU-only machine the
    first changes nothing; memory is only returned when no validation prompts are set."""
    released = [name for name, cached in (("vae", caching.latents), ("text_encoder", caching.text)) if cached]
    for name in released:
        getattr(parts, name).to("cpu" if job.validation.prompts else "meta")
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


def _conditioning(family, parts, batch: dict, device) -> dict:
    """The caption's encoding (cached or encoded now), plus what the family reads from the batch itself
    (SDXL: each sample's size and crop)."""
    if "cond" in batch:
        cond = {name: value.to(device) for name, value in batch["cond"].items()}
    else:
        with torch.no_grad():
            cond = family.encode_prompts(parts, batch["captions"])
    cond.update({name: value.to(device) for name, value in family.conditioning_extras(batch).items()})
    return cond


def _loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """MSE; a folder's loss weight scales its samples' share."""
    if bool((weight == 1).all()):
        return F.mse_loss(pred.float(), target.float())
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
    return (per_sample * weight.to(per_sample.device)).mean()


def _accelerator(job: Job, reporter: Reporter) -> Accelerator:
    precision = job.precision.mixed_precision
    if precision == "fp16" and not torch.cuda.is_available():
        reporter.log("fp16 needs a GPU; training in fp32 on the CPU (bf16 works on CPUs)", "warning")
        precision = "no"
    return Accelerator(gradient_accumulation_steps=job.schedule.gradient_accumulation, mixed_precision=precision)


def _to(module, device, dtype) -> None:
    # Passing dtype=float32 to a float32 model makes diffusers warn about casting; only cast when it changes.
    if dtype == torch.float32:
        module.to(device)
    else:
        module.to(device, dtype=dtype)


def _autocast_dtype(accelerator: Accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def _add_lora(unet, job: Job) -> None:
    from peft import LoraConfig

    config = LoraConfig(r=job.network.rank, lora_alpha=job.network.alpha, lora_dropout=job.network.dropout,
                        init_lora_weights="gaussian", target_modules=job.network.target_modules)
    try:
        unet.add_adapter(config)
    except ValueError as exc:
        raise JobError(f"network.target_modules: {exc}".splitlines()[0]) from None


def _optimizer(job: Job, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    opt = job.optimizer
    kwargs = dict(lr=opt.learning_rate, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay)
    if opt.name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise JobError("optimizer.name: adamw8bit needs bitsandbytes, which is not installed") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def _generator(seed: int, micro: int, accelerator: Accelerator) -> torch.Generator:
    """One generator per micro-step and process, so noise, timesteps and dropout replay exactly on resume."""
    value = (seed * 1_000_003 + micro * 997 + accelerator.process_index) % (2**63)
    torch.manual_seed(value)  # LoRA dropout draws from the global generator
    return torch.Generator(device=accelerator.device).manual_seed(value)


def _stop_handler(requests: Requests):
    """Ctrl-C or SIGTERM: save a checkpoint and stop at the next step; a second one stops at once."""

    def handler(signum, frame):
        requests.signals += 1
        if requests.signals > 1:
            raise KeyboardInterrupt
        requests.stop = True

    return handler


def _gather_requests(accelerator: Accelerator, reporter: Reporter, requests: Requests) -> Requests:
    """Commands reach the main process; every process must act on them at the same step."""
    wants = Requests(stop=requests.stop)
    requests.stop = False
    if accelerator.is_main_process:
        for name in reporter.commands():
            setattr(wants, name, True)
    if accelerator.num_processes > 1:
        flags = torch.tensor([wants.stop, wants.save, wants.sample], device=accelerator.device, dtype=torch.int32)
        flags = broadcast(flags, from_process=0)
        wants = Requests(*(bool(f) for f in flags.tolist()))
    return wants


def _save_checkpoint(accelerator, trained, optimizer, lr_scheduler, job: Job, out: Path, step: int, epoch: int,
                     reporter: Reporter) -> None:
    if accelerator.is_main_process:
        path = checkpoint.save(out / "checkpoints", step, trained, optimizer, lr_scheduler,
                               {"epoch": epoch}, job.output.keep_last)
        reporter.emit("checkpoint", step=step, path=str(path))
    accelerator.wait_for_everyone()


@torch.no_grad()
def _validate(accelerator, family, parts, unet, job: Job, out: Path, step: int, reporter: Reporter,
              released: list[str] = ()) -> None:
    if accelerator.is_main_process:
        val = job.validation
        model = accelerator.unwrap_model(unet)
        model.eval()
        for name in released:  # the VAE / text encoder wait on the CPU while their outputs are cached
            getattr(parts, name).to(accelerator.device)
        pipe = family.validation_pipeline(parts, model)
        samples = out / "samples"
        samples.mkdir(parents=True, exist_ok=True)
        res = job.dataset.resolution
        for i, prompt in enumerate(val.prompts):
            seed = val.seed + i
            with accelerator.autocast():
                image = pipe(prompt, negative_prompt=val.negative_prompt or None, num_inference_steps=val.steps,
                             guidance_scale=val.guidance_scale, height=res, width=res,
                             generator=torch.Generator().manual_seed(seed)).images[0]
            path = samples / f"step-{step:06d}-{i:02d}.png"
            image.save(path)
            reporter.emit("sample", step=step, prompt=prompt, seed=seed, path=str(path))
        for name in released:
            getattr(parts, name).to("cpu")
        model.train()
    accelerator.wait_for_everyone()


def _export(accelerator, family, parts, unet, job: Job, plan: Plan, out: Path, step: int, epoch: int,
            started_at: float) -> dict:
    from peft.utils import get_peft_model_state_dict

    lora_state = get_peft_model_state_dict(accelerator.unwrap_model(unet))
    captions: dict[str, list[str]] = {}
    for item in plan.scan.items:
        captions.setdefault(str(item.folder), []).append(item.caption)
    info = {"num_train_images": len(plan.layout.samples), "started_at": started_at, "step": step, "epoch": epoch,
            "total_steps": plan.total_steps, "captions_by_folder": captions,
            "folders": {str(s.folder): (s.repeats, s.images) for s in plan.scan.subsets}}
    return write_lora(out / "final", family, parts, lora_state, job, info)


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
