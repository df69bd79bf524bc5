"""`trainer export`: a run's trained weights as LoRA files (diffusers or kohya), a diffusers folder, a merged model
(the LoRA fused into the base at a chosen strength) or one original-layout .safetensors for ComfyUI and A1111.

From a checkpoint the model is rebuilt the way training built it (trainer/methods/trainable.py) and the checkpoint's
tensors (its EMA unless --raw) are put back, so every format comes from the same weights. A run without checkpoints
exports what its final/ folder holds. Torch is imported only once an export starts, so the command line stays quick.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from ..job import ADAPTER_KINDS, LYCORIS_ONLY, Job, JobError, load_job

FORMATS = ("diffusers", "kohya", "merged", "single-file")
LORA_FILE = "pytorch_lora_weights.safetensors"  # the diffusers-format LoRA in a run's final/ folder


@dataclass
class Source:
    """What an export reads: the run folder, its job, and the checkpoint (None: the run's final/ files)."""
    run: Path
    job: Job
    checkpoint: Path | None


def export(source: Path, fmt: str, out: Path | None = None, lora_scale: float | None = None, force: bool = False,
           raw: bool = False) -> list[Path]:
    """Export a run folder (its newest complete checkpoint, else its final/ files) or a checkpoint folder as
    `fmt`; returns the paths written. `out` defaults to RUN/export/FMT (single-file: a folder, or a .safetensors
    path); an existing non-empty output is only written over with `force`."""
    if fmt not in FORMATS:
        raise JobError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if lora_scale is not None and fmt not in ("merged", "single-file"):
        raise JobError(f"--lora-scale: only merged and single-file exports fuse the LoRA, not {fmt}")
    src = resolve_source(Path(source))
    if fmt == "kohya" and src.job.network.kind not in ADAPTER_KINDS and src.job.text_encoder.mode != "lora":
        raise JobError(f"--format kohya: the run trained no LoRA (network.kind {src.job.network.kind}, "
                       f"text_encoder.mode {src.job.text_encoder.mode}); export diffusers, merged or single-file")
    if fmt == "diffusers" and src.job.network.kind in LYCORIS_ONLY:
        raise JobError(f"--format diffusers: diffusers' pipelines load no {src.job.network.kind} LoRA; export "
                       "--format kohya (the LyCORIS layout), merged or single-file")
    target = Path(out).expanduser() if out else src.run / "export" / fmt
    if fmt == "single-file" and target.suffix.lower() != ".safetensors":
        target = target / f"{src.job.output.name}.safetensors"
    _check_free(target, force)
    from ..families.detect import detect_family, family_module
    from ..families.table import FAMILIES

    name = detect_family(src.job.model)
    lora_only = fmt == "kohya" or (fmt in ("merged", "single-file") and src.job.network.kind != "full")
    if not FAMILIES[name].kohya and lora_only:
        raise JobError(f"--format {fmt}: not available for {name} models (diffusers has no LoRA loader for them); "
                       "use --format diffusers")
    family = family_module(name)
    scale = 1.0 if lora_scale is None else lora_scale
    if src.checkpoint is not None:
        return _from_checkpoint(family, src, fmt, target, scale, raw)
    return _from_final(family, src, fmt, target, scale)


def resolve_source(path: Path) -> Source:
    """A checkpoint folder (RUN/checkpoints/step-N) or a run folder holding job.json; a one-line JobError naming
    the folder otherwise."""
    from ..run.checkpoint_files import STATE_FILE, damage, newest_good

    path = path.expanduser().resolve()
    if not path.is_dir():
        raise JobError(f"{path}: not found (expected a run folder or a checkpoint folder)")
    if path.parent.name == "checkpoints":
        if not (path / STATE_FILE).is_file():
            raise JobError(f"{path}: an incomplete checkpoint (no {STATE_FILE}); export a complete one")
        why = damage(path)
        if why:
            raise JobError(f"{path}: a damaged checkpoint ({why}); export an older one")
        run, found = path.parent.parent, path
    elif (path / "job.json").is_file():
        run, (found, passed) = path, newest_good(path / "checkpoints")
        for line in passed:
            print(f"warning: {line}; exporting an older one", file=sys.stderr)
        final = path / "final"
        if found is None and not ((final / LORA_FILE).is_file() or (final / "diffusers").is_dir()
                                  or (final / "embeddings").is_dir()):
            raise JobError(f"{path}: nothing to export (no complete checkpoint and no final/ weights)")
    else:
        raise JobError(f"{path}: not a run folder (no job.json) or a checkpoint folder (RUN/checkpoints/step-N)")
    if not (run / "job.json").is_file():
        raise JobError(f"{run / 'job.json'}: file not found (a checkpoint's run folder holds the job)")
    return Source(run, load_job(run / "job.json"), found)


def _from_checkpoint(family, src: Source, fmt: str, target: Path, scale: float, raw: bool) -> list[Path]:
    from ..run import checkpoint
    from . import lora_files
    from ..methods import trainable

    job = src.job
    state = checkpoint.read_state(src.checkpoint)
    parts = family.load(job.model)
    tr = trainable.setup(family, parts, job, max(1, int(state["step"])))
    weights, ema = checkpoint.load_weights(src.checkpoint)
    if ema is not None and job.ema.export_ema and not raw:
        weights = {**weights, **ema}  # the EMA leaves out the token rows: those come from the raw weights
    trainable.load_tensors(tr, weights, str(src.checkpoint))
    pipe = family.pipeline(parts, parts.denoiser)
    written: list[Path] = []
    if fmt in ("diffusers", "kohya"):
        states = trainable.lora_states(tr)
        if fmt == "kohya":
            info = _training_info(src, int(state["step"]), int(state.get("epoch", 0)))
            written.append(lora_files.write_lora_kohya(target / f"{job.output.name}.safetensors", family, parts, states,
                                                   job, info))
        else:
            if states:
                written.append(lora_files.write_lora_diffusers(target, family, states, tr.lora_configs, job))
            if tr.full:  # the whole model is the result; its LoRA (if any) stays a separate file beside it
                if states:
                    pipe.unload_lora_weights()  # drops the adapters unmerged
                written.append(lora_files.write_pipeline_folder(target, pipe, job))
    else:
        _fuse(pipe, list(tr.lora_configs), scale)
        written += _write_model(pipe, job, fmt, target)
    if tr.tokens is not None:
        from ..methods.tokens import save_embeddings

        folder = (target.parent if fmt == "single-file" else target) / "embeddings"
        written += save_embeddings(tr.tokens, folder, {lora_files.JOB_METADATA_KEY: lora_files.job_json(job)})
    return written


def _from_final(family, src: Source, fmt: str, target: Path, scale: float) -> list[Path]:
    """The files a finished run wrote: copied for diffusers/kohya, fused into the base for the rest."""
    from . import lora_files

    job, final = src.job, src.run / "final"
    lora, folder = final / LORA_FILE, final / "diffusers"
    embeddings = sorted((final / "embeddings").glob("*.safetensors"))
    written: list[Path] = []
    if fmt == "diffusers":
        target.mkdir(parents=True, exist_ok=True)
        if folder.is_dir():
            shutil.copytree(folder, target, dirs_exist_ok=True)
            written.append(target)
        if lora.is_file():
            written.append(Path(shutil.copy2(lora, target / LORA_FILE)))
    elif fmt == "kohya":
        kohya = final / f"{job.output.name}.safetensors"
        if not lora.is_file() and not kohya.is_file():
            raise JobError(f"--format kohya: {lora}: file not found (the run has no checkpoint to rebuild it from)")
        path = target / kohya.name
        target.mkdir(parents=True, exist_ok=True)
        if kohya.is_file():
            written.append(Path(shutil.copy2(kohya, path)))
        else:  # the run was told not to write one (output.save_kohya): convert its diffusers-format LoRA
            parts = family.load(job.model)
            info = _training_info(src, *_final_step_epoch(src))
            written.append(lora_files.write_lora_kohya(path, family, parts, _lora_file_states(lora), job, info))
    else:
        if job.network.kind in LYCORIS_ONLY:  # its only file is in the LyCORIS layout, which diffusers cannot fuse
            raise JobError(f"--format {fmt}: a {job.network.kind} run is merged from a checkpoint, and {src.run} has "
                           "none; train with output.checkpoint_every set")
        spec = job.model
        if folder.is_dir():  # a full fine-tune: its own folder is the model
            spec = spec.model_copy(update={"path": str(folder), "config": "", "revision": "", "variant": ""})
        parts = family.load(spec)
        pipe = family.pipeline(parts, parts.denoiser)
        if lora.is_file():
            pipe.load_lora_weights(str(final), weight_name=LORA_FILE)
            _fuse(pipe, sorted(_lora_file_states(lora)), scale)
        if embeddings:
            from ..methods.tokens import load_embeddings_into

            load_embeddings_into(pipe, embeddings)
        written += _write_model(pipe, job, fmt, target)
    if embeddings:
        folder_out = (target.parent if fmt == "single-file" else target) / "embeddings"
        folder_out.mkdir(parents=True, exist_ok=True)
        written += [Path(shutil.copy2(path, folder_out / path.name)) for path in embeddings]
    return written


def _write_model(pipe, job: Job, fmt: str, target: Path) -> list[Path]:
    """merged: a diffusers folder, and NAME.safetensors in it when output.save_single_file and the family has
    an original layout; single-file: the one original-layout file."""
    from .lora_files import JOB_METADATA_KEY, job_json, write_pipeline_folder
    from .single_file import original_layout, write_single_file

    metadata = {JOB_METADATA_KEY: job_json(job)}
    if fmt == "single-file":
        return [write_single_file(pipe, target, metadata)]
    written = [write_pipeline_folder(target, pipe, job)]
    if job.output.save_single_file and original_layout(pipe) is not None:
        written.append(write_single_file(pipe, target / f"{job.output.name}.safetensors", metadata))
    return written


def _fuse(pipe, components: list[str], scale: float) -> None:
    """Merge the LoRA into the weights at `scale` (W + scale * alpha/r * B @ A) and drop the adapters."""
    if components:
        pipe.fuse_lora(components=components, lora_scale=scale)
        pipe.unload_lora_weights()


def _lora_file_states(path: Path) -> dict[str, dict]:
    """A diffusers-format LoRA file (`unet.<module>.lora_A.weight`, ...) as {component: PEFT state dict}."""
    from safetensors.torch import load_file

    states: dict[str, dict] = {}
    for key, value in load_file(path).items():
        component, _, name = key.partition(".")
        states.setdefault(component, {})[name] = value
    return states


def _final_step_epoch(src: Source) -> tuple[int, int]:
    """The last step and epoch the run reported (events.jsonl), for a run exported without a checkpoint."""
    step = epoch = 0
    for event in _events(src):
        if event["type"] == "step":
            step, epoch = event["step"], event["epoch"]
    return step, epoch


def _training_info(src: Source, step: int, epoch: int) -> dict:
    """What kohya's `ss_` metadata records about training (see lora_files.kohya_metadata): the start time and total
    steps from the run's events (job.json is written as the run starts), the dataset as it is on disk."""
    from ..data.files import Scan, scan_dataset

    started_at, total = (src.run / "job.json").stat().st_mtime, step
    starts = [e for e in _events(src) if e["type"] == "run_started"]
    if starts:
        started_at, total = starts[0]["time"], starts[-1]["total_steps"]
    try:
        scan = scan_dataset(src.job.dataset)
    except JobError:  # the images may be gone by the time a run is exported; the weights do not need them
        scan = Scan()
    captions: dict[str, list[str]] = {}
    for item in scan.items:
        captions.setdefault(str(item.folder), []).append(item.caption)
    return {"num_train_images": sum(s.images * s.repeats for s in scan.subsets), "started_at": started_at,
            "step": step, "epoch": epoch, "total_steps": total, "captions_by_folder": captions,
            "folders": {str(s.folder): (s.repeats, s.images) for s in scan.subsets}}


def _events(src: Source) -> list[dict]:
    from ..events import read_events

    path = src.run / "events.jsonl"
    return read_events(path)[0] if path.is_file() else []


def _check_free(target: Path, force: bool) -> None:
    if force or not target.exists():
        return
    if target.is_file() or any(target.iterdir()):
        raise JobError(f"--out {target}: already exists and is not empty; pass --force to write over it")
