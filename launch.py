#!/usr/bin/env python3
"""Start sdtrainer: double-click this file, or run it with Python 3.10 or newer.

    python3 launch.py                          the window
    python3 launch.py --headless JOB [ARGS]    train JOB in this terminal, as `python -m trainer run JOB ARGS`
                                               (ARGS: --resume, --set KEY=VALUE ...); its exit code is passed through
    python3 launch.py --demo DIR [--steps N]   build a tiny model and dataset in DIR, train a LoRA on it (CPU, about a
                                               minute), and print where the LoRA is and how to load it in diffusers
    python3 launch.py --setup                  only install, then exit
    python3 launch.py --test [PYTEST ARGS]     install with the test tools, then run `python -m pytest -q` here

The first run creates a virtual environment in .venv next to this file and installs into it: PyTorch first, then
this project with its dependencies (`pip install -e .`). That takes a few minutes and about 2 GB; pip's output is
shown as it goes and kept in .venv/sdtrainer-setup.log. Later runs compare a stamp in .venv with pyproject.toml and the
PyTorch choice below and start at once; when either changes, the next run installs again. A failed install writes
no stamp, so the next run simply tries again. To start from scratch, delete .venv.

Which PyTorch (read on each setup):
    SDTRAINER_TORCH        the pip requirement, default "torch==2.13.0", the version this project is tested with.
                           From PyPI that is the CUDA build on Linux, the MPS build on Apple silicon, and a CPU-only
                           build on Windows.
    SDTRAINER_TORCH_INDEX  a wheel index for the PyTorch step only, e.g. https://download.pytorch.org/whl/cu128 for
                           a specific CUDA build (on Windows, the way to get a GPU build at all).
Example: SDTRAINER_TORCH_INDEX=https://download.pytorch.org/whl/cu128 python3 launch.py --setup

Inside the environment, `python -m trainer demo|check|run` and `python -m app` work from any folder
(.venv/bin/python on Linux and macOS, .venv\\Scripts\\python.exe on Windows).

This file uses the standard library only: it must run before anything is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent
VENV = REPO / ".venv"
DEFAULT_TORCH = "torch==2.13.0"
SETUP_FORMAT = 1  # bump when the install steps change, so that existing environments run them again
STAMP_NAME = "sdtrainer-setup.json"
LOG_NAME = "sdtrainer-setup.log"
REEXEC_ENV = "SDTRAINER_LAUNCHED"  # set across the re-exec into the venv: "created" (the venv is new) or "1"
EXIT_NO_TESTS = 5  # pytest: no tests collected


# ---- the command line -------------------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    """The launcher's arguments, with `mode` set to window|headless|demo|setup|test."""
    p = argparse.ArgumentParser(
        prog="launch.py", description="Start sdtrainer, installing it into .venv on the first run.",
        epilog="With no option it opens the window. See the top of launch.py for the PyTorch settings.")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--headless", nargs=argparse.REMAINDER, metavar="JOB [ARGS]",
                      help="JOB [ARGS]: train JOB in this terminal; ARGS go to `python -m trainer run`")
    mode.add_argument("--demo", metavar="DIR", help="build the tiny demo in DIR and train it")
    mode.add_argument("--setup", action="store_true", help="only install, then exit")
    mode.add_argument("--test", nargs=argparse.REMAINDER, metavar="PYTEST_ARGS",
                      help="[PYTEST ARGS]: install with the test tools and run the tests")
    p.add_argument("--steps", type=int, metavar="N", help="with --demo: training steps (the trainer's default: 40)")
    args = p.parse_args(argv)

    if args.headless is not None:
        args.mode = "headless"
        if not args.headless:
            p.error("--headless needs a job file: --headless JOB [--resume] [--set KEY=VALUE ...]")
    elif args.demo is not None:
        args.mode = "demo"
    elif args.setup:
        args.mode = "setup"
    elif args.test is not None:
        args.mode = "test"
    else:
        args.mode = "window"
    if args.steps is not None and args.mode != "demo":
        p.error("--steps goes with --demo DIR")
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be at least 1")
    return args


def no_display_hint(platform: str, env: dict) -> str | None:
    """One line when the window cannot open (Linux/BSD without X11 or Wayland, no Qt platform chosen), else None."""
    if platform in ("win32", "cygwin", "darwin"):
        return None
    if env.get("DISPLAY") or env.get("WAYLAND_DISPLAY") or env.get("QT_QPA_PLATFORM"):
        return None
    return ("No display for the window (DISPLAY and WAYLAND_DISPLAY are unset). Train in this terminal instead: "
            "python3 launch.py --headless JOB, or try it with python3 launch.py --demo DIR")


# ---- the virtual environment ------------------------------------------------------------------------------------

def venv_python(venv: Path) -> Path:
    return venv / "Scripts" / "python.exe" if os.name == "nt" else venv / "bin" / "python"


def running_in(venv: Path) -> bool:
    return os.path.realpath(sys.prefix) == os.path.realpath(venv)


def create_venv(venv: Path) -> int:
    """`python -m venv .venv` with the Python running this file; a failed attempt leaves nothing behind."""
    print("Setting up (first run only, a few minutes)...", flush=True)
    print(f"==> Creating the virtual environment {venv}", flush=True)
    existed = venv.exists()
    rc = subprocess.call([sys.executable, "-m", "venv", str(venv)])
    if rc != 0 or not venv_python(venv).exists():
        if not existed:
            shutil.rmtree(venv, ignore_errors=True)
        print(f"error: `{sys.executable} -m venv {venv}` failed (exit {rc}); on Debian/Ubuntu install the venv "
              "module first: sudo apt install python3-venv", file=sys.stderr)
        return 1
    return 0


def reexec_in_venv(venv: Path, argv: list[str], created: bool) -> int:
    """Run this file again with the venv's Python; on POSIX the process is replaced and this never returns."""
    python = str(venv_python(venv))
    cmd = [python, str(Path(__file__).resolve()), *argv]
    env = dict(os.environ, **{REEXEC_ENV: "created" if created else "1"})
    if os.name == "posix":
        os.execve(python, cmd, env)
    return call(cmd, None, env)  # Windows: execv would detach from the console, so wait for the child instead


# ---- installing: PyTorch first, then the project ----------------------------------------------------------------

def setup_key(pyproject: bytes, torch_spec: str, torch_index: str) -> str:
    """What an installation depends on. When it changes, setup runs again."""
    h = hashlib.sha256(f"format {SETUP_FORMAT}\ntorch {torch_spec}\nindex {torch_index}\n".encode())
    h.update(pyproject)
    return h.hexdigest()


def read_stamp(path: Path) -> dict | None:
    try:
        stamp = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def extras_to_install(stamp: dict | None, key: str, wanted: set[str]) -> list[str] | None:
    """None when the stamp shows an installation for `key` with all `wanted` extras; otherwise the extras to install:
    the wanted ones plus those installed before, so that `--test` once keeps the test tools through later updates."""
    had = set(stamp.get("extras", [])) if stamp else set()
    if stamp and stamp.get("key") == key and wanted <= had:
        return None
    return sorted(wanted | had)


def torch_command(python: str, torch_spec: str, torch_index: str) -> list[str]:
    cmd = [python, "-m", "pip", "install", "--disable-pip-version-check", torch_spec]
    if torch_index:
        cmd += ["--index-url", torch_index]
    return cmd


def project_command(python: str, repo: Path, extras: list[str], torch_version: str | None) -> list[str]:
    """`pip install -e REPO[extras]`, holding torch at the version just installed: without that, a dependency that
    asks for a newer torch would make pip swap the build chosen in the first step for PyPI's default one."""
    target = f"{repo}[{','.join(extras)}]" if extras else str(repo)
    cmd = [python, "-m", "pip", "install", "--disable-pip-version-check", "-e", target]
    if torch_version:
        cmd.append(f"torch=={torch_version}")
    return cmd


def installed_version(python: str, dist: str) -> str | None:
    code = "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))"
    out = subprocess.run([python, "-c", code, dist], capture_output=True, text=True)
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def run_logged(cmd: list[str], log) -> int:
    """Run a pip command, showing its output as it comes (indented) and appending it to the log."""
    log.write(("$ " + " ".join(cmd) + "\n").encode())
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        for line in iter(proc.stdout.readline, b""):
            sys.stdout.buffer.write(b"    " + line)
            sys.stdout.flush()
            log.write(line)
        return proc.wait()
    except KeyboardInterrupt:
        proc.wait()
        raise


def ensure_setup(python: str, venv: Path, repo: Path, wanted: set[str], env: dict, first_run: bool = False,
                 runner=run_logged, torch_version=installed_version) -> int:
    """Install what is missing into the venv, or nothing when the stamp matches. 0 when ready, 1 when pip failed."""
    try:
        pyproject = (repo / "pyproject.toml").read_bytes()
    except OSError:
        print(f"error: {repo / 'pyproject.toml'} is missing; launch.py must stay in the sdtrainer folder",
              file=sys.stderr)
        return 1
    torch_spec = env.get("SDTRAINER_TORCH", "").strip() or DEFAULT_TORCH
    torch_index = env.get("SDTRAINER_TORCH_INDEX", "").strip()
    key = setup_key(pyproject, torch_spec, torch_index)
    stamp_path = venv / STAMP_NAME
    stamp = read_stamp(stamp_path)
    extras = extras_to_install(stamp, key, wanted)
    if extras is None:
        return 0

    if stamp is None and not first_run:
        print("Setting up (first run only, a few minutes)...", flush=True)
    elif stamp is not None:
        print("Updating the installation (pyproject.toml, the PyTorch choice or the extras changed)...", flush=True)
    stamp_path.unlink(missing_ok=True)  # an interrupted or failed setup must run again next time
    log_path = venv / LOG_NAME
    started = time.monotonic()
    with open(log_path, "wb") as log:
        steps = [(f"PyTorch ({torch_spec}{', from ' + torch_index if torch_index else ''})",
                  lambda: torch_command(python, torch_spec, torch_index)),
                 ("sdtrainer and its dependencies" + (f" (extras: {', '.join(extras)})" if extras else ""),
                  lambda: project_command(python, repo, extras, torch_version(python, "torch")))]
        for name, make_cmd in steps:
            print(f"==> Installing {name}", flush=True)
            try:
                rc = runner(make_cmd(), log)
            except KeyboardInterrupt:
                print("\nSetup interrupted; the next run starts it again.", file=sys.stderr)
                return 130
            if rc != 0:
                print(f"error: installing {name} failed (pip exit {rc}); the full log is {log_path}. "
                      "Fix the cause and run launch.py again: it retries.", file=sys.stderr)
                return 1
    stamp_path.write_text(json.dumps({"key": key, "extras": extras, "torch": torch_spec, "torch_index": torch_index,
                                      "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2), encoding="utf-8")
    print(f"Setup finished in {time.monotonic() - started:.0f} s.", flush=True)
    return 0


# ---- what runs once the environment is ready --------------------------------------------------------------------

def child_commands(args: argparse.Namespace, python: str, repo: Path, cwd: Path) -> list[tuple[list[str], Path]]:
    """The commands a mode runs, in order, each with its working folder. Setup alone runs none."""
    if args.mode == "window":
        return [([python, "-m", "app"], cwd)]
    if args.mode == "headless":
        return [([python, "-m", "trainer", "run", *args.headless], cwd)]
    if args.mode == "demo":
        folder = demo_folder(args, cwd)
        steps = ["--steps", str(args.steps)] if args.steps is not None else []
        return [([python, "-m", "trainer", "demo", str(folder), *steps], cwd),
                ([python, "-m", "trainer", "run", str(folder / "job.json")], cwd)]
    if args.mode == "test":
        return [([python, "-m", "pytest", "-q", *args.test], repo)]
    return []


def demo_folder(args: argparse.Namespace, cwd: Path) -> Path:
    return Path(os.path.abspath(cwd / Path(args.demo).expanduser()))


def call(cmd: list[str], cwd: Path | None, env: dict | None = None) -> int:
    """Run a child in this terminal and return its exit code (128+N when signal N ended it). Ctrl-C reaches the child
    too, and it decides how to stop; a SIGTERM or SIGHUP sent to this launcher alone is passed on to the child."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env)
    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            sig = getattr(signal, name)
            previous[sig] = signal.signal(sig, lambda signum, frame: proc.send_signal(signum))
    try:
        while True:
            try:
                rc = proc.wait()
                return 128 - rc if rc < 0 else rc
            except KeyboardInterrupt:
                continue
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def demo_result(folder: Path) -> tuple[str, dict]:
    """The demo's model folder and the outputs its run reported (`run_finished` in the run's events.jsonl)."""
    job = json.loads((folder / "job.json").read_text(encoding="utf-8"))
    out_dir = Path(job["output"]["output_dir"])
    out_dir = out_dir if out_dir.is_absolute() else folder / out_dir
    outputs: dict = {}
    events = out_dir / "events.jsonl"
    if events.exists():
        for line in events.read_text(encoding="utf-8").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("type") == "run_finished":
                outputs = event.get("outputs") or {}
    return job["model"]["path"], outputs


def demo_summary(model_path: str, outputs: dict, python: str) -> str:
    """Where the LoRA is, and one command that loads it in diffusers and draws with it."""
    lora = Path(outputs["diffusers"])
    code = (f"from diffusers import DiffusionPipeline; pipe = DiffusionPipeline.from_pretrained({str(model_path)!r}); "
            f"pipe.load_lora_weights({str(lora.parent)!r}, weight_name={lora.name!r}); "
            "pipe('a red circle', height=64, width=64, num_inference_steps=4).images[0].save('demo_lora.png')")
    lines = ["", "The demo LoRA is ready:", f"  {lora}   (diffusers format)"]
    if outputs.get("kohya"):
        lines.append(f"  {outputs['kohya']}   (kohya format, for ComfyUI and A1111)")
    lines += ["Load it in diffusers (draws demo_lora.png here):", f'  {python} -c "{code}"']
    return "\n".join(lines)


def run_mode(args: argparse.Namespace, python: str, repo: Path, cwd: Path) -> int:
    rc = 0
    for cmd, where in child_commands(args, python, repo, cwd):
        rc = call(cmd, where)
        if rc != 0:
            break
    if args.mode == "test" and rc == EXIT_NO_TESTS:
        print("error: pytest collected no tests; that counts as a failure", file=sys.stderr)
    if args.mode == "demo" and rc == 0:
        model_path, outputs = demo_result(demo_folder(args, cwd))
        if not outputs.get("diffusers"):
            print("error: the demo run finished but reported no LoRA file in its events.jsonl", file=sys.stderr)
            return 1
        print(demo_summary(model_path, outputs, python))
    return rc


def main(argv: list[str] | None = None) -> int:
    if sys.version_info < (3, 10):
        print(f"error: sdtrainer needs Python 3.10 or newer; this is {sys.version.split()[0]} ({sys.executable})",
              file=sys.stderr)
        return 1
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.mode == "window":
        hint = no_display_hint(sys.platform, os.environ)
        if hint:
            print(hint, file=sys.stderr)
            return 2

    launched = os.environ.pop(REEXEC_ENV, "")
    if not running_in(VENV):
        if launched:  # guards against a loop when the venv's Python does not report the venv as its prefix
            print(f"error: {venv_python(VENV)} does not run inside {VENV}; delete {VENV} and try again",
                  file=sys.stderr)
            return 1
        created = False
        if not venv_python(VENV).exists():
            if create_venv(VENV) != 0:
                return 1
            created = True
        return reexec_in_venv(VENV, argv, created)

    wanted = {"test"} if args.mode == "test" else set()
    rc = ensure_setup(sys.executable, VENV, REPO, wanted, os.environ, first_run=launched == "created")
    if rc != 0:
        return rc
    if args.mode == "setup":
        print(f"Ready. The environment is {VENV}; start the window with: python3 launch.py")
        return 0
    return run_mode(args, sys.executable, REPO, Path.cwd())


if __name__ == "__main__":
    sys.exit(main())
