"""Pause and continue on a real demo run: over the socket (sampling and saving while paused), by SIGUSR1, by a
`pause` file in the run folder, and from the window's Pause action. The model stays loaded, no step is taken while
paused, and the loss curve is the one of a run never paused."""

import os
import signal
import time
from pathlib import Path

import pytest

from test_train import _losses, _trainer
from trainer.cli import main
from trainer.events import EventListener, read_events
from trainer.job import load_job, save_job

QUICK = ["--set", "validation.prompts=[\"a red circle\"]", "--set", "validation.steps=2",
         "--set", "validation.at_start=false", "--set", "output.checkpoint_every=0"]


@pytest.fixture(scope="module")
def unpaused(demo_template, tmp_path_factory):
    """The demo's loss curve, never paused (the demo_job copies train the same model on the same data)."""
    out = tmp_path_factory.mktemp("unpaused")
    job = load_job(demo_template / "job.json")
    job.model.path, job.dataset.folders[0].path = str(demo_template / "model"), str(demo_template / "dataset")
    job.output.output_dir = str(out / "run")
    save_job(job, out / "job.json")
    assert main(["run", str(out / "job.json"), *QUICK]) == 0
    return _losses(out / "run")


def test_pause_sample_save_continue_over_the_socket(demo_job, unpaused):
    run = demo_job.parent / "run"
    listener = EventListener(token="tok")
    proc = _trainer(["run", str(demo_job), "--events", listener.address, *QUICK], token="tok")
    try:
        assert listener.wait_for("step", timeout=120) is not None
        listener.send("pause")
        paused = listener.wait_for("paused", timeout=60)
        assert paused is not None
        listener.send("sample", ["a blue square"])  # prompts of its own, in place of the validation prompts
        sample = listener.wait_for("sample", timeout=60)
        assert sample is not None and sample["step"] == paused["step"] and sample["prompt"] == "a blue square"
        assert Path(sample["path"]).name == f"step-{paused['step']:06d}-asked-00.png"
        listener.send("save")
        assert listener.wait_for("checkpoint", timeout=60)["step"] == paused["step"]
        steps = [e for e in listener.events if e["type"] == "step"]
        time.sleep(1.0)
        assert [e for e in listener.events if e["type"] == "step"] == steps, "a paused run steps nothing"
        listener.send("continue")
        assert listener.wait_for("continued", timeout=60)["step"] == paused["step"]
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
        listener.close()
    assert proc.returncode == 0, err[-2000:]
    assert _losses(run) == unpaused


def test_sigusr1_and_the_pause_file_pause_a_headless_run(demo_job, unpaused):
    run = demo_job.parent / "run"
    run.mkdir()
    (run / "pause").touch()  # paused from its first step on
    proc = _trainer(["run", str(demo_job), *QUICK])
    try:
        assert _wait_for(proc, run, "paused")["step"] == 1
        time.sleep(1.0)
        assert [e["step"] for e in _events(run) if e["type"] == "step"] == [1]
        os.kill(proc.pid, signal.SIGUSR1)  # continue: the pause file goes, or the next step would pause again
        assert _wait_for(proc, run, "continued")["step"] == 1
        assert not (run / "pause").exists()
        _wait_for(proc, run, "step", after=1)
        os.kill(proc.pid, signal.SIGUSR1)  # pause again
        second = _wait_for(proc, run, "paused", after=1)
        (run / "pause").touch()
        (run / "pause").unlink()  # a file that comes and goes does not continue a run paused by the signal
        time.sleep(0.6)
        assert len([e for e in _events(run) if e["type"] == "continued"]) == 1
        os.kill(proc.pid, signal.SIGUSR1)
        assert _wait_for(proc, run, "continued", after=1)["step"] == second["step"]
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert _losses(run) == unpaused


@pytest.mark.slow
def test_pause_sample_continue_from_the_window(qtbot, demo_job, unpaused):
    from app.window import MainWindow

    window = MainWindow(restore=False)  # the real `python -m trainer`
    qtbot.addWidget(window)
    window.ask = lambda title, text, buttons: buttons[0]  # the demo leaves one image uncaptioned on purpose
    assert window.load_preset(demo_job)
    window.form.set_job(load_job(demo_job, QUICK[1::2]))  # the job of the unpaused run
    assert window.act_start.isEnabled(), window.start_reasons
    # Pause as soon as the trainer says it runs, so the pause lands inside the run (at its first step), not after
    # its last; the window's action sends it.
    window.runner.runStarted.connect(lambda _: window.act_pause.trigger())
    with qtbot.waitSignal(window.runner.pauseChanged, timeout=240000) as paused:
        assert window.start()
    assert paused.args[0] is True
    step = paused.args[1]
    assert 1 <= step < max(unpaused) and window.act_pause.text() == "&Continue"
    with qtbot.waitSignal(window.runner.sampleReceived, timeout=120000) as sample:
        window.act_sample_now.trigger()  # sampling while paused, with the model still loaded
    assert sample.args[0]["step"] == step
    qtbot.wait(800)
    assert window.run_panel.plot.point_count == step, "a paused run steps nothing"
    with qtbot.waitSignal(window.runner.pauseChanged, timeout=60000) as continued:
        window.act_pause.trigger()
    assert continued.args == [False, step] and window.act_pause.text() == "&Pause"
    with qtbot.waitSignal(window.runner.runFinished, timeout=240000) as finished:
        pass
    assert finished.args[0]["status"] == "completed"
    qtbot.waitUntil(lambda: window.runner.state == "idle", timeout=30000)
    assert window.run_panel.plot.losses() == unpaused  # the curve the window drew, step by step
    assert _losses(demo_job.parent / "run") == unpaused


def _events(run):
    return read_events(run / "events.jsonl")[0] if (run / "events.jsonl").exists() else []


def _wait_for(proc, run, type_: str, after: int = 0, timeout: float = 120) -> dict:
    """The (after+1)-th event of this type in the run's events.jsonl."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        found = [e for e in _events(run) if e["type"] == type_]
        if len(found) > after:
            return found[after]
        time.sleep(0.05)
    raise AssertionError(f"no {type_} event #{after + 1} within {timeout} s")
