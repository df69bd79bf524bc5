"""`python -m trainer caption … --json` as a child process: the window never loads the captioning model itself.

Folders with different caption extensions are captioned one after another (the command takes one extension).
The child's stdout carries `progress` events (trainer/events.py); its last stderr line is the reason shown when it
fails.
"""

from __future__ import annotations

import sys

from PySide6.QtCore import QObject, QProcess, Signal
from PySide6.QtWidgets import QCheckBox, QDialog, QDialogButtonBox, QFormLayout, QLineEdit, QWidget

from trainer.events import LineBuffer, decode
from trainer.job import DatasetSpec

from .child import failure, trainer_child

DEFAULT_MODEL = "Salesforce/blip-image-captioning-large"
MAX_LINE = 1 << 16


class CaptionProcess(QObject):
    progress = Signal(int, int)  # done, total (of the current folder group)
    finished = Signal(bool, str)  # ok, the last line the command printed

    def __init__(self, command_prefix: list[str] | None = None, parent: QObject | None = None):
        super().__init__(parent)
        self.command_prefix = command_prefix or [sys.executable, "-m", "trainer"]
        self.process: QProcess | None = None
        self._queue: list[list[str]] = []
        self._lines = LineBuffer(MAX_LINE)
        self._stderr = b""

    @property
    def running(self) -> bool:
        return self.process is not None

    def start(self, spec: DatasetSpec, model: str, prefix: str = "", suffix: str = "",
              overwrite: bool = False) -> None:
        """Caption the folders of `spec` (not .tar shards: their captions are inside them)."""
        groups: dict[str, list[str]] = {}
        for folder in spec.folders:
            if not folder.path.lower().endswith(".tar"):
                groups.setdefault(folder.caption_extension, []).append(folder.path)
        options = ["--model", model, "--prefix", prefix, "--suffix", suffix, "--json",
                   *(["--overwrite"] if overwrite else [])]
        self._queue = [["caption", *paths, "--extension", ext, *options] for ext, paths in groups.items()]
        self._next()

    def kill(self) -> None:
        """The window is closing: stop at once, and say nothing afterwards."""
        self._queue.clear()
        if self.process is not None:
            self.process.finished.disconnect()
            self.process.kill()
            self.process.waitForFinished(2000)
            self.process = None

    def _next(self) -> None:
        if not self._queue:
            self.finished.emit(True, "captions written")
            return
        args = self._queue.pop(0)
        self._lines, self._stderr = LineBuffer(MAX_LINE), b""
        self.process = trainer_child(self, stdout=self._read, stderr=self._read_errors, finished=self._done,
                                     error=self._error)
        self.process.start(self.command_prefix[0], [*self.command_prefix[1:], *args])

    def _read(self) -> None:
        for line in self._lines.feed(bytes(self.process.readAllStandardOutput().data())):
            event = decode(line)
            if event is not None and event["type"] == "progress":
                self.progress.emit(event["done"], event["total"])

    def _read_errors(self) -> None:
        self._stderr = (self._stderr + bytes(self.process.readAllStandardError().data()))[-MAX_LINE:]

    def _done(self, code: int, status: QProcess.ExitStatus) -> None:
        self._read()
        self._read_errors()
        self.process = None
        reason = failure(code, status, self._stderr, "caption")
        if reason is not None:
            self._queue.clear()
            self.finished.emit(False, reason)
            return
        self._next()

    def _error(self, error: QProcess.ProcessError) -> None:
        if error == QProcess.ProcessError.FailedToStart and self.process is not None:
            self.process = None
            self._queue.clear()
            self.finished.emit(False, f"cannot start {self.command_prefix[0]}")


class CaptionDialog(QDialog):
    """Which model, and what goes before and after each caption."""

    def __init__(self, model: str, prefix: str, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("Caption missing images")
        self.model = QLineEdit(model or DEFAULT_MODEL)
        self.model.setToolTip("A BLIP-style image-to-text model: a Hugging Face id or a local folder")
        self.prefix = QLineEdit(prefix)
        self.prefix.setToolTip("Put before every caption, e.g. the instance token")
        self.suffix = QLineEdit()
        self.overwrite = QCheckBox("Rewrite existing captions too")
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        form = QFormLayout(self)
        form.addRow("Model", self.model)
        form.addRow("Prefix", self.prefix)
        form.addRow("Suffix", self.suffix)
        form.addRow(self.overwrite)
        form.addRow(buttons)

    def choice(self) -> tuple[str, str, str, bool]:
        return self.model.text().strip(), self.prefix.text(), self.suffix.text(), self.overwrite.isChecked()
