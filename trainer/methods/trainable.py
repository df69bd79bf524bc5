"""What trains in a run: the denoiser's LoRA or its selected weights, the text encoders, new token rows.

The training loop and `trainer export` build it the same way, so a checkpoint's tensors always find their
parameters again; everything else in the model stays frozen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..job import ADAPTER_KINDS, Job, JobError


@dataclass
class Group:
    """One optimizer parameter group: its own learning rate, and the step after which it stops moving."""
    name: str  # "denoiser", a text encoder's component name, or "tokens"
    params: dict[str, torch.nn.Parameter]
    lr: float
    stop_step: int


@dataclass
class Trainable:
    modules: dict[str, torch.nn.Module]  # component name -> the module whose weights train
    groups: list[Group]
    lora_configs: dict[str, dict] = field(default_factory=dict)  # component -> adapter metadata for LoRA files
    tokens: Any = None  # trainer.methods.tokens.TokenState when new tokens train
    full: set[str] = field(default_factory=set)  # components trained fully (exported as whole models)

    @property
    def params(self) -> dict[str, torch.nn.Parameter]:
        return {key: p for group in self.groups for key, p in group.params.items()}

    def count(self) -> int:
        return sum(p.numel() for p in self.params.values())


def setup(family, parts, job: Job, total_steps: int) -> Trainable:
    """Attach adapters and mark what trains; seed the global generator first, so LoRA init is repeatable."""
    tr = Trainable(modules={}, groups=[])
    denoiser_name = family.DENOISER
    denoiser = parts.denoiser
    denoiser.requires_grad_(False)
    net = job.network
    if job.memory.base_weights != "auto":  # before the adapters, so peft wraps the quantized layers
        from .base_weights import quantize

        quantize(denoiser, job.memory.base_weights)
    if net.kind in ADAPTER_KINDS:
        from .layers import lora_target_names

        targets = lora_target_names(denoiser, job)  # exact module names: the layer selection already applied
        config = adapter_config(net, targets)
        _inject(config, denoiser, "network")
        tr.lora_configs[denoiser_name] = adapter_meta(net, targets)
    elif net.kind == "full":
        from .layers import full_trainable_names

        names = set(full_trainable_names(denoiser, job))
        for name, p in denoiser.named_parameters():
            p.requires_grad_(name in names)
        tr.full.add(denoiser_name)
    _add_group(tr, "denoiser", denoiser_name, denoiser, job.optimizer.learning_rate, total_steps)

    encoders = family.text_encoders(parts)
    te = job.text_encoder
    if te.mode != "off":
        stop = math.ceil(te.stop_fraction * total_steps)
        for index, (component, (_, encoder)) in enumerate(encoders.items()):
            encoder.requires_grad_(te.mode == "full")
            if te.mode == "lora":
                _add_lora(encoder, net.rank, net.alpha, net.dropout, te.target_modules, "text_encoder")
                tr.lora_configs[component] = _adapter_meta(net.rank, net.alpha, net.dropout, te.target_modules)
            else:
                tr.full.add(component)
            lr = te.learning_rate_2 if index > 0 and te.learning_rate_2 else te.learning_rate
            _add_group(tr, component, component, encoder, lr, stop)

    if job.tokens.new:
        from . import tokens

        tr.tokens = tokens.add_tokens(job.tokens.new, encoders)
        taken = tr.params
        rows = {k: p for k, p in tokens.trainable_parameters(tr.tokens).items() if k not in taken}
        if rows:  # a fully trained encoder already trains its whole embedding
            tr.groups.append(Group("tokens", rows, job.tokens.learning_rate,
                                   math.ceil(job.tokens.stop_fraction * total_steps)))
    return tr


def gradient_checkpointing(tr: Trainable) -> None:
    """Recompute activations in the backward pass, in every module that trains."""
    for module in tr.modules.values():
        if hasattr(module, "enable_gradient_checkpointing"):  # diffusers models
            module.enable_gradient_checkpointing()
        elif hasattr(module, "activation_checkpointing_enable"):  # transformers 5 models
            module.activation_checkpointing_enable()
        elif hasattr(module, "gradient_checkpointing_enable"):  # older transformers
            module.gradient_checkpointing_enable()


def reread(tr: Trainable) -> None:
    """Point the groups at their modules' parameters again, after FSDP replaced them (by DTensors)."""
    now = {f"{component}.{n}": p for component, module in tr.modules.items() for n, p in module.named_parameters()}
    for group in tr.groups:
        group.params = {key: now[key] for key in group.params}


def optimizer_groups(tr: Trainable) -> list[dict]:
    return [{"params": list(g.params.values()), "lr": g.lr, "name": g.name} for g in tr.groups]


def apply_stops(tr: Trainable, optimizer, step: int) -> None:
    """Groups past their stop step get learning rate 0 (after every LR-scheduler step, which resets it): AdamW
    then moves them neither by its update nor by weight decay, and DDP's buckets stay as they were built."""
    for group, opt_group in zip(tr.groups, optimizer.param_groups):
        if step >= group.stop_step:
            opt_group["lr"] = 0.0


def text_trains(tr: Trainable, step: int) -> bool:
    """Whether prompts must be encoded with gradients at this step."""
    return any(g.name != "denoiser" and step < g.stop_step for g in tr.groups)


def after_optimizer_step(tr: Trainable) -> None:
    """New token rows train; the rest of the embedding gets its values back (weight decay moved them)."""
    if any(g.name == "tokens" for g in tr.groups):  # else a fully trained encoder owns the whole embedding
        from . import tokens

        tokens.restore_frozen_rows(tr.tokens)


def ema_params(tr: Trainable) -> dict[str, torch.nn.Parameter]:
    """What the EMA averages: every trained tensor except the token embeddings (checkpointed as rows)."""
    return {k: p for g in tr.groups if g.name != "tokens" for k, p in g.params.items()}


def tensors(tr: Trainable) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps: the trained tensors by "component.parameter", new tokens as their rows."""
    out = {k: p.detach() for g in tr.groups if g.name != "tokens" for k, p in g.params.items()}
    if tr.tokens is not None:
        from . import tokens

        out.update(tokens.tensors(tr.tokens))
    return out


@torch.no_grad()
def load_tensors(tr: Trainable, saved: dict[str, torch.Tensor], source: str) -> None:
    """Put a checkpoint's tensors back; a checkpoint of another job is a one-line error."""
    expected = set(tensors(tr))
    missing = expected - set(saved)
    if missing:
        raise JobError(f"{source}: lacks {len(missing)} of the {len(expected)} trained tensors "
                       f"(e.g. {sorted(missing)[0]}); was it made by a different job?")
    from ..run.sharding import like

    params = tr.params
    for key in expected:
        if key in params:
            params[key].copy_(like(params[key], saved[key].to(params[key].device, params[key].dtype)))
    if tr.tokens is not None:
        from . import tokens

        tokens.load_tensors(tr.tokens, {k: v for k, v in saved.items() if k.startswith("tokens.")})


def lora_states(tr: Trainable) -> dict[str, dict[str, torch.Tensor]]:
    """{component: PEFT-format LoRA state dict} for every component that carries a LoRA."""
    from peft.utils import get_peft_model_state_dict

    return {component: get_peft_model_state_dict(tr.modules[component]) for component in tr.lora_configs}


def _add_group(tr: Trainable, name: str, component: str, module, lr: float, stop_step: int) -> None:
    params = {f"{component}.{n}": p for n, p in module.named_parameters() if p.requires_grad}
    if params:
        tr.modules[component] = module
        tr.groups.append(Group(name, params, lr, stop_step))


def _add_lora(module, rank: int, alpha: float, dropout: float, targets: list[str], field_name: str) -> None:
    """LoRA layers on a text encoder (the network's rank and alpha; LoHa, LoKr and DoRA are the denoiser's)."""
    from peft import LoraConfig

    _inject(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                       target_modules=targets), module, field_name)


def adapter_config(net, targets: list[str]):
    """peft's own config for the network's kind: LoRA (with DoRA when asked), LoHa or LoKr. LoHa and LoKr keep
    peft's default initialisation (one factor zero, so training starts from the base model, as LoRA's does);
    their convolutions use the plain, not the Tucker, form, which is what the LyCORIS layout below writes."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    if net.kind == "lora":
        return LoraConfig(r=net.rank, lora_alpha=net.alpha, lora_dropout=net.dropout, init_lora_weights="gaussian",
                          use_dora=net.dora, target_modules=targets)
    if net.kind == "loha":
        return LoHaConfig(r=net.rank, alpha=net.alpha, rank_dropout=net.dropout, target_modules=targets)
    return LoKrConfig(r=net.rank, alpha=net.alpha, rank_dropout=net.dropout, decompose_factor=net.lokr_factor,
                      decompose_both=net.lokr_decompose_both, target_modules=targets)


def _inject(config, module, field_name: str) -> None:
    """Adapter layers on `module` through peft's own API, for diffusers and transformers models alike: the models'
    `add_adapter` glue checks library versions against each other (transformers 5.24 refuses peft 0.21), and a
    new release must not be able to switch text-encoder training off. The layers and keys are the same."""
    from peft import inject_adapter_in_model

    try:
        inject_adapter_in_model(config, module)
    except ValueError as exc:
        raise JobError(f"{field_name}.target_modules: {exc}".splitlines()[0]) from None


def adapter_meta(net, targets: list[str]) -> dict:
    """What an adapter file records about the denoiser's adapter: diffusers' LoRA adapter metadata (it builds a
    LoraConfig from these keys), or the LoKrConfig keyword arguments diffusers builds a LoKr from."""
    if net.kind == "lokr":
        return {"r": net.rank, "alpha": net.alpha, "decompose_factor": net.lokr_factor,
                "decompose_both": net.lokr_decompose_both, "target_modules": sorted(targets)}
    if net.kind == "loha":
        return {"r": net.rank, "alpha": net.alpha, "target_modules": sorted(targets)}
    meta = _adapter_meta(net.rank, net.alpha, net.dropout, targets)
    if net.dora:
        meta["use_dora"] = True
    return meta


def _adapter_meta(rank: int, alpha: float, dropout: float, targets: list[str]) -> dict:
    return {"r": rank, "lora_alpha": alpha, "target_modules": sorted(targets), "lora_dropout": dropout}
