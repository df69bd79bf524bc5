"""A real window in a process of its own, training the job given (tests/test_app_survival.py kills it mid-run).

It answers every question with its first button, prints `training` when the first step event arrives, and runs
until it is killed."""

import sys

from PySide6.QtWidgets import QApplication

from app.window import MainWindow
from trainer.job import load_job

app = QApplication(sys.argv[:1])
window = MainWindow(restore=False)
window.ask = lambda title, text, buttons: buttons[0]
window.form.set_job(load_job(sys.argv[1]))
window.runner.stepReceived.connect(lambda event: print("training", flush=True))
if not window.start():
    sys.exit(f"did not start: {window.start_reasons}")
app.exec()
