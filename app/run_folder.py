"""Follow a run folder's events.jsonl: read what is there, then whatever is appended while the run goes on.

Reads happen in a worker thread (a 100,000-step file takes a while to parse) and arrive by signal; a
timer checks for growth once a second, so a run on a mounted disk or one still training is followed.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QObject, QRunnable, QThreadPool, QTimer, Signal

from trainer.events import read_events

FOLLOW_MS = 1000


class _ReadSignals(QObject):
    done = Signal(int, list, int, str)  # generation, events, new offset, error


class _Read(QRunnable):
    def __init__(self, generation: int, path: Path, offset: int, signals: _ReadSignals):
        super().__init__()
        self.generation, self.path, self.offset, self.signals = generation, path, offset, signals

    def run(self) -> None:
        try:
            events, offset = read_events(self.path, self.offset)
        except OSError as exc:
            self.signals.done.emit(self.generation, [], self.offset, f"{self.path}: {exc.strerror or exc}")
            return
        self.signals.done.emit(self.generation, events, offset, "")


class RunFolder(QObject):
    eventsRead = Signal(list)  # a batch of events, in file order
    failed = Signal(str)

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self.path: Path | None = None
        self.finished_seen = False
        self._offset = 0
        self._size = -1
        self._generation = 0
        self._busy = False
        self._pool = QThreadPool(self)
        self._pool.setMaxThreadCount(1)
        self._signals = _ReadSignals()
        self._signals.done.connect(self._on_read)
        self._timer = QTimer(self)
        self._timer.setInterval(FOLLOW_MS)
        self._timer.timeout.connect(self._check)

    @property
    def events_path(self) -> Path | None:
        return self.path / "events.jsonl" if self.path else None

    def open(self, folder: str | Path) -> None:
        folder = Path(folder)
        if not (folder / "events.jsonl").is_file():
            raise FileNotFoundError(f"{folder}: no events.jsonl here; pick a run folder (the job's output_dir)")
        self.close()
        self.path = folder
        self._check()
        self._timer.start()

    def close(self) -> None:
        self._timer.stop()
        self._generation += 1  # a read in flight for the old folder is dropped
        self.path = None
        self._offset, self._size, self._busy = 0, -1, False
        self.finished_seen = False

    def wait(self) -> None:
        self._pool.waitForDone()

    def _check(self) -> None:
        if self.path is None or self._busy:
            return
        try:
            size = self.events_path.stat().st_size
        except OSError as exc:
            self.failed.emit(f"{self.events_path}: {exc.strerror or exc}")
            return
        if size == self._size:
            return
        self._size = size
        self._busy = True
        self._pool.start(_Read(self._generation, self.events_path, self._offset, self._signals))

    def _on_read(self, generation: int, events: list, offset: int, error: str) -> None:
        if generation != self._generation:
            return
        self._busy = False
        if error:
            self.failed.emit(error)
            return
        if offset < self._size:
            self._size = -1  # a torn last line: read again on the next tick
        self._offset = offset
        if any(e["type"] == "run_finished" for e in events):
            self.finished_seen = True
        if events:
            self.eventsRead.emit(events)
