"""GPU memory and time of a run, known before Start: the job's training step run once on fake tensors (shapes and
dtypes only), with the model built from its configs; no weights are read and nothing real-size is allocated.

A storage counter (trainer/memory_counter.py) follows every tensor alive during the step and splits the peak into
weights, trainable weights, gradients, optimizer state, activations and encoders; torch's FlopCounterMode counts the
FLOPs, from which a named GPU's time per step follows at a stated utilisation.
"""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from .gpus import Gpu
from .job import Job, JobError
from .plan import Plan

GIB = 2**30
# What a GPU needs beyond the tensors counted: the CUDA context with cuBLAS/cuDNN workspaces (about 0.3-0.9 GiB on
# recent cards and drivers), and the caching allocator's rounding (blocks of 512 B and 2 MiB) and fragmentation.
CONTEXT_BYTES = int(0.75 * GIB)
FRAGMENTATION = 0.10  # of the counted peak
UTILISATION = 0.40  # the share of a GPU's peak bf16 throughput a training step reaches (a typical 35-45%)
PARTS = ("frozen weights", "trainable weights", "gradients", "optimizer state", "activations", "encoders")
SHARDED_PARTS = PARTS[:4]  # what FSDP splits across the processes (the denoiser's; trainer/run/sharding.py)
# bitsandbytes' 8-bit AdamW (it cannot run on fake tensors): two 1-byte states per element with one fp32 scale per
# block of 256, for tensors of at least 4096 elements; smaller ones keep two fp32 states.
BNB_BLOCK, BNB_MIN_SIZE = 256, 4096
BASE_WEIGHT_NOTES = {
    "fp8": ["base weights fp8: the denoiser's Linear weights in float8_e4m3fn with one scale each, upcast layer by "
            "layer"],
    "nf4": ["base weights nf4: bitsandbytes cannot run on fake tensors; its NF4 weights are counted by formula (0.5 "
            "byte per weight, an 8-bit absmax per 64 weights, an fp32 scale per 256 absmaxes) and its dequantized "
            "weight as one layer's bf16 copy at a time"]}


@dataclass
class Estimate:
    family: str
    bucket: tuple[int, int]  # the largest bucket (width, height): the step that needs the most
    batch_size: int
    precision: str
    peak: dict[str, int]  # bytes alive at the peak, by part (PARTS)
    flops: int  # per optimizer step (every micro-batch of gradient accumulation)
    trainable: int  # trained parameters
    params: int  # the denoiser's parameters
    # Bytes alive between steps, by part (weights and optimizer state: the gradients are set to None).
    between_steps: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0  # how long the estimate took
    swappable: int = 0  # the denoiser's blocks that memory.block_swap can hold in CPU memory

    @property
    def counted(self) -> int:
        return sum(self.peak.values())

    @property
    def total(self) -> int:
        """The counted peak with the allowance for the CUDA context and the allocator."""
        return int(self.counted * (1 + FRAGMENTATION)) + CONTEXT_BYTES

    def step_seconds(self, gpu: Gpu) -> float:
        return self.flops / (gpu.tflops * 1e12 * UTILISATION)

    def summary(self) -> str:
        w, h = self.bucket
        return (f"memory estimate: {self.total / GIB:.1f} GiB peak on the GPU ({self.counted / GIB:.1f} GiB of "
                f"tensors + allowance) at {w}x{h}, batch {self.batch_size}, {self.precision}; "
                f"{self.flops / 1e12:.1f} TFLOP per step")

    def fsdp_line(self, processes: int) -> str:
        """The peak per GPU when `processes` share the denoiser under FSDP: its weights, gradients and optimizer
        state divided among them; activations and the encoders as they are."""
        split = sum(self.peak.get(part, 0) for part in SHARDED_PARTS)
        counted = self.counted - split + split // processes
        total = int(counted * (1 + FRAGMENTATION)) + CONTEXT_BYTES
        return (f"under FSDP over {processes} processes: about {total / GIB:.1f} GiB peak per GPU (weights, "
                f"gradients and optimizer state, {_size(split)}, divided by {processes}; plus one block's "
                "whole weights while it runs, not counted)")

    def lines(self, gpu: Gpu | None = None, memory_gib: float | None = None) -> list[str]:
        out = [self.summary()]
        for part in PARTS:
            out.append(f"  {part:<18} {_size(self.peak.get(part, 0)):>10}")
        out.append(f"  {'allowance':<18} {_size(self.total - self.counted):>10} (CUDA context "
                   f"{CONTEXT_BYTES / GIB:.2f} GiB + {FRAGMENTATION:.0%} for the allocator)")
        out.append(f"between steps: {_size(sum(self.between_steps.values()))} stay allocated (optimizer state "
                   f"{_size(self.between_steps.get('optimizer state', 0))})")
        out.append(f"trainable: {self.trainable:,} of {self.params:,} denoiser parameters")
        out += [f"note: {note}" for note in self.notes]
        limit = memory_gib if memory_gib is not None else gpu.memory_gib if gpu else None
        if gpu:
            out.append(f"{gpu.name}: {self.step_seconds(gpu):.2f} s per step at {UTILISATION:.0%} of its "
                       f"{gpu.tflops:g} bf16 TFLOPS")
        if limit is not None:
            spare = limit - self.total / GIB
            out.append(f"fits in {limit:g} GiB: {'yes' if spare >= 0 else 'no'} ({abs(spare):.1f} GiB "
                       f"{'spare' if spare >= 0 else 'short'})")
        return out

    def as_json(self, gpu: Gpu | None = None, memory_gib: float | None = None) -> dict:
        out = {"family": self.family, "bucket": list(self.bucket), "batch_size": self.batch_size,
               "precision": self.precision, "peak_bytes": {p: self.peak.get(p, 0) for p in PARTS},
               "counted_bytes": self.counted, "allowance_bytes": self.total - self.counted,
               "total_bytes": self.total, "total_gib": round(self.total / GIB, 3), "flops_per_step": self.flops,
               "between_steps_bytes": {p: self.between_steps.get(p, 0) for p in PARTS},
               "trainable_params": self.trainable, "denoiser_params": self.params, "notes": self.notes,
               "utilisation": UTILISATION, "seconds": round(self.seconds, 2), "swappable_blocks": self.swappable}
        limit = memory_gib if memory_gib is not None else gpu.memory_gib if gpu else None
        if gpu:
            out["gpu"] = {**dataclasses.asdict(gpu), "step_seconds": round(self.step_seconds(gpu), 3)}
        if limit is not None:
            out["memory_gib"] = limit
            out["fits"] = self.total / GIB <= limit
        return out


def estimate(job: Job, plan: Plan, real: bool = False) -> Estimate:
    """Trace one training step of `job` at its largest bucket on fake tensors; a JobError names what failed.
    `real`: run the same step on real CPU tensors, the models built with their constructors' random weights,
    counted the same way: what the estimate is checked against (tests, bench/estimate_accuracy.py)."""
    started = time.perf_counter()
    spec = job.model.model_copy(update={"path": str(_config_folder(job)), "config": "", "variant": ""})
    try:
        result = _trace(job, plan, spec, real)
    except JobError:
        raise
    except Exception as exc:  # noqa: BLE001 - an op fake tensors cannot run, a model that cannot be built, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise JobError(f"estimate: could not trace the training step ({type(exc).__name__}: {first[:200]})") \
            from None
    result.seconds = time.perf_counter() - started
    return result


def _config_folder(job: Job) -> Path:
    """The local folder whose configs describe the model: model.path, or model.config for a single file, or the
    hub cache's snapshot of a model id."""
    from .families.detect import check_model_path

    kind = check_model_path(job.model)
    if kind == "folder":
        return Path(job.model.path).expanduser()
    if kind == "file":
        if job.model.config and Path(job.model.config).expanduser().is_dir():
            return Path(job.model.config).expanduser()
        raise JobError("model.config: the estimate builds the model from configs: set it to a local diffusers "
                       "folder of the same model (its configs are enough)")
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(job.model.path, "model_index.json", revision=job.model.revision or None)
    if not isinstance(found, str):
        raise JobError(f"model.path: {job.model.path}: not downloaded yet; the estimate needs its configs (a "
                       "local folder, or the model in the hub cache)")
    return Path(found).parent


def _trace(job: Job, plan: Plan, spec, real: bool) -> Estimate:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .families import empty_models, precision
    from .families.detect import family_module
    from .methods import trainable

    family = family_module(plan.family)
    device = "cpu" if real else "meta"
    with empty_models.from_configs(device):
        parts = family.load(spec)  # every model on the meta device (real: on the CPU)
    family.prepare_noise(parts, job.diffusion)
    held = precision.dtypes(job.precision.mixed_precision)
    precision.place(parts.denoiser, device, held.frozen)
    precision.place(parts.text_encoder, device, held.frozen)
    precision.place(parts.vae, device, held.image_encoder)
    width, height = max((plan.layout.buckets[i] for i in set(plan.layout.bucket_of)), key=lambda b: b[0] * b[1])
    batch = job.schedule.batch_size
    counter = _step_counter()
    tr = trainable.setup(family, parts, job, plan.total_steps)  # on the meta device: peft's layers there too
    for p in tr.params.values():
        p.data = p.data.to(held.trained)
    with nullcontext() if real else FakeTensorMode(allow_non_fake_inputs=True):
        if not real:
            _to_fake(torch, (parts.denoiser, parts.text_encoder, parts.vae), tr)
        if job.precision.gradient_checkpointing:
            trainable.gradient_checkpointing(tr)
        for module in tr.modules.values():
            module.train()
        text_trains = trainable.text_trains(tr, 0)
        # The swapped blocks' weights start in CPU memory: never counted before their first move.
        swap_note, swapped = _block_swap(job, plan, parts.denoiser, counter) if job.memory.block_swap else ([], set())
        _add_module(counter, parts.denoiser, tr, skip=swapped)
        gen = torch.Generator().manual_seed(job.schedule.seed)
        pixels = torch.zeros(batch, 3, height, width)
        captions = ["a photo"] * batch
        sizes = {name: torch.tensor([[height, width]] * batch) for name in ("original_size", "target_size")}
        extras = family.conditioning_extras({**sizes, "crop_top_left": torch.zeros(batch, 2, dtype=torch.long)})
        # What the caches hold is made before the step, off the accelerator, by encoders that then leave it.
        if plan.caching.latents:
            latent_dist = family.encode_image_dists(parts, pixels)
        else:
            _add_module(counter, parts.vae, tr, part="encoders")
            counter.add(pixels, "activations")
        if plan.caching.text:
            with torch.no_grad():
                cached_cond = family.encode_prompts(parts, captions)
        else:
            _add_module(counter, parts.text_encoder, tr, part="encoders")
        with counter:
            if plan.caching.latents:
                mean, std = (t.clone() for t in latent_dist)
                latents = family.sample_latents(parts, mean, std, gen)
            else:
                with counter.counting_as("encoders"):
                    latents = family.encode_images(parts, pixels, gen)
            if plan.caching.text:
                cond = {name: value.clone() for name, value in cached_cond.items()}
            else:
                with counter.counting_as("activations" if text_trains else "encoders"), \
                        torch.set_grad_enabled(text_trains):
                    cond = family.encode_prompts(parts, captions)
            cond.update({name: value.clone() for name, value in extras.items()})
            cond = family.drop_conditioning(parts, cond, gen, job.diffusion)
            noisy, timesteps, target, _ = family.noisy_input_and_target(parts, latents, gen, job.diffusion)
            autocast = held.frozen != torch.float32
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):  # fp16 has the same sizes
                pred = family.predict(parts, tr.modules.get(family.DENOISER, parts.denoiser), noisy, timesteps, cond)
            loss = torch.nn.functional.mse_loss(pred.float(), target.float())
            fused = _fused_backward(job, tr, torch, real, counter) if job.memory.fused_backward else None
            del pred, noisy, target, latents, cond
            loss.backward()
            for p in tr.params.values():
                if p.grad is not None:
                    counter.relabel(p.grad, "gradients")
            if fused is not None:
                hooks, state = fused
                hooks.remove()
                notes = ["fused backward: each weight is stepped in its gradient hook and its gradient freed"] + \
                    ([ADAMW8BIT_NOTE] if job.optimizer.name == "adamw8bit" else [])
            else:
                with counter.counting_as("optimizer state"):
                    state, notes = _optimizer_step(job, tr, torch, real)
        step_flops = counter.flops * job.schedule.gradient_accumulation
    notes += BASE_WEIGHT_NOTES.get(job.memory.base_weights, []) + swap_note
    notes += [f"{name} cached: off the GPU during training" for name, cached in
              (("latents", plan.caching.latents), ("text", plan.caching.text)) if cached]
    peak = counter.peak_by_part()
    for p in tr.params.values():
        p.grad = None  # the run's zero_grad(set_to_none=True)
    between = counter.live_by_part()
    del state
    params = sum(p.numel() for name, p in parts.denoiser.named_parameters() if "lora_" not in name)
    from .families.table import FAMILIES
    from .run.block_swap import swap_blocks

    return Estimate(plan.family, (width, height), batch, job.precision.mixed_precision, peak, step_flops,
                    tr.count(), params, between, notes,
                    swappable=len(swap_blocks(parts.denoiser, FAMILIES[plan.family].swap_blocks)))


def _step_counter():
    """A LiveBytes that also counts FLOPs with torch's FlopCounterMode formulas, in the same dispatch pass (a
    second mode, with its per-module hooks, would double the tracing time). CPU attention kernels, which fake
    tensors run here, are counted as the GPU's flash attention."""
    import torch
    from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

    from .memory_counter import LiveBytes

    aten = torch.ops.aten
    formulas = dict(flop_registry)
    formulas[aten._scaled_dot_product_flash_attention_for_cpu] = \
        lambda q, k, v, *args, out_val=None, **kwargs: sdpa_flop_count(q.shape, k.shape, v.shape)
    formulas[aten._scaled_dot_product_flash_attention_for_cpu_backward] = \
        lambda grad, q, k, v, *args, out_val=None, **kwargs: sdpa_backward_flop_count(grad.shape, q.shape, k.shape,
                                                                                      v.shape)

    class StepCounter(LiveBytes):
        flops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = super().__torch_dispatch__(func, types, args, kwargs)
            formula = formulas.get(func._overloadpacket)
            if formula is not None:
                self.flops += formula(*args, **(kwargs or {}), out_val=out)
            return out

    return StepCounter()


def _to_fake(torch, modules, tr) -> None:
    """Meta weights to fake ones (within FakeTensorMode), set directly: three times faster than `to_empty`. The
    groups that `trainable.setup` made on the meta device are pointed at the new Parameter objects."""
    new_of = {}
    for root in modules:
        for module in root.modules():
            for name, p in module._parameters.items():
                if p is not None and id(p) not in new_of:  # a tied weight once, shared as before
                    new_of[id(p)] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype), p.requires_grad)
                if p is not None:
                    module._parameters[name] = new_of[id(p)]
            for name, b in module._buffers.items():
                if b is not None:
                    module._buffers[name] = torch.empty(b.shape, dtype=b.dtype)
    for group in tr.groups:
        group.params = {key: new_of.get(id(p), p) for key, p in group.params.items()}


def _add_module(counter, module, tr, part: str = "", skip: set[int] = frozenset()) -> None:
    """Count a module's weights and buffers (except those in `skip`, by id): trained ones as such, the rest as
    `part` (frozen weights)."""
    trained = {id(p) for p in tr.params.values()}
    for p in module.parameters():
        if id(p) not in skip:
            counter.add(p, "trainable weights" if id(p) in trained else part or "frozen weights")
    for b in module.buffers():
        if id(b) not in skip:
            counter.add(b, part or "frozen weights")


def _optimizer_step(job: Job, tr, torch, real: bool) -> tuple[object, list[str]]:
    """The optimizer's first step, which creates its state; returns what holds the state (the caller keeps it
    alive, as a run does) and notes. Real tensors: torch's AdamW as CUDA runs it by default (foreach), after the
    run's gradient clipping. Fake tensors: AdamW's allocations made directly (two fp32 moments per element, and
    during the step one more fp32 copy, foreach's square roots of the second moments), since running it on fake
    tensors takes longer than the forward and backward passes together; the tests check these sizes against the
    real step. 8-bit AdamW is always counted so: bitsandbytes cannot run on fake tensors."""
    params = [p for p in tr.params.values() if p.grad is not None]
    opt = job.optimizer
    if opt.name == "adamw8bit":
        return [t for p in params for t in _adamw8bit_state(torch, p)], [ADAMW8BIT_NOTE]
    adamw = opt.name == "adamw"
    notes = [] if adamw else [f"optimizer {opt.name}: its state is counted as AdamW's (two fp32 moments per "
                              "element); Adafactor and CAME keep less, Lion one moment, Prodigy and schedule-free "
                              "AdamW about as much or more"]
    if not real:
        numel = sum(p.numel() for p in params)
        state = [torch.empty(numel), torch.empty(numel)]
        square_roots = torch.empty(numel)  # noqa: F841 - alive during the step only
        return state, notes
    if opt.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, opt.max_grad_norm, foreach=True)
    if not adamw:
        from .methods.trainable import optimizer_groups
        from .run.optimizers import build

        optimizer = build(job, optimizer_groups(tr))
        optimizer.step()
        return optimizer, []
    optimizer = _real_adamw(job, tr, torch)
    optimizer.step()
    return optimizer, []


ADAMW8BIT_NOTE = ("8-bit AdamW: bitsandbytes cannot run on fake tensors; its state is counted at 1 byte per element "
                  "per moment plus one fp32 scale per 256 elements")


def _adamw8bit_state(torch, p) -> list:
    if p.numel() >= BNB_MIN_SIZE:
        return [*(torch.empty(p.numel(), dtype=torch.uint8) for _ in range(2)),
                *(torch.empty(math.ceil(p.numel() / BNB_BLOCK)) for _ in range(2))]
    return [torch.empty(p.numel()) for _ in range(2)]


def _real_adamw(job: Job, tr, torch):
    from .methods.trainable import optimizer_groups

    opt = job.optimizer
    return torch.optim.AdamW(optimizer_groups(tr), lr=opt.learning_rate, betas=tuple(opt.betas), eps=opt.eps,
                             weight_decay=opt.weight_decay, foreach=True)


def _fused_backward(job: Job, tr, torch, real: bool, counter):
    """The run's FusedBackward hooks (trainer/run/fused_backward.py), stepping each weight as its gradient is ready:
    with torch's AdamW on real tensors, with AdamW's allocations for that weight on fake ones (as `_optimizer_step`
    makes them for all weights at once). Each gradient is counted as one while it lives. Returns the hooks and
    what holds the optimizer state."""
    from .run.fused_backward import FusedBackward, stepping

    state: list = []
    if real and job.optimizer.name == "adamw":
        optimizer = _real_adamw(job, tr, torch)
        state.append(optimizer)
        real_step = stepping(optimizer)

    def step_one(p):
        counter.relabel(p.grad, "gradients")
        with counter.counting_as("optimizer state"):
            if job.optimizer.name == "adamw8bit":
                state.extend(_adamw8bit_state(torch, p))
            elif real:
                real_step(p)
            else:
                state.extend([torch.empty(p.numel()), torch.empty(p.numel())])
                square_root = torch.empty(p.numel())  # noqa: F841 - alive during the step only

    return FusedBackward(list(tr.params.values()), step_one), state


class _CountingMover:
    """Block swap's moves (trainer/run/block_swap.py) as the memory count sees them: a block's frozen weights leave
    the count when they go to CPU memory and come back when they return."""

    def __init__(self, counter):
        self.counter = counter

    def to_host(self, index: int, tensors) -> None:
        for t in tensors:
            self.counter.remove(t)

    def to_device(self, index: int, tensors, prefetch: bool = False) -> None:
        for t in tensors:
            self.counter.add(t, "frozen weights")

    def ready(self, index: int, tensors) -> None:
        pass


def _block_swap(job: Job, plan: Plan, denoiser, counter) -> tuple[list[str], set[int]]:
    """The run's BlockSwap hooks on the traced denoiser, moving bytes in the count; the note for the output, and
    the ids of the tensors that start in CPU memory."""
    from .families.table import FAMILIES
    from .run.block_swap import BlockSwap, frozen_tensors, swap_blocks

    count = job.memory.block_swap
    blocks = swap_blocks(denoiser, FAMILIES[plan.family].swap_blocks)
    if count > len(blocks):
        raise JobError(f"memory.block_swap: {count}, but this model has {len(blocks)} blocks to swap")
    held = sum(t.untyped_storage().nbytes() for block in blocks[:count] for t in frozen_tensors(block))
    swap = BlockSwap(blocks, count, _CountingMover(counter))
    return ([f"block swap: {count} of {len(blocks)} blocks ({_size(held)} of frozen weights) in CPU memory, "
             f"streamed to the GPU while they run"], {id(t) for tensors in swap.tensors for t in tensors})


def _size(size: int) -> str:
    return f"{size / GIB:.2f} GiB" if size >= GIB / 10 else f"{size / 2**20:.1f} MiB"
