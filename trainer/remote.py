"""Train on another machine (a rented GPU) over SSH: upload a bundle, set up, start detached, follow, steer,
download. Used by `python -m trainer remote ...` and by the window's Remote tab; torch-free and Qt-free.

It runs the system's `ssh` and `rsync`, not an SSH library: the user's own ~/.ssh/config, agent, known_hosts and
keys work exactly as in their terminal (host aliases, jump hosts, hardware keys), and nothing new is installed.
rsync gives resumable uploads (--partial) and cheap repeated mirroring of the run folder; it must be installed
on both machines (every common image has it; `apt-get install rsync` otherwise), and its absence is said in one
line rather than papered over with a slower scp path.

On the remote machine, under the remote folder:

    code/              this project's files (trainer, launch.py, the locks), so both sides run the same version
    runs/NAME/         the bundle (job.json, manifest, data, model), plus trainer.pid and trainer.log
    runs/NAME/output/  the run folder; `commands/` in it takes stop / save / sample / pause / continue

Locally, the run's folder (the job's output_dir unless --local says otherwise) mirrors runs/NAME/output and holds
`remote.json`: where the run lives. Following again after the window, the terminal or the network went away
needs only that folder.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .events import COMMAND_DIR, COMMANDS, read_events
from .job import JobError, load_job

STATE = "remote.json"
REPO = Path(__file__).resolve().parent.parent
CODE = ["launch.py", "pyproject.toml", "requirements.lock", "requirements-test.lock", "README.md", "trainer", "app",
        "presets", "resources"]  # what `launch.py --setup` installs from and the trainer runs from
FOLLOW_EVERY_S = 2.0


@dataclass
class Remote:
    """Where and how to reach the machine. `python` empty: the environment is made there with
    `python3 launch.py --setup` (minutes the first time, a moment later); a path: an interpreter there that
    already has the dependencies (a prepared image), used as it is."""
    host: str
    user: str = ""
    port: int = 22
    key: str = ""
    folder: str = "sdtrainer"  # relative: in the remote user's home
    python: str = ""
    options: list[str] = field(default_factory=list)  # more ssh options, e.g. ["-o", "ProxyJump=bastion"]

    @property
    def target(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    def ssh_args(self) -> list[str]:
        # BatchMode: a key or agent, never a password prompt that would hang a window with no terminal
        args = ["ssh", "-p", str(self.port), "-o", "BatchMode=yes", "-o", "ServerAliveInterval=15"]
        if self.key:
            args += ["-i", str(Path(self.key).expanduser())]
        return args + list(self.options)


@dataclass
class RemoteRun:
    """One run on a remote machine, as `remote.json` in the local run folder records it."""
    remote: Remote
    name: str
    local: Path

    @property
    def run_dir(self) -> str:
        return f"{self.remote.folder}/runs/{self.name}"

    def target_dir(self) -> str:
        return f"{self.remote.target}:{self.run_dir}"

    @property
    def output_dir(self) -> str:
        return f"{self.run_dir}/output"

    def save(self) -> None:
        self.local.mkdir(parents=True, exist_ok=True)
        tmp = self.local / (STATE + ".tmp")
        tmp.write_text(json.dumps({"remote": asdict(self.remote), "name": self.name}, indent=1) + "\n",
                       encoding="utf-8")
        tmp.replace(self.local / STATE)

    @classmethod
    def load(cls, local: str | Path) -> "RemoteRun":
        local = Path(local)
        try:
            data = json.loads((local / STATE).read_text(encoding="utf-8"))
            return cls(Remote(**data["remote"]), str(data["name"]), local)
        except FileNotFoundError:
            raise JobError(f"{local}: no {STATE} here; pick the local folder of a remote run") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise JobError(f"{local / STATE}: not a remote run's record ({exc})") from None


# The commands, as argument lists: the window runs them in a QProcess, the terminal in subprocess.

def ssh(remote: Remote, script: str) -> list[str]:
    return remote.ssh_args() + [remote.target, script]


def rsync(remote: Remote, sources: list[str], dest: str, excludes: tuple[str, ...] = ()) -> list[str]:
    """rsync over ssh, resumable (--partial); a path prefixed with ':' is on the remote machine."""
    side = lambda p: f"{remote.target}:{shlex.quote(p[1:])}" if p.startswith(":") else p  # noqa: E731
    return (["rsync", "-a", "--partial", "-e", shlex.join(remote.ssh_args())]
            + [f"--exclude={e}" for e in excludes] + [side(p) for p in sources] + [side(dest)])


def upload_commands(run: RemoteRun, bundle: Path) -> list[list[str]]:
    code = [str(REPO / name) for name in CODE if (REPO / name).exists()]
    return [ssh(run.remote, f"mkdir -p {shlex.quote(run.remote.folder + '/code')} {shlex.quote(run.run_dir)}"),
            rsync(run.remote, code, f":{run.remote.folder}/code/", ("__pycache__",)),
            rsync(run.remote, [f"{bundle}/"], f":{run.run_dir}/")]


def setup_command(run: RemoteRun) -> list[str] | None:
    """`launch.py --setup` there (streams pip's output); None when the remote's own Python is used."""
    if run.remote.python:
        return None
    return ssh(run.remote, f"cd {shlex.quote(run.remote.folder + '/code')} && python3 launch.py --setup")


def start_command(run: RemoteRun, resume: bool = False) -> list[str]:
    """Start the trainer detached: setsid and nohup, so a closed connection or a hang-up never stops it; its pid
    goes to trainer.pid, its terminal output to trainer.log."""
    q = shlex.quote
    code = q(run.remote.folder + "/code")
    job = q(f"../runs/{run.name}/job.json")
    if run.remote.python:
        train = f"{q(run.remote.python)} -m trainer run {job}"  # from code/: this copy of the trainer runs
    else:
        train = f"python3 launch.py --headless {job}"
    if resume:
        train += " --resume"
    log, pid = q(f"../runs/{run.name}/trainer.log"), q(f"../runs/{run.name}/trainer.pid")
    return ssh(run.remote, f"cd {code} && {{ setsid nohup {train} >>{log} 2>&1 </dev/null & echo $! >{pid}; }}")


def command_command(run: RemoteRun, name: str) -> list[str]:
    if name not in COMMANDS:
        raise JobError(f"{name}: not a command ({', '.join(COMMANDS)})")
    folder = shlex.quote(f"{run.output_dir}/{COMMAND_DIR}")
    return ssh(run.remote, f"mkdir -p {folder} && touch {folder}/{name}")


def alive_command(run: RemoteRun) -> list[str]:
    """Exit 0 while the trainer's process lives."""
    return ssh(run.remote, f"kill -0 \"$(cat {shlex.quote(run.run_dir + '/trainer.pid')})\" 2>/dev/null")


def mirror_command(run: RemoteRun, checkpoints: bool = False) -> list[str]:
    """Copy what is new in the remote run folder into the local one (checkpoints only when asked: they stay
    there to resume from, and are the bulk)."""
    excludes = (COMMAND_DIR,) + (() if checkpoints else ("checkpoints",))
    return rsync(run.remote, [f":{run.output_dir}/"], f"{run.local}/", excludes)


def log_command(run: RemoteRun, lines: int = 20) -> list[str]:
    return ssh(run.remote, f"tail -n {int(lines)} {shlex.quote(run.run_dir + '/trainer.log')}")


# The terminal's steps (`python -m trainer remote ...`).

def _call(cmd: list[str], what: str, quiet: bool = False) -> None:
    if shutil.which(cmd[0]) is None:
        package = "openssh-client" if cmd[0] == "ssh" else cmd[0]
        raise JobError(f"{cmd[0]}: not installed on this machine (apt-get install {package})")
    result = subprocess.run(cmd, stdout=subprocess.PIPE if quiet else None, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        reason = (result.stderr or "").strip().splitlines()
        if result.returncode == 127 or any("rsync: command not found" in line for line in reason):
            reason = ["rsync is not installed there (apt-get install rsync on that machine)"]
        raise JobError(f"{what} failed (exit {result.returncode}): {reason[-1] if reason else 'no message'}")


def start(job_path: str | Path, remote: Remote, local: str | Path | None = None, name: str = "",
          say=print) -> RemoteRun:
    """Bundle the job with its data (and a local model), upload it, set up, and start it there. Started again
    with the same name, the upload resumes where it was cut."""
    from .bundle import bundle

    job = load_job(job_path)
    local = Path(local or job.output.output_dir).expanduser().resolve()
    name = name or f"{local.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = RemoteRun(remote, name, local)
    with tempfile.TemporaryDirectory(prefix="sdtrainer-bundle-") as tmp:
        folder = bundle(job_path, Path(tmp) / name, with_data=True, with_model=True)
        run.save()
        say(f"uploading the bundle as {run.target_dir()} (cut off? the same command with --name {name} resumes)")
        for cmd in upload_commands(run, folder):
            _call(cmd, "upload")
    launch(run)
    return run


def launch(run: RemoteRun, resume: bool = False) -> None:
    setup = setup_command(run)
    if setup is not None:
        _call(setup, "setup there (python3 launch.py --setup)")
    _call(start_command(run, resume), "start")


def follow(run: RemoteRun, out=sys.stdout, every: float = FOLLOW_EVERY_S, offset: int = 0) -> str:
    """Mirror the run folder and print its events (from `offset` of the local events.jsonl) until the trainer
    there has exited; returns the status of its last run_finished."""
    status = ""
    while True:
        alive = subprocess.run(alive_command(run), capture_output=True).returncode == 0
        _call(mirror_command(run), "download", quiet=True)  # after the check: all a finished trainer wrote
        events_path = run.local / "events.jsonl"
        events, offset = read_events(events_path, offset) if events_path.is_file() else ([], offset)
        for event in events:
            line = describe_event(event)
            if line:
                print(line, file=out, flush=True)
            if event["type"] in ("run_started", "run_finished"):  # a resumed run starts again after a stop
                status = event.get("status", "")
        if not alive:
            return status or "ended without finishing (see its log: python -m trainer remote log FOLDER)"
        time.sleep(every)


def events_end(run: RemoteRun) -> int:
    """Where following the run's new events starts: after what the local copy holds."""
    path = run.local / "events.jsonl"
    return path.stat().st_size if path.is_file() else 0


def describe_event(event: dict) -> str:
    kind = event["type"]
    if kind == "step":
        loss = "nan" if event["loss"] is None else f"{event['loss']:.4f}"
        return f"step {event['step']}: loss {loss}"
    if kind in ("sample", "checkpoint"):
        return f"{kind} at step {event['step']}: {event['path']}"
    if kind in ("paused", "continued"):
        return f"{kind} at step {event['step']}"
    if kind == "error":
        return f"error: {event['message']}"
    if kind == "run_finished":
        return f"run {event['status']}"
    if kind == "log":
        return event["message"]
    return ""


def fetch(run: RemoteRun, checkpoints: bool = False) -> None:
    _call(mirror_command(run, checkpoints), "download")


def send(run: RemoteRun, name: str) -> None:
    _call(command_command(run, name), name)
