#!/usr/bin/env python3
"""Start sdtrainer: double-click this file, or run it with Python 3.11 or newer.

    python3 launch.py                          the window
    python3 launch.py --headless JOB [ARGS]    train JOB in this terminal, as `python -m trainer run JOB ARGS`
                                               (ARGS: --resume, --set KEY=VALUE ...); its exit code is passed through
    python3 launch.py --demo DIR [--steps N]   build a tiny model and dataset in DIR, train a LoRA on it (CPU, about a
                                               minute), and print where the LoRA is and how to load it in diffusers
    python3 launch.py --setup                  only install, then exit
    python3 launch.py --test [PYTEST ARGS]     install with the test tools, then run the suite on two cores here
    python3 launch.py --update-lock            resolve the newest allowed releases, test them in .venv-update, and
                                               rewrite requirements*.lock only when the whole suite passes

The first run creates a virtual environment in .venv next to this file and installs into it: PyTorch first, then
exactly the versions in requirements.lock (requirements-test.lock with the test tools), checked against their hashes,
then this project itself (`pip install --no-deps -e .`). That takes a few minutes and about 2 GB; pip's output is
shown as it goes and kept in .venv/sdtrainer-setup.log. Later runs compare a stamp in .venv with pyproject.toml, the
lock files and the PyTorch choice below, and the installed versions with the lock, and start at once; when one
differs, the run says what and installs the lock again. A failed install writes no stamp, so the next run simply
tries again. To start from scratch, delete .venv.

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
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent
VENV = REPO / ".venv"
DEFAULT_TORCH = "torch==2.13.0"
SETUP_FORMAT = 2  # bump when the install steps change, so that existing environments run them again
STAMP_NAME = "sdtrainer-setup.json"
LOG_NAME = "sdtrainer-setup.log"
REEXEC_ENV = "SDTRAINER_LAUNCHED"  # set across the re-exec into the venv: "created" (the venv is new) or "1"
EXIT_NO_TESTS = 5  # pytest: no tests collected
LOCK = "requirements.lock"  # every dependency but PyTorch: exact versions and hashes, one file for all platforms
TEST_LOCK = "requirements-test.lock"  # the same versions, plus the test tools
UV = "uv==0.13.9"  # resolves the lock files (--update-lock only; users never need it)
UPDATE_VENV = ".venv-update"

# Releases that install cleanly but break beside another: pyproject.toml keeps each one out (a test checks it),
# setup names one found in an existing environment, and --update-lock names the ones it holds back.
KNOWN_BAD = [
    {"package": ("transformers", ">=", "5.24"), "with": ("peft", "<", "0.22"),
     "why": "transformers 5.24 and newer refuse their adapter calls (add_adapter, set_adapter, delete_adapter, "
            "...) with peft older than 0.22, which diffusers makes on text-encoder LoRAs"},
    {"package": ("pyside6-essentials", ">=", "6.12"), "with": ("python", "<", "3.12"),
     "why": "PySide6 6.12 drops a reference to None on every call on Python older than 3.12: the window aborts"},
]


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
    mode.add_argument("--update-lock", action="store_true",
                      help="resolve the newest allowed releases, run the tests on them in .venv-update, and "
                           "rewrite the lock files only when they pass")
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
    elif args.update_lock:
        args.mode = "update-lock"
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


# ---- installing: PyTorch first, then the lock, then the project ------------------------------------------------

def setup_key(inputs: bytes, torch_spec: str, torch_index: str) -> str:
    """What an installation depends on (pyproject.toml and the lock files, as bytes). When it changes, setup runs
    again."""
    h = hashlib.sha256(f"format {SETUP_FORMAT}\ntorch {torch_spec}\nindex {torch_index}\n".encode())
    h.update(inputs)
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


def lock_for(repo: Path, extras: list[str]) -> Path:
    return repo / (TEST_LOCK if "test" in extras else LOCK)


def torch_command(python: str, torch_spec: str, torch_index: str) -> list[str]:
    cmd = [python, "-m", "pip", "install", "--disable-pip-version-check", torch_spec]
    if torch_index:
        cmd += ["--index-url", torch_index]
    return cmd


def lock_command(python: str, lock: Path) -> list[str]:
    """Exactly the lock: no resolving (--no-deps), every file checked against its hash. PyTorch is not in it, so
    the build installed first stays."""
    return [python, "-m", "pip", "install", "--disable-pip-version-check", "--require-hashes", "--no-deps",
            "-r", str(lock)]


def project_command(python: str, repo: Path) -> list[str]:
    return [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-deps", "-e", str(repo)]


def check_command(python: str) -> list[str]:
    """Every installed package's requirements hold, PyTorch's version included."""
    return [python, "-m", "pip", "check", "--disable-pip-version-check"]


def install_steps(python: str, repo: Path, lock: Path, torch_spec: str, torch_index: str) -> list[tuple[str, list]]:
    """(what, pip command) in order: PyTorch, the lock, this project, the consistency check."""
    return [(f"Installing PyTorch ({torch_spec}{', from ' + torch_index if torch_index else ''})",
             torch_command(python, torch_spec, torch_index)),
            (f"Installing the locked dependencies ({lock.name})", lock_command(python, lock)),
            ("Installing sdtrainer", project_command(python, repo)),
            ("Checking that the installed versions fit each other (pip check)", check_command(python))]


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


def run_steps(steps: list[tuple[str, list]], log, log_path: Path, runner=None) -> int:
    """Run (what, command) steps in order, stopping at the first that fails: 0, 1 (said why) or 130 (Ctrl-C)."""
    for name, cmd in steps:
        print(f"==> {name}", flush=True)
        try:
            rc = (runner or run_logged)(cmd, log)
        except KeyboardInterrupt:
            print("\nSetup interrupted; the next run starts it again.", file=sys.stderr)
            return 130
        if rc != 0:
            print(f"error: {name} failed (pip exit {rc}); the full log is {log_path}. "
                  "Fix the cause and run launch.py again: it retries.", file=sys.stderr)
            return 1
    return 0


def ensure_setup(python: str, venv: Path, repo: Path, wanted: set[str], env: dict, first_run: bool = False,
                 runner=None, installed=None) -> int:
    """Install what is missing into the venv, or nothing when the stamp matches and the installed versions are the
    lock's. 0 when ready, 1 when pip failed. `installed`: {name: version} of the environment (read when None)."""
    try:
        inputs = b"".join((repo / name).read_bytes() for name in ("pyproject.toml", LOCK, TEST_LOCK))
    except OSError as exc:
        print(f"error: {exc.filename} is missing; launch.py must stay in the sdtrainer folder", file=sys.stderr)
        return 1
    torch_spec = env.get("SDTRAINER_TORCH", "").strip() or DEFAULT_TORCH
    torch_index = env.get("SDTRAINER_TORCH_INDEX", "").strip()
    key = setup_key(inputs, torch_spec, torch_index)
    stamp_path = venv / STAMP_NAME
    stamp = read_stamp(stamp_path)
    extras = extras_to_install(stamp, key, wanted)
    if extras is None:
        extras = sorted(stamp.get("extras", []))
        problems = environment_problems(lock_for(repo, extras).read_text(encoding="utf-8"),
                                        installed_versions() if installed is None else installed)
        if not problems:
            return 0
        for line in problems:
            print(f"The environment differs from the lock: {line}", flush=True)
        print("Installing the lock again...", flush=True)
    elif stamp is None and not first_run:
        print("Setting up (first run only, a few minutes)...", flush=True)
    elif stamp is not None:
        print("Updating the installation (pyproject.toml, the lock, the PyTorch choice or the extras changed)...",
              flush=True)
    stamp_path.unlink(missing_ok=True)  # an interrupted or failed setup must run again next time
    log_path = venv / LOG_NAME
    started = time.monotonic()
    with open(log_path, "wb") as log:
        rc = run_steps(install_steps(python, repo, lock_for(repo, extras), torch_spec, torch_index), log, log_path,
                       runner)
    if rc != 0:
        return rc
    stamp_path.write_text(json.dumps({"key": key, "extras": extras, "torch": torch_spec, "torch_index": torch_index,
                                      "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2), encoding="utf-8")
    print(f"Setup finished in {time.monotonic() - started:.0f} s.", flush=True)
    return 0


# ---- the lock: reading it, and comparing an environment with it -------------------------------------------------

def parse_lock(text: str) -> dict[str, set[str]]:
    """{normalized name: versions} of a requirements lock (a name may have one version per Python range)."""
    pins: dict[str, set[str]] = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", line)
        if m:
            pins.setdefault(normalize(m.group(1)), set()).add(m.group(2))
    return pins


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_versions() -> dict[str, str]:
    """{normalized name: version} of what this interpreter's environment holds."""
    import importlib.metadata

    return {normalize(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()
            if d.metadata["Name"]}


def environment_problems(lock_text: str, installed: dict[str, str]) -> list[str]:
    """One line for each locked package installed at another version, and for each known-bad pair present."""
    problems = []
    for name, versions in sorted(parse_lock(lock_text).items()):
        have = installed.get(name)
        if have is not None and have not in versions:
            problems.append(f"{name} {have} is installed; the lock has {' or '.join(sorted(versions))}")
    return problems + [line for line, _ in known_bad_found(installed)]


def known_bad_found(versions: dict[str, str]) -> list[tuple[str, str]]:
    """(one line naming the pair and why, the package to hold back) for each KNOWN_BAD pair in `versions`
    ({name: version}; "python" is this interpreter unless given)."""
    versions = {"python": platform.python_version(), **versions}
    found = []
    for rule in KNOWN_BAD:
        (name, op, bound), (other, other_op, other_bound) = rule["package"], rule["with"]
        if name in versions and other in versions and version_matches(versions[name], op, bound) \
                and version_matches(versions[other], other_op, other_bound):
            found.append((f"{name} {versions[name]} with {other} {versions[other]}: {rule['why']}", name))
    return found


def version_matches(version: str, op: str, bound: str) -> bool:
    """`version op bound` on release numbers (enough for the bounds in KNOWN_BAD; pre-release tags are ignored)."""
    a, b = _release(version), _release(bound)
    width = max(len(a), len(b))
    a, b = a + (0,) * (width - len(a)), b + (0,) * (width - len(b))
    return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b, "==": a == b}[op]


def _release(version: str) -> tuple[int, ...]:
    m = re.match(r"\d+(\.\d+)*", version.strip())
    return tuple(int(x) for x in m.group(0).split(".")) if m else (0,)


# ---- --update-lock: the newest allowed releases, tested before they reach the lock --------------------------------

def update_lock(repo: Path, env: dict, runner=None) -> int:
    """Resolve the newest releases pyproject.toml allows (uv, one universal file per lock), name what pyproject.toml
    holds back and why, install the candidate into a fresh .venv-update and run the whole suite there. Only a green
    suite rewrites requirements.lock and requirements-test.lock; a red one prints the failing tests and what
    changed. 0 when the lock is current or updated, 1 otherwise."""
    work = repo / UPDATE_VENV
    shutil.rmtree(work, ignore_errors=True)
    print(f"==> Creating the separate environment {work}", flush=True)
    if subprocess.call([sys.executable, "-m", "venv", str(work)]) != 0:
        print(f"error: `{sys.executable} -m venv {work}` failed", file=sys.stderr)
        return 1
    python = str(venv_python(work))
    torch_spec = env.get("SDTRAINER_TORCH", "").strip() or DEFAULT_TORCH
    torch_index = env.get("SDTRAINER_TORCH_INDEX", "").strip()
    log_path = work / LOG_NAME
    with open(log_path, "wb") as log:
        def step(name: str, cmd: list[str]) -> bool:
            return run_steps([(name, cmd)], log, log_path, runner) == 0

        if not step(f"Installing the resolver ({UV})", [python, "-m", "pip", "install", "--disable-pip-version-check",
                                                        UV]):
            return 1
        (work / "torch.txt").write_text(torch_spec + "\n", encoding="utf-8")
        (work / "uncapped.in").write_text("\n".join(uncapped_requirements(repo / "pyproject.toml")) + "\n",
                                          encoding="utf-8")
        # Paths relative to the repository (uv changes into it), so the files name no folder of this machine.
        # One file for every platform and Python (--universal); where Pythons could take different versions, the
        # fewest versions, so that a run of the suite on one Python covers as much of the lock as it can.
        compile_ = [python, "-m", "uv", "--directory", str(repo), "pip", "compile", "--universal",
                    "--fork-strategy", "fewest", "--quiet", "--python-version", "3.11",
                    "--custom-compile-command", "python3 launch.py --update-lock",
                    "-c", f"{UPDATE_VENV}/torch.txt"]
        out = f"{UPDATE_VENV}/"
        if not step("Resolving the newest allowed releases", [*compile_, "pyproject.toml", "--extra", "test",
                                                               "-o", out + "resolved.txt"]):
            return 1
        # PyTorch's install brings its own dependencies (CUDA libraries, triton...), matching the build chosen.
        left_out = ["torch", *sorted(torch_only((work / "resolved.txt").read_text(encoding="utf-8")))]
        no_emit = [arg for name in left_out for arg in ("--no-emit-package", name)]
        hashed = [*compile_, "--generate-hashes", *no_emit]
        if not (step("Writing the candidate test lock", [*hashed, "pyproject.toml", "--extra", "test",
                                                         "-o", out + TEST_LOCK])
                and step("Writing the candidate lock", [*hashed, "pyproject.toml", "-c", out + TEST_LOCK,
                                                        "-o", out + LOCK])
                and step("Resolving without pyproject.toml's upper bounds (to name what they hold back)",
                         [*compile_, f"{UPDATE_VENV}/uncapped.in", "-o", out + "uncapped.txt"])):
            return 1
    old = parse_lock((repo / TEST_LOCK).read_text(encoding="utf-8")) if (repo / TEST_LOCK).exists() else {}
    new = parse_lock((work / TEST_LOCK).read_text(encoding="utf-8"))
    for line in held_back(new, parse_lock((work / "uncapped.txt").read_text(encoding="utf-8"))):
        print(f"Held back: {line}")
    changes = lock_changes(old, new)
    if not changes:
        print("The lock already has the newest allowed releases; nothing to test.")
        return 0
    print("Changes from the current lock:\n" + "\n".join(f"  {c}" for c in changes), flush=True)
    with open(log_path, "ab") as log:
        installed = run_steps(install_steps(python, repo, work / TEST_LOCK, torch_spec, torch_index), log,
                              log_path, runner) == 0
    junit = work / "junit.xml"
    rc = call([*pytest_command(python), "-p", "no:cacheprovider", f"--junitxml={junit}"], repo) if installed \
        else 1
    if rc == 0:
        for name in (LOCK, TEST_LOCK):
            shutil.copyfile(work / name, repo / name)
        print(f"Green: {LOCK} and {TEST_LOCK} rewritten with the changes above; commit them.")
        return 0
    failing = failed_tests(junit) if junit.exists() else []
    print(f"Red: the lock is unchanged ({'the candidate did not install' if not installed else 'tests failed'}).")
    if failing:
        print("Failing tests:\n" + "\n".join(f"  {t}" for t in failing))
    print("Packages that changed:\n" + "\n".join(f"  {c}" for c in changes))
    return 1


def uncapped_requirements(pyproject: Path) -> list[str]:
    """pyproject.toml's dependencies and test tools without their upper bounds: what the newest releases would be."""
    import tomllib

    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    out = []
    for requirement in [*project["dependencies"], *project.get("optional-dependencies", {}).get("test", [])]:
        spec, sep, marker = requirement.partition(";")
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*(?:\[[^\]]*\])?)(.*)", spec)
        kept = [c.strip() for c in m.group(2).split(",") if c.strip() and not c.strip().startswith(("<", "!="))]
        out.append(m.group(1) + ",".join(kept) + (f";{marker}" if sep else ""))
    return out


def torch_only(resolved: str) -> set[str]:
    """Packages in a uv resolution (with its `# via` notes) that only PyTorch, or packages only it needs, require."""
    via: dict[str, set[str]] = {}
    current = None
    for line in resolved.splitlines():
        pin = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==", line)
        one = re.match(r"^\s+# via\s*(\S*)", line)
        more = re.match(r"^\s+#\s{3}(\S+)", line)
        if pin:
            current = normalize(pin.group(1))
            via.setdefault(current, set())
        elif current and (one or more):
            parent = (one or more).group(1)
            if parent:
                via[current].add(normalize(parent))
    only = {"torch"}
    grew = True
    while grew:
        grew = False
        for name, parents in via.items():
            if name not in only and parents and parents <= only:
                only.add(name)
                grew = True
    return only - {"torch"}


def lock_changes(old: dict[str, set[str]], new: dict[str, set[str]]) -> list[str]:
    out = []
    for name in sorted(old.keys() | new.keys()):
        before, after = " or ".join(sorted(old.get(name, []))), " or ".join(sorted(new.get(name, [])))
        if before != after:
            out.append(f"{name}: {before or '(new)'} -> {after or '(removed)'}")
    return out


def held_back(locked: dict[str, set[str]], newest: dict[str, set[str]]) -> list[str]:
    """One line for each package whose newest release the lock does not take, with the known reason if any."""
    top = {name: max(versions, key=_release) for name, versions in newest.items()}
    reasons = {name: line for line, name in known_bad_found(top)}
    out = []
    for name in sorted(top.keys() & locked.keys()):
        kept = max(locked[name], key=_release)
        if _release(top[name]) > _release(kept):
            why = reasons.get(name, "pyproject.toml's upper bounds keep it, directly or through what needs it")
            out.append(f"{name} {top[name]} is out; the lock keeps {kept}. {why}")
    return out


def failed_tests(junit: Path) -> list[str]:
    """`file::test` of every failed or erroring test case in a pytest JUnit XML report."""
    import xml.etree.ElementTree as ET

    failed = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname', '')}::{case.get('name', '')}")
    return failed


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
        return [([*pytest_command(python), *args.test], repo)]
    return []


def pytest_command(python: str) -> list[str]:
    """The suite on up to two worker processes (pytest-xdist): the runs it trains keep one core busy each, so the
    suite takes about half as long on the 2-core machines CI and most laptops have. Each module stays on one worker
    (`--dist loadfile`), so what its module fixtures build is built once. (`--dist loadgroup` would split finer,
    but pytest-xdist 3.8 cannot name the groups under pytest 9: its tests land anywhere.)"""
    workers = min(2, os.cpu_count() or 1)
    return [python, "-m", "pytest", "-q", *(["-n", str(workers), "--dist", "loadfile"] if workers > 1 else [])]


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
    if sys.version_info < (3, 11):
        print(f"error: sdtrainer needs Python 3.11 or newer; this is {sys.version.split()[0]} ({sys.executable})",
              file=sys.stderr)
        return 1
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.mode == "update-lock":
        return update_lock(REPO, os.environ)
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
