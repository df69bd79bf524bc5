"""Nothing typed is lost: unsaved edits are autosaved a moment after typing stops, offered back after a crash, and
closing with unsaved changes asks (save / discard / cancel)."""

import json

import pytest


@pytest.fixture
def open_window(qtbot, monkeypatch):
    """Opens real windows with the user's (test home's) settings; questions are answered from `answers`."""
    from app import autosave
    from app.window import MainWindow

    monkeypatch.setattr(autosave, "DELAY_MS", 100)

    def open_(answers=()):
        window = MainWindow()  # restore=True: autosave is part of the user's settings
        window.questions, window.answers = [], list(answers)
        window.ask = lambda title, text, buttons: window.questions.append(title) or window.answers.pop(0)
        qtbot.waitUntil(lambda: window.autosave.active, timeout=30_000)  # the start-up offer has run
        return window

    return open_


def _crash(window, qtbot):
    """The window goes away without a close event: no question, no clean-up, as after a crash or kill -9."""
    window.deleteLater()
    qtbot.wait(50)


def test_an_unsaved_job_is_offered_back_after_a_crash(open_window, qtbot, tmp_path):
    from app.settings import autosave_path

    preset = tmp_path / "mine.json"
    preset.write_text('{"network": {"rank": 12}}')
    first = open_window()
    first.load_preset(preset)
    assert not first.isWindowModified()
    first.form.editor("network.alpha").set(3.5)
    first.form.editor("dataset.folders").set([{"path": "/no/such/folder", "instance_prompt": "sks cat"}])
    assert first.isWindowModified()
    qtbot.waitUntil(autosave_path().is_file, timeout=30_000)
    saved = json.loads(autosave_path().read_text())["job"]
    assert saved["network"]["alpha"] == 3.5 and saved["dataset"]["folders"][0]["instance_prompt"] == "sks cat"
    _crash(first, qtbot)

    second = open_window(answers=["Restore", "Discard"])
    qtbot.addWidget(second)
    assert second.questions == ["Restore unsaved job?"]
    job = second.form.job_or_none()
    assert (job.network.rank, job.network.alpha) == (12, 3.5)
    assert job.dataset.folders[0].instance_prompt == "sks cat"
    assert second.isWindowModified()  # restored, still in no file

    assert second.close()  # Discard: the edits go, and with them the autosave
    assert second.questions[-1] == "Unsaved changes"
    assert not autosave_path().exists()
    third = open_window()
    qtbot.addWidget(third)
    assert third.questions == []  # nothing to offer after a clean close
    job = third.form.job_or_none()
    assert (job.network.rank, job.network.alpha) != (12, 3.5) and job.network.rank == 12  # the preset itself


def test_a_discarded_offer_leaves_the_form_as_it_was(open_window, qtbot):
    from app.settings import autosave_path

    autosave_path().write_text(json.dumps({"saved_at": "earlier", "job": {"network": {"rank": 77}}}))
    window = open_window(answers=["Discard"])
    qtbot.addWidget(window)
    assert window.questions == ["Restore unsaved job?"]
    assert window.form.job_or_none().network.rank != 77
    assert not autosave_path().exists() and not window.isWindowModified()


def test_closing_with_unsaved_changes_asks(open_window, qtbot, tmp_path):
    from app.settings import autosave_path

    window = open_window(answers=["Cancel", "Save…"])
    qtbot.addWidget(window)
    window.form.editor("network.rank").set(24)
    assert not window.close()  # Cancel: the window stays, the edit with it
    assert window.questions == ["Unsaved changes"]
    assert window.form.job_or_none().network.rank == 24

    target = tmp_path / "saved.json"
    window.choose_save_path = lambda: str(target)
    assert window.close()  # Save…: written as a full job file, then closed
    assert json.loads(target.read_text())["network"]["rank"] == 24
    assert not autosave_path().exists()


def test_an_unedited_window_closes_without_asking(open_window, qtbot):
    window = open_window()
    qtbot.addWidget(window)
    assert window.close() and window.questions == []
