"""Thumbnails decoded off the UI thread: QImageReader in a QThreadPool, results delivered by a signal.

QImage (unlike QPixmap) is safe to build in a worker thread; the UI turns it into a pixmap when it arrives.
"""

from __future__ import annotations

from PySide6.QtCore import QObject, QRunnable, QSize, Qt, QThreadPool, Signal
from PySide6.QtGui import QImage, QImageReader


class _Signals(QObject):
    loaded = Signal(str, QImage)  # path, image (null if unreadable)


class _Job(QRunnable):
    def __init__(self, path: str, size: int, signals: _Signals):
        super().__init__()
        self.path, self.size, self.signals = path, size, signals

    def run(self) -> None:
        reader = QImageReader(self.path)
        reader.setAutoTransform(True)
        full = reader.size()
        if full.isValid() and (full.width() > self.size or full.height() > self.size):
            # Decoding straight to the small size is much cheaper than decoding and then scaling (JPEG).
            reader.setScaledSize(full.scaled(QSize(self.size, self.size), Qt.AspectRatioMode.KeepAspectRatio))
        image = reader.read()
        self.signals.loaded.emit(self.path, image)


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

    def request(self, path: str) -> None:
        if path in self._pending:
            return
        self._pending.add(path)
        self._pool.start(_Job(path, self.size, self._signals))

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
