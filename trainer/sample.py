"""`trainer sample`: render prompts with a base model and, side by side on one seed, LoRA files, runs and their
checkpoints at several strengths, through the family's validation pipeline and the guidance validation uses (CFG
or APG), so the images match a run's. A checkpoint is read the way `trainer export` reads it.

`render` is the one place a prompt becomes an image: training's validation calls it too.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .families import precision
from .families.detect import detect_family, family_module
from .families.table import FAMILIES
from .job import ADAPTER_KINDS, LYCORIS_ONLY, JobError, ModelSpec, ValidationSpec
from .run import guidance
from .sample_grid import write_grid

ADAPTER = "sample"  # the LoRA files are loaded as adapters sample0, sample1, ...


def render(pipe, denoiser, cfg_halves: tuple[str, ...], prompt: str, val: ValidationSpec, seed: int,
           height: int | None, width: int | None):
    """One image of `prompt` with `val`'s negative prompt, steps, guidance scale and guidance (CFG or APG)."""
    with guidance.guided(denoiser, val, cfg_halves):
        return pipe(prompt, negative_prompt=val.negative_prompt or None, num_inference_steps=val.steps,
                    guidance_scale=val.guidance_scale, height=height, width=width,
                    generator=torch.Generator().manual_seed(seed)).images[0]


@dataclass
class Sample:
    path: Path
    prompt: str
    scale: float
    seed: int
    row: int = 0  # the prompt's index
    column: int = 0  # the grid's column: 0 the base model (when rendered), then each LoRA at each scale
    label: str = "base"  # the column's LoRA: "base", a file's name, RUN/final or RUN/step-N
    source: str = ""  # the LoRA file, run folder or checkpoint folder named on the command line


@dataclass
class LoraSource:
    label: str
    given: str  # as named on the command line
    file: Path  # the LoRA file loaded: the given one, a run's final/ file, or a checkpoint exported to it
    exported: bool = False  # `file` is a checkpoint's export, gone once sampling ends


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:40] or "prompt"


def _check_lora_file(lora: str) -> Path:
    return _check_file("--lora", lora)


def _check_file(option: str, name: str) -> Path:
    path = Path(name).expanduser()
    if not path.is_file():
        raise JobError(f"{option}: {name}: no such file")
    if path.suffix.lower() != ".safetensors":
        kind = "LoRA" if option == "--lora" else "embedding"
        raise JobError(f"{option}: {name}: expected a .safetensors {kind} file")
    return path


def _check_embedding(name: str) -> Path:
    """Readable before the model loads (its header only): a wrong file costs no wait."""
    from safetensors import safe_open

    path = _check_file("--embedding", name)
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as exc:  # safetensors raises its own error type for a damaged file
        raise JobError(f"--embedding: {path}: not a readable safetensors file "
                       f"({str(exc).splitlines()[0][:200]})") from None
    return path


def check_run(run: str):
    """A run folder or one of its checkpoints, as export reads them: (its job, the run or checkpoint folder, the
    run's final/ LoRA file or None for a checkpoint). One line naming the folder when it is neither, or trained no
    LoRA diffusers can load."""
    from .export.command import LORA_FILE, resolve_source

    path = Path(run).expanduser()
    final = path / "final" / LORA_FILE
    try:
        if path.is_dir() and (path / "job.json").is_file() and final.is_file():
            # a finished run: the file it shipped, not its newest checkpoint (which may hold the EMA or be older)
            from .job import load_job

            src, use_final = None, True
            job = load_job(path / "job.json")
        else:
            src, use_final = resolve_source(path), False
            job = src.job
    except JobError as exc:
        raise JobError(f"--run: {exc}") from None
    # a full fine-tune's LoRA (text encoders only) would be sampled without the weights it trained beside it
    if job.network.kind == "full" or (job.network.kind not in ADAPTER_KINDS and job.text_encoder.mode != "lora"):
        raise JobError(f"--run: {run}: the run trained no LoRA (network.kind {job.network.kind}); sample its "
                       "final/diffusers folder as --model")
    if job.network.kind in LYCORIS_ONLY:
        raise JobError(f"--run: {run}: diffusers' pipelines load no {job.network.kind} LoRA")
    if use_final:
        return job, path.resolve(), final
    return job, src.checkpoint or src.run, None


def lora_sources(loras: list[str], runs: list[tuple[str, tuple]], scratch: Path) -> list[LoraSource]:
    """Each LoRA file as it is; each run as its final/ LoRA file, or its checkpoint exported to a diffusers LoRA
    file in `scratch` by `trainer export` (which rebuilds the model the way training did: one model load each)."""
    from .export.command import LORA_FILE, export

    sources = [LoraSource(path.name, lora, path) for lora, path in ((x, _check_lora_file(x)) for x in loras)]
    for k, (run, (_, folder, final)) in enumerate(runs):
        if final is not None:
            sources.append(LoraSource(f"{folder.name}/final", run, final))
            continue
        written = export(folder, "diffusers", scratch / f"run-{k}", raw=False)
        lora_file = next(p for p in written if p.name == LORA_FILE)
        name = folder.name if folder.parent.name != "checkpoints" else f"{folder.parent.parent.name}/{folder.name}"
        sources.append(LoraSource(name, run, lora_file, exported=True))
    return sources


def run_model(runs: list[str]) -> ModelSpec:
    """The base model the runs trained on (one for all of them: a grid compares like for like)."""
    models = [(run, check_run(run)[0].model) for run in runs]
    run, model = models[0]
    for other, spec in models[1:]:
        if spec.path != model.path:
            raise JobError(f"--run: {other}: trained on {spec.path}, {run} on {model.path}; give --model to render "
                           "both on one base model")
    return model


def sample(model: ModelSpec, prompts: list[str], out: Path, val: ValidationSpec, lora: str | list[str] = "",
           scales: tuple[float, ...] = (1.0,), height: int | None = None, width: int | None = None,
           runs: list[str] | None = None, grid: Path | None = None, embeddings: list[str] | None = None):
    """Yield each image as it is written: every prompt (seed val.seed + its index) in every column: the base model
    (when a scale is 0, or nothing else is given), then each LoRA file, run or checkpoint at each non-zero scale.
    Embedding files (textual inversion) are loaded for every column: they act only where a prompt names their
    token, so rows with and without it compare them. With `grid`, then write them all as one PNG with the
    settings in its metadata (sample_grid.py)."""
    loras = [lora] if isinstance(lora, str) else list(lora)
    loras = [x for x in loras if x]
    runs = list(runs or [])
    for path in loras:
        _check_lora_file(path)
    embedding_files = [_check_embedding(x) for x in embeddings or []]
    resolved = [(run, check_run(run)) for run in runs]
    if grid is not None and Path(grid).suffix.lower() != ".png":
        raise JobError(f"--grid: {grid}: expected a .png file")
    family_name = detect_family(model)
    family = FAMILIES[family_name]
    import diffusers

    if not hasattr(getattr(diffusers, family.pipeline_class), "load_lora_weights"):
        raise JobError(f"--model: {family.title} has no diffusers LoRA loader; use `python -m trainer "
                       "sample-cascade` for it")
    for side, value in (("--height", height), ("--width", width)):
        if value is not None and (value <= 0 or value % family.size_multiple):
            raise JobError(f"{side}: {value} is not a positive multiple of {family.size_multiple} "
                           f"({family.title})")
    with tempfile.TemporaryDirectory(prefix="sdtrainer-sample-") as scratch:
        sources = lora_sources(loras, resolved, Path(scratch))
        yield from _render_all(family_name, model, sources, prompts, out, val, scales, height, width, grid,
                               embedding_files)


def _render_all(family_name: str, model: ModelSpec, sources: list[LoraSource], prompts: list[str], out: Path,
                val: ValidationSpec, scales: tuple[float, ...], height: int | None, width: int | None,
                grid: Path | None, embeddings: list[Path]):
    family = FAMILIES[family_name]
    module = family_module(family_name)
    parts = module.load(model.model_copy(update={"family": family_name}))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # bf16 where the GPU has it (as training's validation renders), fp32 on the CPU
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    for part in (parts.vae, parts.text_encoder, parts.denoiser):
        precision.place(part, device, dtype)
    pipe = module.validation_pipeline(parts, parts.denoiser)
    for k, source in enumerate(sources):
        try:
            pipe.load_lora_weights(str(source.file.parent), weight_name=source.file.name, adapter_name=f"{ADAPTER}{k}")
        except (ValueError, KeyError, OSError) as exc:
            option = "--lora" if source.file == Path(source.given).expanduser() else "--run"
            raise JobError(f"{option}: {source.given}: not a {family.title} LoRA "
                           f"({str(exc).splitlines()[0][:200]})") from None
    if embeddings:
        from .methods.tokens import load_embeddings_into

        try:
            load_embeddings_into(pipe, embeddings)
        except JobError as exc:
            raise JobError(f"--embedding: {exc}") from None
    # (source index or None for the base model, scale)
    columns: list[tuple[int | None, float]] = [(None, 0.0)] if not sources or 0 in scales else []
    columns += [(k, scale) for k in range(len(sources)) for scale in scales if scale != 0]
    out.mkdir(parents=True, exist_ok=True)
    cells: dict[tuple[int, int], Path] = {}
    for i, prompt in enumerate(prompts):
        seed = val.seed + i
        for column, (k, scale) in enumerate(columns):
            if k is None:
                if sources:  # off, not weighted 0: the base model's image exactly
                    pipe.disable_lora()
                name, source = f"{i:02d}-{_slug(prompt)}-0.png", None
            else:
                pipe.enable_lora()
                pipe.set_adapters([f"{ADAPTER}{k}"], adapter_weights=[scale])
                source = sources[k]
                tag = f"{k + 1}-{_slug(source.label)}-" if len(sources) > 1 else ""
                name = f"{i:02d}-{_slug(prompt)}-{tag}{scale:g}.png"
            image = render(pipe, parts.denoiser, family.cfg_halves, prompt, val, seed, height, width)
            path = out / name
            image.save(path)
            cells[(i, column)] = path
            yield Sample(path, prompt, scale, seed, i, column, source.label if source else "base",
                         source.given if source else "")
    if grid is not None:
        labels = ["base" if k is None else f"{sources[k].label} x{scale:g}" for k, scale in columns]
        size = image.size
        settings = {"model": model.path, "config": model.config, "prompts": prompts,
                    "negative_prompt": val.negative_prompt, "seed": val.seed, "steps": val.steps,
                    "guidance_scale": val.guidance_scale, "guidance": val.guidance,
                    **({"apg_eta": val.apg_eta, "apg_norm_threshold": val.apg_norm_threshold,
                        "apg_momentum": val.apg_momentum} if val.guidance == "apg" else {}),
                    "width": size[0], "height": size[1], "scales": list(scales),
                    "embeddings": [str(path) for path in embeddings],
                    "columns": [{"label": label, "source": "" if k is None else sources[k].given,
                                 "file": "" if k is None or sources[k].exported else str(sources[k].file),
                                 "scale": scale}
                                for label, (k, scale) in zip(labels, columns)]}
        write_grid(Path(grid), cells, prompts, labels, settings)
