"""Validation images as a grid: one row per prompt, the step-0 baseline first, then steps newest first."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QSize, Qt, Signal
from PySide6.QtGui import QIcon, QImage, QPixmap
from PySide6.QtWidgets import QAbstractItemView, QHeaderView, QLabel, QTableWidget, QTableWidgetItem, \
    QVBoxLayout, QWidget

from .image_dialog import ImageDialog
from .thumbnails import ThumbnailLoader

THUMB = 160
PATH_ROLE = Qt.ItemDataRole.UserRole


class Gallery(QWidget):
    imageOpened = Signal(str)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.run_dir: Path | None = None
        self._samples: dict[tuple[int, str], dict] = {}  # (step, prompt) → event with a resolved path
        self._thumbs: dict[str, QPixmap] = {}
        self._cells: dict[str, list[QTableWidgetItem]] = {}  # path → the items showing it
        self._loader = ThumbnailLoader(THUMB, self)
        self._loader.loaded.connect(self._on_thumb)
        self.table = QTableWidget()
        self.table.setIconSize(QSize(THUMB, THUMB))
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.horizontalHeader().setDefaultSectionSize(THUMB + 12)
        self.table.verticalHeader().setDefaultSectionSize(THUMB + 12)
        self.table.verticalHeader().setMaximumWidth(260)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Fixed)
        self.table.cellClicked.connect(self._on_clicked)
        self.summary = QLabel("No validation images yet")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.summary)
        layout.addWidget(self.table, 1)

    @property
    def image_count(self) -> int:
        return len(self._samples)

    def clear(self, run_dir: str | Path | None = None) -> None:
        self.run_dir = Path(run_dir) if run_dir else None
        self._samples.clear()
        self._loader.clear()
        self._rebuild()

    def add_sample(self, event: dict) -> None:
        self.add_samples([event])

    def add_samples(self, events: list[dict]) -> None:
        for event in events:
            path = self._resolve(str(event.get("path", "")))
            self._samples[(int(event.get("step", 0)), str(event.get("prompt", "")))] = {**event, "path": path}
        if events:
            self._rebuild()

    def _resolve(self, path: str) -> str:
        # A run copied back from a rented GPU carries that machine's absolute paths: look in our samples/.
        if Path(path).is_file() or self.run_dir is None:
            return path
        local = self.run_dir / "samples" / Path(path).name
        return str(local) if local.is_file() else path

    def _rebuild(self) -> None:
        steps = sorted({step for step, _ in self._samples}, key=lambda s: (s != 0, -s))
        prompts = list(dict.fromkeys(prompt for _, prompt in sorted(self._samples, key=lambda k: k[0])))
        self.table.clear()
        self._cells.clear()
        self.table.setRowCount(len(prompts))
        self.table.setColumnCount(len(steps))
        self.table.setHorizontalHeaderLabels([f"step {s} (baseline)" if s == 0 else f"step {s}" for s in steps])
        self.table.setVerticalHeaderLabels([_elide(p) for p in prompts])
        for row, prompt in enumerate(prompts):
            self.table.verticalHeaderItem(row).setToolTip(prompt)
            for col, step in enumerate(steps):
                event = self._samples.get((step, prompt))
                if event is None:
                    continue
                item = QTableWidgetItem()
                item.setData(PATH_ROLE, event["path"])
                item.setToolTip(f"step {step} · seed {event.get('seed', '')}\n{prompt}\n{event['path']}")
                thumb = self._thumbs.get(event["path"])
                if thumb is not None:
                    item.setIcon(QIcon(thumb))
                else:
                    item.setText("loading…")
                    self._loader.request(event["path"])
                self.table.setItem(row, col, item)
                self._cells.setdefault(event["path"], []).append(item)
        if self._samples:
            self.summary.setText(f"{len(self._samples)} validation images · {len(prompts)} prompts · "
                                 f"{len(steps)} steps (newest first; click to enlarge)")
        else:
            self.summary.setText("No validation images yet")

    def _on_thumb(self, path: str, image: QImage) -> None:
        if image.isNull():
            return
        pixmap = QPixmap.fromImage(image)
        if max(pixmap.width(), pixmap.height()) < THUMB:  # tiny samples: scale up crisply
            pixmap = pixmap.scaled(THUMB, THUMB, Qt.AspectRatioMode.KeepAspectRatio,
                                   Qt.TransformationMode.FastTransformation)
        self._thumbs[path] = pixmap
        for item in self._cells.get(path, []):
            item.setText("")
            item.setIcon(QIcon(pixmap))

    def _on_clicked(self, row: int, col: int) -> None:
        item = self.table.item(row, col)
        if item is None:
            return
        path = item.data(PATH_ROLE)
        header = self.table.horizontalHeaderItem(col).text()
        prompt = self.table.verticalHeaderItem(row).toolTip()
        ImageDialog(path, f"{header}: {prompt}", self).show()
        self.imageOpened.emit(path)


def _elide(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"
