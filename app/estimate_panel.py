"""The Memory tab: the job in the editor, estimated before Start (`python -m trainer estimate --json --suggest` as a
child process), against the memory of the GPU it will train on, with the settings that make it fit and an Apply for
each.

The GPUs are the trainer's answer to `trainer devices --json` (the window never imports torch) and, for a machine
without one or a run planned elsewhere, the trainer's table of common cards or a memory figure; the choice is a
window setting. The estimate runs after the editor has been still for a moment, only while the tab is shown, and a
new edit cancels the one under way. It never gates Start: a job the trace cannot follow shows the trainer's line.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from PySide6.QtCore import QProcess, QTimer, Signal
from PySide6.QtWidgets import (QComboBox, QDoubleSpinBox, QFormLayout, QGridLayout, QGroupBox, QHBoxLayout, QLabel,
                               QProgressBar, QPushButton, QVBoxLayout, QWidget)

from trainer.gpus import GPUS, match_gpu
from trainer.job import save_job

from .child import trainer_child
from .job_form import JobForm
from .settings import settings

GIB = 2**30
OTHER = "Other: memory in GiB"
PARTS = ("frozen weights", "trainable weights", "gradients", "optimizer state", "activations", "encoders")


class EstimatePanel(QWidget):
    estimated = Signal(dict)  # the job's estimate as `trainer estimate --json` prints it
    suggested = Signal(dict)  # one suggestion: {"changes", "set", and its estimate}
    finished = Signal(int)  # the estimate process's exit code (after its suggestions)

    def __init__(self, form: JobForm, parent: QWidget | None = None, trainer_command: list[str] | None = None):
        super().__init__(parent)
        self.form = form
        self.trainer_command = trainer_command or [sys.executable, "-m", "trainer"]
        self.devices_command: list[str] | None = None  # tests answer in place of `trainer devices --json`
        self.debounce_ms = 1500  # an estimate imports torch and traces a step: not on every keystroke
        self.suggestion_count = 3  # each is a trace or a few: seconds on the demo, a minute on a real model
        self.process: QProcess | None = None
        self.devices: QProcess | None = None
        self.detected: list[dict] = []
        self.gpus_known = False  # the trainer has answered (or failed to) which GPUs it sees
        self.result: dict | None = None
        self.suggestions: list[tuple[dict, QPushButton]] = []
        self._stale = True  # the form changed since the last estimate started
        self._out = b""
        self._err = b""
        self._folder = tempfile.TemporaryDirectory(prefix="sdtrainer-estimate-")

        self.gpu = QComboBox()
        self.gpu.setToolTip("The GPU the run trains on: the ones this machine's trainer sees, or one of the table "
                            "of common cards, or a memory figure")
        self.memory = QDoubleSpinBox()
        self.memory.setRange(0.1, 9999)
        self.memory.setDecimals(3)
        self.memory.setSuffix(" GiB")
        self.summary = QLabel("")
        self.summary.setWordWrap(True)
        self.bar = QProgressBar()
        self.bar.setTextVisible(True)
        self.bar.hide()  # until an estimate arrives
        self.speed = QLabel("")
        self.parts = QLabel("")
        self.warning = QLabel("")
        self.warning.setWordWrap(True)
        self.warning.setStyleSheet("color: #b00000;")
        self.failure = QLabel("")
        self.failure.setWordWrap(True)
        self.failure.setStyleSheet("color: #b00000;")
        self.fixes = QGroupBox("Settings that would fit")
        self.fixes_grid = QGridLayout(self.fixes)
        self.fixes.hide()

        choose = QHBoxLayout()
        choose.addWidget(self.gpu, 1)
        choose.addWidget(self.memory)
        top = QFormLayout()
        top.addRow("GPU", choose)
        layout = QVBoxLayout(self)
        layout.addLayout(top)
        for widget in (self.summary, self.bar, self.speed, self.parts, self.warning, self.failure, self.fixes):
            layout.addWidget(widget)
        layout.addStretch(1)

        self._fill_gpus()
        self.gpu.currentIndexChanged.connect(self._gpu_chosen)
        self.memory.valueChanged.connect(self._memory_chosen)
        self.timer = QTimer(self)
        self.timer.setSingleShot(True)
        self.timer.timeout.connect(self.start_estimate)
        form.changed.connect(self._edited)

    # ---- the GPU ---------------------------------------------------------------------------------------------

    def _fill_gpus(self) -> None:
        saved = str(settings().value("estimate/gpu", ""))
        self.gpu.blockSignals(True)
        self.gpu.clear()
        for device in self.detected:
            self.gpu.addItem(f"GPU {device['index']}: {device['name']} ({device['memory_gib']:g} GiB)",
                             ("detected", device["name"], float(device["memory_gib"])))
        for gpu in GPUS.values():
            self.gpu.addItem(f"{gpu.name} ({gpu.memory_gib:g} GiB)", ("table", gpu.name, float(gpu.memory_gib)))
        self.gpu.addItem(OTHER, ("other", "", 0.0))
        # The user's last choice, found by its text; else the first GPU the trainer sees, else the table's first.
        chosen = self.gpu.findText(saved) if saved else -1
        self.gpu.setCurrentIndex(max(chosen, 0))
        self.memory.blockSignals(True)
        self.memory.setValue(float(settings().value("estimate/memory", 8.0)))
        self.memory.blockSignals(False)
        self.gpu.blockSignals(False)
        self._show_memory_box()

    def _show_memory_box(self) -> None:
        self.memory.setVisible(self.gpu.currentData()[0] == "other")

    def _gpu_chosen(self) -> None:
        settings().setValue("estimate/gpu", self.gpu.currentText())
        self._show_memory_box()
        self._edited()

    def _memory_chosen(self) -> None:
        settings().setValue("estimate/memory", self.memory.value())
        if self.gpu.currentData()[0] == "other":
            self._edited()

    def choose_memory(self, gib: float) -> None:
        """Fit `gib` of memory (the combo's last entry), as a user would pick it."""
        self.memory.setValue(gib)
        self.gpu.setCurrentIndex(self.gpu.findText(OTHER))

    def memory_gib(self) -> float:
        kind, _, gib = self.gpu.currentData()
        return self.memory.value() if kind == "other" else gib

    def table_gpu(self) -> str:
        """The name in the trainer's table for the chosen GPU (its time per step), or ''."""
        kind, name, _ = self.gpu.currentData()
        if kind == "table":
            return name
        found = match_gpu(name) if kind == "detected" else None
        return found.name if found else ""

    def list_devices(self) -> None:
        """Ask the trainer which GPUs it sees; the estimate waits for the answer."""
        self.summary.setText("Asking the trainer which GPUs it sees…")
        self.devices = trainer_child(self, finished=self._devices_listed, error=lambda error: self._devices_listed(
            -1, None) if error == QProcess.ProcessError.FailedToStart else None)
        command = self.devices_command or [*self.trainer_command, "devices", "--json"]
        self.devices.start(command[0], command[1:])

    def _devices_listed(self, code: int, _status) -> None:
        out = bytes(self.devices.readAllStandardOutput()).decode("utf-8", "replace").strip().splitlines()
        self.gpus_known = True  # asked once: the GPUs do not change while the window is open
        try:
            self.detected = json.loads(out[-1])["gpus"] if code == 0 else []
        except (ValueError, IndexError, KeyError, TypeError):
            self.detected = []
        self._fill_gpus()
        self._edited(at_once=True)

    # ---- the estimate ----------------------------------------------------------------------------------------

    def showEvent(self, event) -> None:
        super().showEvent(event)
        if self.devices is None:
            self.list_devices()
        elif self._stale:
            self._edited(at_once=True)

    def _edited(self, at_once: bool = False) -> None:
        self._stale = True
        if self.isVisible() and self.gpus_known:
            self.timer.start(0 if at_once else self.debounce_ms)

    def start_estimate(self) -> None:
        """Estimate the form's job now, cancelling one under way."""
        self.cancel()
        self._stale = False
        self._clear()
        job = self.form.job_or_none()
        if job is None:
            self.summary.setText("The estimate waits for a valid job in the editor.")
            return
        path = Path(self._folder.name) / "job.json"
        save_job(job, path)
        args = [*self.trainer_command[1:], "estimate", str(path), "--json", "--suggest", str(self.suggestion_count),
                "--memory", f"{self.memory_gib():g}"]
        if self.table_gpu():
            args += ["--gpu", self.table_gpu()]
        self.summary.setText(f"Estimating the job on {self.gpu.currentText()}… (the trainer traces one step on "
                             "fake tensors: seconds)")
        self._out, self._err = b"", b""
        process = trainer_child(self, stdout=lambda: self._read(process), stderr=lambda: self._read_err(process),
                                finished=lambda code, _s: self._done(process, code),
                                error=lambda error: self._failed_to_start(process, error))
        self.process = process
        process.start(self.trainer_command[0], args)

    def cancel(self) -> None:
        """Stop the estimate under way, if any; the job is estimated again when the tab is next shown."""
        process, self.process = self.process, None
        if process is None:
            return
        for signal in (process.readyReadStandardOutput, process.readyReadStandardError, process.finished):
            signal.disconnect()
        if process.state() != QProcess.ProcessState.NotRunning:
            self._stale = True
            process.finished.connect(process.deleteLater)
            process.kill()
        else:
            process.deleteLater()

    def hideEvent(self, event) -> None:
        self.cancel()  # another tab, or the window closing: nobody is reading it
        super().hideEvent(event)

    def _read(self, process: QProcess) -> None:
        if process is not self.process:
            return
        self._out += bytes(process.readAllStandardOutput())
        *lines, self._out = self._out.split(b"\n")
        for line in lines:
            try:
                item = json.loads(line)
            except ValueError:
                continue  # a library's stray line
            if "suggestion" in item:
                self._add_suggestion(item["suggestion"])
            elif "search" in item:
                self._searched(item["search"])
            elif "total_bytes" in item:
                self._show(item)

    def _read_err(self, process: QProcess) -> None:
        if process is self.process:
            self._err += bytes(process.readAllStandardError())

    def _done(self, process: QProcess, code: int) -> None:
        if process is not self.process:
            return
        self._read(process)
        self._read_err(process)
        if code != 0:
            errors = [line for line in self._err.decode("utf-8", "replace").splitlines() if line.strip()]
            said = next((line for line in reversed(errors) if line.startswith("error:")),
                        errors[-1] if errors else f"exit {code}")
            self.summary.setText("")
            self.failure.setText(f"No estimate: {said.removeprefix('error: ')}")
        self.process = None
        process.deleteLater()
        self.finished.emit(code)

    def _failed_to_start(self, process: QProcess, error) -> None:
        if process is self.process and error == QProcess.ProcessError.FailedToStart:
            self.summary.setText("")
            self.failure.setText(f"No estimate: the trainer did not start ({process.errorString()})")
            self.process = None
            process.deleteLater()
            self.finished.emit(-1)

    # ---- showing it ------------------------------------------------------------------------------------------

    def _clear(self) -> None:
        self.result = None
        for text_label in (self.speed, self.parts, self.warning, self.failure):
            text_label.setText("")
        self.bar.setValue(0)
        self.bar.hide()  # until there is a peak to show against the memory
        while self.fixes_grid.count():
            widget = self.fixes_grid.takeAt(0).widget()
            if widget is not None:
                widget.deleteLater()
        self.suggestions = []
        self.fixes.hide()

    def _show(self, result: dict) -> None:
        self.result = result
        memory = result.get("memory_gib", self.memory_gib())
        peak = result["total_gib"]
        w, h = result["bucket"]
        self.summary.setText(f"Peak {peak:.2f} GiB of {memory:g} GiB on {self.gpu.currentText()}: "
                             f"{'fits' if result['fits'] else 'does not fit'} ({w}x{h}, batch "
                             f"{result['batch_size']}, mixed precision {result['precision']})")
        self.bar.show()
        self.bar.setMaximum(1000)
        self.bar.setValue(min(1000, int(1000 * peak / memory)))
        self.bar.setFormat(f"{peak:.2f} / {memory:g} GiB")
        gpu = result.get("gpu")
        self.speed.setText(f"{gpu['step_seconds']:.2f} s per step on {gpu['name']} at "
                           f"{result['utilisation']:.0%} of its {gpu['tflops']:g} bf16 TFLOPS" if gpu else
                           "Time per step: not known for this GPU (choose it in the table)")
        self.parts.setText(" · ".join(f"{part} {result['peak_bytes'][part] / GIB:.2f}" for part in PARTS) +
                           f" · allowance {result['allowance_bytes'] / GIB:.2f} GiB")
        if not result["fits"]:
            self.warning.setText(f"This run will not fit: {peak - memory:.2f} GiB short. Looking for settings "
                                 "that would fit…")
        self.estimated.emit(result)

    def _add_suggestion(self, found: dict) -> None:
        row = len(self.suggestions)
        speed = f", {found['gpu']['step_seconds']:.2f} s per step" if found.get("gpu") else ""
        text = QLabel(f"{found['total_gib']:.2f} GiB{speed}: " + ", ".join(found["set"]))
        text.setWordWrap(True)
        apply = QPushButton("Apply")
        apply.setToolTip("Set these fields in the editor")
        apply.clicked.connect(lambda: self.apply(found["changes"]))
        self.fixes_grid.addWidget(text, row, 0)
        self.fixes_grid.addWidget(apply, row, 1)
        self.suggestions.append((found, apply))
        self.fixes.show()
        self.suggested.emit(found)

    def _searched(self, search: dict) -> None:
        if self.result is None or self.result["fits"]:
            return
        stopped = f" (the search {search['stopped']})" if search["stopped"] else ""
        self.warning.setText(f"This run will not fit: {self.result['total_gib'] - self.memory_gib():.2f} GiB short. "
                             + (f"{search['found']} setting(s) below would fit{stopped}." if search["found"] else
                                f"No setting tried would fit{stopped}."))

    def apply(self, changes: dict) -> None:
        """Set a suggestion's fields in the editor; the edit estimates the job again."""
        for dotted, value in changes.items():
            self.form.editor(dotted).set(value)
