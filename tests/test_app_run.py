"""The window driving a trainer process: a fake one (tests/fake_trainer.py) that streams scripted events."""

import json
import socket
import time

import pytest
from PIL import Image

from trainer.events import hello

WAIT = 60_000  # ms for a trainer process to start and answer: generous, as CI runs two heavy workers side by side


def make_dataset(folder, count=3, missing=1):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (80, 64), (40 * i, 100, 200)).save(folder / f"img{i}.png")
        if i >= missing:
            (folder / f"img{i}.txt").write_text(f"a picture number {i}\n")
    return folder


def setup_job(window, tmp_path, missing=0, prompts=("a red circle", "a blue square")):
    form = window.form
    form.editor("model.path").set(str(tmp_path / "model"))
    form.editor("output.output_dir").set(str(tmp_path / "run"))
    form.set_dataset_folders([str(make_dataset(tmp_path / "data", missing=missing))])
    form.editor("validation.prompts").set(list(prompts))
    assert window.act_start.isEnabled(), window.start_reasons


def run_to_end(qtbot, window, timeout=WAIT):
    with qtbot.waitSignal(window.runner.finished, timeout=timeout) as blocker:
        assert window.start()
    return blocker.args


def test_fake_run_drives_progress_plot_and_gallery(app_window, qtbot, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_STEPS", "20")
    setup_job(app_window, tmp_path)
    code, summary = run_to_end(qtbot, app_window)
    assert code == 0 and "completed" in summary
    panel = app_window.run_panel
    assert (panel.progress.value(), panel.progress.maximum()) == (20, 20)
    assert panel.plot.point_count == 20
    assert panel.gallery.image_count == 2 * 5  # 2 prompts × steps 0, 5, 10, 15, 20
    assert panel.gallery.table.horizontalHeaderItem(0).text() == "step 0 (baseline)"
    assert panel.gallery.table.horizontalHeaderItem(1).text() == "step 20"  # newest next to the baseline
    assert "it/s" in panel.speed.text() and "ETA" in panel.speed.text()
    assert "completed" in panel.banner.text()
    assert (tmp_path / "run" / "job.json").is_file()
    assert app_window.act_start.isEnabled()  # ready for the next run
    qtbot.waitUntil(lambda: panel.gallery.table.item(0, 0).text() == "", timeout=30_000)  # thumbnail arrived


@pytest.mark.parametrize("mode,expect", [
    ("crash", "RuntimeError: CUDA out of memory (fake)"),
    ("error", "NaN loss at step 3 (fake)"),
    ("kill", "killed by signal 9 (SIGKILL)"),
    ("invalid", "optimizer.learning_rate: Input should be greater than 0"),
])
def test_failing_trainer_shows_its_error_and_start_works_again(app_window, qtbot, tmp_path, monkeypatch,
                                                               mode, expect):
    monkeypatch.setenv("FAKE_MODE", mode)
    setup_job(app_window, tmp_path)
    with qtbot.waitSignal(app_window.runner.failed, timeout=WAIT) as failed:
        assert app_window.start()
    assert expect in failed.args[0].splitlines()[0]
    banner = app_window.run_panel.banner
    assert banner.isVisibleTo(app_window) and expect in banner.text()
    if mode == "crash":
        assert "Traceback" in banner.text()  # the last lines of stderr come with it
    if mode == "invalid":
        assert "before it connected" in banner.text()
    assert app_window.runner.state == "idle"
    assert app_window.act_start.isEnabled()
    monkeypatch.setenv("FAKE_MODE", "")
    app_window.answers.append("Resume")
    code, _ = run_to_end(qtbot, app_window)
    assert code == 0


def test_exit_is_reported_within_a_second(app_window, qtbot, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "forever")
    monkeypatch.setenv("FAKE_DELAY", "0.02")
    setup_job(app_window, tmp_path)
    with qtbot.waitSignal(app_window.runner.stepReceived, timeout=WAIT):
        assert app_window.start()
    with qtbot.waitSignal(app_window.runner.finished, timeout=1000) as finished:
        killed_at = time.monotonic()
        app_window.runner.kill()
    assert time.monotonic() - killed_at < 1.0
    assert finished.args[0] == -9


def test_wrong_token_connection_is_refused(app_window, qtbot, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "wrongtoken")
    setup_job(app_window, tmp_path)
    with qtbot.waitSignal(app_window.runner.refused, timeout=WAIT):
        assert app_window.start()
    qtbot.waitSignal(app_window.runner.finished, timeout=WAIT).wait()
    assert app_window.run_panel.plot.point_count == 0  # nothing from the refused client was read


def test_raw_socket_with_wrong_token_is_refused(app_window, qtbot, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "forever")
    monkeypatch.setenv("FAKE_DELAY", "0.05")
    setup_job(app_window, tmp_path)
    with qtbot.waitSignal(app_window.runner.connected, timeout=WAIT):
        assert app_window.start()
    port = app_window.runner._server.serverPort()
    intruder = socket.create_connection(("127.0.0.1", port))
    intruder.sendall(hello("guess"))
    with qtbot.waitSignal(app_window.runner.refused, timeout=30_000):
        pass
    intruder.close()
    with qtbot.waitSignal(app_window.runner.finished, timeout=WAIT):
        app_window.act_stop.trigger()


def test_stop_makes_the_trainer_exit_3(app_window, qtbot, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "forever")
    monkeypatch.setenv("FAKE_DELAY", "0.02")
    setup_job(app_window, tmp_path)
    with qtbot.waitSignal(app_window.runner.stepReceived, timeout=WAIT):
        assert app_window.start()
    assert app_window.act_stop.isEnabled() and not app_window.act_start.isEnabled()
    with qtbot.waitSignal(app_window.runner.finished, timeout=WAIT) as finished:
        app_window.act_stop.trigger()
    assert finished.args[0] == 3
    assert "stopped" in app_window.run_panel.banner.text()
    assert app_window.act_start.isEnabled()


def test_save_now_and_sample_now_reach_the_trainer(app_window, qtbot, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "forever")
    monkeypatch.setenv("FAKE_DELAY", "0.02")
    monkeypatch.setenv("FAKE_SAMPLE_EVERY", "0")
    setup_job(app_window, tmp_path)
    with qtbot.waitSignal(app_window.runner.stepReceived, timeout=WAIT):
        assert app_window.start()
    with qtbot.waitSignal(app_window.runner.checkpointReceived, timeout=30_000):
        app_window.act_save_now.trigger()
    before = app_window.run_panel.gallery.image_count
    with qtbot.waitSignal(app_window.runner.sampleReceived, timeout=30_000):
        app_window.act_sample_now.trigger()
    qtbot.waitUntil(lambda: app_window.run_panel.gallery.image_count == before + 2, timeout=30_000)
    offered = []
    app_window.ask_text = lambda title, label, text: offered.append(text) or "a green triangle\n\n"
    with qtbot.waitSignal(app_window.runner.sampleReceived, timeout=30_000) as got:
        app_window.act_sample_prompts.trigger()  # Run → Sample prompts…: typed prompts, not the validation ones
    assert offered == ["a red circle\na blue square"] and got.args[0]["prompt"] == "a green triangle"
    with qtbot.waitSignal(app_window.runner.finished, timeout=WAIT):
        app_window.act_stop.trigger()


def test_missing_captions_warn_before_start(app_window, qtbot, tmp_path):
    setup_job(app_window, tmp_path, missing=2)
    app_window.answers.append("Cancel")
    assert not app_window.start()
    title, text = app_window.questions[-1]
    assert title == "Missing captions" and "2 of 3 images" in text
    assert app_window.runner.state == "idle"


def test_used_run_folder_offers_a_new_folder(app_window, qtbot, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_STEPS", "3")
    setup_job(app_window, tmp_path)
    run_to_end(qtbot, app_window)
    app_window.answers.append("New folder")
    code, _ = run_to_end(qtbot, app_window)
    assert app_window.questions[-1][0] == "Run folder in use"
    assert app_window.form.job_or_none().output.output_dir == str(tmp_path / "run-2")
    assert (tmp_path / "run-2" / "events.jsonl").is_file()


def test_closing_while_training_can_leave_the_run_going(app_window, qtbot, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_STEPS", "60")
    monkeypatch.setenv("FAKE_DELAY", "0.02")
    setup_job(app_window, tmp_path)
    with qtbot.waitSignal(app_window.runner.stepReceived, timeout=WAIT):
        assert app_window.start()
    pid = app_window.runner.pid
    app_window.answers.append("Leave it running")
    assert app_window.close()
    assert app_window.questions[-1][0] == "A run is in progress"
    # The trainer goes on without the window and finishes its run.
    events = tmp_path / "run" / "events.jsonl"
    qtbot.waitUntil(lambda: '"run_finished"' in events.read_text(), timeout=WAIT)
    import os
    try:
        os.waitpid(pid, 0)  # reap it: it is still our child in this test process
    except ChildProcessError:
        pass


def test_create_demo_then_run_it(app_window, qtbot, tmp_path):
    with qtbot.waitSignal(app_window.demoReady, timeout=WAIT):
        app_window.create_demo(tmp_path / "demo")
    assert app_window.form.job_or_none().output.output_dir == str(tmp_path / "demo" / "run")
    assert app_window.act_start.isEnabled(), app_window.start_reasons
    code, _ = run_to_end(qtbot, app_window)
    assert code == 0 and app_window.run_panel.plot.point_count == 20


def test_closing_while_training_can_stop_the_run(app_window, qtbot, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "forever")
    monkeypatch.setenv("FAKE_DELAY", "0.02")
    setup_job(app_window, tmp_path)
    with qtbot.waitSignal(app_window.runner.stepReceived, timeout=WAIT):
        assert app_window.start()
    pid = app_window.runner.pid
    app_window.answers.append("Stop the run")
    assert app_window.close()
    import os
    _, status = os.waitpid(pid, 0)  # the trainer got the stop command although the window is gone
    assert os.waitstatus_to_exitcode(status) == 3
    assert '"status":"stopped"' in (tmp_path / "run" / "events.jsonl").read_text()
    assert not (tmp_path / "run" / "commands" / "stop").exists()  # the same stop, taken once: none left over


def test_live_log_shows_trainer_output_once(app_window, qtbot, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_STEPS", "3")
    setup_job(app_window, tmp_path)
    run_to_end(qtbot, app_window)
    log = app_window.run_panel.log.toPlainText()
    assert "fake trainer:" in log  # stderr
    assert log.count("run completed") == 1


def test_demo_dialog_builds_the_chosen_method(app_window, qtbot, tmp_path, monkeypatch):
    import sys

    from app import window as window_module
    from trainer.demo import METHODS

    assert set(window_module.DEMO_METHODS) == set(METHODS)  # the window offers what the demo builds: one list
    monkeypatch.setattr(window_module.QFileDialog, "getExistingDirectory", lambda *a, **k: str(tmp_path))
    monkeypatch.setattr(app_window.runner, "command_prefix", [sys.executable, "-m", "trainer"])  # the real demo
    app_window.answers.append("DreamBooth")
    with qtbot.waitSignal(app_window.demoReady, timeout=120000):  # importing torch on a busy machine
        app_window.create_demo_dialog()
    assert "DreamBooth" in app_window.questions[-1][1]
    job = app_window.form.job_or_none()
    assert job.prior.enabled and job.text_encoder.mode == "lora" and job.output.name == "demo_dreambooth"
    assert job.output.output_dir == str(tmp_path / "sdtrainer-demo" / "run")



def test_a_folder_without_images_blocks_start_with_the_line_trainer_check_gives(app_window, qtbot, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("a caption without its image\n")
    window = app_window
    window.form.editor("model.path").set(str(tmp_path / "model"))
    window.form.editor("output.output_dir").set(str(tmp_path / "run"))
    window.form.set_dataset_folders([str(data)])
    qtbot.waitUntil(lambda: window.dataset.scan is not None)
    assert not window.act_start.isEnabled()
    assert f"dataset.folders: no images (png, jpg, jpeg, webp) found in {data}" in window.start_reasons
    assert window.start() is False


def test_pause_then_continue_from_the_window(app_window, qtbot, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_STEPS", "400")
    monkeypatch.setenv("FAKE_DELAY", "0.02")
    window = app_window
    setup_job(window, tmp_path)
    assert not window.act_pause.isEnabled()
    assert window.start()
    qtbot.waitUntil(lambda: window.act_pause.isEnabled(), timeout=30_000)
    window.act_pause.trigger()
    qtbot.waitUntil(lambda: window.paused, timeout=30_000)
    assert window.act_pause.text() == "&Continue"
    window.act_pause.trigger()
    qtbot.waitUntil(lambda: not window.paused, timeout=30_000)
    assert window.act_pause.text() == "&Pause"
    events = [json.loads(line)["type"] for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert events.count("paused") == 1 and events.count("continued") == 1
    assert events.index("paused") < events.index("continued")
    window.stop()
    qtbot.waitUntil(lambda: window.runner.state == "idle", timeout=30_000)
    assert not window.paused and not window.act_pause.isEnabled()


def test_closing_while_a_demo_builds_ends_the_build_quietly(app_window, qtbot, tmp_path, monkeypatch):
    import sys

    slow = [sys.executable, "-c", "import time; time.sleep(30)"]  # stands in for a `trainer demo` still importing
    monkeypatch.setattr(app_window.runner, "command_prefix", slow)
    app_window.create_demo(tmp_path / "demo")
    qtbot.waitUntil(lambda: app_window._demo.state() == app_window._demo.ProcessState.Running, timeout=30_000)
    app_window.close()
    assert app_window._demo.state() == app_window._demo.ProcessState.NotRunning
    qtbot.wait(300)  # a finished signal reaching the closed window would raise here
    assert not app_window.messages
