"""The window is not the run: killing it mid-run leaves the real trainer to finish, a window opened afterwards
offers to follow that run, and a trainer that goes silent while its process lives is shown as stalled."""

import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

from app import live_run
from app.window import MainWindow
from test_app_run import setup_job
from trainer.events import read_events
from trainer.job import load_job, save_job

ROOT = Path(__file__).resolve().parent.parent


def test_a_killed_window_leaves_the_run_to_finish_and_a_new_window_follows_it(demo_job, qtbot):
    job = load_job(demo_job)
    job.schedule.max_steps, job.output.checkpoint_every, job.validation.prompts = 12, 4, []
    save_job(job, demo_job)
    run = demo_job.parent / "run"
    child = subprocess.Popen([sys.executable, str(ROOT / "tests" / "window_child.py"), str(demo_job)], cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    ready, _, _ = select.select([child.stdout], [], [], 240)
    assert ready and child.stdout.readline().strip() == "training", child.stderr.read()[-2000:]
    child.kill()  # the window dies mid-run: no close event, no chance to ask or detach
    child.wait()

    found = live_run.still_running()
    assert found is not None and found[0] == run, "the trainer did not outlive its window"
    window = MainWindow(restore=True)
    window.questions = []
    window.ask = lambda title, text, buttons: window.questions.append(title) or "Follow it"
    qtbot.addWidget(window)
    qtbot.waitUntil(lambda: bool(window.questions), timeout=30_000)
    assert window.questions == ["A run is still training"]
    qtbot.waitUntil(lambda: window.run_panel.last_status == "completed", timeout=300_000)
    events, _ = read_events(run / "events.jsonl")
    assert [e["step"] for e in events if e["type"] == "step"] == list(range(1, 13))
    assert (run / "final" / "pytorch_lora_weights.safetensors").is_file()
    deadline = time.monotonic() + 30
    while live_run._alive(found[1]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert live_run.still_running() is None  # nothing left to offer next time


def test_a_silent_trainer_is_shown_as_stalled_and_can_be_stopped(app_window, qtbot, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "forever")
    monkeypatch.setenv("FAKE_DELAY", "60")  # alive, connected, and silent after its first events
    setup_job(app_window, tmp_path)
    app_window.runner.stall_s = 1.0
    shown = []  # what the window showed when it asked

    def ask(title, text, buttons):
        shown.append((title, app_window.run_panel.banner.text(), app_window.state_label.text(), buttons))
        return "Stop it"

    app_window.ask = ask
    with qtbot.waitSignal(app_window.runner.finished, timeout=20000) as finished:
        assert app_window.start()
    assert len(shown) == 1
    title, banner, state, buttons = shown[0]
    assert title == "The trainer has stalled" and buttons == ["Keep waiting", "Stop it"]
    assert re.search(r"No event from the trainer for \d+ s", banner) and "may be hung" in banner
    assert state == "Stalled"
    assert finished.args[0] < 0  # killed: a hung trainer would never act on a stop request
