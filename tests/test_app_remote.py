"""The Remote tab, for real: the window starts the demo on this machine's own sshd (tests/sshd.py), follows it
live in the run view, pauses, stops and resumes it, downloads it, and its loss curve equals a local run's."""

import sys

import pytest
from sshd import sshd  # noqa: F401 - the fixture
from test_remote import losses, short_demo

from app.remote_panel import RemotePanel
from trainer.cli import main
from trainer.events import read_events

LONG = 240_000  # ms: a trainer start imports torch; this machine may be shared


@pytest.mark.slow  # three trainer starts (there, resumed there, here)
def test_a_remote_run_from_the_window(app_window, qtbot, sshd, demo_job, tmp_path):
    window, panel = app_window, app_window.remote
    job = short_demo(demo_job)
    assert window.load_preset(str(job))
    local = demo_job.parent / "run"
    panel.host.setText(sshd.host)
    panel.user.setText(sshd.user)
    panel.port.setValue(sshd.port)
    panel.key.setText(sshd.key)
    panel.folder.setText(sshd.folder)
    panel.python.setText(sys.executable)
    panel.options.setText(" ".join(sshd.options[3::2]))  # the -o values after -F /dev/null

    panel.buttons["start"].click()
    qtbot.waitUntil(lambda: panel.status in ("following", "failed"), timeout=LONG)
    assert panel.status == "following", panel.log.toPlainText()
    panel.buttons["pause"].click()  # lands while the trainer there still imports torch: it pauses after step 1
    events = lambda: read_events(local / "events.jsonl")[0] if (local / "events.jsonl").is_file() else []  # noqa: E731
    qtbot.waitUntil(lambda: any(e["type"] == "paused" for e in events()), timeout=LONG)
    qtbot.waitUntil(lambda: window.run_panel.plot._n == 1, timeout=30_000)  # followed live in the run view
    assert window.live_run_dir == local

    qtbot.waitUntil(lambda: panel.buttons["stop"].isEnabled(), timeout=30_000)
    panel.buttons["stop"].click()
    qtbot.waitUntil(lambda: panel.status == "stopped", timeout=LONG)
    panel.buttons["resume"].click()
    qtbot.waitUntil(lambda: panel.status in ("completed", "failed"), timeout=LONG)
    assert panel.status == "completed", panel.log.toPlainText()
    # the run view reads the copied events on its own timer: the last step and the end may come in two reads
    qtbot.waitUntil(lambda: window.run_panel.last_status == "completed", timeout=30_000)
    assert window.run_panel.plot._n == 4
    panel.buttons["fetch"].click()
    qtbot.waitUntil(lambda: (local / "checkpoints").is_dir() and panel.buttons["fetch"].isEnabled(), timeout=60_000)
    assert (local / "final").is_dir()

    again = RemotePanel()  # a window opened later: the same machine, and the run to follow again
    assert (again.host.text(), again.port.value(), again.local) == (sshd.host, sshd.port, local)

    assert main(["bundle", str(job), str(tmp_path / "here"), "--with-data", "--with-model"]) == 0
    assert main(["run", str(tmp_path / "here" / "job.json")]) == 0
    assert losses(local / "events.jsonl") == losses(tmp_path / "here" / "output" / "events.jsonl")
    assert list(losses(local / "events.jsonl")) == [1, 2, 3, 4]


def test_a_follow_cut_by_the_network_starts_again_and_a_later_window_follows_the_recorded_run(qtbot, tmp_path,
                                                                                              monkeypatch):
    """`remote follow` exits 2 when the connection fails: the tab tries again until the run ends (here a stand-in
    for the command: it fails twice, then reports the run completed)."""
    import app.remote_panel as panel_module

    monkeypatch.setattr(panel_module, "RETRY_MS", 50)
    calls = tmp_path / "calls"
    stand_in = [sys.executable, "-c", "import sys; f = open(sys.argv[1], 'a+'); f.write(' '.join(sys.argv[2:]) + "
                "'\\n'); f.seek(0); sys.exit(2 if len(f.readlines()) < 3 else 0)", str(calls)]
    local = tmp_path / "run"
    local.mkdir()
    (local / "remote.json").write_text("{}")
    first = RemotePanel(trainer_command=stand_in)
    qtbot.addWidget(first)
    first.local = local
    first.save()
    later = RemotePanel(trainer_command=stand_in)  # as a window opened after the first one closed
    qtbot.addWidget(later)
    assert later.follow_recorded()
    qtbot.waitUntil(lambda: later.status == "completed", timeout=20_000)
    assert calls.read_text().splitlines() == [f"remote follow {local}"] * 3
    assert later.log.toPlainText().count("connection lost; following again") == 2
