"""The Try tab: render prompts with a finished run, its checkpoints or LoRA files beside the base model, on one seed.

The images come from `python -m trainer sample ... --json --grid` as a child process (the window loads no model):
each JSON line names an image's row (prompt) and column (base model, or a LoRA at a strength), so the grid fills in
as the images are written. The trainer also writes the whole grid as one PNG with the settings in its metadata;
"Save grid…" copies that file.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from PySide6.QtCore import QProcess, Qt, QTemporaryDir, Signal
from PySide6.QtGui import QPixmap
from PySide6.QtWidgets import (QDoubleSpinBox, QFileDialog, QFormLayout, QGridLayout, QHBoxLayout, QLabel,
                               QLineEdit, QListWidget, QListWidgetItem, QPlainTextEdit, QPushButton, QScrollArea,
                               QSpinBox, QSplitter, QVBoxLayout, QWidget)

from trainer.events import LineBuffer
from trainer.job import Job
from trainer.run.checkpoint_files import complete

from .child import failure, trainer_child
from .image_dialog import show_image

MAX_LINE = 1 << 16
CELL = 128  # demo images are 64 px: shown larger, nearest-neighbour, so their pixels stay visible


class TryPanel(QWidget):
    finished = Signal(bool, str)  # ok, the line shown under the grid

    def __init__(self, parent: QWidget | None = None, trainer_command: list[str] | None = None):
        super().__init__(parent)
        self.trainer_command = trainer_command or [sys.executable, "-m", "trainer"]
        self.current_job = lambda: None  # the window sets it: the form's job, or None
        self.process: QProcess | None = None
        self.cells: dict[tuple[int, int], str] = {}  # (row, column): the image file
        self.grid_file: Path | None = None
        self._out: QTemporaryDir | None = None
        self._lines = LineBuffer(MAX_LINE)
        self._stderr = b""
        self._filled = False

        self.model = QLineEdit()
        self.model.setPlaceholderText("empty: the model the run trained on")
        self.model.setToolTip("The base model: a diffusers folder, a model id or a single .safetensors checkpoint")
        self.run = QLineEdit()
        self.run.setPlaceholderText("a run folder (a job's output_dir)")
        self.run.textChanged.connect(self._list_checkpoints)
        self.checkpoints = QListWidget()
        self.checkpoints.setToolTip("Tick the run's final LoRA and the checkpoints to compare side by side")
        self.loras = QListWidget()
        self.loras.setToolTip("LoRA .safetensors files (diffusers or kohya format), each a column, and "
                              "textual-inversion embeddings, used by every column where a prompt names their token")
        self.prompts = QPlainTextEdit()
        self.prompts.setPlaceholderText("one prompt a line")
        self.seed = QSpinBox()
        self.seed.setRange(0, 2**31 - 1)
        self.seed.setToolTip("Prompt N uses seed + N in every column, so the columns compare like for like")
        self.steps = QSpinBox()
        self.steps.setRange(1, 1000)
        self.steps.setValue(20)
        self.guidance = QDoubleSpinBox()
        self.guidance.setRange(0.0, 50.0)
        self.guidance.setSingleStep(0.5)
        self.guidance.setValue(7.5)
        self.width_box, self.height_box = QSpinBox(), QSpinBox()
        for box in (self.width_box, self.height_box):
            box.setRange(0, 4096)
            box.setSingleStep(64)
            box.setSpecialValueText("model's")
        self.scales = QLineEdit("0 0.5 1")
        self.scales.setToolTip("LoRA strengths, space-separated; 0 is the base model (the LoRA switched off)")

        browse_run, browse_model, add_lora, add_embedding, remove_lora, from_job = (
            QPushButton(text) for text in ("Browse…", "Browse…", "Add LoRA…", "Add embedding…", "Remove",
                                           "From current job"))
        browse_run.clicked.connect(self._browse_run)
        browse_model.clicked.connect(self._browse_model)
        add_lora.clicked.connect(lambda: self._add_file("--lora"))
        add_embedding.clicked.connect(lambda: self._add_file("--embedding"))
        remove_lora.clicked.connect(lambda: [self.loras.takeItem(self.loras.row(i))
                                             for i in self.loras.selectedItems()])
        from_job.clicked.connect(lambda: self.fill_from_job(force=True))
        self.render_button = QPushButton("Render")
        self.render_button.clicked.connect(self.start)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.stop_button.clicked.connect(self.kill)
        self.save_button = QPushButton("Save grid…")
        self.save_button.setEnabled(False)
        self.save_button.clicked.connect(self._save_grid_dialog)
        self.status = QLabel("Pick a run (or LoRA files and a base model), type prompts, Render.")
        self.status.setWordWrap(True)

        for box in (self.seed, self.steps, self.guidance, self.width_box, self.height_box):
            box.setMaximumWidth(110)
        numbers = _row(QLabel("Seed"), self.seed, QLabel("Steps"), self.steps, QLabel("Guidance"), self.guidance,
                       QLabel("Size"), self.width_box, QLabel("×"), self.height_box)
        numbers.layout().addStretch(1)
        lora_buttons = QWidget()
        column = QVBoxLayout(lora_buttons)
        column.setContentsMargins(0, 0, 0, 0)
        column.addWidget(add_lora)
        column.addWidget(add_embedding)
        column.addWidget(remove_lora)
        column.addStretch(1)
        form = QFormLayout()
        form.addRow("Run folder", _row(self.run, browse_run, from_job))
        form.addRow("Final / checkpoints", self.checkpoints)
        form.addRow("LoRA / embedding files", _row(self.loras, lora_buttons))
        form.addRow("Base model", _row(self.model, browse_model))
        form.addRow("Prompts", self.prompts)
        form.addRow("Strengths", self.scales)
        form.addRow("", numbers)
        form.addRow(_row(self.render_button, self.stop_button, self.save_button))
        settings = QWidget()
        settings.setLayout(form)
        self.checkpoints.setMaximumHeight(72)
        self.loras.setMaximumHeight(78)
        self.prompts.setMaximumHeight(64)

        self.grid_widget = QWidget()
        self.grid = QGridLayout(self.grid_widget)
        self.grid.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(self.grid_widget)
        below = QWidget()
        below_layout = QVBoxLayout(below)
        below_layout.setContentsMargins(0, 0, 0, 0)
        below_layout.addWidget(self.status)
        below_layout.addWidget(scroll, 1)
        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(settings)
        split.addWidget(below)
        split.setStretchFactor(1, 1)
        layout = QVBoxLayout(self)
        layout.addWidget(split)

    # --- what to render -------------------------------------------------------------------------------------------

    def showEvent(self, event) -> None:
        self.fill_from_job()
        super().showEvent(event)

    def fill_from_job(self, force: bool = False) -> None:
        """The form's job as the defaults: its output folder, validation prompts and settings, resolution. Only the
        first time the tab is shown (or on "From current job"): what the user typed here stays."""
        job: Job | None = self.current_job()
        if job is None or (self._filled and not force):
            return
        self._filled = True
        if job.output.output_dir:
            self.run.setText(str(Path(job.output.output_dir).expanduser()))
        if job.validation.prompts:
            self.prompts.setPlainText("\n".join(job.validation.prompts))
        self.seed.setValue(job.validation.seed)
        self.steps.setValue(job.validation.steps)
        self.guidance.setValue(job.validation.guidance_scale)
        self.width_box.setValue(job.dataset.resolution)
        self.height_box.setValue(job.dataset.resolution)

    def _list_checkpoints(self) -> None:
        """The run's final LoRA (ticked) and its complete checkpoints, newest last."""
        self.checkpoints.clear()
        run = Path(self.run.text().strip()).expanduser()
        if not self.run.text().strip() or not run.is_dir():
            return
        entries = ([("final", run)] if (run / "final").is_dir() else [])
        entries += [(path.name, path) for path in complete(run / "checkpoints")]
        for k, (name, path) in enumerate(entries):
            item = QListWidgetItem(name)
            item.setData(Qt.ItemDataRole.UserRole, str(path))
            # the final LoRA, or (a run still going) its newest checkpoint
            ticked = name == "final" or (k == len(entries) - 1 and entries[0][0] != "final")
            item.setCheckState(Qt.CheckState.Checked if ticked else Qt.CheckState.Unchecked)
            self.checkpoints.addItem(item)

    def tick(self, names: list[str]) -> None:
        """Tick exactly these entries of the final / checkpoints list."""
        for i in range(self.checkpoints.count()):
            item = self.checkpoints.item(i)
            item.setCheckState(Qt.CheckState.Checked if item.text() in names else Qt.CheckState.Unchecked)

    def add_file(self, option: str, path: str) -> None:
        """A LoRA file (`--lora`: a column of its own) or an embedding (`--embedding`: loaded for every column)."""
        item = QListWidgetItem(f"{'LoRA' if option == '--lora' else 'embedding'}: {path}")
        item.setData(Qt.ItemDataRole.UserRole, option)
        item.setData(Qt.ItemDataRole.UserRole + 1, path)
        self.loras.addItem(item)

    def arguments(self) -> list[str] | str:
        """`trainer sample`'s arguments for what the panel shows, or the one line saying what is missing."""
        runs = [self.checkpoints.item(i).data(Qt.ItemDataRole.UserRole) for i in range(self.checkpoints.count())
                if self.checkpoints.item(i).checkState() == Qt.CheckState.Checked]
        files = [(item.data(Qt.ItemDataRole.UserRole), item.data(Qt.ItemDataRole.UserRole + 1))
                 for item in map(self.loras.item, range(self.loras.count()))]
        prompts = [line.strip() for line in self.prompts.toPlainText().splitlines() if line.strip()]
        model = self.model.text().strip()
        if not prompts:
            return "Type at least one prompt."
        if not runs and not model:
            return "Tick the final LoRA or a checkpoint of a run, or give a base model (and LoRA files)."
        try:
            scales = [float(x) for x in self.scales.text().replace(",", " ").split()]
        except ValueError:
            return f"Strengths: {self.scales.text()!r} is not a list of numbers (e.g. 0 0.5 1)."
        if not scales:
            return "Strengths: give at least one (0 is the base model)."
        # `--option=value`: a prompt or path starting with '-' stays a value
        args = [*([f"--model={model}"] if model else []), *(f"--run={run}" for run in runs),
                *(f"{option}={path}" for option, path in files), *(f"--prompt={p}" for p in prompts),
                "--lora-scale", *(f"{s:g}" for s in scales), f"--seed={self.seed.value()}",
                f"--steps={self.steps.value()}", f"--guidance-scale={self.guidance.value():g}"]
        for option, box in (("--width", self.width_box), ("--height", self.height_box)):
            if box.value():
                args.append(f"{option}={box.value()}")
        return args

    # --- the child process ----------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.process is not None

    def start(self) -> bool:
        if self.running:
            return False
        args = self.arguments()
        if isinstance(args, str):
            self._say(args, error=True)
            return False
        self._clear_grid()
        self._out = QTemporaryDir()  # removed with the next render or the window
        out = Path(self._out.path())
        args += [f"--out={out / 'images'}", f"--grid={out / 'grid.png'}", "--json"]
        self._lines, self._stderr = LineBuffer(MAX_LINE), b""
        self.process = trainer_child(self, stdout=self._read, stderr=self._read_errors, finished=self._done,
                                     error=self._error)
        self.render_button.setEnabled(False)
        self.stop_button.setEnabled(True)
        self.save_button.setEnabled(False)
        self._say("Loading the model…")
        self.process.start(self.trainer_command[0], [*self.trainer_command[1:], "sample", *args])
        return True

    def kill(self) -> None:
        """Stop rendering (or the window is closing): at once, and say nothing afterwards."""
        if self.process is not None:
            self.process.finished.disconnect()
            self.process.kill()
            self.process.waitForFinished(2000)
            self.process = None
            self._reset_buttons()
            self._say("Stopped.")

    def _read(self) -> None:
        for line in self._lines.feed(bytes(self.process.readAllStandardOutput().data())):
            try:
                item = json.loads(line)
            except ValueError:
                continue  # a library's own print: not ours
            if not isinstance(item, dict):
                continue
            if "grid" in item:
                self.grid_file = Path(item["grid"])
            elif {"path", "row", "column", "label", "scale", "prompt"} <= item.keys():
                self._add_cell(item)

    def _read_errors(self) -> None:
        self._stderr = (self._stderr + bytes(self.process.readAllStandardError().data()))[-MAX_LINE:]

    def _done(self, code: int, status: QProcess.ExitStatus) -> None:
        self._read()
        self._read_errors()
        self.process = None
        self._reset_buttons()
        reason = failure(code, status, self._stderr, "sample")
        if reason is not None:
            self._say(reason, error=True)
            self.finished.emit(False, reason)
            return
        self.save_button.setEnabled(self.grid_file is not None and self.grid_file.is_file())
        text = (f"{len(self.cells)} images, seed {self.seed.value()} (prompt N: seed + N, the same in every "
                "column).")
        self._say(text)
        self.finished.emit(True, text)

    def _error(self, error: QProcess.ProcessError) -> None:
        if error == QProcess.ProcessError.FailedToStart and self.process is not None:
            self.process = None
            self._reset_buttons()
            reason = f"cannot start {self.trainer_command[0]}"
            self._say(reason, error=True)
            self.finished.emit(False, reason)

    def _reset_buttons(self) -> None:
        self.render_button.setEnabled(True)
        self.stop_button.setEnabled(False)

    def _say(self, text: str, error: bool = False) -> None:
        self.status.setText(text)
        self.status.setStyleSheet("color: #b00000;" if error else "")

    # --- the grid -------------------------------------------------------------------------------------------------

    def _clear_grid(self) -> None:
        self.cells.clear()
        self.grid_file = None
        while self.grid.count():
            widget = self.grid.takeAt(0).widget()
            if widget is not None:
                widget.deleteLater()

    def _add_cell(self, item: dict) -> None:
        """Grid row 0 holds the column labels and grid column 0 the prompts, so image (r, c) sits at (r+1, c+1)."""
        row, column = int(item["row"]), int(item["column"])
        if self.grid.itemAtPosition(0, column + 1) is None:
            label = "base model" if item["label"] == "base" else f"{item['label']} × {float(item['scale']):g}"
            header = QLabel(label)
            header.setToolTip(item.get("source") or "the base model, no LoRA")
            self.grid.addWidget(header, 0, column + 1, Qt.AlignmentFlag.AlignHCenter)
        if self.grid.itemAtPosition(row + 1, 0) is None:
            prompt = QLabel(item["prompt"])
            prompt.setWordWrap(True)
            prompt.setMaximumWidth(180)
            self.grid.addWidget(prompt, row + 1, 0)
        cell = QLabel()
        show_image(cell, QPixmap(item["path"]), item["path"], CELL)
        cell.setToolTip(f"{item['prompt']} — seed {item.get('seed')}")
        self.grid.addWidget(cell, row + 1, column + 1)
        self.cells[(row, column)] = item["path"]
        self._say(f"Rendering… {len(self.cells)} images so far.")

    def save_grid(self, path: Path) -> Path:
        """The trainer's grid PNG (settings in its metadata) copied to `path`."""
        if self.grid_file is None or not self.grid_file.is_file():
            raise FileNotFoundError("no grid rendered yet")
        return Path(shutil.copyfile(self.grid_file, path))

    def _save_grid_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save grid", "try-grid.png", "PNG images (*.png)")
        if not path:
            return
        try:
            self.save_grid(Path(path))
        except OSError as exc:
            self._say(f"{path}: {exc.strerror or exc}", error=True)
            return
        self._say(f"Saved {path} (the settings are in its PNG metadata).")

    def _browse_run(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Run folder (a job's output_dir)", self.run.text())
        if folder:
            self.run.setText(folder)

    def _browse_model(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Base model (a diffusers folder)", self.model.text())
        if folder:
            self.model.setText(folder)

    def _add_file(self, option: str) -> None:
        kind = "LoRA" if option == "--lora" else "Embedding"
        path, _ = QFileDialog.getOpenFileName(self, f"{kind} file", self.run.text(), f"{kind} files (*.safetensors)")
        if path:
            self.add_file(option, path)


def _row(*widgets: QWidget) -> QWidget:
    row = QWidget()
    layout = QHBoxLayout(row)
    layout.setContentsMargins(0, 0, 0, 0)
    for widget in widgets:
        layout.addWidget(widget)
    return row
