"""The Essentials page: the fields most runs need, in the order a person fills them in, above "All settings".

Which fields, in which order and under which heading is marked in the schema (trainer/job.py `essential`), not
here. The page has editors of its own, built as the job form builds them, and mirrors the form: what is typed
here is copied into the form's editor as typed (a half-typed number too), the form's values and errors are copied
back. The form stays the one job the window validates, saves and runs.
"""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QBoxLayout, QFormLayout, QGroupBox, QHeaderView, QLabel, QPushButton, QScrollArea, \
    QVBoxLayout, QWidget

from trainer.job import essential_fields, essential_mark

from .job_form import BLOCK_FIELDS, FieldEditor, JobForm, ModelListEditor, field_editor, label_for, tooltip

INTRO = ("What most runs need, in the order you fill it in. Every other setting is under <b>All settings</b>; "
         "both pages edit the same job.")


class EssentialsPage(QWidget):
    def __init__(self, form: JobForm, parent: QWidget | None = None):
        super().__init__(parent)
        self.form = form
        self.editors: dict[tuple[str, str], FieldEditor] = {}
        self.step_errors: dict[str, tuple[QLabel, set[str]]] = {}  # heading -> (its error line, its sections)
        self._pulling = False
        body = QWidget()
        column = QVBoxLayout(body)
        intro = QLabel(INTRO)
        intro.setWordWrap(True)
        column.addWidget(intro)
        group_form: QFormLayout | None = None
        for section, name, mark in essential_fields():
            if mark["step"] not in self.step_errors:
                group = QGroupBox(mark["step"])
                group_form = QFormLayout(group)
                group_form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
                error = QLabel()
                error.setStyleSheet("color: #c00000;")
                error.setWordWrap(True)
                error.hide()
                group_form.addRow(error)
                self.step_errors[mark["step"]] = (error, set())
                column.addWidget(group)
            self.step_errors[mark["step"]][1].add(section)
            self.editors[(section, name)] = self._add_row(group_form, section, name)
        column.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidget(body)
        scroll.setWidgetResizable(True)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(scroll)
        form.changed.connect(self.pull)
        form.errorsShown.connect(self.show_errors)
        self.pull()
        self.show_errors()

    def _add_row(self, group_form: QFormLayout, section: str, name: str) -> FieldEditor:
        info = self.form.editors[(section, name)].info  # for a choice's field (optimizer), the current kind's
        editor = field_editor(section, name, info)
        editor.changed.connect(lambda key=(section, name): self.push(key))
        if (section, name) in BLOCK_FIELDS:
            pick = QPushButton("Pick blocks…")
            pick.setToolTip("Check the blocks that train in a tree of the model's blocks (reads the model in "
                            "model.path)")
            pick.clicked.connect(self.form.pick_blocks)
            editor.row.addWidget(pick, 0, Qt.AlignmentFlag.AlignTop)
        if isinstance(editor, ModelListEditor):
            self._essential_columns(editor)
        label = QLabel(label_for(name))
        label.setToolTip(tooltip(name, info))
        if isinstance(editor, ModelListEditor):
            group_form.addRow(editor.widget)
        else:
            group_form.addRow(label, editor.widget)
        return editor

    @staticmethod
    def _essential_columns(editor: ModelListEditor) -> None:
        """Only the item's marked columns, in their order; the rest keep their values (All settings shows them)."""
        fields = editor.item_model.model_fields
        marked = sorted((essential_mark(fields[c])["position"], c) for c in editor.columns
                        if essential_mark(fields[c]) is not None)
        header = editor.table.horizontalHeader()
        for col, column in enumerate(editor.columns):
            editor.table.setColumnHidden(col, essential_mark(fields[column]) is None)
        for target, (_, column) in enumerate(marked):
            header.moveSection(header.visualIndex(editor.columns.index(column)), target)
        # The page is narrow: the path takes what the few other columns leave, so nothing scrolls sideways.
        header.setStretchLastSection(False)
        for _, column in marked:
            header.setSectionResizeMode(editor.columns.index(column), QHeaderView.ResizeMode.ResizeToContents)
        if "path" in editor.columns:
            header.setSectionResizeMode(editor.columns.index("path"), QHeaderView.ResizeMode.Stretch)
        # The row buttons go under the table, in a line, so the table has the page's width.
        editor.row.setDirection(QBoxLayout.Direction.TopToBottom)
        buttons = editor.row.itemAt(editor.row.count() - 1).widget().layout()
        buttons.setDirection(QBoxLayout.Direction.LeftToRight)
        buttons.setContentsMargins(0, 0, 0, 0)

    # ---- one job: the form's ---------------------------------------------------------------------------

    def push(self, key: tuple[str, str]) -> None:
        """An edit here: the form's editor of the same field takes it as typed."""
        if self._pulling:
            return
        raw, target = self.editors[key].raw(), self.form.editors[key]
        if target.raw() != raw:
            target.set_raw(raw)

    def pull(self) -> None:
        """The form changed (an edit there, a job loaded): show its values. Only editors that differ are set, so
        the one being typed in keeps its cursor."""
        self._pulling = True
        try:
            for key, editor in self.editors.items():
                raw = self.form.editors[key].raw()
                if editor.raw() != raw:
                    editor.set_raw(raw)
        finally:
            self._pulling = False

    def show_errors(self) -> None:
        for key, editor in self.editors.items():
            editor.set_error(*self.form.editors[key].error_state)
        for label, sections in self.step_errors.values():
            lines = [self.form.group_errors[s].text() for s in sorted(sections)
                     if s in self.form.group_errors and self.form.group_errors[s].text()]
            label.setText("\n".join(lines))
            label.setVisible(bool(lines))
