"""Layer selection: which modules of the denoiser train (LoRA or full fine-tuning), from the job's `layers`.

The selection is made once, over a table of the modules that own parameters; the table comes from a torch model
(the training loop) or from a local model's safetensors headers (`trainer check`, which must not import torch).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from ..blocks import BlockEntryError, block_children, resolve_block
from ..families.detect import check_model_path, safetensors_shapes
from ..families.table import FAMILIES
from ..job import ADAPTER_KINDS, Job, JobError

# Projections inside attention modules: diffusers (SD3's joint attention adds the add_* ones), CLIP, T5.
ATTENTION_PROJECTIONS = {"to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                         "to_add_out", "q_proj", "k_proj", "v_proj", "out_proj", "q", "k", "v", "o"}
# Feed-forward containers: diffusers `ff` / `ff_context` (`ff.net.0.proj`, `ff.net.2`), CLIP `mlp`, T5.
MLP_CONTAINERS = {"ff", "ff_context", "mlp", "DenseReluDense"}
# Flux's single-stream blocks run attention and MLP in parallel: proj_mlp is the MLP's input, proj_out mixes both.
SINGLE_BLOCK_MLP = {"proj_mlp", "proj_out"}
# Persistent buffers that safetensors files hold beside the weights; they never train.
BUFFER_NAMES = {"pos_embed", "position_ids"}
LISTED_BLOCKS = 12  # valid block names shown in an error about a block that matches nothing


@dataclass(frozen=True)
class Module:
    """A module that owns parameters: its full dotted name, what kind of layer it is, its parameters' shapes."""
    name: str
    kind: str  # "linear", "conv", "embedding", "norm" or "other"
    shapes: tuple[tuple[str, tuple[int, ...]], ...]  # (parameter name, shape), by name

    @property
    def params(self) -> int:
        return sum(math.prod(shape) for _, shape in self.shapes)


def table_from_model(model) -> list[Module]:
    """The module table of a torch model, kinds from the module classes."""
    import torch.nn as nn

    seen: set[int] = set()  # a tied weight counts once, under its first name, as in named_parameters()
    out = []
    for name, module in model.named_modules():
        shapes = []
        for pname, p in module.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                shapes.append((pname, tuple(p.shape)))
        if not shapes:
            continue
        if isinstance(module, nn.Linear):
            kind = "linear"
        elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            kind = "conv"
        elif isinstance(module, nn.Embedding):
            kind = "embedding"
        else:
            kind = _kind_from_shapes(name, dict(shapes))
        out.append(Module(name, kind, tuple(sorted(shapes))))
    return sorted(out, key=lambda m: _natural(m.name))


def table_from_folder(root: str | Path, component: str, variant: str = "") -> list[Module]:
    """The module table of `root/component` from its safetensors headers (no torch, no weights read)."""
    files = _weight_files(Path(root) / component, variant)
    if not files:
        raise JobError(f"model.path: {Path(root) / component}: no .safetensors weights")
    params: dict[str, dict[str, tuple[int, ...]]] = {}
    for path in files:
        for key, shape in safetensors_shapes(path).items():
            module, _, pname = key.rpartition(".")
            if pname not in BUFFER_NAMES:
                params.setdefault(module, {})[pname] = shape
    table = [Module(name, _kind_from_shapes(name, shapes), tuple(sorted(shapes.items())))
             for name, shapes in params.items()]
    return sorted(table, key=lambda m: _natural(m.name))


def select(table: list[Module], job: Job) -> list[str]:
    """Names of the modules that train under the job's network kind and layer selection."""
    return _select(table, job, job.network.kind)


def lora_target_names(model, job: Job) -> list[str]:
    """Exact module names for peft's `LoraConfig(target_modules=...)`: the LoRA targets the layer selection keeps.

    peft also wraps a module whose name ends with "." + a listed name; no listed top-level name of the SD
    denoisers (conv_in, proj_out, ...) recurs inside a block, so the list means just these modules."""
    table = table_from_model(model)
    names = _select(table, job, "lora")
    if not names:
        raise _nothing_selected(table, job, "lora")
    return names


def full_trainable_names(model, job: Job) -> list[str]:
    """Parameter names (as in `model.named_parameters()`) that train in full fine-tuning."""
    table = table_from_model(model)
    names = set(_select(table, job, "full"))
    if not names:
        raise _nothing_selected(table, job, "full")
    return [f"{m.name}.{pname}" for m in table if m.name in names for pname, _ in m.shapes]


def count_trainable(table: list[Module], job: Job) -> int:
    """Parameters that train: LoRA adds rank*(in+out) per linear and, per conv, lora_A (in->rank, the conv's
    kernel) plus lora_B (1x1, rank->out), as peft builds them; full fine-tuning trains the modules' own weights."""
    names = set(select(table, job))
    rank = job.network.rank
    total = 0
    for m in table:
        if m.name not in names:
            continue
        if job.network.kind in ADAPTER_KINDS:
            out_dim, in_dim, *kernel = dict(m.shapes)["weight"]
            total += _adapter_params(job.network, out_dim, in_dim, math.prod(kernel))  # a linear's prod() is 1
        else:
            total += m.params
    return total


def describe_trainable(job: Job, family_name: str) -> list[str]:
    """`trainer check`'s lines about what trains in the denoiser, counted from the model's headers (no torch)."""
    component = FAMILIES[family_name].denoiser
    net = job.network
    if net.kind == "none":
        return [f"trainable: nothing in the {component} (network.kind none)"]
    kind = check_model_path(job.model)
    if kind == "file":
        return ["trainable parameters: counted once the model is a local diffusers folder (model.path is a "
                "single-file checkpoint)"]
    root = Path(job.model.path).expanduser() if kind == "folder" else _hub_snapshot(job, component)
    if root is None:
        return ["trainable parameters: shown once the model is local (it is downloaded when the run starts)"]
    if not _weight_files(root / component, job.model.variant):
        return [f"trainable parameters: not counted here ({root / component} holds no .safetensors weights); "
                "`trainer estimate` counts them from the configs"]
    table = table_from_folder(root, component, job.model.variant)
    names = select(table, job)
    if not names:
        raise _nothing_selected(table, job, net.kind)
    count = count_trainable(table, job)
    total = sum(m.params for m in table)
    adapter = "DoRA" if net.dora else {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}.get(net.kind)
    what = f"{len(names)} {adapter} layers" if adapter else f"{len(names)} layers (full fine-tuning)"
    return [f"trainable: {count:,} parameters in {what} of the {component} (of {total:,} in the model)"]


def _select(table: list[Module], job: Job, kind: str) -> list[str]:
    if kind == "none":
        return []
    spec, targets = job.layers, job.network.target_modules
    kinds = {"all": None, "attention": {"attention"}, "attention_mlp": {"attention", "mlp"}}[spec.module_kinds]
    train = _blocks(table, spec.train_blocks, "layers.train_blocks") if spec.train_blocks else None
    freeze = _blocks(table, spec.freeze_blocks, "layers.freeze_blocks")
    out = []
    for m in table:
        if (train is not None and m.name not in train) or m.name in freeze:
            continue
        if (kinds is not None and _role(m) not in kinds) or (spec.exclude_adanorm and _role(m) == "adanorm"):
            continue
        if spec.include_patterns and not any(fnmatchcase(m.name, p) for p in spec.include_patterns):
            continue
        if any(fnmatchcase(m.name, p) for p in spec.exclude_patterns):
            continue
        if kind in ADAPTER_KINDS and not _is_lora_target(m, targets):
            continue
        out.append(m.name)
    return out


def _role(module: Module) -> str:
    """"attention" (a projection inside an attention module), "mlp" (a feed-forward layer), "adanorm" (the
    linear of an adaptive norm: timestep modulation), or "" for anything else."""
    if module.kind not in ("linear", "conv"):
        return ""  # norms inside attention (SD3's norm_q) are not projections
    segments = module.name.split(".")
    # `to_out.0`: the projection is item 0 of a list, so its attention module sits one level further up.
    tail_length = 2 if segments[-1].isdigit() and len(segments) > 1 else 1
    tail, parents = ".".join(segments[-tail_length:]), segments[:-tail_length]
    if segments[-1] == "linear" and parents and parents[-1].startswith("norm"):
        return "adanorm"
    if tail in ATTENTION_PROJECTIONS and parents and re.search("attn|attention", parents[-1], re.IGNORECASE):
        return "attention"
    if MLP_CONTAINERS.intersection(segments[:-1]):
        return "mlp"
    if tail in SINGLE_BLOCK_MLP and parents and parents[-2:-1] == ["single_transformer_blocks"]:
        return "mlp"
    return ""


def _is_lora_target(m: Module, targets: list[str]) -> bool:
    # peft's rule for a list of names: the module's name is one, or ends with "." + one.
    if m.kind not in ("linear", "conv"):
        return False
    return not targets or any(m.name == t or m.name.endswith("." + t) for t in targets)


def _nothing_selected(table: list[Module], job: Job, kind: str) -> JobError:
    """Say which part of the job leaves nothing to train."""
    if kind in ADAPTER_KINDS and not any(_is_lora_target(m, job.network.target_modules) for m in table):
        return JobError(f"network.target_modules: none of {', '.join(job.network.target_modules)} is a linear or "
                        "conv layer of the denoiser")
    spec = job.layers
    fields = [name for name, value in (("train_blocks", spec.train_blocks), ("freeze_blocks", spec.freeze_blocks),
                                       ("module_kinds", spec.module_kinds != "all"),
                                       ("exclude_adanorm", spec.exclude_adanorm),
                                       ("include_patterns", spec.include_patterns),
                                       ("exclude_patterns", spec.exclude_patterns)) if value]
    among = f" among network.target_modules ({', '.join(job.network.target_modules)})" if (
        kind in ADAPTER_KINDS and job.network.target_modules) else ""
    return JobError(f"{', '.join('layers.' + f for f in fields) or 'layers'}: the layer selection leaves nothing "
                    f"in the denoiser to train{among}")


def _blocks(table: list[Module], entries: list[str], field: str) -> set[str]:
    """Names of the modules inside any of the entries; an entry that matches nothing is a JobError (every
    prefix it resolves to comes from a module name, so one that resolves matches at least one module)."""
    names = [m.name for m in table]
    children = block_children(names)
    out: set[str] = set()
    for entry in entries:
        try:
            prefixes = resolve_block(entry, children)
        except BlockEntryError as exc:
            valid = ", ".join(_listing(children, exc.reached)) or "none"
            raise JobError(f"{field}: {exc}" + (f" (valid: {valid})" if "matches no" in str(exc) else "")) from None
        out |= {n for n in names for p in prefixes if n == p or n.startswith(p + ".")}
    return out


def _listing(children: dict[tuple, list[str]], prefix: tuple) -> list[str]:
    """Names under prefix, a container of numbered blocks as one range; at most LISTED_BLOCKS, then '...'."""
    out = []
    for child in children.get(prefix, []):
        path = prefix + (child,)
        name = ".".join(path)
        numbered = children.get(path, [])
        if numbered and all(c.isdigit() for c in numbered):
            first, last = numbered[0], numbered[-1]
            out.append(f"{name}.{first}" if first == last else f"{name}.{first}-{last}")
        else:
            out.append(name)
    return out[:LISTED_BLOCKS] + (["..."] if len(out) > LISTED_BLOCKS else [])


def _kind_from_shapes(name: str, shapes: dict[str, tuple[int, ...]]) -> str:
    """A module's kind from its parameters alone (what a safetensors header shows)."""
    weight = shapes.get("weight")
    if set(shapes) <= {"weight", "bias"} and weight is not None:
        if len(weight) in (3, 4, 5):
            return "conv"
        if len(weight) == 2:
            # An embedding table is a 2-D weight like a linear's, but has no bias and says what it is.
            last = name.rpartition(".")[2]
            if "bias" not in shapes and ("embedding" in last or last in ("shared", "embed_tokens",
                                                                         "relative_attention_bias")):
                return "embedding"
            return "linear"
        if all(len(s) == 1 for s in shapes.values()):
            return "norm"
    return "other"


def _weight_files(folder: Path, variant: str = "") -> list[Path]:
    """A component folder's safetensors files: one file, or the shards its index names; [] when there are none.
    The variant's files (e.g. fp16) are preferred, as diffusers loads them."""
    for stem in ("diffusion_pytorch_model", "model"):
        for var in ([variant] if variant else []) + [""]:
            single = folder / _with_variant(f"{stem}.safetensors", var)
            if single.is_file():
                return [single]
            index = folder / _with_variant(f"{stem}.safetensors.index.json", var)
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    raise JobError(f"model.path: {index}: not a readable shard index ({exc})") from None
                return [folder / name for name in sorted(set(weight_map.values()))]
    return []


def _hub_snapshot(job: Job, component: str) -> Path | None:
    """The local snapshot folder of a hub model whose component config is in the hub cache, else None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(job.model.path, f"{component}/config.json", revision=job.model.revision or None)
    return Path(found).parent.parent if isinstance(found, str) else None


def _with_variant(filename: str, variant: str) -> str:
    # diffusers' naming: the variant goes before the last suffix (model.fp16.safetensors, ...index.fp16.json).
    if not variant:
        return filename
    stem, _, suffix = filename.rpartition(".")
    return f"{stem}.{variant}.{suffix}"


def _natural(name: str) -> tuple:
    """Sort key: numbered blocks in number order (2 before 10)."""
    return tuple(_segment_key(s) for s in name.split("."))


def _segment_key(segment: str) -> tuple:
    return (0, int(segment), "") if segment.isdigit() else (1, 0, segment)


def _adapter_params(net, out_dim: int, in_dim: int, kernel: int) -> int:
    """Parameters of one adapter as peft builds it (conv kernels without the Tucker form): LoRA rank*(in*k+out)
    (lora_A carries the kernel, lora_B is 1x1) plus DoRA's magnitude per output; LoHa two such pairs; LoKr a small
    and a large Kronecker factor of the weight's factorised sides, each a full matrix or a low-rank pair."""
    r = net.rank
    if net.kind == "lora":
        return r * (in_dim * kernel + out_dim) + (out_dim if net.dora else 0)
    if net.kind == "loha":
        return 2 * r * (in_dim * kernel + out_dim)
    out_l, out_k = _factorization(out_dim, net.lokr_factor)
    in_m, in_n = _factorization(in_dim, net.lokr_factor)
    small_full = not (net.lokr_decompose_both and r < max(out_l, in_m) / 2)
    large_full = not r < max(out_k, in_n) / 2
    small = out_l * in_m if small_full else r * (out_l + in_m)
    large = out_k * in_n * kernel if large_full else r * (out_k + in_n * kernel)
    return small + large


def _factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS's (and peft's) split of a side into m <= n with m * n == dimension: `factor` itself when it
    divides, else the most balanced pair whose smaller side is at most `factor` (-1: no limit)."""
    if factor > 0 and dimension % factor == 0:
        return tuple(sorted((factor, dimension // factor)))
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > limit:
            break
        m, n = new_m, new_n
    return (m, n) if m <= n else (n, m)
