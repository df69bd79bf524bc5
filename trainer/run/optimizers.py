"""The optimizer a job names, built from its own package, its learning-rate schedule, and its eval mode.

Each optimizer comes from the package its authors or a well-kept collection publish (torch, bitsandbytes,
prodigyopt, transformers, pytorch_optimizer, schedulefree); the job's `optimizer` section holds only the
fields that apply to the one chosen (trainer/job.py). Their states are tensors and numbers, which
trainer/run/checkpoint.py writes to safetensors and JSON.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..job import Job, JobError
from . import speed


def build(job: Job, groups: list[dict]) -> torch.optim.Optimizer:
    """The job's optimizer over the parameter groups (each carries its own learning rate)."""
    opt = job.optimizer
    name = opt.name
    if name in ("adamw", "adamw8bit"):
        kwargs = dict(lr=opt.learning_rate, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay)
        if name == "adamw8bit":
            bnb = _package("bitsandbytes", name)
            return bnb.optim.AdamW8bit(groups, **kwargs)
        return torch.optim.AdamW(groups, **kwargs, fused=speed.fused_adamw(groups) or None)  # fused on CUDA
    if name == "prodigy":
        prodigyopt = _package("prodigyopt", name)
        return prodigyopt.Prodigy(groups, lr=opt.learning_rate, betas=tuple(opt.betas), beta3=opt.beta3 or None,
                                  eps=opt.eps, weight_decay=opt.weight_decay, d_coef=opt.d_coef, d0=opt.d0,
                                  growth_rate=opt.growth_rate or float("inf"),
                                  safeguard_warmup=opt.safeguard_warmup,
                                  use_bias_correction=opt.use_bias_correction)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        if opt.relative_step:  # its own learning rate: the groups' must be None (transformers refuses both)
            groups = [{k: v for k, v in g.items() if k != "lr"} for g in groups]
        return Adafactor(groups, lr=None if opt.relative_step else opt.learning_rate, eps=tuple(opt.eps),
                         clip_threshold=opt.clip_threshold, decay_rate=opt.decay_rate, beta1=opt.beta1 or None,
                         weight_decay=opt.weight_decay, scale_parameter=opt.scale_parameter,
                         relative_step=opt.relative_step, warmup_init=opt.warmup_init)
    if name == "came":
        pytorch_optimizer = _package("pytorch_optimizer", name)
        return pytorch_optimizer.CAME(groups, lr=opt.learning_rate, betas=tuple(opt.betas),
                                      weight_decay=opt.weight_decay, clip_threshold=opt.clip_threshold,
                                      eps1=opt.eps1, eps2=opt.eps2)
    if name == "lion":
        pytorch_optimizer = _package("pytorch_optimizer", name)
        return pytorch_optimizer.Lion(groups, lr=opt.learning_rate, betas=tuple(opt.betas),
                                      weight_decay=opt.weight_decay)
    if name == "adamw_schedulefree":
        schedulefree = _package("schedulefree", name)
        optimizer = schedulefree.AdamWScheduleFree(groups, lr=opt.learning_rate, betas=tuple(opt.betas),
                                                   eps=opt.eps, weight_decay=opt.weight_decay,
                                                   warmup_steps=job.schedule.warmup_steps, r=opt.r,
                                                   weight_lr_power=opt.weight_lr_power)
        optimizer.train()  # its authors: train mode before training steps, eval mode for anything else
        return optimizer
    raise JobError(f"optimizer.name: {name!r} is not an optimizer this trainer builds")


def scheduler(job: Job, optimizer, total_steps: int):
    """The learning-rate schedule. Adafactor's relative step and schedule-free AdamW schedule themselves (the
    job's validation requires 'constant' for them): Adafactor's own schedule reports the rate it uses, and the
    schedule-free warmup is inside the optimizer, so warmup_steps is not applied twice."""
    from diffusers.optimization import get_scheduler

    opt = job.optimizer
    if opt.name == "adafactor" and opt.relative_step:
        from transformers.optimization import AdafactorSchedule

        return AdafactorSchedule(optimizer)
    warmup = 0 if opt.name == "adamw_schedulefree" else job.schedule.warmup_steps
    return get_scheduler(job.schedule.lr_scheduler, optimizer, num_warmup_steps=warmup,
                         num_training_steps=total_steps)


def has_eval_mode(optimizer) -> bool:
    """Schedule-free optimizers train at one point and evaluate at another (the average of the iterates)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    return callable(getattr(inner, "eval", None)) and callable(getattr(inner, "train", None))


@contextmanager
def eval_mode(optimizer):
    """The weights as they are to be used (sampled, saved, exported) for the duration; train mode after. For a
    schedule-free optimizer, as its authors require; nothing for the others."""
    if optimizer is None or not has_eval_mode(optimizer):
        yield
        return
    inner = getattr(optimizer, "optimizer", optimizer)
    inner.eval()
    try:
        yield
    finally:
        inner.train()


def _package(module: str, name: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise JobError(f"optimizer.name: {name} needs the {module} package, which is not installed") from None
