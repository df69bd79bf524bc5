"""Nothing typed into the job form is lost: a debounced autosave of unsaved edits, offered back after a crash.

"Unsaved" means the form differs from the job file it was last loaded from or saved to (or from the form the window
opened with). A few seconds after an edit stops, such a form is written to `autosave_path()`; a form that is back to
its saved state removes the file. A window that closes normally removes it too (it has asked the user), so a file
found at start-up was left by a window that crashed or was killed.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from pydantic import ValidationError
from PySide6.QtCore import QObject, QTimer, Signal

from trainer.job import Job

from .job_form import JobForm

DELAY_MS = 3000  # long enough that typing a path writes once, short enough that a crash loses a sentence at most


class Autosave(QObject):
    dirtyChanged = Signal(bool)

    def __init__(self, form: JobForm, path: Path, parent=None):
        super().__init__(parent)
        self.form, self.path = form, path
        self._saved = self._values()
        self._dirty = False
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(DELAY_MS)
        self._timer.timeout.connect(self.write_now)
        self.active = False  # set once the window has offered an earlier autosave back: until then it is evidence
        self.stopped = False
        self.source = ""  # the file the form was last loaded from or saved to

    def _values(self) -> dict:
        data, _ = self.form.values()  # a field whose text is not a value keeps its default here
        return data

    @property
    def dirty(self) -> bool:
        return self._dirty

    def edited(self) -> None:
        """The form changed: recompute dirtiness now, write later."""
        self._set_dirty(self._values() != self._saved)
        if self.active:
            self._timer.start()

    def mark_saved(self, source: str | None = None) -> None:
        """The form is now what a file holds (loaded, saved, or what the window opened with); `source` names the
        file, so that a restored autosave comes back with it."""
        if source is not None:
            self.source = source
        self._saved = self._values()
        self._set_dirty(False)
        if self.active:
            self.discard()

    def write_now(self) -> None:
        self._timer.stop()
        if not self.active:
            return
        if not self._dirty:
            self.discard()
            return
        payload = {"saved_at": time.strftime("%Y-%m-%d %H:%M:%S"), "file": self.source, "job": self._values()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=1), encoding="utf-8")
        os.replace(tmp, self.path)  # a crash mid-write leaves the previous autosave, never half a file

    def discard(self) -> None:
        self._timer.stop()
        self.path.unlink(missing_ok=True)

    def stop(self) -> None:
        """The window closed normally (having asked about unsaved changes): remove the autosave, write no more."""
        if self.active:
            self.discard()
        self.active, self.stopped = False, True

    def pending(self) -> dict | None:
        """What a crashed window left ({"saved_at", "job"}), or None; an unreadable file counts as none."""
        try:
            payload = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return payload if isinstance(payload, dict) and isinstance(payload.get("job"), dict) else None

    def restore(self, data: dict) -> None:
        """Fills the form with an autosaved job; it stays unsaved (dirty) against the file it came from."""
        try:
            self.form.set_job(Job.model_validate(data))
        except ValidationError:
            # The user may have crashed mid-edit with a value the schema refuses: set field by field, so the
            # form shows it marked in red rather than dropping the whole job.
            for section, fields in data.items():
                if not isinstance(fields, dict):
                    continue
                for name, value in fields.items():
                    if (section, name) in self.form.editors:
                        self.form.editors[(section, name)].set(value)
        self.edited()

    def _set_dirty(self, dirty: bool) -> None:
        if dirty != self._dirty:
            self._dirty = dirty
            self.dirtyChanged.emit(dirty)
