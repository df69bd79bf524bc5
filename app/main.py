"""Entry point: `python -m app`, `python launch.py`, or `app.main.main()`.

SDTRAINER_EXIT_AFTER_FIRST_FRAME=1 prints the seconds from process start to the first painted frame and
quits; bench/bench_window_start.py uses it.
"""

from __future__ import annotations

import time

_T0 = time.monotonic()  # before the Qt and pyqtgraph imports, which are most of the start-up time

import os  # noqa: E402
import sys  # noqa: E402

from PySide6.QtCore import QEvent, QObject, QTimer  # noqa: E402
from PySide6.QtGui import QIcon  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

from .settings import APPLICATION, ORGANIZATION, RESOURCES  # noqa: E402
from .window import MainWindow  # noqa: E402

FIRST_FRAME_ENV = "SDTRAINER_EXIT_AFTER_FIRST_FRAME"


class _FirstFrame(QObject):
    """Quits once the first paint has been delivered and the event loop is idle again."""

    def __init__(self, app: QApplication):
        super().__init__(app)
        self.app = app
        self.done = False

    def eventFilter(self, obj, event) -> bool:
        if not self.done and event.type() == QEvent.Type.Paint:
            self.done = True
            QTimer.singleShot(0, self._report)
        return False

    def _report(self) -> None:
        # The benchmark times the whole process from outside; this line is for a person running it by hand.
        print(f"first frame {time.monotonic() - _T0:.3f} s after app.main began importing", flush=True)
        self.app.quit()


def qt_binding_problem() -> str:
    """PySide6 6.12.0 on Python < 3.12 drops a reference to None on every call of a C++ method that returns
    nothing; a busy window then frees None and aborts within minutes. One line naming the fix, or ""."""
    import PySide6

    if sys.version_info < (3, 12) and PySide6.__version__.startswith("6.12."):
        return (f"PySide6 {PySide6.__version__} on Python {sys.version.split()[0]} crashes after a few minutes "
                "of training (a None refcount bug); install PySide6-Essentials<6.12 or use Python 3.12+")
    return ""


def main(argv: list[str] | None = None) -> int:
    app = QApplication.instance() or QApplication(sys.argv if argv is None else argv)
    app.setOrganizationName(ORGANIZATION)
    app.setApplicationName(APPLICATION)
    app.setWindowIcon(QIcon(str(RESOURCES / "icon.png")))
    if os.environ.get(FIRST_FRAME_ENV):
        app.installEventFilter(_FirstFrame(app))
    window = MainWindow()
    problem = qt_binding_problem()
    if problem:
        print(f"warning: {problem}", file=sys.stderr)
        window.run_panel.show_banner(problem, "error")
    window.show()
    return app.exec()


if __name__ == "__main__":
    sys.exit(main())
