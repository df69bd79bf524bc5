"""The live loss plot: raw and smoothed loss, the held-out validation loss, the learning rate on a second axis,
a log-scale toggle.

Points go into preallocated numpy arrays (grown by doubling) and the curves are redrawn at most 10 times
a second, with pyqtgraph's clip-to-view and peak downsampling, so 100,000 points stay smooth.
"""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import QCheckBox, QHBoxLayout, QLabel, QVBoxLayout, QWidget

from trainer.events import LOSS_SMOOTHING

REDRAW_MS = 100
pg.setConfigOptions(antialias=False, background="w", foreground="k")


class LossPlot(QWidget):
    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self._steps = np.zeros(1024, dtype=np.float64)
        self._loss = np.zeros(1024, dtype=np.float64)
        self._smooth = np.zeros(1024, dtype=np.float64)
        self._lr = np.zeros(1024, dtype=np.float64)
        self._n = 0
        self._val_steps: list[float] = []  # a point every validation.loss_every_n_steps: few, a list will do
        self._val_loss: list[float] = []
        self._ema = 0.0
        self._dirty = False

        self.view = pg.PlotWidget()
        plot = self.view.getPlotItem()
        plot.showGrid(x=True, y=True, alpha=0.2)
        plot.setLabel("bottom", "step")
        plot.setLabel("left", "loss")
        plot.getAxis("left").enableAutoSIPrefix(False)
        plot.addLegend(offset=(-10, 10))
        self.raw_curve = plot.plot(pen=pg.mkPen((120, 160, 220), width=1), name="loss")
        self.smooth_curve = plot.plot(pen=pg.mkPen((20, 70, 180), width=2), name="smoothed")
        for curve in (self.raw_curve, self.smooth_curve):
            curve.setClipToView(True)
            curve.setDownsampling(auto=True, method="peak")
        self.val_curve = plot.plot(pen=pg.mkPen((200, 30, 30), width=2), symbol="o", symbolSize=5,
                                   symbolBrush=(200, 30, 30), name="validation (held out)", connect="finite")
        # The learning rate has its own scale: a second ViewBox on the right axis, sharing x.
        self.lr_box = pg.ViewBox()
        plot.showAxis("right")
        plot.scene().addItem(self.lr_box)
        plot.getAxis("right").linkToView(self.lr_box)
        plot.getAxis("right").setLabel("learning rate", color="#c06000")
        self.lr_box.setXLink(plot)
        self.lr_curve = pg.PlotDataItem(pen=pg.mkPen((220, 120, 0), width=1, style=Qt.PenStyle.DashLine))
        self.lr_curve.setClipToView(True)
        self.lr_curve.setDownsampling(auto=True, method="peak")
        self.lr_box.addItem(self.lr_curve)
        plot.getViewBox().sigResized.connect(self._sync_lr_box)
        plot.legend.addItem(self.lr_curve, "learning rate")

        self.log_scale = QCheckBox("Log scale")
        self.log_scale.setToolTip("Show the loss on a logarithmic axis")
        self.log_scale.toggled.connect(self.set_log_scale)
        self.summary = QLabel("No steps yet")
        top = QHBoxLayout()
        top.addWidget(self.summary, 1)
        top.addWidget(self.log_scale)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(top)
        layout.addWidget(self.view, 1)

        self._timer = QTimer(self)
        self._timer.setInterval(REDRAW_MS)
        self._timer.timeout.connect(self._redraw)
        self._timer.start()

    @property
    def point_count(self) -> int:
        return self._n

    @property
    def val_point_count(self) -> int:
        return len(self._val_steps)

    def losses(self) -> dict[int, float]:
        """The raw loss curve as plotted: step -> loss."""
        return {int(step): float(loss) for step, loss in zip(self._steps[:self._n], self._loss[:self._n])}

    def clear(self) -> None:
        self._n = 0
        self._val_steps, self._val_loss = [], []
        self._ema = 0.0
        self._dirty = True
        self._redraw()

    def add_point(self, step: float, loss: float, lr: float) -> None:
        self.add_points(np.array([step]), np.array([loss]), np.array([lr]))

    def add_points(self, steps, losses, lrs) -> None:
        steps = np.asarray(steps, dtype=np.float64)
        losses = np.asarray(losses, dtype=np.float64)
        lrs = np.asarray(lrs, dtype=np.float64)
        if not len(steps):
            return
        # A resumed run starts again from its checkpoint's step: drop what came after it.
        if self._n and steps[0] <= self._steps[self._n - 1]:
            self._n = int(np.searchsorted(self._steps[:self._n], steps[0], side="left"))
            self._ema = self._ema_at(self._n)
        self._reserve(self._n + len(steps))
        end = self._n + len(steps)
        self._steps[self._n:end] = steps
        self._loss[self._n:end] = losses
        self._lr[self._n:end] = lrs
        ema = self._ema
        for i in range(self._n, end):  # plain loop: a few µs per point, batches are rare
            value = self._loss[i]
            if np.isfinite(value):
                ema = LOSS_SMOOTHING * ema + (1 - LOSS_SMOOTHING) * value
            self._smooth[i] = ema / (1 - LOSS_SMOOTHING ** (i + 1))
        self._ema = ema
        self._n = end
        self._dirty = True

    def add_val_points(self, steps, losses) -> None:
        """Validation losses (the `val_loss` events); a resumed run's evaluations replace those after its step."""
        for step, loss in zip(steps, losses):
            while self._val_steps and self._val_steps[-1] >= step:
                self._val_steps.pop()
                self._val_loss.pop()
            self._val_steps.append(float(step))
            self._val_loss.append(float("nan") if loss is None else float(loss))
        self._dirty = True

    def set_log_scale(self, on: bool) -> None:
        self.view.getPlotItem().setLogMode(x=False, y=on)
        if self.log_scale.isChecked() != on:
            self.log_scale.setChecked(on)

    def _ema_at(self, n: int) -> float:
        # Undo the debiasing of the last kept point to continue the EMA from there.
        return float(self._smooth[n - 1] * (1 - LOSS_SMOOTHING ** n)) if n else 0.0

    def _reserve(self, size: int) -> None:
        if size <= len(self._steps):
            return
        capacity = max(size, 2 * len(self._steps))
        for name in ("_steps", "_loss", "_smooth", "_lr"):
            old = getattr(self, name)
            new = np.zeros(capacity, dtype=np.float64)
            new[:self._n] = old[:self._n]
            setattr(self, name, new)

    def _redraw(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        n = self._n
        x = self._steps[:n]
        self.raw_curve.setData(x, self._loss[:n])
        self.smooth_curve.setData(x, self._smooth[:n])
        self.lr_curve.setData(x, self._lr[:n])
        self.val_curve.setData(np.array(self._val_steps), np.array(self._val_loss))
        if n:
            # The learning rate is never negative; autorange on a constant rate would centre it on a flat line.
            top = float(self._lr[:n].max())
            self.lr_box.setYRange(0.0, top * 1.05 if top > 0 else 1.0, padding=0)
            val = f" · validation {self._val_loss[-1]:.4g}" if self._val_loss else ""
            self.summary.setText(f"{n:,} steps · last loss {self._loss[n - 1]:.4g} · "
                                 f"smoothed {self._smooth[n - 1]:.4g}{val} · lr {self._lr[n - 1]:.3g}")
        else:
            self.summary.setText("No steps yet")

    def _sync_lr_box(self) -> None:
        self.lr_box.setGeometry(self.view.getPlotItem().getViewBox().sceneBoundingRect())
