"""The Remote tab: train the form's job on another machine over SSH (a rented GPU).

Every step is the terminal's own command, `python -m trainer remote ...` (trainer/remote.py), run as a QProcess:
the window adds no second implementation, and what it does can be repeated by hand. Following is that command's
`follow` (it mirrors the remote run folder here every two seconds); the window's run view reads the mirrored
events.jsonl like any run folder. A follow cut off by the network is started again after a pause; which run is
followed is kept in the window's settings, so a window opened later follows it again.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from PySide6.QtCore import QProcess, QTimer, Signal
from PySide6.QtWidgets import (QFormLayout, QHBoxLayout, QLabel, QLineEdit, QPlainTextEdit, QPushButton, QSpinBox,
                               QVBoxLayout, QWidget)

from .child import trainer_child
from .settings import settings

GROUP = "remote"
FIELDS = ("host", "user", "port", "key", "folder", "python", "options")
RUN_KEY = "remote/run"  # the local folder of the remote run being followed
RETRY_MS = 3000
EXIT_INVALID, EXIT_STOPPED = 2, 3  # trainer/cli.py's exit codes


class RemotePanel(QWidget):
    runFolderReady = Signal(str)  # the local copy has an events.jsonl: show it in the run view
    statusChanged = Signal(str)

    def __init__(self, parent: QWidget | None = None, trainer_command: list[str] | None = None):
        super().__init__(parent)
        self.trainer_command = trainer_command or [sys.executable, "-m", "trainer"]
        self.job_file = lambda: None  # the window sets it: the form's job written to a file, with its local folder
        self.local: Path | None = None
        self.status = "idle"  # idle, starting, following, stopped, completed, failed, retrying
        self._want_follow = False
        self._announced = False
        self.host, self.user, self.key = QLineEdit(), QLineEdit(), QLineEdit()
        self.folder, self.python, self.options = QLineEdit("sdtrainer"), QLineEdit(), QLineEdit()
        self.port = QSpinBox()
        self.port.setRange(1, 65535)
        self.port.setValue(22)
        self.host.setPlaceholderText("gpu-box, 203.0.113.7, or a Host from ~/.ssh/config")
        self.user.setPlaceholderText("ssh's default")
        self.key.setPlaceholderText("ssh's default key or agent")
        self.python.setPlaceholderText("empty: set up there with python3 launch.py --setup")
        self.options.setPlaceholderText("ssh -o options, e.g. ProxyJump=bastion ConnectTimeout=10")
        form = QFormLayout()
        for label, widget in (("Host", self.host), ("User", self.user), ("Port", self.port), ("Key file", self.key),
                              ("Folder there", self.folder), ("Python there", self.python),
                              ("SSH options", self.options)):
            form.addRow(label, widget)
        self.buttons = {}
        row = QHBoxLayout()
        for name, text in (("start", "Start remote"), ("follow", "Follow"), ("pause", "Pause"),
                           ("continue", "Continue"), ("save", "Save"), ("sample", "Sample"), ("stop", "Stop"),
                           ("resume", "Resume"), ("fetch", "Download")):
            button = QPushButton(text)
            button.clicked.connect(lambda _=False, n=name: self.act(n))
            row.addWidget(button)
            self.buttons[name] = button
        self.state_label = QLabel("No remote run.")
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(row)
        layout.addWidget(self.state_label)
        layout.addWidget(self.log, 1)

        # one-shot commands (start, stop, save, ..., fetch), and `remote follow` / `remote resume`, which run while
        # the run does
        self.task = trainer_child(self, stdout=lambda: self._read(self.task), finished=self._task_finished,
                                  merged=True)
        self.follower = trainer_child(self, stdout=lambda: self._read(self.follower),
                                      finished=self._follow_finished, merged=True)
        self._retry = QTimer(self)
        self._retry.setSingleShot(True)
        self._retry.setInterval(RETRY_MS)
        self._retry.timeout.connect(lambda: self._follow("follow"))
        self._task_name = ""
        self.restore()
        self._update()

    # ---- settings ------------------------------------------------------------------------------------

    def restore(self) -> None:
        s = settings()
        for name in FIELDS:
            value = s.value(f"{GROUP}/{name}")
            if value is not None:
                self.port.setValue(int(value)) if name == "port" else getattr(self, name).setText(str(value))
        run = s.value(RUN_KEY)
        self.local = Path(str(run)) if run else None

    def save(self) -> None:
        s = settings()
        for name in FIELDS:
            s.setValue(f"{GROUP}/{name}", self.port.value() if name == "port" else getattr(self, name).text())
        s.setValue(RUN_KEY, str(self.local) if self.local else "")
        s.sync()

    def follow_recorded(self) -> bool:
        """After a restart: follow the recorded run again unless its local copy says it finished."""
        if self.local is None or not (self.local / "remote.json").is_file():
            return False
        self._follow("follow")
        return True

    # ---- actions -------------------------------------------------------------------------------------

    def act(self, name: str) -> None:
        self.save()
        if name == "start":
            self._start()
        elif name in ("follow", "resume"):
            self._follow(name)
        elif self.local is not None:
            extra = ["--checkpoints"] if name == "fetch" else []
            self._run_task(name, ["remote", name, str(self.local), *extra])

    def _start(self) -> None:
        if not self.host.text().strip():
            self._say("Start remote: fill in the host first.")
            return
        found = self.job_file()
        if found is None:
            self._say("Start remote: the job in the form is not valid (see the form).")
            return
        job, local = found
        args = ["remote", "start", str(job), "--host", self.host.text().strip(), "--port", str(self.port.value()),
                "--folder", self.folder.text().strip() or "sdtrainer", "--local", str(local), "--no-follow"]
        for flag, widget in (("--user", self.user), ("--key", self.key), ("--python", self.python)):
            if widget.text().strip():
                args += [flag, widget.text().strip()]
        for option in shlex.split(self.options.text()):
            args += ["--ssh-option", option]
        self.local = Path(local)
        self._announced = False
        self.save()
        self._set_status("starting")
        self._run_task("start", args)

    def _run_task(self, name: str, args: list[str]) -> None:
        if self.task.state() != QProcess.ProcessState.NotRunning:
            self._say(f"{name}: wait for '{self._task_name}' to finish")
            return
        self._task_name = name
        self._say(f"$ python -m trainer {shlex.join(args)}")
        self.task.start(self.trainer_command[0], self.trainer_command[1:] + args)
        self._update()

    def _follow(self, how: str) -> None:
        if self.local is None or self.follower.state() != QProcess.ProcessState.NotRunning:
            return
        self._want_follow = True
        self._set_status("following")
        self.follower.start(self.trainer_command[0], self.trainer_command[1:] + ["remote", how, str(self.local)])
        self._update()

    def stop_following(self) -> None:
        """The window closes: the run goes on there; only following ends."""
        self._want_follow = False
        self._retry.stop()
        for proc in (self.follower, self.task):
            if proc.state() != QProcess.ProcessState.NotRunning:
                proc.kill()
                proc.waitForFinished(3000)

    # ---- process output ------------------------------------------------------------------------------

    def _read(self, proc: QProcess) -> None:
        text = bytes(proc.readAllStandardOutput()).decode("utf-8", "replace")
        for line in text.splitlines():
            self.log.appendPlainText(line)
        if not self._announced and self.local is not None and (self.local / "events.jsonl").is_file():
            self._announced = True
            self.runFolderReady.emit(str(self.local))

    def _task_finished(self, code: int, _status) -> None:
        name, self._task_name = self._task_name, ""
        if name == "start":
            if code == 0:
                self._follow("follow")
            else:
                self._set_status("failed")
        elif code != 0:
            self._say(f"{name} failed (exit {code}); see the lines above")
        elif name == "fetch":
            self._say(f"Downloaded into {self.local}")
        self._update()

    def _follow_finished(self, code: int, _status) -> None:
        self._read(self.follower)
        if code == EXIT_INVALID and self._want_follow:  # the connection failed: try again, the run goes on there
            self._set_status("retrying")
            self._say(f"connection lost; following again in {RETRY_MS // 1000} s")
            self._retry.start()
        else:
            self._want_follow = False
            self._set_status({0: "completed", EXIT_STOPPED: "stopped"}.get(code, "failed"))
        self._update()

    def _set_status(self, status: str) -> None:
        self.status = status
        where = f" ({self.local})" if self.local else ""
        self.state_label.setText(f"Remote run: {status}{where}")
        self.statusChanged.emit(status)

    def _say(self, text: str) -> None:
        self.log.appendPlainText(text)

    def _update(self) -> None:
        busy = self.task.state() != QProcess.ProcessState.NotRunning
        following = self.follower.state() != QProcess.ProcessState.NotRunning
        has_run = self.local is not None
        self.buttons["start"].setEnabled(not busy and not following)
        self.buttons["follow"].setEnabled(has_run and not following)
        self.buttons["resume"].setEnabled(has_run and not following and not busy)
        for name in ("pause", "continue", "save", "sample", "stop"):
            self.buttons[name].setEnabled(has_run and following and not busy)
        self.buttons["fetch"].setEnabled(has_run and not busy)
