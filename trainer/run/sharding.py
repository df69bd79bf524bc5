"""FSDP (full shard) for full fine-tunes: the denoiser's weights, gradients and optimizer state split across the
processes, gathered back whole for checkpoints, samples and the final files.

`accelerate launch --config_file presets/accelerate/fsdp.yaml` (or the window's FSDP choice) asks for it by setting
ACCELERATE_USE_FSDP and FSDP_*. The trainer then shards with torch's own FSDP2 (`fully_shard`) instead of letting
accelerate's prepare do it: accelerate 1.16 shards only on GPUs (on a CPU its processes silently become plain
data-parallel), and one code path on GPUs and CPUs is what the CPU test can vouch for. Accelerate still runs the
processes (gloo or NCCL, autocast, gradient accumulation), as for data-parallel.

Each of the denoiser's repeated blocks (the family table's `swap_blocks`, in forward order) is one FSDP unit, so
only one block's whole weights exist at a time; the rest of the denoiser is the root unit. Checkpoints hold whole
tensors in the same files and layout as a one-process run's, so a checkpoint resumes under FSDP, with another
number of processes, or as one process.

Importing this module is torch-free (`claim` and `requested` run before anything loads).
"""

from __future__ import annotations

import os

from ..job import ADAPTER_KINDS, Job, JobError

ENV = "ACCELERATE_USE_FSDP"  # what `accelerate launch` sets for a config with distributed_type FSDP
CONFIG = "presets/accelerate/fsdp.yaml"
_active = {"on": False, "reshard": True}


def requested() -> bool:
    return os.environ.get(ENV, "false").lower() == "true"


def claim() -> bool:
    """Before accelerate sets up the processes: take FSDP over from accelerate (which then runs them as
    data-parallel processes) when the launch asks for it. One line when it asks for what this trainer does not
    do."""
    if not requested():
        return False
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise JobError(f"fsdp_version: {version}; this trainer shards with FSDP2 only: set fsdp_version: 2 in the "
                       f"accelerate config (as {CONFIG} does)")
    if os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true":
        raise JobError("fsdp_offload_params: true is not supported; set it to false (memory.block_swap streams "
                       "frozen blocks from CPU memory on one GPU)")
    del os.environ[ENV]
    _active["on"] = True
    _active["reshard"] = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"
    return True


def active() -> bool:
    return _active["on"]


def check_job(job: Job) -> None:
    """FSDP shards a full fine-tune of the denoiser; what it does not cover is one line, before anything loads."""
    problems = [
        (job.network.kind in ADAPTER_KINDS or job.network.kind == "none",
         f"network.kind: {job.network.kind!r}; FSDP shards full fine-tunes (network.kind 'full'). An adapter is "
         "small: train it data-parallel (presets/accelerate/multi_gpu.yaml)"),
        (job.text_encoder.mode != "off", f"text_encoder.mode: {job.text_encoder.mode!r}; under FSDP only the "
         "denoiser trains: set it to 'off', or launch data-parallel"),
        (bool(job.tokens.new), "tokens.new: new tokens do not train under FSDP; launch data-parallel"),
        (job.memory.block_swap > 0, "memory.block_swap: FSDP already splits the weights across the GPUs; set 0"),
        (job.memory.fused_backward, "memory.fused_backward: not under FSDP; set false"),
        (job.memory.base_weights != "auto", f"memory.base_weights: {job.memory.base_weights!r}; a full fine-tune "
         "trains every weight in full precision: set 'auto'"),
        (job.speed.compile != "none", "speed.compile: not tried under FSDP yet; set 'none'"),
    ]
    for wrong, line in problems:
        if wrong:
            raise JobError(line)


def shard(denoiser, roots: tuple[str, ...]) -> int:
    """FSDP2 full shard: each block under `roots` one unit, then the whole denoiser; returns the number of
    blocks. Parameters become DTensors, so the optimizer must be built afterwards."""
    from torch.distributed.fsdp import fully_shard

    from .block_swap import swap_blocks

    blocks = swap_blocks(denoiser, roots)
    for block in blocks:
        fully_shard(block, reshard_after_forward=_active["reshard"])
    fully_shard(denoiser, reshard_after_forward=_active["reshard"])
    return len(blocks)


def full(tensor):
    """A DTensor made whole on every process (a collective); any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local(tensor):
    """This process's shard of a DTensor; any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def like(target, whole):
    """`whole` (a full tensor) cut as `target` is: its shard when `target` is a DTensor, else `whole` itself."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(target, DTensor):
        return whole
    # Every process read the same file: each cuts its own shard, nothing is sent.
    return distribute_tensor(whole.to(target.device, target.dtype), target.device_mesh, target.placements,
                             src_data_rank=None)


def whole(tensors: dict, main: bool) -> dict:
    """Whole copies on the CPU of `tensors` (a collective: every process calls it, one tensor at a time, so
    only one is whole on the device at once); the main process gets them, the others an empty dict."""
    out = {}
    for key, tensor in tensors.items():
        value = full(tensor.detach())
        if main:
            out[key] = value.to("cpu")
    return out


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


class WholeOptimizer:
    """A sharded optimizer seen as a one-process one: `state_dict()` numbers its whole state as a one-process
    optimizer's (on the main process; empty elsewhere), `load_state_dict` takes that back, so one checkpoint
    format serves both. Both are collectives: every process calls them."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        by_name = get_optimizer_state_dict(self.model, self.optimizer, options=_options(cpu_offload=True))
        if not by_name:
            return {"state": {}, "param_groups": []}
        index = {name: i for i, name in enumerate(n for g in by_name["param_groups"] for n in g["params"])}
        return {"state": {index[name]: entries for name, entries in by_name["state"].items()},
                "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]}

    def load_state_dict(self, numbered: dict) -> None:
        """Every process loads the whole state and keeps its shards."""
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        names_of = {id(p): name for name, p in self.model.named_parameters()}
        names = [names_of[id(p)] for g in self.optimizer.param_groups for p in g["params"]]
        by_name = {"state": {names[int(i)]: entries for i, entries in numbered["state"].items()},
                   "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]}
                                    for g in numbered["param_groups"]]}
        set_optimizer_state_dict(self.model, self.optimizer, by_name, options=_options())


def whole_module(model, main: bool):
    """An unsharded copy of the sharded `model` on the CPU, for rendering and export (a collective: the main
    process gets it, the others None). Built on the meta device and given the gathered weights, so no second
    set of random weights is made."""
    import torch
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    weights = get_model_state_dict(model, options=_options(cpu_offload=True))
    if not main:
        return None
    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        copy = cls.from_config(model.config)
    copy.load_state_dict(weights, assign=True)
    for name, buffer in model.named_buffers():  # buffers outside the state dict (not sharded: whole everywhere)
        owner, _, leaf = name.rpartition(".")
        module = copy.get_submodule(owner) if owner else copy
        if getattr(module, leaf).is_meta:
            setattr(module, leaf, buffer.detach().to("cpu").clone())
    copy.requires_grad_(False)
    return copy.eval()
