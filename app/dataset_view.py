"""The dataset as the trainer will see it: thumbnails with captions and repeats, and how many captions
are missing (users lose hours to captions that were silently ignored).

Scanning and thumbnail decoding both run off the UI thread; the list is a model/view, and a thumbnail is
only decoded when its row is first painted, so a folder of thousands of images stays responsive.
"""

from __future__ import annotations

from PySide6.QtCore import QAbstractListModel, QModelIndex, QObject, QRunnable, QSize, QSortFilterProxyModel, \
    Qt, QThreadPool, Signal
from PySide6.QtGui import QBrush, QColor, QImage, QPixmap
from PySide6.QtWidgets import QCheckBox, QDialog, QHBoxLayout, QLabel, QListView, QProgressBar, QPushButton, \
    QVBoxLayout, QWidget

import trainer.data.masks as masks
from trainer.data.files import ImageItem, Scan, scan_dataset
from trainer.job import DatasetSpec, JobError

from .captioner import CaptionDialog, CaptionProcess
from .image_dialog import ImageDialog
from .thumbnails import ThumbnailLoader

THUMB = 128
MISSING_ROLE = Qt.ItemDataRole.UserRole + 1
PATH_ROLE = Qt.ItemDataRole.UserRole + 2
MISSING_BACKGROUND = QColor(255, 228, 220)


class _ScanSignals(QObject):
    done = Signal(int, object, object, str)  # generation, Scan or None, (with a mask, without), error line


class _ScanJob(QRunnable):
    def __init__(self, generation: int, spec: DatasetSpec, signals: _ScanSignals):
        super().__init__()
        self.generation, self.spec, self.signals = generation, spec, signals

    def run(self) -> None:
        try:
            scan = scan_dataset(self.spec)
        except (JobError, OSError) as exc:
            self.signals.done.emit(self.generation, None, (0, 0), str(exc))
            return
        self.signals.done.emit(self.generation, scan, masks.count(scan.items), "")


class ImageListModel(QAbstractListModel):
    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self.items: list[ImageItem] = []
        self._rows: dict[str, int] = {}
        self._thumbs: dict[str, QPixmap] = {}
        self._loader = ThumbnailLoader(THUMB, self)
        self._loader.loaded.connect(self._on_thumb)
        self._placeholder = QPixmap(THUMB, THUMB)
        self._placeholder.fill(QColor(230, 230, 230))

    def set_items(self, items: list[ImageItem]) -> None:
        self.beginResetModel()
        self._loader.clear()
        self.items = items
        self._rows = {str(item.path): row for row, item in enumerate(items)}
        self.endResetModel()

    def rowCount(self, parent: QModelIndex = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.items)

    def data(self, index: QModelIndex, role: int = Qt.ItemDataRole.DisplayRole):
        if not index.isValid():
            return None
        item = self.items[index.row()]
        missing = item.caption_path is None
        if role == Qt.ItemDataRole.DisplayRole:
            caption = item.caption or "(empty caption)"
            return f"{'⚠ no caption file: ' if missing else ''}{caption}\n×{item.repeats}"
        if role == Qt.ItemDataRole.DecorationRole:
            key = str(item.path)
            thumb = self._thumbs.get(key)
            if thumb is None:
                self._loader.request(key, item)  # only rows that are painted ask for a thumbnail
                return self._placeholder
            return thumb
        if role == Qt.ItemDataRole.ToolTipRole:
            source = f"caption file: {item.caption_path}" if not missing else \
                "no caption file: the folder's instance prompt is used"
            mask = masks.mask_source(item) if item.mask_mode != "none" else None
            mask_line = "" if item.mask_mode == "none" else "\nmask: " + (
                "none found: trains everywhere" if mask is None else
                "its alpha channel" if mask == "alpha" else str(mask)) + " (red: left out of the loss)"
            return f"{item.path}\n{source}\ncaption: {item.caption}\nrepeats: {item.repeats}{mask_line}"
        if role == Qt.ItemDataRole.BackgroundRole and missing:
            return QBrush(MISSING_BACKGROUND)
        if role == MISSING_ROLE:
            return "missing" if missing else "found"
        if role == PATH_ROLE:
            return str(item.path)
        return None

    def _on_thumb(self, path: str, image: QImage) -> None:
        row = self._rows.get(path)
        if row is None:
            return
        self._thumbs[path] = QPixmap.fromImage(image) if not image.isNull() else self._placeholder
        index = self.index(row)
        self.dataChanged.emit(index, index, [Qt.ItemDataRole.DecorationRole])


class DatasetView(QWidget):
    scanned = Signal(object)  # the Scan, or None when the dataset cannot be read

    def __init__(self, parent: QWidget | None = None, trainer_command: list[str] | None = None):
        super().__init__(parent)
        self.scan: Scan | None = None
        self.error = ""
        self.mask_counts = (0, 0)
        self._generation = 0
        self._pool = QThreadPool(self)
        self._pool.setMaxThreadCount(1)
        self._signals = _ScanSignals()
        self._signals.done.connect(self._on_scanned)
        self._spec: DatasetSpec | None = None

        self.model = ImageListModel(self)
        self.proxy = QSortFilterProxyModel(self)
        self.proxy.setSourceModel(self.model)
        self.proxy.setFilterRole(MISSING_ROLE)
        self.list = QListView()
        self.list.setModel(self.proxy)
        self.list.setViewMode(QListView.ViewMode.IconMode)
        self.list.setIconSize(QSize(THUMB, THUMB))
        self.list.setGridSize(QSize(THUMB + 48, THUMB + 84))
        self.list.setUniformItemSizes(True)
        self.list.setResizeMode(QListView.ResizeMode.Adjust)
        self.list.setMovement(QListView.Movement.Static)
        self.list.setWordWrap(True)
        self.list.setLayoutMode(QListView.LayoutMode.Batched)
        self.list.setTextElideMode(Qt.TextElideMode.ElideRight)
        self.list.clicked.connect(self._open)

        self.counts = QLabel("No dataset folder yet: add one under Dataset, or drop a folder on the window.")
        self.counts.setWordWrap(True)
        self.only_missing = QCheckBox("Only missing captions")
        self.only_missing.setToolTip("Show only the images that have no caption file")
        self.only_missing.toggled.connect(lambda on: self.proxy.setFilterFixedString("missing" if on else ""))
        self.refresh = QPushButton("Rescan")
        self.refresh.setToolTip("Read the dataset folders again")
        self.refresh.clicked.connect(lambda: self.set_spec(self._spec, force=True))
        self.captioner = CaptionProcess(trainer_command, self)
        self.captioner.progress.connect(self._on_caption_progress)
        self.captioner.finished.connect(self._on_captioned)
        self.caption_button = QPushButton("Caption missing…")
        self.caption_button.setToolTip("Write captions for the images that have none, with an image-to-text "
                                       "model (python -m trainer caption)")
        self.caption_button.setEnabled(False)
        self.caption_button.clicked.connect(self.caption_missing)
        self.caption_progress = QProgressBar()
        self.caption_progress.setVisible(False)
        self.caption_status = QLabel()
        self.caption_status.setWordWrap(True)
        self.caption_status.setVisible(False)
        self._caption_model, self._caption_prefix = "", ""
        top = QHBoxLayout()
        top.addWidget(self.counts, 1)
        top.addWidget(self.only_missing)
        top.addWidget(self.caption_button)
        top.addWidget(self.refresh)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(top)
        layout.addWidget(self.caption_progress)
        layout.addWidget(self.caption_status)
        layout.addWidget(self.list, 1)

    def set_spec(self, spec: DatasetSpec | None, force: bool = False) -> None:
        """Scan these folders in the background (ignored if nothing changed)."""
        if spec is not None and not force and self._spec is not None and spec == self._spec:
            return
        self._spec = spec
        self._generation += 1
        if spec is None or not spec.folders:
            self._on_scanned(self._generation, None, (0, 0), "")
            return
        self.counts.setText("Scanning…")
        self._pool.start(_ScanJob(self._generation, spec.model_copy(deep=True), self._signals))

    def wait(self) -> None:
        """For tests and the Start check: let a scan in flight finish."""
        self._pool.waitForDone()

    def _on_scanned(self, generation: int, scan: Scan | None, mask_counts: tuple, error: str) -> None:
        if generation != self._generation:
            return  # a newer scan is on its way
        self.scan, self.error, self.mask_counts = scan, error, mask_counts
        self.model.set_items(scan.items if scan else [])
        if scan is None:
            self.counts.setText(f"<b style='color:#b00000'>{error}</b>" if error else
                                "No dataset folder yet: add one under Dataset, or drop a folder on the window.")
        else:
            self.counts.setText(self.summary(scan, mask_counts))
        self.caption_button.setEnabled(bool(scan and scan.captions_missing) and not self.captioner.running)
        self.scanned.emit(scan)

    @staticmethod
    def summary(scan: Scan, mask_counts: tuple = (0, 0)) -> str:
        text = (f"<b>{scan.num_images}</b> images · <b>{scan.captions_found}</b> captions found · "
                f"{scan.num_samples} samples per epoch with repeats")
        if any(mask_counts):
            text += f" · {mask_counts[0]} masks ({mask_counts[1]} images without: they train everywhere)"
        if scan.captions_missing:
            text += (f" · <b style='color:#b00000'>{scan.captions_missing} missing captions</b> "
                     "(those images train with the folder's instance prompt)")
        if scan.warnings:
            text += "<br><span style='color:#b00000'>" + "<br>".join(scan.warnings[:3]) + "</span>"
        return text

    # ---- captioning the images that have no caption ------------------------------------------------------

    def ask_caption(self) -> tuple[str, str, str, bool] | None:
        """(model, prefix, suffix, overwrite), or None when cancelled; tests replace this."""
        folders = self._spec.folders if self._spec else []
        dialog = CaptionDialog(self._caption_model, self._caption_prefix or
                               (folders[0].instance_prompt if folders else ""), self)
        return dialog.choice() if dialog.exec() == QDialog.DialogCode.Accepted else None

    def caption_missing(self) -> None:
        """Run `trainer caption` over the dataset's folders; the list is read again when it is done."""
        if self._spec is None or self.captioner.running:
            return
        choice = self.ask_caption()
        if not choice or not choice[0]:
            return
        model, prefix, suffix, overwrite = choice
        self._caption_model, self._caption_prefix = model, prefix
        self.caption_button.setEnabled(False)
        self.caption_progress.setRange(0, 0)  # busy until the model has loaded and the first batch is done
        self.caption_progress.setVisible(True)
        self.caption_status.setText(f"Captioning with {model}…")
        self.caption_status.setStyleSheet("")
        self.caption_status.setVisible(True)
        self.captioner.start(self._spec, model, prefix, suffix, overwrite)

    def _on_caption_progress(self, done: int, total: int) -> None:
        self.caption_progress.setRange(0, max(total, 1))
        self.caption_progress.setValue(done)
        self.caption_progress.setFormat("captioned %v of %m")

    def _on_captioned(self, ok: bool, message: str) -> None:
        self.caption_progress.setVisible(False)
        self.caption_status.setText(message if ok else f"Captioning failed: {message}")
        self.caption_status.setStyleSheet("" if ok else "color: #b00000;")
        self.set_spec(self._spec, force=True)  # the red missing-caption marks follow the files

    def close_captioner(self) -> None:
        """The window is closing."""
        self.captioner.kill()

    def _open(self, index: QModelIndex) -> None:
        path = index.data(PATH_ROLE)
        item = self.model.items[self.proxy.mapToSource(index).row()]
        ImageDialog(path, item.caption, self, mask=masks.mask_source(item)).show()
