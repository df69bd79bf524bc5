"""The Essentials page: what the schema marks essential, in its order, one job with All settings (no drift),
errors shown on both pages, and the dataset table's repeats as the times a folder trains per epoch."""

import json

from PySide6.QtCore import Qt

from app.essentials import EssentialsPage
from app.job_form import JobForm
from trainer.job import Job, essential_fields, from_sparse, load_job


def _cell(editor, row: int, column: str):
    return editor.table.item(row, editor.columns.index(column))


def test_the_page_holds_the_marked_fields_in_their_order(qtbot):
    form = JobForm()
    page = EssentialsPage(form)
    qtbot.addWidget(form)
    qtbot.addWidget(page)
    marked = [(s, n) for s, n, _ in essential_fields()]
    assert list(page.editors) == marked
    # The schema's marks, not a list in the window: the design's essentials are there, in the order a person
    # fills them in (model first, output last), and the long tail of fields is not.
    assert marked[0] == ("model", "path") and marked[-2:] == [("output", "output_dir"), ("output", "name")]
    for key in (("dataset", "folders"), ("prior", "class_prompt"), ("network", "rank"), ("layers", "freeze_blocks"),
                ("schedule", "max_steps"), ("optimizer", "learning_rate"), ("validation", "prompts")):
        assert key in page.editors
    assert ("model", "revision") not in page.editors and ("ema", "decay") not in page.editors
    folders = page.editors[("dataset", "folders")]
    header = folders.table.horizontalHeader()
    shown = sorted((header.visualIndex(i), c) for i, c in enumerate(folders.columns)
                   if not folders.table.isColumnHidden(i))
    assert [c for _, c in shown] == ["path", "instance_prompt", "repeats", "caption_extension"]


def test_both_pages_edit_one_job_and_show_the_same_errors(app_window, qtbot, tmp_path):
    window = app_window
    page, form = window.essentials, window.form
    assert window.editor_tabs.currentWidget() is page  # the first thing a user sees
    # Essentials -> All settings.
    page.editors[("network", "rank")].spin.setValue(24)
    assert form.editor("network.rank").get() == 24
    qtbot.keyClicks(page.editors[("model", "path")].edit, "/models/base")
    assert form.editor("model.path").get() == "/models/base"
    # All settings -> Essentials, and a job loaded into the form.
    form.editor("schedule.max_steps").set(321)
    assert page.editors[("schedule", "max_steps")].get() == 321
    form.set_job(Job.model_validate({"network": {"alpha": 4.0}, "validation": {"prompts": ["a cat", "a dog"]}}))
    assert page.editors[("network", "alpha")].get() == 4.0
    assert page.editors[("validation", "prompts")].get() == ["a cat", "a dog"]
    assert page.editors[("network", "rank")].get() == 16  # the loaded job's, not the earlier edit
    # A half-typed value is the same text on both pages, with the same error, and Start says why.
    lr = page.editors[("optimizer", "learning_rate")]
    lr.edit.setText("1e-")
    assert form.editor("optimizer.learning_rate").raw() == "1e-"
    assert lr.error_state[0] == form.editor("optimizer.learning_rate").error_state[0] == "enter a number"
    assert lr.error_label.text() == "enter a number"
    assert any(r.startswith("optimizer.learning_rate") for r in window.start_reasons)
    lr.edit.setText("2e-4")
    assert form.editor("optimizer.learning_rate").get() == 2e-4 and lr.error_state[0] is None
    # A rule over a section's fields shows on the page too, under the heading holding them.
    page.editors[("schedule", "max_steps")].set(0)
    page.editors[("schedule", "epochs")].set(0)
    assert "set max_steps or epochs" in page.step_errors["Training"][0].text()
    page.editors[("schedule", "epochs")].set(3)
    assert not page.step_errors["Training"][0].text()
    # A rule over the whole job shows at the field it names, on both pages.
    page.editors[("prior", "enabled")].check.setChecked(True)
    assert form.editor("prior.enabled").get() is True
    needs = "prior preservation needs a class prompt"
    assert page.editors[("prior", "class_prompt")].error_label.text() == needs
    assert form.editor("prior.class_prompt").error_state[0] == needs
    assert f"prior.class_prompt: {needs}" in window.start_reasons
    qtbot.keyClicks(page.editors[("prior", "class_prompt")].edit, "a photo of a dog")
    assert page.editors[("prior", "class_prompt")].error_state[0] is None
    page.editors[("prior", "enabled")].check.setChecked(False)
    # Rows of the dataset table: added on one page, edited on the other.
    folders = page.editors[("dataset", "folders")]
    folders.add_row({"path": str(tmp_path)})
    _cell(form.editor("dataset.folders"), 0, "instance_prompt").setText("photo of sks dog")
    assert _cell(folders, 0, "instance_prompt").text() == "photo of sks dog"
    _cell(folders, 0, "weight").setText("2.5")  # hidden here, still the same row's value
    _cell(folders, 0, "repeats").setText("x")
    assert "repeats" in form.editor("dataset.folders").error_state[0]
    assert folders.error_label.text() == form.editor("dataset.folders").error_label.text()
    _cell(folders, 0, "repeats").setText("4")
    path = tmp_path / "job.json"
    assert window.save_job_file(path)
    saved = load_job(path)
    assert saved.network.rank == 16 and saved.network.alpha == 4.0 and saved.optimizer.learning_rate == 2e-4
    assert saved.schedule.max_steps == 0 and saved.schedule.epochs == 3 and saved.model.path == ""
    folder = saved.dataset.folders[0]
    assert (folder.path, folder.instance_prompt, folder.repeats, folder.weight) == \
        (str(tmp_path), "photo of sks dog", 4, 2.5)


def test_repeats_show_the_times_a_folder_trains_per_epoch(qtbot, tmp_path):
    plain, kohya, parent = tmp_path / "plain", tmp_path / "5_dog", tmp_path / "parent"
    for folder in (plain, kohya, parent / "10_cat", parent / "notes"):
        folder.mkdir(parents=True)
    form = JobForm()
    qtbot.addWidget(form)
    table = form.editor("dataset.folders")
    table.set([{"path": str(plain)}, {"path": str(kohya)}, {"path": str(kohya), "repeats": 3},
               {"path": str(parent)}, {"path": str(tmp_path / "not-yet")}])
    shown = [_cell(table, row, "repeats").text() for row in range(5)]
    assert shown == ["1", "5", "3", "1; 10_cat: 10", "1"]
    assert "N from an 'N_name' folder name" in _cell(table, 1, "repeats").toolTip()
    # The value stays what the job holds (0: automatic); typing a number makes it explicit.
    assert [f["repeats"] for f in table.get()] == [0, 0, 3, 0, 0]
    assert _cell(table, 1, "repeats").data(Qt.ItemDataRole.EditRole) == "0"
    _cell(table, 0, "repeats").setText("7")
    assert _cell(table, 0, "repeats").text() == "7" and table.get()[0]["repeats"] == 7
    _cell(table, 0, "path").setText(str(kohya))  # another folder: its own name's rule
    _cell(table, 0, "repeats").setText("0")
    assert _cell(table, 0, "repeats").text() == "5"


def test_essentials_from_a_blank_start_until_start(app_window, qtbot, demo_template, tmp_path, monkeypatch):
    """A person fills in the Essentials page of a blank window, in its order, until Start is enabled; the saved job
    is what was typed over the defaults."""
    window = app_window
    page = window.essentials
    assert window.form.job_or_none() == Job() and not window.act_start.isEnabled()
    qtbot.keyClicks(page.editors[("model", "path")].edit, str(demo_template / "model"))
    dataset = str(demo_template / "dataset")
    monkeypatch.setattr("app.job_form.QFileDialog.getExistingDirectory", lambda *a, **k: dataset)
    folders = page.editors[("dataset", "folders")]
    qtbot.mouseClick(folders.add_button, Qt.MouseButton.LeftButton)
    _cell(folders, 0, "instance_prompt").setText("a shape")
    assert _cell(folders, 0, "repeats").text() == "1"
    page.editors[("network", "rank")].spin.setValue(8)
    alpha = page.editors[("network", "alpha")].edit
    alpha.clear()
    qtbot.keyClicks(alpha, "8")
    steps = page.editors[("schedule", "max_steps")].edit
    steps.clear()
    qtbot.keyClicks(steps, "12")
    lr = page.editors[("optimizer", "learning_rate")].edit
    lr.clear()
    qtbot.keyClicks(lr, "0.0005")
    page.editors[("dataset", "resolution")].spin.setValue(64)
    qtbot.keyClicks(page.editors[("validation", "prompts")].edit, "a red circle")
    assert not window.act_start.isEnabled()
    assert window.start_reasons == ["Choose a run folder (Output → output_dir)"]
    out = tmp_path / "run"
    qtbot.keyClicks(page.editors[("output", "output_dir")].edit, str(out))
    name = page.editors[("output", "name")].edit
    name.clear()
    qtbot.keyClicks(name, "shapes")
    qtbot.waitUntil(window.act_start.isEnabled, timeout=30_000)  # after the dataset's background scan
    path = tmp_path / "job.json"
    assert window.save_job_file(path)
    typed = {"model": {"path": str(demo_template / "model")},
             "dataset": {"folders": [{"path": dataset, "instance_prompt": "a shape"}], "resolution": 64},
             "network": {"rank": 8, "alpha": 8.0}, "schedule": {"max_steps": 12},
             "optimizer": {"learning_rate": 0.0005}, "validation": {"prompts": ["a red circle"]},
             "output": {"output_dir": str(out), "name": "shapes"}}
    assert load_job(path) == from_sparse(typed)
    assert json.loads(path.read_text())["network"]["rank"] == 8
