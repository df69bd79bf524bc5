"""The Queue tab: jobs queued from the editor and duplicated for a sweep run one after another through the window's
trainer; a failed job is marked and the queue goes on; the queue outlives the window, and a job cut short by a
closed window is resumed by the next one. Fast tests run tests/fake_trainer.py; one runs the real trainer twice."""

import os
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from conftest import FAKE_TRAINER
from trainer.job import load_job

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def queue_folder(tmp_path, monkeypatch):
    """Each test its own queue folder (the window's data folder is shared by the tests of one worker)."""
    folder = tmp_path / "queue"
    folder.mkdir()
    monkeypatch.setattr("app.queue_panel.queue_dir", lambda: folder)
    return folder


def new_window(qtbot, trainer_command=None):
    from app.window import MainWindow

    window = MainWindow(trainer_command=trainer_command or [sys.executable, FAKE_TRAINER], restore=False)
    window.questions, window.answers, window.messages = [], [], []

    def ask(title, text, buttons):
        window.questions.append(title)
        return window.answers.pop(0) if window.answers else buttons[0]

    window.ask = ask
    window.show_message = lambda title, text: window.messages.append(f"{title}: {text}")
    qtbot.addWidget(window)
    return window


def queue_a_sweep(window, demo_job, values):
    """The demo job from the editor, duplicated at each network.rank value; the original taken off again."""
    assert window.load_preset(demo_job)
    queue = window.queue
    assert queue.add_current() is not None, window.messages
    added = queue.duplicate(0, "network.rank", values)
    assert len(added) == len(values), window.messages
    queue.table.selectRow(0)
    queue.remove_selected()
    return queue


def statuses(queue):
    return [e.status for e in queue.entries]


def test_a_failed_job_is_marked_the_queue_goes_on_and_a_new_window_restores_it(app_window, qtbot, demo_job,
                                                                               monkeypatch, queue_folder):
    monkeypatch.setenv("FAKE_STEPS", "6")
    monkeypatch.setenv("FAKE_FAIL_IF", "run-rank4")
    queue = queue_a_sweep(app_window, demo_job, ["2", "4", "8"])
    run = demo_job.parent / "run"
    assert [queue.output_of(e) for e in queue.entries] == [run.with_name(f"run-rank{r}") for r in (2, 4, 8)]
    assert [load_job(queue_folder / e.file).network.rank for e in queue.entries] == [2, 4, 8]
    assert [e.note for e in queue.entries] == ["network.rank=2", "network.rank=4", "network.rank=8"]
    # Reordering: the last job first, then back.
    queue.table.selectRow(2)
    queue.move(-1)
    assert [e.note for e in queue.entries] == ["network.rank=2", "network.rank=8", "network.rank=4"]
    queue.move(1)
    # The queue holds copies: editing the job in the editor changes no queued job.
    app_window.form.editor("network.rank").set(64)
    assert [load_job(queue_folder / e.file).network.rank for e in queue.entries] == [2, 4, 8]

    assert queue.btn_run.isEnabled()
    assert queue.run()
    qtbot.waitUntil(lambda: "waiting" not in statuses(queue) and queue.running is None, timeout=60000)
    qtbot.waitUntil(lambda: app_window.runner.state == "idle", timeout=30_000)
    assert statuses(queue) == ["done", "failed", "done"]
    assert "NaN loss at step 3 (fake)" in queue.entries[1].note
    assert queue.table.item(1, 1).text() == "failed"
    for rank in (2, 8):
        assert (run.with_name(f"run-rank{rank}") / "events.jsonl").is_file()
    assert not queue.btn_run.isEnabled()  # nothing waits

    restored = new_window(qtbot)
    assert [(e.note, e.status) for e in restored.queue.entries] == [(e.note, e.status) for e in queue.entries]
    assert restored.queue.table.rowCount() == 3
    assert restored.queue.table.item(2, 2).text() == str(run.with_name("run-rank8"))


def test_a_job_with_another_jobs_output_folder_is_refused(app_window, demo_job):
    assert app_window.load_preset(demo_job)
    assert app_window.queue.add_current() is not None
    assert app_window.queue.add_current() is None
    assert len(app_window.queue.entries) == 1
    assert "the new job (demo_lora): output.output_dir: " in app_window.messages[-1]
    assert "is also the output folder of row 1 (demo_lora)" in app_window.messages[-1]
    app_window.queue.duplicate(0, "network.rankk", ["4"])
    assert "network.rankk" in app_window.messages[-1] and len(app_window.queue.entries) == 1


def test_stop_ends_the_queue_and_a_job_cut_short_by_closing_is_resumed_next_time(app_window, qtbot, demo_job,
                                                                                 monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "forever")
    monkeypatch.setenv("FAKE_DELAY", "0.05")
    monkeypatch.setenv("FAKE_SAMPLE_EVERY", "0")
    queue = queue_a_sweep(app_window, demo_job, ["2", "4", "8"])
    assert queue.run()
    qtbot.waitUntil(lambda: app_window.runner.state == "running", timeout=20000)
    queue.stop()  # the running job stops with a checkpoint, and nothing after it starts
    qtbot.waitUntil(lambda: queue.running is None, timeout=20000)
    assert statuses(queue) == ["stopped", "waiting", "waiting"]

    queue.table.selectRow(0)
    queue.remove_selected()  # its folder holds a run now; the rest of the queue again, closing while it trains
    # Closed once it steps: a stop sent while the trainer still sends its first events can be lost when the
    # closed socket's reset reaches it first (the window's close, not the queue).
    with qtbot.waitSignal(app_window.runner.stepReceived, timeout=20000):
        assert queue.run()
    pid = app_window.runner.pid
    app_window.answers.append("Stop the run")
    assert app_window.close(), app_window.questions
    deadline = time.monotonic() + 20
    while not _ended(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _ended(pid)

    monkeypatch.setenv("FAKE_MODE", "")
    monkeypatch.setenv("FAKE_STEPS", "4")
    window = new_window(qtbot)
    assert statuses(window.queue) == ["running", "waiting"]
    starts = []
    start = window.runner.start
    window.runner.start = lambda path, resume=False: starts.append((Path(path).parent.name, resume)) or \
        start(path, resume)
    window.answers.append("Resume the queue")
    window.queue.offer_resume()
    assert window.questions == ["The queue was interrupted"]
    qtbot.waitUntil(lambda: statuses(window.queue) == ["done", "done"] and window.queue.running is None,
                    timeout=60000)
    assert starts == [("run-rank4", True), ("run-rank8", False)]  # the cut-short job resumed, the next one fresh
    qtbot.waitUntil(lambda: window.runner.state == "idle", timeout=30_000)


def _ended(pid):
    """The detached trainer is still this process's child: reap it once it exits (a window that closed for real
    would not be its parent any more)."""
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:
        return True


@pytest.mark.slow
def test_the_demo_runs_from_the_queue_twice_with_a_changed_rank(qtbot, demo_job):
    window = new_window(qtbot, [sys.executable, "-m", "trainer"])  # the real trainer
    job = load_job(demo_job)
    job.schedule.max_steps, job.validation.prompts = 2, []
    from trainer.job import save_job

    save_job(job, demo_job)
    queue = queue_a_sweep(window, demo_job, ["2", "4"])
    assert queue.run()
    qtbot.waitUntil(lambda: "waiting" not in statuses(queue) and queue.running is None, timeout=480_000)
    qtbot.waitUntil(lambda: window.runner.state == "idle", timeout=20000)
    assert statuses(queue) == ["done", "done"], [e.note for e in queue.entries]
    assert window.run_panel.plot.point_count == 2  # the Run tab showed the last job live
    shapes = []
    for rank in (2, 4):
        lora = demo_job.parent / f"run-rank{rank}" / "final" / "pytorch_lora_weights.safetensors"
        with safe_open(str(lora), "pt") as f:
            down = sorted(k for k in f.keys() if "lora_A" in k or "lora.down" in k)
            shapes.append({tuple(f.get_slice(k).get_shape()) for k in down})
    assert {s[0] for s in shapes[0]} == {2} and {s[0] for s in shapes[1]} == {4}


def test_a_queued_job_left_training_is_followed_and_marked_when_it_ends(app_window, demo_job, qtbot):
    queue = app_window.queue
    assert app_window.load_preset(demo_job)
    entry = queue.add_current()
    entry.status = "running"  # as an earlier window left it, its trainer still going (the window offers to follow)
    run = demo_job.parent / "run"
    app_window.live_run_dir = run
    queue.followed([{"type": "step", "step": 3, "loss": 0.1}])
    assert entry.status == "running"
    queue.followed([{"type": "run_finished", "status": "failed", "outputs": {}}])
    assert entry.status == "failed" and queue.table.item(0, 1).text() == "failed"
    assert new_window(qtbot).queue.entries[0].status == "failed"  # saved
