"""The one object that runs the trainer: a child process, a loopback server with a per-run token, and the
events it sends turned into typed Qt signals.

Why not QProcess: QProcess kills its child when it is destroyed, and the trainer must never depend on the
window (closing the window may leave a run going). So the child is a plain subprocess in its own session
with stdout/stderr going to a log file (a pipe to a dead window would break the trainer's next print).
A QTimer polls the child's exit status and tails the log every 100 ms, so an exit, crash or kill is seen
within a second.
"""

from __future__ import annotations

import codecs
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

from PySide6.QtCore import QObject, QTimer, Signal
from PySide6.QtNetwork import QHostAddress, QTcpServer, QTcpSocket

from trainer.events import MAX_EVENT_BYTES, TOKEN_ENV, LineBuffer, command, decode, hello_ok

from .devices import Launch
from .settings import REPO_ROOT, logs_dir, settings

EXIT_TEXT = {0: "completed", 1: "training failed", 2: "invalid job or data", 3: "stopped (resumable checkpoint saved)"}
POLL_MS = 100
CONNECT_WARN_S = 120  # importing torch and loading a model can take a while; after this, say so
MAX_HELLO_BYTES = 4096
DRAIN_S = 0.5
STALL_S = 600.0


class TrainerProcess(QObject):
    """States: idle → starting (spawned, not yet connected) → running (connected) → stopping → idle."""

    stateChanged = Signal(str)
    connected = Signal()
    refused = Signal(str)  # a connection without this run's token was closed
    eventReceived = Signal(dict)  # every event, in order
    runStarted = Signal(dict)
    stepReceived = Signal(dict)
    sampleReceived = Signal(dict)
    checkpointReceived = Signal(dict)
    pauseChanged = Signal(bool, int)  # paused (True) or continued (False), at this step
    logReceived = Signal(dict)
    errorReceived = Signal(dict)
    runFinished = Signal(dict)
    stderrText = Signal(str)  # the trainer's stdout and stderr, as they arrive
    notice = Signal(str)  # one line for the status bar
    failed = Signal(str)  # one error line, then the last lines of stderr
    finished = Signal(int, str)  # exit code (negative: killed by that signal), one-line summary
    stalled = Signal(float)  # seconds without an event while the trainer's process lives

    def __init__(self, parent: QObject | None = None, command_prefix: list[str] | None = None):
        super().__init__(parent)
        # Tests swap in a fake trainer here; the real one is `python -m trainer` run from the repo root.
        self.command_prefix = command_prefix or [sys.executable, "-m", "trainer"]
        self.launch = Launch()  # which GPUs and how: the window's Devices setting
        self.state = "idle"
        self.log_path: Path | None = None
        self._proc: subprocess.Popen | None = None
        self._token = ""
        self._server = QTcpServer(self)
        self._server.newConnection.connect(self._on_new_connection)
        self._client: QTcpSocket | None = None
        self._pending: dict[QTcpSocket, bytes] = {}
        self._inbox = LineBuffer(MAX_EVENT_BYTES)
        self._log_file = None
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._tail: deque[str] = deque(maxlen=12)
        self._partial_line = ""
        self._error_event: dict | None = None
        self._finished_status = ""  # the run_finished event's status, once it came
        self._started_at = 0.0
        self._warned_connect = False
        self._had_client = False
        self._exited_at: float | None = None
        # No event for this long while the process lives: the trainer may be hung (a deadlocked data loader, a
        # stuck GPU driver). Long enough for caching and class-image generation, which report as they go.
        self.stall_s = float(settings().value("stall_seconds", STALL_S))
        self._last_event_at = 0.0
        self._stall_shown = False
        self._timer = QTimer(self)
        self._timer.setInterval(POLL_MS)
        self._timer.timeout.connect(self._poll)

    # ---- control -------------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self._server.serverPort()}"

    @property
    def token(self) -> str:
        return self._token

    def start(self, job_path: str | Path, resume: bool = False) -> None:
        if self.state != "idle":
            raise RuntimeError("a trainer is already running")
        self._token = secrets.token_urlsafe(24)
        if not self._server.isListening() and not self._server.listen(QHostAddress.SpecialAddress.LocalHost, 0):
            raise RuntimeError(f"cannot listen on 127.0.0.1: {self._server.errorString()}")
        args, launch_env = self.command(job_path, resume)
        self.log_path = logs_dir() / f"{time.strftime('%Y%m%d-%H%M%S')}-{Path(job_path).parent.name}.log"
        self._reset_run_state()
        env = {**os.environ, **launch_env, TOKEN_ENV: self._token, "PYTHONUNBUFFERED": "1"}
        log = open(self.log_path, "wb")
        try:
            self._proc = subprocess.Popen(
                args, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                **_detach_kwargs())
        finally:
            log.close()  # the child has its own copy
        self._log_file = open(self.log_path, "rb")
        self._started_at = time.monotonic()
        self._timer.start()
        self.stderrText.emit(f"$ {' '.join(args)}\n(trainer output is also kept in {self.log_path})\n")
        self._set_state("starting")

    def command(self, job_path: str | Path, resume: bool = False) -> tuple[list[str], dict[str, str]]:
        """The trainer's command line under the Devices setting, and the environment that setting adds."""
        prefix, env = self.launch.command(self.command_prefix)
        args = [*prefix, "run", str(job_path), "--events", self.address]
        return (args + ["--resume"] if resume else args), env

    def send(self, name: str, prompts: list[str] | None = None) -> bool:
        """Send stop/save/sample/pause/continue (`sample` with its own prompts, if given); the trainer acts at its
        next step. False if no trainer is connected."""
        if self._client is None:
            self.notice.emit(f"cannot send {name}: the trainer has not connected yet")
            return False
        self._client.write(command(name, prompts))
        self._client.flush()
        if name == "stop":
            self._set_state("stopping")
        return True

    def stop(self) -> None:
        """Ask for a checkpoint and a clean exit (code 3). Before the trainer connects it has trained nothing,
        so it is terminated instead."""
        if self.state in ("idle",):
            return
        if not self.send("stop"):
            self.terminate()

    def terminate(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._set_state("stopping")
            self._proc.terminate()

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            if os.name == "nt":
                self._proc.kill()
            else:  # its own session: under a data-parallel launch its workers too, not torchrun alone
                try:
                    os.killpg(self._proc.pid, signal.SIGKILL)
                except ProcessLookupError:  # it ended meanwhile
                    pass

    def detach(self) -> None:
        """Let the run go on without the window: close our end of the socket and stop watching."""
        self._timer.stop()
        if self._client is not None:
            self._client.disconnectFromHost()
            self._client = None
        self._proc = None
        self._close_log()
        self._set_state("idle")

    # ---- socket --------------------------------------------------------------------------------------

    def _on_new_connection(self) -> None:
        while self._server.hasPendingConnections():
            sock = self._server.nextPendingConnection()
            if self._client is not None or self.state == "idle":
                self._refuse(sock, "a second connection was refused (a trainer is already connected)")
                continue
            self._pending[sock] = b""
            sock.readyRead.connect(lambda s=sock: self._on_hello_data(s))
            sock.disconnected.connect(lambda s=sock: self._pending.pop(s, None))

    def _on_hello_data(self, sock: QTcpSocket) -> None:
        if sock not in self._pending:
            return
        buf = self._pending[sock] + bytes(sock.readAll().data())
        if b"\n" not in buf:
            if len(buf) > MAX_HELLO_BYTES:
                self._refuse(sock, "a connection sent no hello line and was refused")
            else:
                self._pending[sock] = buf
            return
        line, rest = buf.split(b"\n", 1)
        del self._pending[sock]
        sock.readyRead.disconnect()
        if not hello_ok(line, self._token) or self._client is not None:
            self._refuse(sock, "a connection with a wrong token was refused")
            return
        self._client = sock
        sock.readyRead.connect(self._on_client_data)
        sock.disconnected.connect(self._on_client_disconnected)
        self._set_state("running" if self.state == "starting" else self.state)
        self.connected.emit()
        self._inbox = LineBuffer(MAX_EVENT_BYTES)
        self._dispatch_lines(rest)

    def _refuse(self, sock: QTcpSocket, why: str) -> None:
        self._pending.pop(sock, None)
        sock.abort()
        sock.deleteLater()
        self.refused.emit(why)
        self.notice.emit(why)

    def _on_client_data(self) -> None:
        if self._client is None:
            return
        self._dispatch_lines(bytes(self._client.readAll().data()))

    def _dispatch_lines(self, data: bytes) -> None:
        for line in self._inbox.feed(data):
            event = decode(line)
            if event is not None:
                self._dispatch(event)

    def _dispatch(self, event: dict) -> None:
        self._last_event_at, self._stall_shown = time.monotonic(), False
        self.eventReceived.emit(event)
        kind = event["type"]
        if kind == "error":
            self._error_event = event
        if kind == "run_finished":
            self._finished_status = event["status"]
        if kind in ("paused", "continued"):
            self.pauseChanged.emit(kind == "paused", event["step"])
            return
        signal_ = {"run_started": self.runStarted, "step": self.stepReceived, "sample": self.sampleReceived,
                   "checkpoint": self.checkpointReceived, "log": self.logReceived, "error": self.errorReceived,
                   "run_finished": self.runFinished}[kind]
        signal_.emit(event)

    def _on_client_disconnected(self) -> None:
        self._client = None
        self._poll()  # the child usually exits right after closing its socket: report it now

    # ---- child ---------------------------------------------------------------------------------------

    def _poll(self) -> None:
        self._read_log()
        if self._proc is None:
            return
        code = self._proc.poll()
        if code is None:
            if self.state == "starting" and not self._warned_connect and \
                    time.monotonic() - self._started_at > CONNECT_WARN_S:
                self._warned_connect = True
                self.notice.emit(f"the trainer (pid {self._proc.pid}) has not connected after {CONNECT_WARN_S} s; "
                                 "it is still running: see the log")
            silent = time.monotonic() - max(self._last_event_at, self._started_at)
            if self.state == "running" and not self._stall_shown and silent > self.stall_s:
                self._stall_shown = True
                self.stalled.emit(silent)
            return
        # The child has exited; its last events may still be on their way through the socket. Wait for the
        # socket to close (it does when the process ends), at most DRAIN_S, so they are shown before the exit.
        if self._client is not None:
            if self._exited_at is None:
                self._exited_at = time.monotonic()
            if time.monotonic() - self._exited_at < DRAIN_S:
                return
            self._on_client_data()
        self._read_log(final=True)
        self._timer.stop()
        self._proc = None
        self._close_log()
        was_connected = self._client is not None or self._error_event is not None or self._had_client
        if self._client is not None:
            self._client.abort()
            self._client = None
        if code == 1 and self._finished_status == "stopped":
            code = 3  # torchrun exits 1 when any worker exits non-zero, also with 3 (stopped on request)
        summary = self._summary(code, was_connected)
        self._set_state("idle")
        if code not in (0, 3):
            self.failed.emit(summary + ("\n" + "\n".join(self._tail) if self._tail else ""))
        self.finished.emit(code, summary)

    def _summary(self, code: int, was_connected: bool) -> str:
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
            head = f"The trainer was killed by signal {-code} ({name})"
        elif code in EXIT_TEXT:
            head = f"Trainer exited with code {code}: {EXIT_TEXT[code]}"
        else:
            head = f"Trainer exited with code {code}"
        if code in (0, 3):
            return head
        if not was_connected:
            head += " before it connected"
        line = self._error_line()
        return f"{head}: {line}" if line else head

    def _error_line(self) -> str:
        if self._error_event is not None:
            return str(self._error_event.get("message", "")).strip()
        for line in reversed(self._tail):
            if line.strip():
                return line.strip()
        return ""

    def _read_log(self, final: bool = False) -> None:
        if self._log_file is None:
            return
        data = self._log_file.read()
        text = self._decoder.decode(data, final=final)
        if not text:
            return
        self.stderrText.emit(text)
        lines = (self._partial_line + text).split("\n")
        self._partial_line = "" if final else lines.pop()
        self._tail.extend(line for line in lines if line.strip())

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _reset_run_state(self) -> None:
        self._tail.clear()
        self._partial_line = ""
        self._inbox = LineBuffer(MAX_EVENT_BYTES)
        self._error_event = None
        self._finished_status = ""
        self._warned_connect = False
        self._had_client = False
        self._exited_at = None
        self._decoder.reset()

    def _set_state(self, state: str) -> None:
        if state == "running":
            self._had_client = True
        if state != self.state:
            self.state = state
            self.stateChanged.emit(state)


def _detach_kwargs() -> dict:
    # Its own session (POSIX) or process group (Windows): Ctrl-C in the window's terminal, or the window
    # exiting, does not reach the trainer.
    if os.name == "nt":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}
