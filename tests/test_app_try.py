"""The Try tab through the real window and the real `python -m trainer sample`: a finished demo LoRA and one of its
checkpoints beside the base model, on one seed; the saved grid carries its settings."""

import os

import numpy as np
import pytest
from PIL import Image

from trainer.cli import main
from trainer.sample_grid import read_settings


@pytest.fixture
def window(qtbot):
    from app.window import MainWindow

    window = MainWindow(restore=False)  # the real `python -m trainer`
    window.ask = lambda title, text, buttons: buttons[0]
    qtbot.addWidget(window)
    yield window
    window.try_panel.kill()


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=int)


@pytest.mark.slow  # the real trainer renders in a child process: 20-60 s on a shared 2-core CPU
def test_try_grid_of_a_finished_demo_lora(qtbot, window, demo_run, tmp_path, capsys):
    assert window.load_preset(demo_run / "job.json")  # the run's own job: its output_dir is the run
    panel = window.try_panel
    window.tabs.setCurrentWidget(panel)
    window.show()
    assert panel.run.text() == str(demo_run)
    names = [panel.checkpoints.item(i).text() for i in range(panel.checkpoints.count())]
    assert names == ["final", "step-1", "step-2"]
    panel.tick(["final", "step-1"])
    panel.prompts.setPlainText("a red circle\na green square")
    panel.scales.setText("0 1")
    panel.steps.setValue(2)
    panel.seed.setValue(7)
    assert (panel.width_box.value(), panel.height_box.value()) == (64, 64)  # the job's resolution

    with qtbot.waitSignal(panel.finished, timeout=300000) as done:
        assert panel.start()
    assert done.args[0], done.args[1]
    # rows: prompts; columns: the base model, the final LoRA, the step-1 checkpoint
    assert sorted(panel.cells) == [(r, c) for r in range(2) for c in range(3)]
    headers = [panel.grid.itemAtPosition(0, c).widget().text() for c in (1, 2, 3)]
    assert headers == ["base model", "run/final × 1", "run/step-1 × 1"]
    assert panel.grid.itemAtPosition(2, 0).widget().text() == "a green square"
    assert panel.save_button.isEnabled()
    if os.environ.get("SDTRAINER_SCREENSHOT"):  # how resources/screenshot-try.png is made
        window.resize(1500, 900)
        window.grab().save(os.environ["SDTRAINER_SCREENSHOT"])

    # the scale-0 column is the base model's own render on the same seed, exactly
    assert main(["sample", "--model", str(demo_run.parent / "model"), "--prompt", "a red circle", "--seed", "7",
                 "--steps", "2", "--guidance-scale", f"{panel.guidance.value():g}", "--width", "64", "--height", "64",
                 "--out", str(tmp_path / "base")]) == 0
    capsys.readouterr()
    base = _pixels(tmp_path / "base" / "00-a-red-circle-0.png")
    np.testing.assert_array_equal(_pixels(panel.cells[(0, 0)]), base)
    assert np.abs(_pixels(panel.cells[(0, 1)]) - base).mean() > 0.5, "the LoRA changes the image"
    assert np.abs(_pixels(panel.cells[(0, 2)]) - _pixels(panel.cells[(0, 1)])).mean() > 0.1

    saved = panel.save_grid(tmp_path / "grid.png")
    settings = read_settings(saved)
    assert settings["prompts"] == ["a red circle", "a green square"]
    assert (settings["seed"], settings["steps"], settings["width"], settings["height"]) == (7, 2, 64, 64)
    assert settings["guidance_scale"] == panel.guidance.value()
    assert settings["model"] == str(demo_run.parent / "model")
    assert [(c["source"], c["scale"]) for c in settings["columns"]] == [
        ("", 0), (str(demo_run), 1), (str(demo_run / "checkpoints" / "step-1"), 1)]


def test_try_says_what_is_missing_and_shows_the_trainers_refusal(qtbot, window, tmp_path):
    panel = window.try_panel
    panel.run.setText("")
    panel.prompts.setPlainText("")
    assert not panel.start() and "prompt" in panel.status.text()
    panel.prompts.setPlainText("a shape")
    assert not panel.start() and "base model" in panel.status.text()
    panel.model.setText(str(tmp_path / "no-model"))
    panel.scales.setText("0 half")
    assert not panel.start() and "Strengths" in panel.status.text()
    panel.scales.setText("0 1")
    panel.add_file("--lora", "-odd/a.safetensors")
    panel.add_file("--embedding", "e.safetensors")
    args = panel.arguments()
    assert args[:3] == [f"--model={tmp_path / 'no-model'}", "--lora=-odd/a.safetensors", "--embedding=e.safetensors"]
    assert args[3:] == ["--prompt=a shape", "--lora-scale", "0", "1", "--seed=0", "--steps=20",
                        "--guidance-scale=7.5"]
    panel.loras.clear()
    with qtbot.waitSignal(panel.finished, timeout=120000) as done:
        assert panel.start()
    assert not done.args[0]
    assert done.args[1].startswith("error: --model:") and "no-model" in done.args[1]
    assert panel.status.text() == done.args[1] and panel.render_button.isEnabled()
    assert not panel.save_button.isEnabled()
