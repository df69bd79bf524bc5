"""The block picker: the denoiser's block tree from `python -m trainer inspect-model`, with a checkbox per block,
written back to the job as the shortest layers.train_blocks / layers.freeze_blocks lists.

The trainer reads the model (it needs torch) in a child process, so the window stays responsive and torch-free.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PySide6.QtCore import QProcess, Qt, Signal
from PySide6.QtWidgets import QAbstractItemView, QDialog, QDialogButtonBox, QHBoxLayout, QHeaderView, QLabel, \
    QPushButton, QTreeWidget, QTreeWidgetItem, QTreeWidgetItemIterator, QVBoxLayout, QWidget

from trainer.blocks import BlockEntryError, block_children, resolve_block

from .child import trainer_child

NAME_ROLE = Qt.ItemDataRole.UserRole
PARAMS_ROLE = Qt.ItemDataRole.UserRole + 1
OWN_ROLE = Qt.ItemDataRole.UserRole + 2  # parameters of the node's own, in none of its children
ERROR_STYLE = "color: #c00000;"


def format_count(n: int) -> str:
    return f"{n:,}"


def denoiser_tree(data: dict) -> tuple[str, dict]:
    """The denoiser's component name and tree from inspect-model's JSON; ValueError when it holds none."""
    components = data.get("components") if isinstance(data, dict) else None
    if not isinstance(components, dict):
        raise ValueError("no components in its output")
    for name in (data.get("denoiser"), "unet", "transformer"):
        if isinstance(name, str) and isinstance(components.get(name), dict):
            return name, components[name]
    raise ValueError("no denoiser (unet or transformer) in the model")


def resolve_entries(names: list[str], entries: list[str]) -> tuple[list[str], list[str]]:
    """The node names inside any of the entries (layers notation: dotted names, globs, '12-23' ranges,
    'blocks[-8:]' slices: the job's block notation, trainer/job.py), and the entries that match no node here."""
    children = block_children(names)
    inside: set[str] = set()
    unmatched = []
    for entry in entries:
        try:
            prefixes = resolve_block(entry, children)
        except BlockEntryError:
            unmatched.append(entry)
            continue
        inside |= {n for n in names for p in prefixes if n == p or n.startswith(p + ".")}
    return [n for n in names if n in inside], unmatched


class BlockPicker(QDialog):
    """Runs inspect-model on `model_path` when created; `loaded` once the tree is shown, `failed` with one line.
    After OK, `lists()` gives (train_blocks, freeze_blocks)."""

    loaded = Signal()
    failed = Signal(str)

    def __init__(self, model_path: str, train_blocks: list[str], freeze_blocks: list[str],
                 command_prefix: list[str] | None = None, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("Pick the blocks that train")
        self.model_path = model_path
        self.initial = (list(train_blocks), list(freeze_blocks))
        self.component = ""
        self.error = ""
        self._items: dict[str, QTreeWidgetItem] = {}
        self._all_params = 0

        self.status = QLabel()
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.tree = QTreeWidget()
        self.tree.setColumnCount(2)
        self.tree.setHeaderLabels(["Block", "Parameters"])
        self.tree.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        self.tree.setUniformRowHeights(True)
        header = self.tree.header()
        header.setStretchLastSection(False)
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.ResizeToContents)
        header.setDefaultAlignment(Qt.AlignmentFlag.AlignLeft)
        self.tree.headerItem().setTextAlignment(1, Qt.AlignmentFlag.AlignRight)
        self.tree.itemChanged.connect(self._on_item_changed)
        self.check_all = QPushButton("Check all")
        self.check_all.clicked.connect(lambda: self._set_all(Qt.CheckState.Checked))
        self.uncheck_all = QPushButton("Uncheck all")
        self.uncheck_all.clicked.connect(lambda: self._set_all(Qt.CheckState.Unchecked))
        self.total_label = QLabel()
        self.result_label = QLabel()
        self.result_label.setWordWrap(True)
        self.note_label = QLabel()
        self.note_label.setWordWrap(True)
        self.note_label.setStyleSheet("color: #8a5a00;")
        self.note_label.hide()
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        self.buttons.accepted.connect(self.accept)
        self.buttons.rejected.connect(self.reject)
        self.ok_button = self.buttons.button(QDialogButtonBox.StandardButton.Ok)
        self.ok_button.setEnabled(False)

        tools = QHBoxLayout()
        tools.addWidget(self.check_all)
        tools.addWidget(self.uncheck_all)
        tools.addStretch(1)
        layout = QVBoxLayout(self)
        layout.addWidget(self.status)
        layout.addWidget(self.tree, 1)
        layout.addLayout(tools)
        layout.addWidget(self.total_label)
        layout.addWidget(self.note_label)
        layout.addWidget(self.result_label)
        layout.addWidget(self.buttons)
        self._enable_tree(False)
        self.resize(560, 640)

        self.process = trainer_child(self, finished=self._on_finished, error=self._on_process_error)
        path = model_path.strip()
        if not path:
            self._fail("model.path: choose a base model first")
        elif not Path(path).expanduser().is_dir():
            self._fail(f"model.path: {path}: not a local folder (the block picker reads a local diffusers folder)")
        else:
            prefix = command_prefix or [sys.executable, "-m", "trainer"]
            self.status.setText("Reading the model…")
            self.process.start(prefix[0], [*prefix[1:], "inspect-model", path])

    # ---- results -------------------------------------------------------------------------------------

    def lists(self) -> tuple[list[str], list[str]]:
        """(train_blocks, freeze_blocks) for the checks: both empty when everything is checked, else the
        shorter of the checked or the unchecked top-most blocks."""
        checked, unchecked = self._top_most(Qt.CheckState.Checked), self._top_most(Qt.CheckState.Unchecked)
        if not unchecked:
            return [], []
        # Freezing the unchecked blocks would leave a partly checked block's own parameters (those in none of
        # its children) training, though they are not checked: then only the train list says what is meant.
        if not checked or (len(unchecked) < len(checked) and not self._partial_with_own_params()):
            return [], unchecked
        return checked, []

    def total(self) -> int:
        """Parameters in the checked blocks (a partly checked block counts only its checked children)."""
        return sum(self._items[name].data(0, PARAMS_ROLE) for name in self._top_most(Qt.CheckState.Checked))

    def item(self, name: str) -> QTreeWidgetItem:
        return self._items[name]

    # ---- the process ---------------------------------------------------------------------------------

    def _on_finished(self, code: int, status: QProcess.ExitStatus) -> None:
        stderr = bytes(self.process.readAllStandardError().data()).decode("utf-8", "replace")
        stdout = bytes(self.process.readAllStandardOutput().data()).decode("utf-8", "replace")
        if status != QProcess.ExitStatus.NormalExit or code != 0:
            self._fail(_error_line(stderr) or f"inspect-model exited with code {code}")
            return
        try:
            self.component, tree = denoiser_tree(json.loads(stdout))
        except ValueError as exc:  # json.JSONDecodeError is a ValueError too
            self._fail(f"inspect-model: {str(exc).splitlines()[0]}")
            return
        self._fill(tree)
        self.loaded.emit()

    def _on_process_error(self, error: QProcess.ProcessError) -> None:
        if error == QProcess.ProcessError.FailedToStart:
            self._fail(f"cannot start the trainer ({self.process.program()}): {self.process.errorString()}")

    def _fail(self, line: str) -> None:
        self.error = line
        self.status.setText(line)
        self.status.setStyleSheet(ERROR_STYLE)
        self.failed.emit(line)

    def done(self, result: int) -> None:
        if self.process.state() != QProcess.ProcessState.NotRunning:
            self.process.kill()  # a QProcess still running when deleted warns and blocks
            self.process.waitForFinished(2000)
        super().done(result)

    # ---- the tree ------------------------------------------------------------------------------------

    def _fill(self, tree: dict) -> None:
        self.tree.blockSignals(True)
        for node in tree.get("children", []):
            self.tree.addTopLevelItem(self._make_item(node))
        self._all_params = int(tree.get("params", 0))
        names = list(self._items)
        train, freeze = self.initial
        on, unmatched_train = resolve_entries(names, train) if train else (names, [])
        off, unmatched_freeze = resolve_entries(names, freeze)
        on_set, off_set = set(on), set(off)
        for name, item in self._items.items():
            if item.childCount() == 0:
                checked = name in on_set and name not in off_set
                item.setCheckState(0, Qt.CheckState.Checked if checked else Qt.CheckState.Unchecked)
        for i in range(self.tree.topLevelItemCount()):  # the first level of a partly checked block shows why
            top = self.tree.topLevelItem(i)
            top.setExpanded(top.checkState(0) == Qt.CheckState.PartiallyChecked)
        self.tree.blockSignals(False)
        unmatched = unmatched_train + unmatched_freeze
        if unmatched:
            self.note_label.setText("Not found in this tree (finer than it shows, or not in this model); OK "
                                    f"replaces them: {', '.join(unmatched)}")
            self.note_label.show()
        self.status.setStyleSheet("")
        self.status.setText(f"{self.component} of {self.model_path} — {format_count(self._all_params)} parameters. "
                            "Checked blocks train (in LoRA and full fine-tuning); the rest stay frozen.")
        self._enable_tree(True)
        self._update_labels()

    def _make_item(self, node: dict) -> QTreeWidgetItem:
        name, params = str(node["name"]), int(node["params"])
        item = QTreeWidgetItem([name, format_count(params)])
        item.setData(0, NAME_ROLE, name)
        item.setData(0, PARAMS_ROLE, params)
        item.setTextAlignment(1, Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        flags = Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsUserCheckable
        children = node.get("children", [])
        if children:
            flags |= Qt.ItemFlag.ItemIsAutoTristate  # a parent's box follows its children, and sets them all
        item.setFlags(flags)
        item.setCheckState(0, Qt.CheckState.Checked)
        self._items[name] = item
        for child in children:
            item.addChild(self._make_item(child))
        item.setData(0, OWN_ROLE, params - sum(int(c["params"]) for c in children))
        return item

    def _top_most(self, state: Qt.CheckState) -> list[str]:
        """Names of the top-most items in `state`, in tree order (partly checked ones are looked into)."""
        out = []
        pending = [self.tree.topLevelItem(i) for i in range(self.tree.topLevelItemCount())]
        while pending:
            item = pending.pop(0)
            item_state = item.checkState(0)
            if item_state == state:
                out.append(item.data(0, NAME_ROLE))
            elif item_state == Qt.CheckState.PartiallyChecked:
                pending[:0] = [item.child(i) for i in range(item.childCount())]
        return out

    def _partial_with_own_params(self) -> bool:
        it = QTreeWidgetItemIterator(self.tree)
        while it.value():
            item = it.value()
            if item.checkState(0) == Qt.CheckState.PartiallyChecked and item.data(0, OWN_ROLE) > 0:
                return True
            it += 1
        return False

    def _set_all(self, state: Qt.CheckState) -> None:
        self.tree.blockSignals(True)
        for i in range(self.tree.topLevelItemCount()):
            self.tree.topLevelItem(i).setCheckState(0, state)
        self.tree.blockSignals(False)
        self.tree.viewport().update()
        self._update_labels()

    def _on_item_changed(self, item: QTreeWidgetItem, column: int) -> None:
        if column == 0:
            self._update_labels()

    def _update_labels(self) -> None:
        total = self.total()
        share = f" ({100 * total / self._all_params:.1f}%)" if self._all_params else ""
        self.total_label.setText(f"Parameters in checked blocks: <b>{format_count(total)}</b>"
                                 f" of {format_count(self._all_params)}{share}")
        if not self._top_most(Qt.CheckState.Checked):
            self.result_label.setText("Check at least one block: with none checked nothing would train.")
            self.result_label.setStyleSheet(ERROR_STYLE)
            self.ok_button.setEnabled(False)
            return
        self.result_label.setStyleSheet("")
        self.ok_button.setEnabled(True)
        train, freeze = self.lists()
        if train:
            self.result_label.setText(f"OK sets <b>train_blocks</b> to the {len(train)} checked block(s): "
                                      f"{', '.join(train)} (freeze_blocks cleared).")
        elif freeze:
            self.result_label.setText(f"OK sets <b>freeze_blocks</b> to the {len(freeze)} unchecked block(s): "
                                      f"{', '.join(freeze)} (train_blocks cleared).")
        else:
            self.result_label.setText("Everything is checked: OK clears train_blocks and freeze_blocks "
                                      "(every block trains).")

    def _enable_tree(self, on: bool) -> None:
        for widget in (self.tree, self.check_all, self.uncheck_all):
            widget.setEnabled(on)


def _error_line(stderr: str) -> str:
    """The trainer's one-line error (`error: ...`, exit code 2), else the last line (a traceback's last line
    names the exception)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error: "):
            return line.removeprefix("error: ")
    return lines[-1] if lines else ""
