"""The Queue tab: jobs run one after another through the window's own trainer process, so the Run tab shows
each as it trains.

The rules are the headless queue's (trainer/job_queue.py): every waiting job is checked up front by its
`check_all`, each trainer exit code is named by its `STATUS`, a failed job is marked and the queue goes on, a
stopped job stops the queue. Each queued job is a full copy of the job file in the window's data folder
(settings.queue_dir), listed in queue.json there, so the queue survives the window and later edits in the editor
do not reach a queued job.

The panel asks and warns through its host, the main window (`ask`, `show_message`), and starts a job through the
host's `run_job`, the same path Start takes after its checks.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from PySide6.QtCore import Qt, QTimer
from PySide6.QtGui import QBrush, QColor, QFont
from PySide6.QtWidgets import QFileDialog, QHBoxLayout, QHeaderView, QInputDialog, QLabel, QPushButton, \
    QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget

from trainer.events import read_events
from trainer.job import Job, JobError, apply_override, from_sparse, load_job, save_job
from trainer.job_queue import STATUS, check_all

from . import live_run
from .settings import queue_dir

LIST_FILE = "queue.json"
# job_queue's words for an exit, as the table shows them; "waiting" and "running" exist only in the window.
SHOWN = {"completed": "done", "failed": "failed", "stopped": "stopped", "waiting": "waiting", "running": "running"}
COLOURS = {"running": "#1f5fbf", "done": "#2e7d32", "failed": "#c62828", "stopped": "#b26a00", "waiting": "#555555"}
COLUMNS = ("Job", "Status", "Output folder", "Note")


@dataclass
class Queued:
    file: str  # the job's own copy, inside the queue folder
    name: str
    status: str = "waiting"
    note: str = ""  # what a duplicate changed, or why the job failed


class QueuePanel(QWidget):
    def __init__(self, host, runner, parent: QWidget | None = None):
        super().__init__(parent)
        self.host = host
        self.runner = runner
        self.folder = queue_dir()
        self.entries: list[Queued] = []
        self.running: Queued | None = None  # the job this panel started and whose exit it waits for
        self._stopping = False

        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setSelectionBehavior(QTableWidget.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QTableWidget.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.setWordWrap(False)
        self.table.setTextElideMode(Qt.TextElideMode.ElideMiddle)  # a folder's start and its own name show
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(2, QHeaderView.ResizeMode.Interactive)
        header.resizeSection(2, 340)
        header.setStretchLastSection(True)
        self.table.itemSelectionChanged.connect(self.update_buttons)

        self.btn_add = self._button("Add current job", self.add_current,
                                    "Queue a copy of the job in the editor (later edits do not change it)")
        self.btn_files = self._button("Add job files…", self.add_files_dialog, "Queue copies of saved job files")
        self.btn_dup = self._button("Duplicate with…", self.duplicate_dialog,
                                    "For a sweep: one copy of the selected job per value of a field (network.rank "
                                    "= 8,16,32), each with its own output folder")
        self.btn_up = self._button("Up", lambda: self.move(-1), "Run the selected job earlier")
        self.btn_down = self._button("Down", lambda: self.move(1), "Run the selected job later")
        self.btn_remove = self._button("Remove", self.remove_selected, "Take the selected job off the queue")
        self.btn_run = self._button("Run queue", self.run, "Train the waiting jobs one after another; a failed job "
                                    "is marked and the queue goes on")
        self.btn_stop = self._button("Stop", self.stop, "Stop the running job (it saves a resumable checkpoint) "
                                     "and the queue")
        self.summary = QLabel()

        edit_row = QHBoxLayout()
        for button in (self.btn_add, self.btn_files, self.btn_dup, self.btn_up, self.btn_down, self.btn_remove):
            edit_row.addWidget(button)
        edit_row.addStretch(1)
        run_row = QHBoxLayout()
        run_row.addWidget(self.summary, 1)
        run_row.addWidget(self.btn_run)
        run_row.addWidget(self.btn_stop)
        layout = QVBoxLayout(self)
        layout.addLayout(edit_row)
        layout.addWidget(self.table, 1)
        layout.addLayout(run_row)

        runner.finished.connect(self._on_trainer_finished)
        runner.stateChanged.connect(self._on_trainer_state)
        self.load()

    def _button(self, text: str, slot, tip: str) -> QPushButton:
        button = QPushButton(text)
        button.setToolTip(tip)
        button.clicked.connect(slot)
        return button

    # ---- the list on disk ----------------------------------------------------------------------------

    def load(self) -> None:
        path = self.folder / LIST_FILE
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))["jobs"] if path.is_file() else []
            self.entries = [Queued(**row) for row in rows]
        except (ValueError, KeyError, TypeError) as exc:
            self.entries = []
            self.host.show_message("Cannot restore the queue", f"{path}: {exc}")
        self._refresh()

    def save(self) -> None:
        path = self.folder / LIST_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"jobs": [asdict(e) for e in self.entries]}, indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)  # a window killed mid-write leaves the previous list, never half of one

    def job_of(self, entry: Queued) -> Job:
        return load_job(self.folder / entry.file)

    def output_of(self, entry: Queued) -> Path:
        try:
            return Path(self.job_of(entry).output.output_dir).expanduser().resolve()
        except JobError:
            return Path()

    # ---- adding, ordering ----------------------------------------------------------------------------

    def add_job(self, job: Job, name: str, note: str = "", at: int | None = None) -> Queued | None:
        """A copy of the job at the end of the queue (or at `at`), once it passes the headless queue's check
        beside the other waiting jobs (valid, data and model there, an output folder of its own)."""
        number = 1 + max((int(Path(e.file).stem) for e in self.entries if Path(e.file).stem.isdigit()), default=0)
        entry = Queued(f"{number:03d}.json", name, note=note)
        path = self.folder / entry.file
        save_job(job, path)
        try:
            check_all([str(self.folder / e.file) for e in self.entries if e.status == "waiting"] + [str(path)], [])
        except JobError as exc:
            path.unlink()
            self.host.show_message("Cannot queue this job", self._rows_named(str(exc), entry, name))
            return None
        self.entries.insert(len(self.entries) if at is None else at, entry)
        self.save()
        self._refresh(select=self.entries.index(entry))
        return entry

    def add_current(self) -> Queued | None:
        job = self.host.form.job_or_none()
        if job is None:
            self.host.show_message("Cannot queue the job", "Fix the fields marked in red first")
            return None
        return self.add_job(job, job.output.name)  # the editor's job has no file name of its own

    def add_files(self, paths: list[str | Path]) -> list[Queued]:
        added = []
        for path in paths:
            try:
                job = load_job(Path(path).resolve())  # relative paths are read from the file's own folder
            except JobError as exc:
                self.host.show_message("Cannot queue this file", str(exc))
                continue
            entry = self.add_job(job, Path(path).stem)
            if entry is not None:
                added.append(entry)
        return added

    def add_files_dialog(self) -> None:
        paths, _ = QFileDialog.getOpenFileNames(self, "Queue job files", str(Path.home()),
                                                "Job files (*.json);;All files (*)")
        self.add_files(paths)

    def duplicate(self, row: int, field: str, values: list[str]) -> list[Queued]:
        """One copy of the job at `row` per value of `field` (a dotted path, as `--set` takes it), placed after
        it; each writes to `<output folder>-<field's last part><value>` unless the field is the output folder."""
        source = self.entries[row]
        base = self.job_of(source).model_dump(mode="json")
        leaf = field.strip().split(".")[-1]
        added: list[Queued] = []
        for value in values:
            try:
                data = apply_override(base, f"{field.strip()}={value}")
                if field.strip() != "output.output_dir":
                    data = apply_override(data, f"output.output_dir={base['output']['output_dir']}-{leaf}{value}")
                job = from_sparse(data, f"{source.name} with {field}={value}")
            except JobError as exc:
                self.host.show_message("Cannot duplicate", str(exc))
                break
            entry = self.add_job(job, source.name, note=f"{field.strip()}={value}",
                                 at=row + 1 + len(added))
            if entry is None:
                break
            added.append(entry)
        return added

    def duplicate_dialog(self) -> None:
        row = self.selected_row()
        if row is None:
            return
        field, ok = QInputDialog.getText(self, "Duplicate with…", "Field to change (as --set names it):",
                                         text="network.rank")
        if not ok or not field.strip():
            return
        values, ok = QInputDialog.getText(self, "Duplicate with…", f"Values of {field}, separated by commas "
                                          "(one job each):", text="8,16,32")
        if ok and values.strip():
            self.duplicate(row, field, [v.strip() for v in values.split(",") if v.strip()])

    def selected_row(self) -> int | None:
        rows = self.table.selectionModel().selectedRows()
        return rows[0].row() if rows else None

    def move(self, by: int) -> None:
        row = self.selected_row()
        if row is None or not 0 <= row + by < len(self.entries):
            return
        self.entries.insert(row + by, self.entries.pop(row))
        self.save()
        self._refresh(select=row + by)

    def remove_selected(self) -> None:
        row = self.selected_row()
        if row is None or self.entries[row] is self.running:
            return
        entry = self.entries.pop(row)
        (self.folder / entry.file).unlink(missing_ok=True)
        self.save()
        self._refresh(select=min(row, len(self.entries) - 1) if self.entries else None)

    # ---- running -------------------------------------------------------------------------------------

    def run(self) -> bool:
        """Checks every waiting job as `trainer queue` does, then starts the first; False if nothing started."""
        waiting = [e for e in self.entries if e.status == "waiting"]
        if not waiting or self.runner.state != "idle":
            return False
        try:
            check_all([str(self.folder / e.file) for e in waiting], [])
        except JobError as exc:
            self.host.show_message("Cannot run the queue", self._rows_named(str(exc)))
            return False
        self._stopping = False
        return self._start_next()

    def stop(self) -> None:
        self.runner.stop()  # the window's Stop does the same; _on_trainer_state ends the queue for both

    def _on_trainer_state(self, state: str) -> None:
        if state == "stopping" and self.running is not None:
            self._stopping = True  # asked to stop, or terminated before it connected: the queue ends too
        self.update_buttons()

    def _start_next(self, resume_entry: Queued | None = None) -> bool:
        if self.running is not None or self.runner.state != "idle":
            return False  # a late call: the queue already goes on, or a run the editor started holds the trainer
        while True:
            entry = resume_entry or next((e for e in self.entries if e.status == "waiting"), None)
            if entry is None or self._stopping:
                self.running = None
                self._refresh()
                return False
            entry.status = "running"
            self.running = entry
            self.save()
            self._refresh()
            try:
                started = self.host.run_job(self.job_of(entry), self.output_of(entry), resume=resume_entry is not None)
            except JobError as exc:
                started, why = False, str(exc)
            else:
                why = "the trainer did not start"
            if started:
                return True
            entry.status, entry.note = "failed", _joined(entry.note, why)
            resume_entry = None
            self.save()

    def _on_trainer_finished(self, code: int, summary: str) -> None:
        entry = self.running
        if entry is None:
            return  # a run the editor's Start began: not the queue's
        status = STATUS.get(code, "failed")
        if self._stopping and code < 0:
            status = "stopped"  # terminated on Stop before it connected: it trained nothing, so nothing failed
        entry.status = SHOWN[status]
        if status == "failed":
            entry.note = _joined(entry.note, summary)
        self.running = None
        self.save()
        self._refresh()
        if not self._stopping and status != "stopped":
            # Later, not inside the trainer's own finished signal: the window's slot for it clears the record of
            # the live run, which must name the next job's trainer, not be cleared after it was written.
            QTimer.singleShot(0, self._start_next)

    # ---- a queue left running by an earlier window ---------------------------------------------------

    def offer_resume(self) -> None:
        """A job still marked running from an earlier window: if its trainer still trains, the window's own offer
        to follow it stands (`followed` marks how it ends); otherwise its events say how it ended, and a job cut
        short is offered to be resumed from its last checkpoint, with the rest of the queue after it."""
        entry = next((e for e in self.entries if e.status == "running"), None)
        if entry is None or self.running is not None:
            return
        out = self.output_of(entry)
        alive = live_run.still_running()
        if alive is not None and alive[0].resolve() == out:
            return
        events = read_events(out / "events.jsonl")[0] if (out / "events.jsonl").is_file() else []
        ends = [e["status"] for e in events if e["type"] == "run_finished"]
        if ends and ends[-1] in ("completed", "failed"):
            entry.status = SHOWN[ends[-1]]
            self.save()
            self._refresh()
            return
        answer = self.host.ask("The queue was interrupted",
                               f"Queued job {entry.name} ({out}) was training when the window closed.\n\nResume it "
                               "from its last checkpoint, then go on with the queue?", ["Resume the queue", "Not now"])
        if answer == "Resume the queue":
            self._stopping = False
            self._start_next(resume_entry=entry)
        else:
            entry.status = "stopped"
            self.save()
            self._refresh()

    def followed(self, events: list) -> None:
        """The run folder the window follows: when it is a queued job's and it ends, mark the job."""
        ends = [e["status"] for e in events if e["type"] == "run_finished"]
        folder = getattr(self.host, "live_run_dir", None)
        if not ends or folder is None or self.running is not None:
            return
        for entry in self.entries:
            if entry.status == "running" and self.output_of(entry) == Path(folder).resolve():
                entry.status = SHOWN.get(ends[-1], "failed")
                self.save()
                self._refresh()

    def _rows_named(self, text: str, new: Queued | None = None, name: str = "") -> str:
        """check_all names the queue's own copies of the job files; the user knows them by row and name."""
        for row, entry in enumerate(self.entries):
            text = text.replace(str(self.folder / entry.file), f"row {row + 1} ({entry.name})")
        if new is not None:
            text = text.replace(str(self.folder / new.file), f"the new job ({name})")
        return text

    # ---- the table -----------------------------------------------------------------------------------

    def update_buttons(self) -> None:
        idle = self.runner.state == "idle"
        row = self.selected_row()
        chosen = row is not None
        self.btn_dup.setEnabled(chosen)
        self.btn_up.setEnabled(chosen and row > 0)
        self.btn_down.setEnabled(chosen and row < len(self.entries) - 1)
        self.btn_remove.setEnabled(chosen and self.entries[row] is not self.running)
        self.btn_run.setEnabled(idle and self.running is None and any(e.status == "waiting" for e in self.entries))
        self.btn_stop.setEnabled(self.running is not None)

    def _refresh(self, select: int | None = None) -> None:
        self.table.setRowCount(len(self.entries))
        bold = QFont()
        bold.setBold(True)
        for row, entry in enumerate(self.entries):
            cells = (entry.name, entry.status, str(self.output_of(entry)), entry.note)
            for column, text in enumerate(cells):
                item = QTableWidgetItem(text)
                item.setToolTip(text)
                if column == 1:
                    item.setForeground(QBrush(QColor(COLOURS.get(entry.status, "#000000"))))
                    item.setFont(bold)
                    item.setTextAlignment(Qt.AlignmentFlag.AlignCenter)
                self.table.setItem(row, column, item)
        if select is not None:
            self.table.selectRow(select)
        counts = {s: sum(e.status == s for e in self.entries) for s in COLOURS}
        self.summary.setText(", ".join(f"{n} {s}" for s, n in counts.items() if n) or
                             "The queue is empty: add the job in the editor, or saved job files.")
        self.update_buttons()


def _joined(note: str, why: str) -> str:
    return f"{note}: {why}" if note else why


