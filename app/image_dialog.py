"""A window that shows one image large: click a thumbnail in the dataset or the gallery to get it."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QImage, QPixmap
from PySide6.QtWidgets import QDialog, QLabel, QScrollArea, QVBoxLayout, QWidget

MIN_SIDE = 512  # tiny images (demo samples are 64 px) are blown up with nearest-neighbour to this size


def show_image(label: QLabel, pixmap: QPixmap, path: str, side: int) -> None:
    """`pixmap` (read from `path`) on `label`: one smaller than `side` is blown up with nearest-neighbour so its
    pixels stay sharp; one that cannot be read says so."""
    if pixmap.isNull():
        label.setText(f"Cannot read {path}")
        return
    if max(pixmap.width(), pixmap.height()) < side:
        pixmap = pixmap.scaled(side, side, Qt.AspectRatioMode.KeepAspectRatio, Qt.TransformationMode.FastTransformation)
    label.setPixmap(pixmap)


class ImageDialog(QDialog):
    def __init__(self, path: str, caption: str = "", parent: QWidget | None = None, mask=None):
        """`mask`: a dataset image's mask (its file, or 'alpha'), shown as on the thumbnails."""
        super().__init__(parent)
        self.setWindowTitle(caption or path)
        self.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        pixmap = QPixmap(path)
        if mask is not None and not pixmap.isNull():
            from .thumbnails import with_mask

            pixmap = QPixmap.fromImage(with_mask(QImage(path), None if mask == "alpha" else str(mask)))
        image = QLabel()
        image.setAlignment(Qt.AlignmentFlag.AlignCenter)
        show_image(image, pixmap, path, MIN_SIDE)
        scroll = QScrollArea()
        scroll.setWidget(image)
        scroll.setWidgetResizable(True)
        text = QLabel(f"{caption}\n{path}" if caption else path)
        text.setWordWrap(True)
        text.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout = QVBoxLayout(self)
        layout.addWidget(scroll, 1)
        layout.addWidget(text)
        screen = self.screen().availableGeometry() if self.screen() else None
        width = min(pixmap.width() + 40, screen.width() - 80) if screen else pixmap.width() + 40
        height = min(pixmap.height() + 100, screen.height() - 80) if screen else pixmap.height() + 100
        self.resize(max(width, 320), max(height, 240))
