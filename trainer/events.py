"""The event stream: JSON lines the trainer writes to `events.jsonl` and, when asked, to a loopback socket.

This module is the contract between trainer and window, so it never imports torch (or Qt). The socket is
two-way: the trainer connects, sends `hello` with the run's token, streams events, and reads commands
(`stop`, `save`, `sample`) that the window sends back. Losing the socket never stops training.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import threading
import time
from pathlib import Path

TOKEN_ENV = "SDTRAINER_EVENTS_TOKEN"
COMMANDS = ("stop", "save", "sample", "pause", "continue")
# A run with no window takes the same commands as files: `touch RUN/commands/save` (how a remote run is steered
# over SSH). The trainer deletes each file as it takes the command; one written before the trainer started was
# meant for an earlier run (a window's stop that arrived after it ended) and is dropped, so a resume does not stop.
COMMAND_DIR = "commands"
STALE_SLACK_S = 2.0

# Every event has `type` and `time`; these are the other fields each type carries.
EVENT_FIELDS: dict[str, tuple[str, ...]] = {
    "run_started": ("job", "total_steps", "start_step", "output_dir"),
    # A step may also carry lrs (learning rate per parameter group), samples_s, peak_mem (bytes), grad_norm,
    # and on a GPU tflops and mfu (trainer/run/throughput.py).
    "step": ("step", "epoch", "loss", "lr", "its", "eta"),
    "val_loss": ("step", "loss", "images"),  # the loss on the held-out images (train.py: _val_loss)
    "sample": ("step", "prompt", "seed", "path"),
    "checkpoint": ("step", "path"),
    "paused": ("step",),
    "continued": ("step",),
    "log": ("level", "message"),
    "error": ("message", "traceback"),
    "run_finished": ("status", "outputs"),
    "progress": ("task", "done", "total"),  # a tool's progress (`trainer caption --json`): done of total
}
# What a field must hold for the window to show it; an event that breaks this is dropped like a torn line.
_NUMBER = (int, float, type(None))  # None: a NaN or infinite value (see `nonfinite`)
FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "step": (int,), "epoch": (int,), "total_steps": (int,), "start_step": (int,), "seed": (int,),
    "loss": _NUMBER, "lr": _NUMBER, "its": _NUMBER, "eta": _NUMBER,
    "images": (int,), "prompt": (str,), "path": (str,), "level": (str,), "message": (str,), "traceback": (str,),
    "status": (str,), "output_dir": (str,), "job": (dict,), "outputs": (dict,), "task": (str,), "done": (int,),
    "total": (int,),
}
# How the loss curve is smoothed wherever it is shown (the window's plot, TensorBoard's loss/smoothed): an EMA
# with this weight, debiased, so the first points are not pulled towards 0.
LOSS_SMOOTHING = 0.97
MAX_EVENT_BYTES = 1 << 20  # a run_started event carries the job; no event comes near this
MAX_COMMAND_BYTES = 65536  # a `sample` command may carry its prompts
MAX_SAMPLE_PROMPTS = 32
MAX_PROMPT_CHARS = 1000  # 32 of them still fit one command line
MAX_READ_BYTES = 1 << 20  # read from the socket per step at most: a flood cannot hold training up


def make_event(type_: str, **fields) -> dict:
    """An event dict, checked against EVENT_FIELDS so the two sides cannot drift apart."""
    if type_ not in EVENT_FIELDS:
        raise ValueError(f"unknown event type {type_!r}")
    missing = [f for f in EVENT_FIELDS[type_] if f not in fields]
    if missing:
        raise ValueError(f"{type_} event is missing {', '.join(missing)}")
    bad: list[str] = []
    fields = {name: _finite(value, name, bad) for name, value in fields.items()}
    if bad:
        fields["nonfinite"] = bad  # JSON has no NaN: such values are written as null and named here
    return {"type": type_, "time": round(time.time(), 3), **fields}


def _finite(value, name: str, bad: list[str]):
    """`value` with every NaN or infinite float (also inside lists and dicts) replaced by None; their dotted
    names are added to `bad`."""
    if isinstance(value, float) and not math.isfinite(value):
        bad.append(name)
        return None
    if isinstance(value, dict):
        return {k: _finite(v, f"{name}.{k}", bad) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v, f"{name}.{i}", bad) for i, v in enumerate(value)]
    return value


def encode(event: dict) -> bytes:
    return (json.dumps(event, separators=(",", ":"), allow_nan=False, default=str) + "\n").encode("utf-8")


def decode(line: bytes | str) -> dict | None:
    """One line to an event, or None for a line that is not a well-formed event (a torn last line, say)."""
    try:
        event = json.loads(line)
    except (ValueError, RecursionError):  # torn, not UTF-8, or nested deeper than the parser goes
        return None
    if not isinstance(event, dict) or event.get("type") not in EVENT_FIELDS:
        return None
    for name in EVENT_FIELDS[event["type"]]:
        if name not in event or not isinstance(event[name], FIELD_TYPES.get(name, (object,))) \
                or isinstance(event[name], bool):
            return None
    return event


class LineBuffer:
    """Bytes from a socket cut into lines. A line longer than `limit` is dropped whole, so a peer that never
    sends a newline cannot make the buffer grow."""

    def __init__(self, limit: int):
        self.limit = limit
        self._rest = b""
        self._skipping = False  # inside a line that is already too long: drop up to its newline

    def feed(self, data: bytes) -> list[bytes]:
        if self._skipping:
            if b"\n" not in data:
                return []
            data, self._skipping = data.split(b"\n", 1)[1], False
        *lines, self._rest = (self._rest + data).split(b"\n")
        if len(self._rest) > self.limit:
            self._rest, self._skipping = b"", True
        return [line for line in lines if len(line) <= self.limit]

    def pending(self) -> int:
        """Bytes held for the line not yet ended."""
        return len(self._rest)


def read_events(path: str | Path, offset: int = 0) -> tuple[list[dict], int]:
    """Events from an events.jsonl starting at byte `offset`; returns them and the offset to continue from.

    A last line without its newline is still being written: it is left for the next call.
    """
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    events = [e for e in (decode(line) for line in data[:end].splitlines()) if e is not None]
    return events, offset + end


def hello(token: str) -> bytes:
    return encode({"type": "hello", "token": token})


def hello_ok(line: bytes, token: str) -> bool:
    """The first line a client sends must be a hello carrying this run's token."""
    try:
        msg = json.loads(line)
    except (ValueError, RecursionError):
        return False
    return isinstance(msg, dict) and msg.get("type") == "hello" and msg.get("token") == token


def command(name: str, prompts: list[str] | None = None) -> bytes:
    """One command line. `sample` may carry the prompts to render, in place of the job's validation prompts."""
    if name not in COMMANDS:
        raise ValueError(f"unknown command {name!r}")
    if prompts is None:
        return encode({"command": name})
    if name != "sample" or sample_prompts(prompts) is None:
        raise ValueError(f"a {name} command cannot carry these prompts")
    return encode({"command": name, "prompts": prompts})


def sample_prompts(value) -> list[str] | None:
    """The prompts a `sample` command sent, or None when they are not a short list of short, non-empty texts."""
    if not isinstance(value, list) or not 0 < len(value) <= MAX_SAMPLE_PROMPTS:
        return None
    if not all(isinstance(p, str) and p.strip() and len(p) <= MAX_PROMPT_CHARS for p in value):
        return None
    return [p.strip() for p in value]


def _read_small(path: Path) -> str:
    with open(path, "rb") as f:
        return f.read(MAX_COMMAND_BYTES).decode("utf-8", "replace")


class Reporter:
    """Where the trainer's events go: events.jsonl always, the window's socket if given, and the terminal."""

    def __init__(self, events_path: str | Path, address: str | None = None, total_steps: int = 0,
                 stream=sys.stderr, started: float | None = None):
        """`started`: when the run began (time.time()); a command file older than that was meant for an earlier
        run. Default: now."""
        self.path = Path(events_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab")
        self._file_failed = False
        self._sock: socket.socket | None = None
        self._inbox = LineBuffer(MAX_COMMAND_BYTES)
        self._stream = stream
        self._bar = None
        self._total = total_steps
        self._last_line = 0.0
        self._listeners: list = []
        # File times come from a coarser clock than time.time() (a file made just now can look a few ms older)
        self._opened = (started or time.time()) - STALE_SLACK_S
        self._prompts: list[str] | None = None  # sent with the last `sample` command, until the trainer takes them
        if address:
            self._connect(address)

    def emit(self, type_: str, **fields) -> dict:
        event = make_event(type_, **fields)
        line = encode(event)
        try:
            self._file.write(line)
            self._file.flush()
            self._file_failed = False
        except OSError as exc:  # a full disk: the run goes on (its next checkpoint says so, in one line)
            if not self._file_failed:
                self._say(f"cannot write {self.path} ({exc.strerror or exc}); events go to the window and the "
                          "terminal only until it can")
            self._file_failed = True
        if self._sock is not None:
            try:
                self._sock.sendall(line)
            except OSError as exc:
                self._drop(f"event socket closed ({exc}); training goes on, events.jsonl still has everything")
        self._show(event)
        for listener in self._listeners:
            listener(event)
        return event

    def add_listener(self, listener) -> None:
        """`listener(event)` after each event is written (TensorBoard, W&B: trainer/run/logbook.py); its
        `close()` runs when the reporter closes."""
        self._listeners.append(listener)

    def log(self, message: str, level: str = "info") -> None:
        self.emit("log", level=level, message=message)

    def commands(self) -> list[str]:
        """Commands the window sent, or that lie as files in the run folder's `commands/`, since the last call
        (never blocks)."""
        return self._socket_commands() + self._file_commands()

    def _file_commands(self) -> list[str]:
        try:
            names = sorted(os.listdir(self.path.parent / COMMAND_DIR))
        except OSError:  # no such folder: the usual case, one failed call per step
            return []
        out = []
        for name in names:
            path = self.path.parent / COMMAND_DIR / name
            try:
                written = path.stat().st_mtime
                # `sample` may hold prompts, one a line; read before the file goes
                text = _read_small(path) if name == "sample" else ""
                os.unlink(path)
            except OSError:
                continue  # taken already, or not ours to delete: acted on by no one twice
            if name in COMMANDS and written < self._opened:
                self.log(f"{COMMAND_DIR}/{name} was written before this run started: ignored", "warning")
            elif name in COMMANDS:
                lines = [line for line in text.splitlines() if line.strip()]
                self._take_prompts(lines or None, f"{COMMAND_DIR}/{name}")
                out.append(name)
        return out

    def take_prompts(self) -> list[str] | None:
        """The prompts the last `sample` command carried (None: the job's validation prompts), once."""
        prompts, self._prompts = self._prompts, None
        return prompts

    def _take_prompts(self, value, source: str) -> None:
        if value is None:
            return
        prompts = sample_prompts(value)
        if prompts is None:
            self.log(f"{source}: the prompts sent with `sample` are not {MAX_SAMPLE_PROMPTS} or fewer non-empty "
                     f"texts of up to {MAX_PROMPT_CHARS} characters; it renders the validation prompts", "warning")
        self._prompts = prompts

    def _socket_commands(self) -> list[str]:
        if self._sock is None:
            return []
        lines, read = [], 0
        try:
            while read < MAX_READ_BYTES:
                chunk = self._sock.recv(65536)
                if not chunk:
                    self._drop("the window closed its connection; training goes on")
                    break
                read += len(chunk)
                lines += self._inbox.feed(chunk)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            self._drop(f"event socket error ({exc}); training goes on")
        out = []
        for line in lines:
            try:
                message = json.loads(line)
                name = message.get("command")
            except (ValueError, AttributeError, RecursionError):  # not JSON, not an object, nested too deep
                continue
            if name in COMMANDS:
                if name == "sample":
                    self._take_prompts(message.get("prompts"), "the window's sample command")
                out.append(name)
        return out

    def set_total(self, total_steps: int, start_step: int = 0) -> None:
        self._total = total_steps
        if self._stream is not None and self._stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, file=self._stream, unit="step",
                             dynamic_ncols=True)

    def close(self) -> None:
        for listener in self._listeners:
            listener.close()
        self._listeners = []
        if self._bar is not None:
            self._bar.close()
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None
        self._file.close()

    def _connect(self, address: str) -> None:
        host, port = parse_address(address)
        try:
            sock = socket.create_connection((host, port), timeout=5)
            sock.sendall(hello(os.environ.get(TOKEN_ENV, "")))
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = sock
        except OSError as exc:
            self._say(f"could not connect to {address} ({exc}); events go to {self.path} only")

    def _drop(self, why: str) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None
            self._say(why)

    def _show(self, event: dict) -> None:
        kind = event["type"]
        if kind == "step":
            loss = "nan" if event["loss"] is None else f"{event['loss']:.4f}"
            if self._bar is not None:
                self._bar.set_postfix(loss=loss, lr=f"{event['lr']:.2e}", refresh=False)
                self._bar.update(event["step"] - self._bar.n)
            elif time.monotonic() - self._last_line > 10 or event["step"] == self._total:
                self._last_line = time.monotonic()
                self._say(f"step {event['step']}/{self._total} loss {loss} "
                          f"{event['its']:.2f} it/s eta {event['eta']:.0f}s")
        elif kind == "log" and event["level"] != "debug":
            self._say(f"[{event['level']}] {event['message']}")
        elif kind == "error":
            self._say(f"error: {event['message']}")
        elif kind == "val_loss":
            self._say(f"validation loss at step {event['step']}: "
                      + ("nan" if event["loss"] is None else f"{event['loss']:.4f}"))
        elif kind in ("checkpoint", "sample"):
            self._say(f"{kind} at step {event['step']}: {event['path']}")
        elif kind == "run_finished":
            self._say(f"run {event['status']}")

    def _say(self, text: str) -> None:
        if self._stream is None:
            return
        if self._bar is not None:
            self._bar.write(text, file=self._stream)
        else:
            print(text, file=self._stream, flush=True)


def parse_address(address: str) -> tuple[str, int]:
    """`tcp://127.0.0.1:PORT` only: events never leave this machine."""
    if not address.startswith("tcp://"):
        raise ValueError(f"--events {address}: expected tcp://127.0.0.1:PORT")
    host, _, port = address[len("tcp://"):].rpartition(":")
    if host not in ("127.0.0.1", "localhost", "[::1]") or not port.isdigit():
        raise ValueError(f"--events {address}: expected tcp://127.0.0.1:PORT (loopback only)")
    return host.strip("[]"), int(port)


class EventListener:
    """A plain-socket listener for headless use and tests: the same handshake the window's QTcpServer does.

    Accepts one trainer at a time, refuses a client whose hello carries the wrong token, collects events,
    and can send commands back.
    """

    def __init__(self, token: str):
        self.token = token
        self.events: list[dict] = []
        self.refused = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self._server.getsockname()[1]}"
        self._client: socket.socket | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def send(self, name: str, prompts: list[str] | None = None) -> None:
        with self._lock:
            if self._client is None:
                raise RuntimeError("no trainer connected")
            self._client.sendall(command(name, prompts))

    def wait_for(self, type_: str, timeout: float = 60.0) -> dict | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for event in self.events:
                    if event["type"] == type_:
                        return event
            time.sleep(0.02)
        return None

    def close(self) -> None:
        self._server.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            reader = conn.makefile("rb")
            if not hello_ok(reader.readline(), self.token):
                with self._lock:
                    self.refused += 1
                reader.close()  # the file object holds the socket open until it is closed too
                conn.close()
                continue
            with self._lock:
                self._client = conn
            for line in reader:
                event = decode(line)
                if event is not None:
                    with self._lock:
                        self.events.append(event)
            with self._lock:
                self._client = None
