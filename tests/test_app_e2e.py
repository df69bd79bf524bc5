"""The real trainer on the demo job, through the window: Start, live events, run_finished, exit 0."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_demo_run_through_the_window(qtbot, demo_job):
    if not (ROOT / "trainer" / "train.py").is_file() or not (ROOT / "trainer" / "__main__.py").is_file():
        pytest.skip("the trainer (trainer/train.py, trainer/__main__.py) is not there yet")
    from app.window import MainWindow

    window = MainWindow(restore=False)  # the real `python -m trainer`
    qtbot.addWidget(window)
    window.ask = lambda title, text, buttons: buttons[0]  # the demo leaves one image uncaptioned on purpose
    assert window.load_preset(demo_job)
    # Keep it short on a CPU: three steps, one validation prompt rendered at the end only.
    window.form.editor("schedule.max_steps").set(3)
    window.form.editor("validation.prompts").set(["a red circle"])
    window.form.editor("validation.at_start").set(False)
    assert window.act_start.isEnabled(), window.start_reasons
    with qtbot.waitSignal(window.runner.runFinished, timeout=240000) as finished:
        assert window.start()
    assert finished.args[0]["status"] == "completed"
    if window.runner.state != "idle":
        with qtbot.waitSignal(window.runner.finished, timeout=30_000) as exited:
            pass
        assert exited.args[0] == 0
    panel = window.run_panel
    assert panel.plot.point_count == 3
    assert panel.progress.value() == 3
    assert panel.gallery.image_count >= 1  # the final validation image
    assert window.act_start.isEnabled()
