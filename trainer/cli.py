"""The command line: `python -m trainer demo|check|estimate|run|queue|export|import|caption|...`. Exit codes are a
contract with the window and scripts.

0 completed, 1 training failed, 2 invalid job or data (one line naming the field or file), 3 stopped on request.
Torch is imported only by the commands that need it: `check --no-estimate` answers at once without it; its
memory-estimate line and `estimate` trace one step on fake tensors (seconds).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import sys
import traceback
from contextlib import nullcontext
from pathlib import Path

from .job import PROVENANCE_KEY, JobError, ModelSpec, RunFailed, load_job, save_job
from .run import disk
from .families.model_files import require_weights
from .run.checkpoint_files import resume_lines
from .run.terminal import attached

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_STOPPED = 0, 1, 2, 3


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with attached(getattr(args, "log", None)):  # a closed terminal or SIGHUP stops no command
        try:
            return args.func(args)
        except JobError as exc:
            from .run.ranks import is_main

            if is_main():  # several processes share one terminal: one line, not one per rank
                print(f"error: {exc}", file=sys.stderr)
            return EXIT_INVALID


def cmd_demo(args) -> int:
    from .demo import build_demo

    _quiet_libraries()
    job_path = build_demo(Path(args.dir).resolve(), steps=args.steps, family=args.family, method=args.method,
                          real_size=args.real_size or "")
    print(f"wrote the demo model, dataset and job: {job_path}")
    if args.real_size:
        print(f"the model has configs but no weights; estimate its memory with: python -m trainer estimate {job_path}")
    else:
        print(f"train it with: python -m trainer run {job_path}")
    return EXIT_OK


def cmd_check(args) -> int:
    from .bundle import check_beside
    from .plan import make_plan

    job = load_job(args.job, args.set)
    check_beside(args.job)
    if args.processes is not None and args.processes < 1:
        raise JobError(f"--processes: {args.processes} is not a number of processes (1 or more)")
    plan = make_plan(job, resume=args.resume, processes=args.processes)
    lines = plan.describe()  # reads the model's layer table too: a bad block name fails here
    print(f"job: {args.job} is valid")
    from .run.logbook import wandb_problem

    if wandb_problem(job):
        print(f"warning: {wandb_problem(job)}")
    for line in lines:
        print(line)
    print(disk.estimate(plan).describe(disk.free_bytes(plan.output_dir)))
    if args.resume:
        for line in resume_lines(plan.output_dir / "checkpoints"):
            print(line)
    if not args.no_estimate:
        print(_memory_line(job, plan))
    return EXIT_OK


def _memory_line(job, plan) -> str:
    """`check`'s line from the memory estimate. The job is valid whatever happens here, so a step the estimate
    cannot trace is reported in the line, and check still passes."""
    try:
        _quiet_libraries()
        from .estimate import estimate

        result = estimate(job, plan)
        if plan.world_size > 1 and job.network.kind == "full":  # what presets/accelerate/fsdp.yaml would change
            return result.summary() + "\n" + result.fsdp_line(plan.world_size)
        return result.summary()
    except Exception as exc:  # noqa: BLE001 - said in one line; `estimate` itself exits 2 on it
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"memory estimate: not available ({text})"


def cmd_estimate(args) -> int:
    import json

    from .gpus import find_gpu
    from .plan import make_plan

    job = load_job(args.job, args.set)
    gpu = find_gpu(args.gpu) if args.gpu else None  # a wrong name answers before anything slow
    if args.memory is not None and not 0 < args.memory < 10_000:
        raise JobError(f"--memory: {args.memory:g} GiB is not a GPU's memory (0 to 10000)")
    limit = args.memory if args.memory is not None else gpu.memory_gib if gpu else None
    if args.suggest is not None and not 1 <= args.suggest <= 10:
        raise JobError(f"--suggest: {args.suggest} is not a number of suggestions (1 to 10)")
    if args.suggest and limit is None:
        raise JobError("--suggest: say how much memory to fit, with --gpu NAME or --memory GIB")
    plan = make_plan(job, resume=True)  # writes nothing: a run folder already in use is no reason to refuse
    _quiet_libraries()
    from .estimate import estimate

    result = estimate(job, plan)
    if args.json:
        print(json.dumps(result.as_json(gpu, args.memory)), flush=True)
    else:
        print("\n".join(result.lines(gpu, args.memory)), flush=True)
    # Suggestions only when the job does not fit as it is; each is traced (seconds to a minute), so each is printed
    # as soon as it is found (--json: one object a line, the window shows them as they come).
    if args.suggest and result.total / 2**30 > limit:
        from .fit import lines, search_json, suggest, suggestion_json

        def found_one(suggestion) -> None:
            if args.json:
                print(json.dumps({"suggestion": suggestion_json(suggestion, gpu, args.memory)}), flush=True)

        search = suggest(job, plan, result, limit, args.suggest, found_one=found_one)
        print(json.dumps({"search": search_json(search)}) if args.json else "\n".join(lines(search, limit, gpu)))
    return EXIT_OK


def cmd_caption(args) -> int:
    if not 1 <= args.max_tokens <= 1000:
        raise JobError(f"--max-tokens: {args.max_tokens} is not between 1 and 1000")
    _quiet_libraries()
    from .caption import run_captioning

    run_captioning([Path(d).expanduser() for d in args.dataset], args.model, args.extension, args.overwrite,
                   args.prefix, args.suffix, args.prompt, args.json, args.max_tokens)
    return EXIT_OK


def cmd_devices(args) -> int:
    """The CUDA GPUs this process sees, and whether DeepSpeed is installed: the window asks here, so it never
    imports torch itself."""
    import importlib.util
    import json

    import torch

    gpus = [{"index": i, "name": torch.cuda.get_device_name(i),
             "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
            for i in range(torch.cuda.device_count())]
    deepspeed = importlib.util.find_spec("deepspeed") is not None
    if args.json:
        print(json.dumps({"gpus": gpus, "deepspeed": deepspeed}))
    else:
        for gpu in gpus:
            print(f"{gpu['index']}: {gpu['name']}, {gpu['memory_gib']:g} GiB")
        if not gpus:
            print("no CUDA GPU: training runs on the CPU")
        print("DeepSpeed: " + ("installed" if deepspeed else "not installed (presets/accelerate/fsdp.yaml needs "
                               "nothing more)"))
    return EXIT_OK


def cmd_run(args) -> int:
    import time

    from .bundle import check_beside
    from .events import Reporter, parse_address
    from .run import ranks

    job = load_job(args.job, args.set)
    check_beside(args.job)  # a bundle that arrived incomplete names its files before anything is written
    if args.events:
        try:
            parse_address(args.events)
        except ValueError as exc:
            raise JobError(str(exc)) from None
    started = time.time()
    ranks.join()  # several processes: one run over them all, or one line why not
    from .run import sharding

    if sharding.active():
        sharding.check_job(job)
    ranks.deepspeed_checkpoints(job)
    # Only rank 0 checks and creates the run folder; the others read the plan once it stands, and every rank
    # must have worked out the same one (on several machines: the same files at the same paths).
    plan = ranks.on_main(lambda: _claim_folder(job, args.resume, args.random_weights))
    try:
        plan = plan or _follower_plan(job)
        summary = {"family": plan.family, "samples": len(plan.layout.samples), "total_steps": plan.total_steps,
                   "batches_per_epoch": plan.batches_per_epoch}
    except JobError as exc:  # this rank alone: it must still reach the vote, or rank 0 would wait on it
        summary = {"error": str(exc)}
    ranks.agree(summary, "dataset")
    out = plan.output_dir
    if ranks.is_main():
        # a command file written while the dataset was scanned is this run's
        reporter = Reporter(out / "events.jsonl", args.events, plan.total_steps, stream=sys.stderr, started=started)
    else:  # its events in its own log: rank 0 names a failed rank's reason from there
        reporter = Reporter(ranks.log_path(out, ranks.rank()), None, plan.total_steps, stream=None)
    try:
        # Importing torch and diffusers and loading the model make about a million long-lived objects; each
        # collection meanwhile would walk them all again (a fifth of the start-up). train() freezes them once
        # the model is loaded and turns the collector back on.
        gc.disable()
        _quiet_libraries(need_bitsandbytes=job.optimizer.name == "adamw8bit")
        from .train import train

        with _random_weights(job) if args.random_weights else nullcontext():
            status = train(job, plan, reporter, args.resume)
        return EXIT_OK if status == "completed" else EXIT_STOPPED
    except JobError as exc:
        reporter.emit("error", message=str(exc), traceback="")
        reporter.emit("run_finished", status="failed", outputs={})
        raise
    except BaseException as exc:  # noqa: BLE001 - the reason must reach events.jsonl and the window
        tail = "".join(traceback.format_exception(exc)[-6:])
        one_line = _one_line_reason(exc)
        message = one_line or f"{type(exc).__name__}: {exc}".splitlines()[0]
        if ranks.is_main() and ranks.world_size() > 1:
            blamed = ranks.blame(out, started)  # another rank's failure broke rank 0's collective: say whose
            one_line, message = (blamed, blamed) if blamed else (one_line, message)
        reporter.emit("error", message=message, traceback=tail)
        reporter.emit("run_finished", status="failed", outputs={})
        if one_line is None and ranks.is_main():  # a bug or unforeseen failure: its traceback helps
            print(tail, file=sys.stderr)
        return EXIT_FAILED
    finally:
        gc.enable()  # also when loading failed
        reporter.close()


def cmd_queue(args) -> int:
    from .job_queue import check_all, run_all, table

    entries = check_all(args.jobs, args.set)  # all up front: a bad fifth file stops nothing hours later
    run_all(entries, args.set, args.log)
    print(table(entries))
    if any(e.status == "failed" for e in entries):
        return EXIT_FAILED
    return EXIT_STOPPED if any(e.status in ("stopped", "not run") for e in entries) else EXIT_OK


def _random_weights(job):
    """Models of a configs-only folder built with their constructors' random weights on the GPU (the CPU without
    one), in the dtype frozen weights are held in: a real-size Flux never exists in fp32 on the way."""
    import torch

    from .families import empty_models, precision

    return empty_models.from_configs("cuda" if torch.cuda.is_available() else "cpu",
                                     precision.dtypes(job.precision.mixed_precision).frozen)


def _claim_folder(job, resume: bool, random_weights: bool):
    """Rank 0 (or the only process): the plan, the model's weights (unless random ones are asked for) and the
    disk space checked, the run folder made and the resolved job written into it."""
    from .plan import make_plan

    plan = make_plan(job, resume=resume)
    if not random_weights:
        require_weights(job.model)
    disk.check_space(plan)
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    save_job(job, plan.output_dir / "job.json", extra={PROVENANCE_KEY: _provenance()})
    return plan


def _follower_plan(job):
    """Another rank's plan, once rank 0 has claimed the folder (so its contents are no reason to refuse)."""
    from .plan import make_plan

    return make_plan(job, resume=True)


def _one_line_reason(exc: BaseException) -> str | None:
    """The message of a failure one line explains (the reporter has already shown it), else None."""
    if isinstance(exc, RunFailed):
        return str(exc)
    if disk.is_full(exc):  # a sample, an export or a cache file: the same advice as for a checkpoint
        return disk.full_message(getattr(exc, "filename", None) or "the run folder")
    return None


def cmd_bundle(args) -> int:
    from .bundle import bundle, describe

    out = bundle(args.job, args.out, with_data=args.with_data, with_model=args.with_model, tar=args.tar)
    for line in describe(out):
        print(line)
    return EXIT_OK


def cmd_remote(args) -> int:
    from . import remote

    if args.action == "start":
        if not args.host:
            raise JobError("remote start: --host is needed (the machine to train on)")
        options = [part for option in args.ssh_option for part in ("-o", option)]
        where = remote.Remote(host=args.host, user=args.user, port=args.port, key=args.key, folder=args.folder,
                              python=args.python, options=options)
        run = remote.start(args.target, where, args.local, args.name)
        print(f"started {run.name} on {run.remote.target}; its files arrive in {run.local}")
        if args.no_follow:
            print(f"follow it with: python -m trainer remote follow {run.local}")
            return EXIT_OK
    else:
        run = remote.RemoteRun.load(args.target)
    if args.action in ("start", "follow", "resume"):
        offset = 0
        if args.action == "resume":
            remote.fetch(run)
            offset = remote.events_end(run)  # what the stopped run said is not said again
            remote.launch(run, resume=True)
        print("following (Ctrl-C stops following; the run goes on)")
        try:
            status = remote.follow(run, offset=offset)
        except KeyboardInterrupt:
            print(f"\nstopped following; again with: python -m trainer remote follow {run.local}")
            return EXIT_OK
        print(f"the run's files are in {run.local}")
        return {"completed": EXIT_OK, "stopped": EXIT_STOPPED}.get(status, EXIT_FAILED)
    if args.action == "fetch":
        remote.fetch(run, args.checkpoints)
        print(f"downloaded into {run.local}")
    elif args.action == "log":
        import subprocess

        return subprocess.call(remote.log_command(run, 40))
    else:
        remote.send(run, args.action)
        print(f"sent {args.action}; the trainer takes it at its next step")
    return EXIT_OK


def cmd_import(args) -> int:
    from .imports.command import import_files, write_job

    out = Path(args.out)
    if out.exists() and not args.force:  # before reading anything: nothing is written either way
        raise JobError(f"{out}: already exists; pass --force to replace it")
    imported = import_files([Path(p) for p in args.files])
    write_job(imported, out, args.force)
    for line in imported.report():
        print(line)
    print(f"wrote {out}; check it with: python -m trainer check {out}")
    return EXIT_OK


def cmd_inspect_model(args) -> int:
    from .families.detect import check_model_path
    from .inspect_model import main_json

    spec = ModelSpec(path=args.model)
    check_model_path(spec)  # a wrong path answers at once, before the libraries load
    _quiet_libraries()
    print(main_json(spec))
    return EXIT_OK


def cmd_export(args) -> int:
    from .export.command import export

    _quiet_libraries()
    out = Path(args.out) if args.out else None
    for path in export(Path(args.source), args.format, out, args.lora_scale, args.force, args.raw):
        print(f"wrote {path}")
    return EXIT_OK


def cmd_sample_cascade(args) -> int:
    from .export.cascade_lora import sample

    from pydantic import ValidationError

    from .job import ValidationSpec, first_error

    try:  # the job's own bounds for the APG settings
        guidance = ValidationSpec(guidance=args.guidance, apg_eta=args.apg_eta,
                                  apg_norm_threshold=args.apg_norm_threshold, apg_momentum=args.apg_momentum)
    except ValidationError as exc:
        raise JobError(f"--{first_error(exc).replace('_', '-')}") from None
    _quiet_libraries()
    path = sample(args.model, args.prompt, Path(args.out), lora=args.lora or "", decoder=args.decoder or "",
                  scale=args.lora_scale, negative_prompt=args.negative_prompt, steps=args.steps,
                  guidance_scale=args.guidance_scale, height=args.height, width=args.width, seed=args.seed,
                  guidance=guidance)
    print(f"wrote {path}")
    return EXIT_OK


def cmd_sample(args) -> int:
    from pydantic import ValidationError

    from .job import ValidationSpec, first_error

    try:  # the job's own bounds for the sampling and APG settings
        val = ValidationSpec(negative_prompt=args.negative, seed=args.seed, steps=args.steps,
                             guidance_scale=args.guidance_scale, guidance=args.guidance, apg_eta=args.apg_eta,
                             apg_norm_threshold=args.apg_norm_threshold, apg_momentum=args.apg_momentum)
    except ValidationError as exc:
        raise JobError(f"--{first_error(exc).replace('_', '-')}") from None
    if not args.model and not args.run:
        raise JobError("--model: required (or --run, whose job names the base model)")
    from .families.detect import check_model_path

    grid = Path(args.grid) if args.grid else None
    try:
        if args.model:  # a wrong path answers at once, before the libraries load (the window waits for it)
            check_model_path(ModelSpec(path=args.model))
        _quiet_libraries()
        from .sample import run_model, sample

        model = ModelSpec(path=args.model, config=args.config or "") if args.model else run_model(args.run)
        for image in sample(model, args.prompt, Path(args.out), val, args.lora or [], tuple(args.lora_scale),
                            args.height, args.width, runs=args.run or [], grid=grid,
                            embeddings=args.embedding or []):
            if args.json:
                print(json.dumps({"path": str(image.path), "prompt": image.prompt, "scale": image.scale,
                                  "seed": image.seed, "row": image.row, "column": image.column,
                                  "label": image.label, "source": image.source}), flush=True)
            else:
                print(f"wrote {image.path} ({image.label}, scale {image.scale:g}, seed {image.seed})", flush=True)
    except JobError as exc:  # the model's checks name the job's field; here it is the option
        raise JobError(str(exc).replace("model.path:", "--model:", 1).replace("model.config:", "--config:", 1)) \
            from None
    if grid is not None:
        print(json.dumps({"grid": str(grid)}) if args.json else f"wrote {grid} (the grid)", flush=True)
    return EXIT_OK


def _quiet_libraries(need_bitsandbytes: bool = False) -> None:
    """The libraries' import-time notices (no torchvision, no optional kernels, loading bars) bury our own
    progress; real problems still reach the user as errors. Call before importing them."""
    import logging

    _hide_bitsandbytes(not need_bitsandbytes)

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()


def _hide_bitsandbytes(hide: bool) -> None:
    """diffusers, peft and transformers import bitsandbytes whenever it is installed, and it imports torch's
    compiler: 0.7 s of every start-up, and a notice about 4-bit kernels. Only the adamw8bit optimizer uses it
    (and imports it itself), so other runs hide it: with None in sys.modules, find_spec() reports it missing."""
    if hide:
        sys.modules.setdefault("bitsandbytes", None)
    elif "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
        del sys.modules["bitsandbytes"]  # hidden by an earlier run in this process (tests run several)


def _provenance() -> dict:
    import platform
    import time

    return {"written_by": "python -m trainer run", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "python": platform.python_version(), "packages": dict(_package_versions()), "argv": sys.argv[1:]}


@functools.cache  # one process, one install: reading the metadata (tens of ms) once is enough
def _package_versions() -> tuple[tuple[str, str], ...]:
    from importlib.metadata import PackageNotFoundError, version

    versions = []
    for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "pydantic"):
        try:
            versions.append((name, version(name)))
        except PackageNotFoundError:
            pass
    return tuple(versions)


def _parser() -> argparse.ArgumentParser:
    from .export.command import FORMATS
    from .job import ValidationSpec
    from .demo import BUILDERS, METHODS
    from .real_size import MODELS as REAL_SIZE

    p = argparse.ArgumentParser(prog="python -m trainer", description="Train LoRAs for Stable Diffusion models.")
    sub = p.add_subparsers(required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="write a tiny model, dataset and job that train on any CPU in a minute")
    demo.add_argument("dir", help="an empty or new folder")
    demo.add_argument("--steps", type=int, default=40, help="training steps (default 40)")
    demo.add_argument("--family", choices=tuple(BUILDERS), default="sd1",
                      help="which tiny model to build (default sd1)")
    demo.add_argument("--method", choices=tuple(METHODS), default="lora",
                      help="how it trains: " + "; ".join(f"{k}: {v}" for k, v in METHODS.items()))
    demo.add_argument("--real-size", nargs="?", const="default", metavar="MODEL",
                      help="write the real model's configs without weights (for estimate and check): "
                      + "; ".join(f"{f}: {', '.join(n)}" for f, n in REAL_SIZE.items()) + " (the first is the default)")
    demo.set_defaults(func=cmd_demo)

    imp = sub.add_parser("import", help="turn other trainers' configs (kohya_ss GUI JSON, sd-scripts dataset "
                         "TOML, OneTrainer config and concepts.json, SimpleTuner config.json and "
                         "multidatabackend.json, ai-toolkit YAML) into a job, reporting what mapped exactly, "
                         "approximately, or not at all")
    imp.add_argument("files", nargs="+", metavar="FILE", help="config files; a config and its dataset file "
                     "combine")
    imp.add_argument("--out", required=True, metavar="JOB", help="the job file to write")
    imp.add_argument("--force", action="store_true", help="replace an existing --out file")
    imp.set_defaults(func=cmd_import)

    bundle = sub.add_parser("bundle", help="make a job ready to run on another machine: the job with paths "
                            "relative to the bundle, a manifest of every dataset file (size, sha256) and the model "
                            "reference; `run` on the other side checks every file first")
    bundle.add_argument("job", help="job file (JSON)")
    bundle.add_argument("out", help="a new or empty folder (with --tar: the .tar file)")
    bundle.add_argument("--with-data", action="store_true", help="copy the dataset and class images in")
    bundle.add_argument("--with-model", action="store_true", help="copy a local model in (a hub id is always "
                        "only named)")
    bundle.add_argument("--tar", action="store_true", help="write one .tar holding the bundle folder")
    bundle.set_defaults(func=cmd_bundle)

    rem = sub.add_parser("remote", help="train on another machine over SSH (the system's ssh and rsync): upload "
                         "a bundle, set up, start detached, follow, steer and download")
    rem.add_argument("action", choices=("start", "follow", "resume", "stop", "save", "sample", "pause", "continue",
                                        "fetch", "log"),
                     help="start JOB; the others take the local folder of a remote run (it holds remote.json)")
    rem.add_argument("target", metavar="JOB_OR_FOLDER", help="start: the job file; otherwise the run's local folder")
    rem.add_argument("--host", help="start: the machine (a name from ~/.ssh/config works)")
    rem.add_argument("--user", default="", help="start: the user there (default: ssh's)")
    rem.add_argument("--port", type=int, default=22, help="start: the SSH port (default 22)")
    rem.add_argument("--key", default="", help="start: a private key file (default: ssh's, or the agent)")
    rem.add_argument("--folder", default="sdtrainer", help="start: the folder there (relative: in the home; "
                     "default sdtrainer)")
    rem.add_argument("--python", default="", help="start: a Python there that has the dependencies already; "
                     "default: set up with python3 launch.py --setup")
    rem.add_argument("--ssh-option", action="append", default=[], metavar="OPTION",
                     help="start: an ssh -o option, e.g. ProxyJump=bastion (repeatable)")
    rem.add_argument("--local", help="start: the local folder for the run's files (default the job's output_dir)")
    rem.add_argument("--name", default="", help="start: the run's name there (again with the same name: the "
                     "upload resumes)")
    rem.add_argument("--no-follow", action="store_true", help="start: return once it started")
    rem.add_argument("--checkpoints", action="store_true", help="fetch: the checkpoints too")
    rem.set_defaults(func=cmd_remote)

    inspect = sub.add_parser("inspect-model", help="print a model's block tree with parameter counts (JSON)")
    inspect.add_argument("model", help="a local diffusers model folder")
    inspect.set_defaults(func=cmd_inspect_model)

    export = sub.add_parser("export", help="write a run's weights as LoRA files, a merged model or one "
                            "original-layout file")
    export.add_argument("source", help="a run folder (its newest complete checkpoint, else its final/ files) or "
                        "a checkpoint folder RUN/checkpoints/step-N")
    export.add_argument("--format", required=True, choices=FORMATS,
                        help="diffusers / kohya: the LoRA files (a full fine-tune: its diffusers folder); merged: "
                        "the LoRA fused into the base, as a diffusers folder; single-file: one .safetensors in "
                        "the original layout for ComfyUI and A1111")
    export.add_argument("--lora-scale", type=float, metavar="S",
                        help="merged / single-file: fuse the LoRA at this strength (default 1)")
    export.add_argument("--out", metavar="PATH", help="output folder (single-file: or a .safetensors path); "
                        "default RUN/export/FORMAT")
    export.add_argument("--force", action="store_true", help="write over an existing non-empty output")
    export.add_argument("--raw", action="store_true", help="export the raw trained weights, not their EMA")
    export.set_defaults(func=cmd_export)

    cascade = sub.add_parser("sample-cascade", help="render a prompt with Stable Cascade stage C and a trained "
                             "LoRA file (diffusers has no LoRA loader for it)")
    cascade.add_argument("--model", required=True, help="stage C: a StableCascadePriorPipeline (or combined) "
                         "diffusers folder or model id")
    cascade.add_argument("--lora", metavar="FILE", help="a run's final/pytorch_lora_weights.safetensors "
                         "(default: none, the base model)")
    cascade.add_argument("--prompt", required=True)
    cascade.add_argument("--out", required=True, metavar="PNG", help="the image to write")
    cascade.add_argument("--decoder", metavar="STAGE_B", help="stage B: a StableCascadeDecoderPipeline folder or "
                         "id, e.g. stabilityai/stable-cascade; without one (and no combined model) the PNG shows "
                         "stage C's latents (their first three channels), not an image")
    cascade.add_argument("--lora-scale", type=float, default=1.0, metavar="S", help="LoRA strength (default 1)")
    cascade.add_argument("--negative-prompt", default="")
    cascade.add_argument("--steps", type=int, default=20, help="stage C sampling steps (default 20)")
    cascade.add_argument("--guidance-scale", type=float, default=4.0, help="stage C guidance (default 4)")
    _guidance_options(cascade)
    cascade.add_argument("--height", type=int, default=1024, help="image height in pixels (default 1024)")
    cascade.add_argument("--width", type=int, default=1024, help="image width in pixels (default 1024)")
    cascade.add_argument("--seed", type=int, default=0)
    cascade.set_defaults(func=cmd_sample_cascade)

    smp = sub.add_parser("sample", help="render prompts with a base model and a trained LoRA at several strengths "
                         "(scale 0: the base model), as validation renders them (CFG or APG)")
    smp.add_argument("--model", help="base model: diffusers folder, model id or single-file .safetensors checkpoint "
                     "(default with --run: the model the run trained on)")
    smp.add_argument("--config", metavar="DIR", help="for a single-file checkpoint: a diffusers folder or id "
                     "whose configs describe it")
    smp.add_argument("--lora", metavar="FILE", action="append", help="a LoRA .safetensors file, diffusers or "
                     "kohya format; repeat for several side by side (default: none, the base model only)")
    smp.add_argument("--run", metavar="FOLDER", action="append", help="a run folder (its final/ LoRA, else its "
                     "newest checkpoint) or a checkpoint folder RUN/checkpoints/step-N; repeat for several side by "
                     "side")
    smp.add_argument("--embedding", metavar="FILE", action="append", help="a textual-inversion embedding "
                     ".safetensors file (ours, A1111's or ComfyUI's), loaded for every column: a prompt uses it by "
                     "its token; repeat for several")
    smp.add_argument("--lora-scale", type=float, nargs="+", default=[0.0, 1.0], metavar="S",
                     help="LoRA strengths, each prompt rendered with each LoRA at each (0: the base model, once; "
                     "default 0 1)")
    smp.add_argument("--prompt", required=True, action="append", help="a prompt; repeat for several")
    smp.add_argument("--negative", default="", help="negative prompt")
    smp.add_argument("--out", required=True, metavar="DIR", help="folder for the images, NN-prompt-scale.png")
    smp.add_argument("--json", action="store_true", help="one JSON object a line per image")
    smp.add_argument("--grid", metavar="PNG", help="also write all images as one grid PNG (rows: prompts, "
                     "columns: base and each LoRA at each scale) with the settings in its metadata")
    val = ValidationSpec.model_fields
    smp.add_argument("--seed", type=int, default=0, help="prompt N uses seed + N at every scale (default 0)")
    smp.add_argument("--steps", type=int, default=val["steps"].default,
                     help=f"sampling steps (default {val['steps'].default})")
    smp.add_argument("--guidance-scale", type=float, default=val["guidance_scale"].default,
                     help=f"guidance scale (default {val['guidance_scale'].default:g})")
    _guidance_options(smp)
    smp.add_argument("--height", type=int, help="image height in pixels (default: the model's)")
    smp.add_argument("--width", type=int, help="image width in pixels (default: the model's)")
    smp.set_defaults(func=cmd_sample)

    caption = sub.add_parser("caption", help="write captions for the images that have none, with an image-to-text "
                             "model through transformers (BLIP-style: BLIP, BLIP-2, GIT; not Florence-2 or chat "
                             "models)")
    caption.add_argument("dataset", nargs="+", metavar="DATASET", help="image folders (their N_name subfolders too)")
    caption.add_argument("--model", required=True, metavar="ID_OR_FOLDER", help="a hub id such as "
                         "Salesforce/blip-image-captioning-large, or a local folder")
    caption.add_argument("--overwrite", action="store_true", help="rewrite existing caption files too")
    caption.add_argument("--prefix", default="", help="put before every caption, e.g. the instance token")
    caption.add_argument("--suffix", default="", help="put after every caption")
    caption.add_argument("--prompt", default="", help="text the model continues or answers (not written into the "
                         "caption; use --prefix for that)")
    caption.add_argument("--extension", default=".txt", help="the caption file extension the dataset uses "
                         "(default .txt)")
    caption.add_argument("--max-tokens", type=int, default=60, help="longest caption in tokens (default 60)")
    caption.add_argument("--json", action="store_true", help="print a progress event per batch on stdout instead of "
                         "the progress bar (the window reads these)")
    caption.set_defaults(func=cmd_caption)

    devices = sub.add_parser("devices", help="list the CUDA GPUs this machine's trainer sees")
    devices.add_argument("--json", action="store_true",
                         help='print {"gpus": [{"index", "name", "memory_gib"}], "deepspeed": installed}')
    devices.set_defaults(func=cmd_devices)

    estimate = sub.add_parser("estimate", help="the GPU memory and time of one training step, from the model's "
                              "configs on fake tensors (no weights read, no GPU needed)")
    estimate.add_argument("job", help="job file (JSON)")
    estimate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="override a job field by its dotted path, e.g. network.rank=16")
    estimate.add_argument("--gpu", metavar="NAME", help="a GPU of the table (e.g. 'RTX 4090', h100): its time per "
                          "step and whether the run fits its memory")
    estimate.add_argument("--memory", type=float, metavar="GIB", help="whether the run fits in this much GPU memory "
                          "(with --gpu: in place of the card's nominal memory, e.g. what the driver reports)")
    estimate.add_argument("--suggest", type=int, nargs="?", const=3, metavar="N", help="when the run does not fit, "
                          "trace settings that make it fit (gradient checkpointing, 8-bit AdamW, fp8/NF4 base "
                          "weights, block swap, ...) and print up to N (default 3), each with its estimate (with --json: one object a line, the estimate first, then "
                          "{\"suggestion\": ...} each, then {\"search\": ...})")
    estimate.add_argument("--json", action="store_true", help="print one JSON object")
    estimate.set_defaults(func=cmd_estimate)

    queue = sub.add_parser("queue", help="train several jobs one after another; a failed job is marked and the "
                           "queue goes on; a summary table at the end")
    queue.add_argument("jobs", nargs="+", metavar="JOB", help="job files (JSON), run in this order")
    queue.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a field of every job by its dotted path, e.g. schedule.max_steps=500")
    queue.add_argument("--log", metavar="FILE", help="also write the terminal output to FILE (appended); "
                       "the queue goes on if the terminal closes")
    queue.set_defaults(func=cmd_queue)

    for name, func, text in (("check", cmd_check, "validate a job and its data and print the plan"),
                             ("run", cmd_run, "train")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("job", help="job file (JSON)")
        cmd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a job field by its dotted path, e.g. optimizer.learning_rate=3e-4")
        cmd.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
        cmd.set_defaults(func=func)
        if name == "check":
            cmd.add_argument("--no-estimate", action="store_true", help="leave out the memory estimate (which "
                             "imports torch and traces one step: seconds, not a moment)")
            cmd.add_argument("--processes", type=int, metavar="N", help="plan for N data-parallel processes (GPUs "
                             "over all machines), as `torchrun`/`accelerate launch` would start; default: "
                             "WORLD_SIZE when set, else 1")
        if name == "run":
            cmd.add_argument("--events", metavar="tcp://127.0.0.1:PORT",
                             help="also stream events to this loopback address (the window listens there)")
            cmd.add_argument("--log", metavar="FILE", help="also write the terminal output to FILE (appended); "
                             "the run goes on if the terminal closes")
            cmd.add_argument("--random-weights", action="store_true", help="a model folder of configs alone "
                             "trains with random weights, built on the training device in the frozen dtype: the "
                             "memory and speed of a real-size model without its weights (bench/gpu_check.py)")
    return p



def _guidance_options(parser: argparse.ArgumentParser) -> None:
    """--guidance and the APG options, with validation's defaults and descriptions (trainer/job.py)."""
    from .job import ValidationSpec

    val = ValidationSpec.model_fields
    parser.add_argument("--guidance", choices=("cfg", "apg"), default="cfg", help="classifier-free guidance, or "
                        "adaptive projected guidance (as validation.guidance)")
    for name in ("apg_eta", "apg_norm_threshold", "apg_momentum"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=val[name].default,
                            help=f"{val[name].description} (default {val[name].default:g})")


if __name__ == "__main__":
    sys.exit(main())
