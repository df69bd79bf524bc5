"""The job editor, generated from the job schema: one group per section of `Job`, one editor per field.

Nothing here lists the schema's fields: a field added to trainer/job.py appears in the form with its
description as tooltip and its constraints as range. Values are checked by the schema itself
(`Job.model_validate`) and each error is shown at the field it names.
"""

from __future__ import annotations

import json
import math
import os
import typing

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from PySide6.QtCore import QObject, QSignalBlocker, Qt, Signal
from PySide6.QtGui import QBrush, QColor
from PySide6.QtWidgets import QAbstractItemView, QCheckBox, QComboBox, QFileDialog, QFormLayout, QGroupBox, \
    QHBoxLayout, QHeaderView, QLabel, QLineEdit, QMenu, QPlainTextEdit, QPushButton, QScrollArea, QSpinBox, \
    QTableWidget, QTableWidgetItem, QToolButton, QVBoxLayout, QWidget

from trainer.job import UNIONS, Job, switch_choice, union_loc

from .block_picker import BlockPicker
from .repeats_cell import repeats_shown

INT32_MAX = 2**31 - 1
ERROR_STYLE = "border: 1px solid #c00000;"
# Section titles; a section not listed here (one added to the schema later) gets its name capitalised.
SECTION_TITLES = {
    "model": "Model",
    "dataset": "Dataset",
    "network": "Network (what trains in the denoiser)",
    "layers": "Layers (blocks and kinds that train)",
    "text_encoder": "Text encoders",
    "tokens": "New tokens (textual inversion, pivotal tuning)",
    "prior": "Prior preservation (DreamBooth)",
    "ema": "EMA (moving average of the weights)",
    "diffusion": "Noise and loss",
    "optimizer": "Optimizer",
    "schedule": "Schedule",
    "precision": "Precision",
    "memory": "Memory (fitting bigger models)",
    "validation": "Validation",
    "output": "Output",
    "logging": "Logging (TensorBoard, Weights & Biases)",
}
# Block lists that get a "Pick blocks…" button (app/block_picker.py reads the model's block tree).
BLOCK_FIELDS = {("layers", "train_blocks"), ("layers", "freeze_blocks")}
# Table cells whose shown text is not their value: (section, list field, column) -> fn(row values) giving
# (text, tooltip) or None to show the value itself.
CELL_DISPLAY = {("dataset", "folders", "repeats"): repeats_shown}
# Paths that must be set before a run can start, with the reason shown on the Start button.
REQUIRED = {
    ("model", "path"): "Choose a base model (Model → path)",
    ("output", "output_dir"): "Choose a run folder (Output → output_dir)",
}


class _NoWheelSpinBox(QSpinBox):
    # Scrolling the form must not change a value the pointer happens to pass over.
    def wheelEvent(self, event):
        if self.hasFocus():
            super().wheelEvent(event)
        else:
            event.ignore()


class _NoWheelComboBox(QComboBox):
    def wheelEvent(self, event):
        if self.hasFocus():
            super().wheelEvent(event)
        else:
            event.ignore()


def constraints(info: FieldInfo) -> dict:
    """ge/gt/le/lt/multiple_of/min_length/max_length/pattern from a field's annotated_types metadata."""
    out = {}
    for item in info.metadata:
        for name in ("ge", "gt", "le", "lt", "multiple_of", "min_length", "max_length", "pattern"):
            value = getattr(item, name, None)
            if value is not None:
                out[name] = value
    return out


def range_text(info: FieldInfo) -> str:
    c = constraints(info)
    low = f"≥ {c['ge']}" if "ge" in c else f"> {c['gt']}" if "gt" in c else ""
    high = f"≤ {c['le']}" if "le" in c else f"< {c['lt']}" if "lt" in c else ""
    parts = [" and ".join(p for p in (low, high) if p)]
    if "multiple_of" in c:
        parts.append(f"a multiple of {c['multiple_of']}")
    if "min_length" in c and c.get("min_length") == c.get("max_length"):
        parts.append(f"exactly {c['min_length']} values")
    if "pattern" in c:
        parts.append(f"matching {c['pattern']}")
    return ", ".join(p for p in parts if p)


def tooltip(name: str, info: FieldInfo) -> str:
    lines = [f"<b>{name}</b>: {info.description or ''}"]
    rng = range_text(info)
    if rng:
        lines.append(f"Range: {rng}")
    if typing.get_origin(info.annotation) is typing.Literal:
        lines.append("Options: " + ", ".join(str(a) for a in typing.get_args(info.annotation)))
    default = info.get_default(call_default_factory=True)
    if isinstance(default, BaseModel):
        default = default.model_dump()
    lines.append(f"Default: {json.dumps(default, default=str)}")
    return "<br>".join(lines)


def label_for(name: str) -> str:
    return name.replace("_", " ").capitalize()


class FieldEditor(QObject):
    """One field: a widget in the form, get/set of its JSON value, and an error shown under it."""

    changed = Signal()

    def __init__(self, name: str, info: FieldInfo):
        super().__init__()
        self.name, self.info = name, info
        self.widget = QWidget()
        self.error_label = QLabel()
        self.error_label.setStyleSheet("color: #c00000;")
        self.error_label.setWordWrap(True)
        self.error_label.hide()
        self.row = QHBoxLayout()
        self.row.setContentsMargins(0, 0, 0, 0)
        box = QVBoxLayout(self.widget)
        box.setContentsMargins(0, 0, 0, 0)
        box.setSpacing(2)
        box.addLayout(self.row)
        box.addWidget(self.error_label)
        self.input: QWidget = QWidget()
        self.error_state: tuple[str | None, tuple] = (None, ())  # what set_error last showed

    def _place(self, widget: QWidget, *extra: QWidget) -> None:
        self.input = widget
        widget.setToolTip(tooltip(self.name, self.info))
        self.row.addWidget(widget, 1)
        for w in extra:
            self.row.addWidget(w)

    def get(self):  # raises ValueError with a one-line message when the text is not a value
        raise NotImplementedError

    def set(self, value) -> None:
        raise NotImplementedError

    def raw(self):
        """What the editor holds as typed, even when it is not a value (a number half typed): another editor of
        the same field copies this, so both show the same text and the same error."""
        return self.get()

    def set_raw(self, raw) -> None:
        self.set(raw)

    def set_error(self, message: str | None, sub: tuple = ()) -> None:
        self.error_state = (message, tuple(sub))
        self.input.setStyleSheet(ERROR_STYLE if message else "")
        self.error_label.setText(message or "")
        self.error_label.setVisible(bool(message))


class ComboEditor(FieldEditor):
    def __init__(self, name, info):
        super().__init__(name, info)
        self.combo = _NoWheelComboBox()
        self.combo.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        for option in typing.get_args(info.annotation):
            self.combo.addItem(str(option), option)
        self.combo.currentIndexChanged.connect(self.changed)
        self._place(self.combo)

    def get(self):
        return self.combo.currentData()

    def set(self, value):
        index = self.combo.findData(value)
        if index < 0:
            raise ValueError(f"{self.name}: {value!r} is not one of the options")
        self.combo.setCurrentIndex(index)


class CheckEditor(FieldEditor):
    def __init__(self, name, info):
        super().__init__(name, info)
        self.check = QCheckBox()
        self.check.toggled.connect(self.changed)
        self._place(self.check)

    def get(self):
        return self.check.isChecked()

    def set(self, value):
        self.check.setChecked(bool(value))


class SpinEditor(FieldEditor):
    """Whole numbers with both bounds known: a spin box."""

    def __init__(self, name, info, low: int, high: int):
        super().__init__(name, info)
        self.spin = _NoWheelSpinBox()
        self.spin.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        self.spin.setRange(low, high)
        self.spin.setSingleStep(int(constraints(info).get("multiple_of", 1)))
        self.spin.valueChanged.connect(self.changed)
        self._place(self.spin)

    def get(self):
        return self.spin.value()

    def set(self, value):
        self.spin.setValue(int(value))


class NumberEditor(FieldEditor):
    """Numbers as text: floats round-trip exactly (1e-8 stays 1e-08, not 0.00000001 rounded), and an
    invalid value stays visible, with its error, instead of being clamped away."""

    def __init__(self, name, info, kind: type):
        super().__init__(name, info)
        self.kind = kind
        self.edit = QLineEdit()
        self.edit.textChanged.connect(self.changed)
        self._place(self.edit)

    def get(self):
        text = self.edit.text().strip()
        try:
            value = self.kind(text)
        except ValueError:
            raise ValueError("enter a whole number" if self.kind is int else "enter a number") from None
        if self.kind is float and not math.isfinite(value):
            raise ValueError("enter a finite number")
        return value

    def set(self, value):
        self.edit.setText(repr(float(value)) if self.kind is float else str(value))

    def raw(self):
        return self.edit.text()

    def set_raw(self, raw):
        self.edit.setText(raw)


class TextEditor(FieldEditor):
    """A string; a path-like field (path, config, *_dir) gets a picker button."""

    def __init__(self, name, info):
        super().__init__(name, info)
        self.edit = QLineEdit()
        self.edit.setClearButtonEnabled(True)
        self.edit.textChanged.connect(self.changed)
        extra = []
        if name == "path" or name == "config" or name.endswith("_dir"):
            button = QToolButton()
            button.setText("…")
            button.setToolTip(f"Choose {label_for(name).lower()}")
            if name == "path":  # a folder (diffusers) or a single .safetensors file
                menu = QMenu(button)
                menu.addAction("Folder…", self.pick_folder)
                menu.addAction("File…", self.pick_file)
                button.setMenu(menu)
                button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
            else:
                button.clicked.connect(self.pick_folder)
            extra.append(button)
        self._place(self.edit, *extra)

    def pick_folder(self):
        path = QFileDialog.getExistingDirectory(self.widget, f"Choose {label_for(self.name).lower()}",
                                                self.edit.text())
        if path:
            self.edit.setText(path)

    def pick_file(self):
        path, _ = QFileDialog.getOpenFileName(self.widget, f"Choose {label_for(self.name).lower()}",
                                              self.edit.text(), "Checkpoints (*.safetensors *.ckpt);;All files (*)")
        if path:
            self.edit.setText(path)

    def get(self):
        return self.edit.text().strip()

    def set(self, value):
        self.edit.setText(str(value))

    def raw(self):
        return self.edit.text()

    def set_raw(self, raw):
        self.edit.setText(raw)


class LinesEditor(FieldEditor):
    """A list of strings, one per line (empty lines dropped)."""

    def __init__(self, name, info):
        super().__init__(name, info)
        self.edit = QPlainTextEdit()
        self.edit.setPlaceholderText("one per line")
        self.edit.setFixedHeight(self.edit.fontMetrics().lineSpacing() * 4 + 12)
        self.edit.textChanged.connect(self.changed)
        self._place(self.edit)

    def get(self):
        return [line.strip() for line in self.edit.toPlainText().splitlines() if line.strip()]

    def set(self, value):
        self.edit.setPlainText("\n".join(value))

    def raw(self):
        return self.edit.toPlainText()

    def set_raw(self, raw):
        self.edit.setPlainText(raw)


class FloatListEditor(FieldEditor):
    def __init__(self, name, info):
        super().__init__(name, info)
        self.edit = QLineEdit()
        self.edit.setPlaceholderText("comma-separated numbers")
        self.edit.textChanged.connect(self.changed)
        self._place(self.edit)

    def get(self):
        parts = [p.strip() for p in self.edit.text().split(",") if p.strip()]
        try:
            return [float(p) for p in parts]
        except ValueError:
            raise ValueError("enter numbers separated by commas") from None

    def set(self, value):
        self.edit.setText(", ".join(repr(float(v)) for v in value))

    def raw(self):
        return self.edit.text()

    def set_raw(self, raw):
        self.edit.setText(raw)


class JsonEditor(FieldEditor):
    """Any type this form has no editor for yet: its JSON text, so no field is ever hidden."""

    def __init__(self, name, info):
        super().__init__(name, info)
        self.edit = QLineEdit()
        self.edit.textChanged.connect(self.changed)
        self._place(self.edit)

    def get(self):
        try:
            return json.loads(self.edit.text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON ({exc.msg})") from None

    def set(self, value):
        self.edit.setText(json.dumps(value))

    def raw(self):
        return self.edit.text()

    def set_raw(self, raw):
        self.edit.setText(raw)


class _Cell(QTableWidgetItem):
    """A table cell whose shown text may differ from its value (EditRole), e.g. repeats 0 shown as the times the
    folder trains; editing it edits the value."""

    def __init__(self, text: str):
        super().__init__(text)
        self.shown: tuple[str, str] | None = None  # (text, tooltip)

    def data(self, role):
        if self.shown is not None and role == Qt.ItemDataRole.DisplayRole:
            return self.shown[0]
        if self.shown is not None and role == Qt.ItemDataRole.ToolTipRole:
            return self.shown[1]
        return super().data(role)

    def value_text(self) -> str:
        return str(super().data(Qt.ItemDataRole.EditRole) or "")


class ModelListEditor(FieldEditor):
    """A list of small sections (dataset folders, new tokens): a table with a column per field of the item
    model; items with a `path` get folder pickers, others an Add button that appends a row to fill in."""

    def __init__(self, name, info, item_model: type[BaseModel]):
        super().__init__(name, info)
        self.item_model = item_model
        self.columns = list(item_model.model_fields)
        self._editors = {c: _cell_kind(item_model.model_fields[c]) for c in self.columns}
        self.table = QTableWidget(0, len(self.columns))
        self.table.setHorizontalHeaderLabels([label_for(c) for c in self.columns])
        for i, column in enumerate(self.columns):
            self.table.horizontalHeaderItem(i).setToolTip(tooltip(column, item_model.model_fields[column]))
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        header.setStretchLastSection(True)
        metrics = self.table.horizontalHeader().fontMetrics()
        for col, column in enumerate(self.columns):
            width = metrics.horizontalAdvance(label_for(column)) + 20
            self.table.setColumnWidth(col, 170 if col == 0 else width)  # the path or token: the widest
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.verticalHeader().setVisible(False)
        self.table.setFixedHeight(120)
        self.display: dict = {}  # column -> fn(row texts) -> (text, tooltip) or None (CELL_DISPLAY)
        self.table.itemChanged.connect(lambda item: self._refresh_shown(item.row()))
        self.table.itemChanged.connect(self.changed)
        remove = QPushButton("Remove")
        remove.clicked.connect(self.remove_selected)
        if "path" in self.columns:
            add = QPushButton("Add folder…")
            add.setToolTip("Add an image folder to the dataset (or drop a folder on the window)")
            add.clicked.connect(self.pick_and_add)
            change = QPushButton("Change…")
            change.setToolTip("Choose another folder for the selected row")
            change.clicked.connect(self.pick_for_selected)
            row_buttons = (add, change, remove)
        else:
            add = QPushButton("Add")
            add.setToolTip("Add a row with the default values; then edit its cells")
            add.clicked.connect(self.add_blank)
            row_buttons = (add, remove)
        self.add_button = add
        buttons = QVBoxLayout()
        for b in row_buttons:
            buttons.addWidget(b)
        buttons.addStretch(1)
        holder = QWidget()
        holder.setLayout(buttons)
        self._place(self.table, holder)

    def add_row(self, values: dict) -> None:
        defaults = {c: f.get_default(call_default_factory=True) for c, f in self.item_model.model_fields.items()
                    if not f.is_required()}
        data = {**defaults, **values}
        self.table.blockSignals(True)
        row = self.table.rowCount()
        self.table.insertRow(row)
        for col, column in enumerate(self.columns):
            self.table.setItem(row, col, _Cell(_cell_text(data.get(column, ""))))
        self.table.blockSignals(False)
        self._refresh_shown(row)
        self.changed.emit()

    def _row_texts(self, row: int) -> dict[str, str]:
        return {column: self.table.item(row, col).value_text() for col, column in enumerate(self.columns)
                if self.table.item(row, col) is not None}

    def _refresh_shown(self, row: int) -> None:
        if not self.display or row < 0:
            return
        texts = self._row_texts(row)
        for column, shown in self.display.items():
            cell = self.table.item(row, self.columns.index(column))
            if cell is not None:
                cell.shown = shown(texts)
        self.table.viewport().update()

    def add_blank(self) -> None:
        self.add_row({})
        self.table.setCurrentCell(self.table.rowCount() - 1, 0)
        self.table.editItem(self.table.item(self.table.rowCount() - 1, 0))

    def pick_and_add(self):
        path = QFileDialog.getExistingDirectory(self.widget, "Add an image folder")
        if path:
            self.add_row({"path": path})

    def pick_for_selected(self):
        row = self.table.currentRow()
        if row < 0:
            return
        path = QFileDialog.getExistingDirectory(self.widget, "Choose the image folder",
                                                self.table.item(row, 0).value_text())
        if path:
            self.table.item(row, self.columns.index("path")).setText(path)

    def remove_selected(self):
        row = self.table.currentRow()
        if row >= 0:
            self.table.removeRow(row)
            self.changed.emit()

    def get(self):
        out = []
        for row in range(self.table.rowCount()):
            values = {}
            for col, column in enumerate(self.columns):
                text = self.table.item(row, col).value_text().strip()
                try:
                    values[column] = self._editors[column](text)
                except ValueError as exc:
                    raise ValueError(f"row {row + 1}, {column}: {exc}") from None
            out.append(values)
        return out

    def set(self, value):
        self.table.blockSignals(True)
        self.table.setRowCount(0)
        self.table.blockSignals(False)
        for item in value:
            self.add_row(item if isinstance(item, dict) else item.model_dump(mode="json"))
        self.changed.emit()

    def raw(self):
        return [[self.table.item(row, col).value_text() for col in range(len(self.columns))]
                for row in range(self.table.rowCount())]

    def set_raw(self, raw):
        self.table.blockSignals(True)
        self.table.setRowCount(0)
        for texts in raw:
            row = self.table.rowCount()
            self.table.insertRow(row)
            for col, text in enumerate(texts):
                self.table.setItem(row, col, _Cell(text))
        self.table.blockSignals(False)
        for row in range(self.table.rowCount()):
            self._refresh_shown(row)
        self.changed.emit()

    def set_error(self, message, sub=()):
        super().set_error(message, sub)
        # Colouring a cell is an item change too: keep it from re-triggering validation.
        blocker = QSignalBlocker(self.table)  # noqa: F841  (unblocks when it goes out of scope)
        for row in range(self.table.rowCount()):
            for col in range(self.table.columnCount()):
                self.table.item(row, col).setBackground(QBrush())
        if message and len(sub) >= 2 and isinstance(sub[0], int) and sub[1] in self.columns:
            cell = self.table.item(sub[0], self.columns.index(sub[1]))
            if cell is not None:  # the cell carries the mark
                cell.setBackground(QColor(255, 200, 200))


def _cell_kind(info: FieldInfo):
    if info.annotation is int:
        def parse_int(text):
            try:
                return int(text or "0")
            except ValueError:
                raise ValueError("enter a whole number") from None
        return parse_int
    if info.annotation is float:
        return float
    if info.annotation is bool:
        return lambda text: text.lower() in ("1", "true", "yes", "on")
    if typing.get_origin(info.annotation) is list:  # e.g. a folder's metadata filters: JSON in the cell
        def parse_json(text):
            try:
                return json.loads(text or "[]")
            except json.JSONDecodeError as exc:
                raise ValueError(f"not JSON ({exc.msg})") from None
        return parse_json
    return str


def _cell_text(value) -> str:
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return repr(value) if isinstance(value, float) else str(value)


def make_editor(name: str, info: FieldInfo) -> FieldEditor:
    ann = info.annotation
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Literal:
        return ComboEditor(name, info)
    if ann is bool:
        return CheckEditor(name, info)
    if ann is int:
        c = constraints(info)
        low = c["ge"] if "ge" in c else c["gt"] + 1 if "gt" in c else None
        high = c["le"] if "le" in c else c["lt"] - 1 if "lt" in c else None
        if low is not None and high is not None and -INT32_MAX <= low and high <= INT32_MAX:
            return SpinEditor(name, info, int(low), int(high))
        return NumberEditor(name, info, int)
    if ann is float:
        return NumberEditor(name, info, float)
    if ann is str:
        return TextEditor(name, info)
    if origin is list and args == (str,):
        return LinesEditor(name, info)
    if origin is list and args in ((float,), (int,)):
        return FloatListEditor(name, info)
    if origin is list and len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return ModelListEditor(name, info, args[0])
    return JsonEditor(name, info)


def field_editor(section: str, name: str, info: FieldInfo) -> FieldEditor:
    """The editor of one job field, as every page of the window shows it."""
    editor = make_editor(name, info)
    if isinstance(editor, ModelListEditor):
        editor.display = {column: fn for (s, n, column), fn in CELL_DISPLAY.items() if (s, n) == (section, name)}
    return editor


def sections() -> list[tuple[str, type[BaseModel]]]:
    """The schema's sections with one set of fields, in the order the schema declares them (the ones whose
    fields follow a choice, like the optimizer's, are `union_sections`)."""
    out = []
    for name, info in Job.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.append((name, ann))
    return out


def union_sections() -> dict[str, tuple[str, dict[str, type[BaseModel]]]]:
    """Sections whose fields depend on one of them (optimizer.name): section -> (that field, {choice: model})."""
    return {name: UNIONS[name] for name in Job.model_fields if name in UNIONS}


def choice_info(section: str) -> FieldInfo:
    """The choosing field of a union section, as one field whose options are every member's."""
    key, models = UNIONS[section]
    default = Job.model_fields[section].get_default(call_default_factory=True)
    member = models[getattr(default, key)].model_fields[key]
    return FieldInfo(annotation=typing.Literal[tuple(models)], default=getattr(default, key),
                     description=member.description)


class JobForm(QWidget):
    """Emits `changed` on every edit; `check()` gives the job (or None) and the reasons it cannot run."""

    changed = Signal()
    errorsShown = Signal()  # after each check: every editor's error_state is current

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.editors: dict[tuple[str, str], FieldEditor] = {}
        self.groups: dict[str, QGroupBox] = {}
        self.trainer_command: list[str] | None = None  # the block picker's `python -m trainer`; tests swap it
        self.block_picker: BlockPicker | None = None
        self.group_errors: dict[str, QLabel] = {}
        # Union sections: for each choice, the editors of its fields (choices sharing a model share them);
        # `editors` holds the chosen one's, the others' rows are hidden.
        self.choices: dict[str, dict[str, dict[str, FieldEditor]]] = {}
        self._forms: dict[str, QFormLayout] = {}
        self._loading = False
        body = QWidget()
        column = QVBoxLayout(body)
        plain, unions = dict(sections()), union_sections()
        for section in Job.model_fields:
            if section not in plain and section not in unions:
                continue
            group = QGroupBox(SECTION_TITLES.get(section, label_for(section)))
            form = QFormLayout(group)
            form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
            error = QLabel()
            error.setStyleSheet("color: #c00000;")
            error.hide()
            form.addRow(error)
            if section in plain:
                group.setToolTip(plain[section].__doc__ or "")
                for name, info in plain[section].model_fields.items():
                    self.editors[(section, name)] = self._add_row(form, section, name, info)
            else:
                key, models = unions[section]
                choice = self._add_row(form, section, key, choice_info(section))
                self.editors[(section, key)] = choice
                built: dict[type, dict[str, FieldEditor]] = {}
                for tag, model in models.items():
                    if model not in built:
                        built[model] = {name: self._add_row(form, section, name, info)
                                        for name, info in model.model_fields.items() if name != key}
                    self.choices.setdefault(section, {})[tag] = built[model]
                choice.changed.connect(lambda s=section: self._choose(s))
            self._forms[section] = form
            self.groups[section] = group
            self.group_errors[section] = error
            column.addWidget(group)
        column.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidget(body)
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(scroll)
        self.scroll = scroll
        self.set_job(Job())

    def _add_row(self, form: QFormLayout, section: str, name: str, info: FieldInfo) -> FieldEditor:
        editor = field_editor(section, name, info)
        editor.changed.connect(self._on_edit)
        if (section, name) in BLOCK_FIELDS:
            pick = QPushButton("Pick blocks…")
            pick.setToolTip("Check the blocks that train in a tree of the model's blocks "
                            "(reads the model in model.path)")
            pick.clicked.connect(self.pick_blocks)
            editor.row.addWidget(pick, 0, Qt.AlignmentFlag.AlignTop)
        label = QLabel(label_for(name))
        label.setToolTip(tooltip(name, info))
        if isinstance(editor, ModelListEditor):  # a table needs the full width
            form.addRow(label)
            form.addRow(editor.widget)
        else:
            form.addRow(label, editor.widget)
        return editor

    def _choose(self, section: str, values: dict | None = None) -> None:
        """Show the fields of the section's current choice, and only those. Without `values` (the user picked
        another optimizer), the shared fields keep their values and the rest take the new choice's defaults."""
        key = UNIONS[section][0]
        chosen = self.editors[(section, key)].get()
        fields = self.choices[section][chosen]
        active = {name: ed for (s, name), ed in self.editors.items() if s == section and name != key}
        picked = values is None
        if values is None and active != fields:
            current = {}
            for name, editor in active.items():
                try:
                    current[name] = editor.get()
                except ValueError:
                    pass
            values = switch_choice({key: None, **current}, section, chosen)
        if values is not None:
            loading, self._loading = self._loading, True
            try:
                for name, editor in fields.items():
                    editor.set(values[name])
            finally:
                self._loading = loading
        shown = {id(ed) for ed in fields.values()}
        for editor in {id(ed): ed for eds in self.choices[section].values() for ed in eds.values()}.values():
            self._forms[section].setRowVisible(editor.widget, id(editor) in shown)
            if id(editor) not in shown:
                editor.set_error(None)
        for name in active:
            del self.editors[(section, name)]
        self.editors.update({(section, name): ed for name, ed in fields.items()})
        if picked:
            self._on_edit()  # the job changed again: other fields, other values

    # ---- values --------------------------------------------------------------------------------------

    def set_job(self, job: Job) -> None:
        data = job.model_dump(mode="json")
        self._loading = True
        try:
            for section, (key, _) in UNIONS.items():
                if (section, key) in self.editors:
                    with QSignalBlocker(self.editors[(section, key)].input):
                        self.editors[(section, key)].set(data[section][key])
                    self._choose(section, data[section])
            for (section, name), editor in list(self.editors.items()):
                editor.set(data[section][name])
        finally:
            self._loading = False
        self._on_edit()

    def editor(self, dotted: str) -> FieldEditor:
        section, name = dotted.split(".", 1)
        return self.editors[(section, name)]

    def values(self) -> tuple[dict, dict[tuple, str]]:
        """The form as a job dict, and the fields whose text is not a value at all."""
        data: dict = {"version": Job.model_fields["version"].default}
        errors: dict[tuple, str] = {}
        for (section, name), editor in self.editors.items():
            try:
                data.setdefault(section, {})[name] = editor.get()
            except ValueError as exc:
                errors[(section, name)] = str(exc)
        return data, errors

    def check(self) -> tuple[Job | None, list[str]]:
        """Validate, mark each invalid field, and return the job (None if invalid) and the reasons Start
        is disabled (empty when the job can run)."""
        data, text_errors = self.values()
        errors: list[tuple[tuple, str]] = [(loc, msg) for loc, msg in text_errors.items()]
        job = None
        if not errors:
            try:
                job = Job.model_validate(data)
            except ValidationError as exc:
                errors = [_rule_field(union_loc(tuple(e["loc"])), _message(e)) for e in exc.errors()]
        self._show_errors(errors)
        reasons = [f"{'.'.join(str(p) for p in loc)}: {msg}" for loc, msg in errors]
        for (section, name), why in REQUIRED.items():
            if not data.get(section, {}).get(name):
                reasons.append(why)
        folders = data.get("dataset", {}).get("folders")
        if folders == []:
            reasons.append("Add a dataset folder (Dataset → folders, or drop a folder on the window)")
        elif isinstance(folders, list):
            for i, folder in enumerate(folders):
                if not str(folder.get("path", "")).strip():
                    reasons.append(f"dataset.folders.{i}.path: choose a folder")
        return (job if not reasons else None), reasons

    def job_or_none(self) -> Job | None:
        """The job when the schema accepts it (even if paths are still empty)."""
        data, text_errors = self.values()
        if text_errors:
            return None
        try:
            return Job.model_validate(data)
        except ValidationError:
            return None

    def section(self, name: str) -> BaseModel | None:
        """One section, validated on its own: the dataset view follows the dataset even while another
        field is invalid."""
        model = dict(sections())[name]
        values = {}
        for (section, field), editor in self.editors.items():
            if section == name:
                try:
                    values[field] = editor.get()
                except ValueError:
                    return None
        try:
            return model.model_validate(values)
        except ValidationError:
            return None

    def set_dataset_folders(self, paths: list[str]) -> None:
        self.editors[("dataset", "folders")].set([{"path": p} for p in paths])

    def pick_blocks(self) -> None:
        """Open the block picker on model.path (its config folder for a single-file checkpoint); OK writes
        the layer lists back into the form."""
        path, config = self.editor("model.path").get(), self.editor("model.config").get()
        if config and os.path.isfile(os.path.expanduser(path)):
            path = config
        if self.block_picker is not None:
            self.block_picker.deleteLater()
        self.block_picker = BlockPicker(path, self.editor("layers.train_blocks").get(),
                                        self.editor("layers.freeze_blocks").get(), self.trainer_command, self)
        self.block_picker.accepted.connect(self._on_blocks_picked)
        self.block_picker.open()

    def _on_blocks_picked(self) -> None:
        train, freeze = self.block_picker.lists()
        self.editor("layers.train_blocks").set(train)
        self.editor("layers.freeze_blocks").set(freeze)

    # ---- errors --------------------------------------------------------------------------------------

    def _show_errors(self, errors: list[tuple[tuple, str]]) -> None:
        by_field: dict[tuple[str, str], tuple[str, tuple]] = {}
        by_group: dict[str, str] = {}
        for loc, msg in errors:
            if len(loc) >= 2 and (loc[0], loc[1]) in self.editors:
                by_field.setdefault((loc[0], loc[1]), (msg, tuple(loc[2:])))
            elif loc:
                by_group.setdefault(str(loc[0]), msg)
        for key, editor in self.editors.items():
            msg, sub = by_field.get(key, (None, ()))
            editor.set_error(msg, sub)
        for section, label in self.group_errors.items():
            label.setText(by_group.get(section, ""))
            label.setVisible(section in by_group)
        self.errorsShown.emit()

    def _on_edit(self) -> None:
        if not self._loading:
            self.changed.emit()


def _rule_field(loc: tuple, msg: str) -> tuple[tuple, str]:
    """A rule over the whole job has no location of its own; its message starts with the field it is about
    ("prior.class_prompt: prior preservation needs a class prompt"): the error is shown at that field."""
    head, sep, rest = msg.partition(": ")
    parts = tuple(head.split("."))
    if not loc and sep and len(parts) == 2 and all(p.isidentifier() for p in parts):
        return parts, rest
    return loc, msg


def _message(err: dict) -> str:
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return "unknown key"
    rest = union_loc(tuple(err["loc"]))[2:]
    if rest:  # inside a list: say which item
        where = " ".join(f"row {p + 1}" if isinstance(p, int) else str(p) for p in rest)
        return f"{where}: {msg}"
    return msg
