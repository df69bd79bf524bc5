"""What a run looks like: progress with it/s and ETA, the loss plot, the validation gallery and the log.

It only has slots. The same slots are fed live by the trainer process or, for a run folder, by the
events read back from its events.jsonl.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtGui import QFont, QTextCursor
from PySide6.QtWidgets import QHBoxLayout, QLabel, QPlainTextEdit, QProgressBar, QTabWidget, QVBoxLayout, QWidget

from .gallery import Gallery
from .loss_plot import LossPlot

LOG_LINES = 5000
BANNER_STYLES = {
    "error": "background:#fde2e2; border:1px solid #d08080; padding:6px;",
    "ok": "background:#e3f4e1; border:1px solid #8cc08a; padding:6px;",
    "info": "background:#e8eef8; border:1px solid #9ab0d0; padding:6px;",
}


def format_duration(seconds: float) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "–"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class RunPanel(QWidget):
    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.total_steps = 0
        self.run_dir: Path | None = None
        self.log_events = True
        self.last_status = ""

        self.title = QLabel("No run yet. Press Start (F5), or open a run folder (Ctrl+Shift+O).")
        self.title.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.title.setWordWrap(True)
        self.banner = QLabel()
        self.banner.setWordWrap(True)
        self.banner.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.banner.hide()
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setFormat("step %v / %m")
        self.speed = QLabel()
        self.speed.setMinimumWidth(260)
        bar = QHBoxLayout()
        bar.addWidget(self.progress, 1)
        bar.addWidget(self.speed)

        self.plot = LossPlot()
        self.gallery = Gallery()
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setMaximumBlockCount(LOG_LINES)
        self.log.setLineWrapMode(QPlainTextEdit.LineWrapMode.NoWrap)
        mono = QFont("monospace")
        mono.setStyleHint(QFont.StyleHint.Monospace)
        self.log.setFont(mono)
        self.tabs = QTabWidget()
        self.tabs.addTab(self.plot, "Loss")
        self.tabs.addTab(self.gallery, "Samples")
        self.tabs.addTab(self.log, "Log")

        layout = QVBoxLayout(self)
        layout.addWidget(self.title)
        layout.addWidget(self.banner)
        layout.addLayout(bar)
        layout.addWidget(self.tabs, 1)

    # ---- slots ---------------------------------------------------------------------------------------

    def reset(self, title: str, run_dir: str | Path | None = None, log_events: bool = True) -> None:
        """log_events: write log/error/checkpoint events into the log pane. A live run's stderr already
        carries them (the trainer prints each one), so there they would show twice."""
        self.run_dir = Path(run_dir) if run_dir else None
        self.log_events = log_events
        self.total_steps = 0
        self.last_status = ""
        self.title.setText(title)
        self.banner.hide()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.speed.setText("")
        self.plot.clear()
        self.gallery.clear(self.run_dir)
        self.log.clear()

    def add_event(self, event: dict) -> None:
        self.add_events([event])

    def add_events(self, events: list[dict]) -> None:
        """A batch (a whole events.jsonl, say): steps go to the plot in one go."""
        steps = [e for e in events if e["type"] == "step"]
        samples = []
        for event in events:
            kind = event["type"]
            if kind == "run_started":
                self.total_steps = int(event.get("total_steps") or 0)
                self.progress.setRange(0, max(self.total_steps, 1))
                self.progress.setValue(int(event.get("start_step") or 0))
                self._log_line(f"run started: {self.total_steps} steps from step {event.get('start_step', 0)}, "
                               f"output in {event.get('output_dir', '')}")
            elif kind == "sample":
                samples.append(event)
            elif kind == "checkpoint":
                self._log_line(f"checkpoint at step {event['step']}: {event['path']}")
            elif kind == "log" and event.get("level") != "debug":  # for files and tests, like the terminal
                self._log_line(f"[{event.get('level', 'info')}] {event.get('message', '')}")
            elif kind == "error":
                self._log_line(f"error: {event.get('message', '')}")
                if event.get("traceback"):
                    self._log_line(str(event["traceback"]).rstrip())
            elif kind == "run_finished":
                self.last_status = str(event.get("status", ""))
                self._log_line(f"run finished: {self.last_status}")
        if steps:
            self.plot.add_points([e["step"] for e in steps], [e["loss"] for e in steps], [e["lr"] for e in steps])
            self._show_step(steps[-1])
        validations = [e for e in events if e["type"] == "val_loss"]
        if validations:
            self.plot.add_val_points([e["step"] for e in validations], [e["loss"] for e in validations])
        if samples:
            self.gallery.add_samples(samples)

    def append_output(self, text: str) -> None:
        """Raw trainer output (stdout/stderr), which arrives in arbitrary chunks."""
        self.log.moveCursor(QTextCursor.MoveOperation.End)
        self.log.insertPlainText(text)
        self.log.moveCursor(QTextCursor.MoveOperation.End)

    def show_banner(self, text: str, kind: str = "info") -> None:
        self.banner.setStyleSheet(BANNER_STYLES[kind])
        self.banner.setText(text)
        self.banner.show()

    # ---- helpers -------------------------------------------------------------------------------------

    def _show_step(self, event: dict) -> None:
        step = int(event["step"])
        if step > self.progress.maximum():
            self.progress.setRange(0, step)
        self.progress.setValue(step)
        loss = event.get("loss")
        loss = "not finite" if loss is None else f"{loss:.4g}"  # the trainer writes NaN as null
        self.speed.setText(f"{event.get('its', 0):.2f} it/s · ETA {format_duration(event.get('eta', -1))} · "
                           f"epoch {event.get('epoch', 0)} · loss {loss}")

    def _log_line(self, text: str) -> None:
        if self.log_events:
            self.log.appendPlainText(text)
