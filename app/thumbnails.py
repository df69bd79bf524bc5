"""Thumbnails decoded off the UI thread: QImageReader in a QThreadPool, results delivered by a signal.

QImage (unlike QPixmap) is safe to build in a worker thread; the UI turns it into a pixmap when it arrives. A
dataset image with a mask (trainer/data/masks.py decides which) is shown with what does not train tinted red.
"""

from __future__ import annotations

from PySide6.QtCore import QObject, QRunnable, QSize, Qt, QThreadPool, Signal
from PySide6.QtGui import QColor, QImage, QImageReader, QPainter

from trainer.data.files import ImageItem
from trainer.data.masks import mask_source

OUTSIDE_TINT = QColor(200, 0, 0, 150)  # over the pixels a mask leaves out of the loss


class _Signals(QObject):
    loaded = Signal(str, QImage)  # path, image (null if unreadable)


class _Job(QRunnable):
    def __init__(self, path: str, size: int, signals: _Signals, item: ImageItem | None = None):
        super().__init__()
        self.path, self.size, self.signals, self.item = path, size, signals, item

    def run(self) -> None:
        reader = QImageReader(self.path)
        reader.setAutoTransform(True)
        full = reader.size()
        if full.isValid() and (full.width() > self.size or full.height() > self.size):
            # Decoding straight to the small size is much cheaper than decoding and then scaling (JPEG).
            reader.setScaledSize(full.scaled(QSize(self.size, self.size), Qt.AspectRatioMode.KeepAspectRatio))
        image = reader.read()
        if self.item is not None and not image.isNull():
            source = mask_source(self.item)  # here, off the UI thread: 'alpha' reads the image's header
            if source is not None:
                image = with_mask(image, None if source == "alpha" else str(source))
        self.signals.loaded.emit(self.path, image)


def with_mask(image: QImage, mask_path: str | None) -> QImage:
    """The image on white with the pixels outside its mask tinted: the mask file at `mask_path` (stretched onto
    the image, as training does), or the image's own alpha channel when None."""
    size = image.size()
    if mask_path is None:
        keep = image.convertToFormat(QImage.Format.Format_ARGB32_Premultiplied)
    else:
        gray = QImage(mask_path).convertToFormat(QImage.Format.Format_Grayscale8)
        if gray.isNull():
            return image
        keep = QImage(size, QImage.Format.Format_ARGB32_Premultiplied)
        keep.fill(QColor(0, 0, 0))
        keep.setAlphaChannel(gray.scaled(size, Qt.AspectRatioMode.IgnoreAspectRatio,
                                         Qt.TransformationMode.SmoothTransformation))
    tint = QImage(size, QImage.Format.Format_ARGB32_Premultiplied)
    tint.fill(OUTSIDE_TINT)
    painter = QPainter(tint)
    painter.setCompositionMode(QPainter.CompositionMode.CompositionMode_DestinationOut)  # the mask cuts it away
    painter.drawImage(0, 0, keep)
    painter.end()
    out = QImage(size, QImage.Format.Format_ARGB32_Premultiplied)
    out.fill(QColor(255, 255, 255))  # transparency trains as white
    painter = QPainter(out)
    painter.drawImage(0, 0, image)
    painter.drawImage(0, 0, tint)
    painter.end()
    return out


class ThumbnailLoader(QObject):
    """Ask for a path once; `loaded(path, image)` arrives later. Repeated requests are ignored."""

    loaded = Signal(str, QImage)

    def __init__(self, size: int = 128, parent: QObject | None = None):
        super().__init__(parent)
        self.size = size
        self._pool = QThreadPool(self)
        self._pool.setMaxThreadCount(max(2, QThreadPool.globalInstance().maxThreadCount()))
        self._signals = _Signals()
        self._signals.loaded.connect(self._on_loaded)
        self._pending: set[str] = set()

    def request(self, path: str, item: ImageItem | None = None) -> None:
        """`item`: a dataset image, shown with its mask."""
        if path in self._pending:
            return
        self._pending.add(path)
        self._pool.start(_Job(path, self.size, self._signals, item))

    def clear(self) -> None:
        """Forget queued work (a new folder was chosen); running decodes finish and are ignored."""
        self._pool.clear()
        self._pending.clear()

    def wait(self) -> None:
        self._pool.waitForDone()

    def _on_loaded(self, path: str, image: QImage) -> None:
        if path in self._pending:
            self._pending.discard(path)
            self.loaded.emit(path, image)
