"""The schema-generated editor: every field round-trips, presets fill it, invalid values block Start."""

import json
import typing

import pytest
from pydantic import BaseModel, ValidationError

from app.job_form import JobForm, sections, union_sections
from trainer.job import Job, from_sparse, list_presets, load_preset


def _other_value(section_model, name, info, current):
    """A valid value for this field that differs from `current` (the schema decides what is valid)."""
    ann = info.annotation
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Literal:
        if len(args) == 1:
            return current  # only one option: nothing to change
        candidates = [a for a in args if a != current]
    elif ann is bool:
        candidates = [not current]
    elif ann is int:
        candidates = [current + 8, current + 1, current * 2, 1, 7]
    elif ann is float:
        candidates = [current * 0.37 + 1.25e-7, current / 3, 0.123456789, 1e-7, 3.0]
    elif ann is str:
        candidates = ["some/path/x", "x1"]
    elif origin is list and args == (str,):
        candidates = [["first line", "second, with comma"]]
    elif origin is list and args == (float,):
        candidates = [[0.85, 0.9876543], [0.85, 0.98, 0.9876543]]
    elif origin is list and issubclass(args[0], BaseModel):
        candidates = [[{"path": "/data/a", "repeats": 3, "caption_extension": ".caption",
                        "instance_prompt": "photo of sks dog"}, {"path": "/data/b"}],
                      [{"token": "[sks]", "init_pattern": "^dog</w>$", "vectors": 2}, {"token": "<x>"}]]
    else:
        pytest.fail(f"no test value for {name}: {ann}")
    for value in candidates:
        if value == current:
            continue
        try:
            section_model.model_validate({**section_model().model_dump(), name: value})
        except ValidationError:
            continue
        return value
    pytest.fail(f"no valid non-default value for {name}")


def _non_default_job() -> dict:
    data = Job().model_dump(mode="json")
    for section, model in sections():
        for name, info in model.model_fields.items():
            data[section][name] = _other_value(model, name, info, data[section][name])
            # Cross-field rules (max_steps or epochs) must still hold.
            try:
                model.model_validate(data[section])
            except ValidationError:
                data[section][name] = Job().model_dump(mode="json")[section][name]
    # Rules across sections (trainer/job.py): quantized base weights are frozen, so not a full fine-tune ("none":
    # new tokens only); the fused backward pass needs gradient_accumulation 1, which this job moves off, so it stays
    # off here and round-trips on its own (FUSED); DoRA is for network.kind lora only (PINNED, round-tripped apart).
    data["network"]["kind"] = "none"
    data["memory"]["fused_backward"] = False
    for dotted in PINNED:
        section, name = dotted.split(".")
        data[section][name] = Job().model_dump(mode="json")[section][name]
    return data


FUSED = {"memory": {"fused_backward": True}, "optimizer": {"max_grad_norm": 0.0}}
PINNED = {"network.dora", "speed.compile"}  # speed.compile: not with block_swap, which this job moves off 0


def test_every_field_has_an_editor(qtbot):
    form = JobForm()
    qtbot.addWidget(form)
    expected = {(s, n) for s, m in sections() for n in m.model_fields}
    expected |= {(s, n) for s, (key, models) in union_sections().items()
                 for n in models[Job().model_dump()[s][key]].model_fields}
    assert set(form.editors) == expected
    for (section, name), editor in form.editors.items():
        assert editor.input.toolTip(), f"{section}.{name} has no tooltip"


def test_form_job_round_trip_every_field(qtbot):
    form = JobForm()
    qtbot.addWidget(form)
    data = _non_default_job()
    job = Job.model_validate(data)
    default = Job().model_dump(mode="json")
    unchanged = {f"{s}.{n}" for s, m in sections() for n, info in m.model_fields.items()
                 if data[s][n] == default[s][n]
                 and not (typing.get_origin(info.annotation) is typing.Literal and len(typing.get_args(info.annotation)) == 1)}
    assert unchanged == {"memory.fused_backward"} | PINNED  # every other field moved off its default
    form.set_job(job)
    back = form.job_or_none()
    assert back is not None, form.check()[1]
    assert back.model_dump(mode="json") == job.model_dump(mode="json")
    # And back out to JSON text exactly (learning rates must not be rounded by the editor).
    assert json.dumps(back.model_dump(mode="json")) == json.dumps(job.model_dump(mode="json"))
    fused = from_sparse(FUSED)
    form.set_job(fused)
    assert form.job_or_none().model_dump(mode="json") == fused.model_dump(mode="json")
    dora = Job.model_validate({**data, "network": {**data["network"], "kind": "lora", "dora": True}})
    form.set_job(dora)
    assert form.job_or_none() == dora
    compiled = Job.model_validate({**data, "memory": {**data["memory"], "block_swap": 0},
                                   "speed": {"compile": "regional"}})
    form.set_job(compiled)
    assert form.job_or_none() == compiled


def test_tiny_learning_rates_round_trip_exactly(qtbot):
    form = JobForm()
    qtbot.addWidget(form)
    for lr in (1e-8, 3.3e-5, 0.00012345678901234, 1.0):
        form.set_job(from_sparse({"optimizer": {"learning_rate": lr}}))
        assert form.job_or_none().optimizer.learning_rate == lr


def test_loading_a_preset_fills_the_form(app_window, tmp_path):
    preset = tmp_path / "mine.json"
    preset.write_text(json.dumps({"version": 1, "network": {"rank": 8, "alpha": 4.0},
                                  "optimizer": {"learning_rate": 3e-5}, "schedule": {"lr_scheduler": "cosine"},
                                  "validation": {"prompts": ["a", "b c"]}}))
    assert app_window.load_preset(preset)
    form = app_window.form
    assert form.editor("network.rank").spin.value() == 8
    assert form.editor("network.alpha").edit.text() == "4.0"
    assert form.editor("optimizer.learning_rate").edit.text() == "3e-05"
    assert form.editor("schedule.lr_scheduler").combo.currentText() == "cosine"
    assert form.editor("validation.prompts").edit.toPlainText() == "a\nb c"
    assert form.job_or_none() == from_sparse(json.loads(preset.read_text()))


@pytest.mark.parametrize("name", list_presets() or ["(no presets yet)"])
def test_built_in_presets_load(app_window, name):
    if not list_presets():
        pytest.skip("presets/ is empty")
    index = app_window.preset_combo.findText(name)
    assert index > 0
    app_window._on_preset_chosen(index)
    assert app_window.form.job_or_none() == load_preset(name)


def test_bad_preset_is_one_line_error(app_window, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"network": {"rank": 0}}')
    assert not app_window.load_preset(bad)
    assert len(app_window.messages) == 1 and "network.rank" in app_window.messages[0]
    assert "\n" not in app_window.messages[0]


KOHYA = {"LoRA_type": "LyCORIS/LoHa", "pretrained_model_name_or_path": "/models/sdxl.safetensors", "sdxl": True,
         "network_dim": 32, "network_alpha": 16, "conv_dim": 8, "max_resolution": "1024,1024", "optimizer": "AdamW8bit",
         "learning_rate": 0.0001, "max_train_steps": 1600, "lr_scheduler": "cosine", "lr_warmup": 10,
         "train_batch_size": 2, "output_name": "mine", "xformers": "xformers"}
DATASET_TOML = ("[[datasets]]\nresolution = 1024\n"
                "[[datasets.subsets]]\nimage_dir = '/data/20_ohwx dog'\nnum_repeats = 20\n")


def test_file_import_loads_the_job_and_shows_the_report(app_window, tmp_path, monkeypatch):
    from PySide6.QtWidgets import QFileDialog

    from trainer.imports.command import import_files

    (tmp_path / "lora.json").write_text(json.dumps(KOHYA))
    (tmp_path / "dataset.toml").write_text(DATASET_TOML)
    chosen = [str(tmp_path / "lora.json"), str(tmp_path / "dataset.toml")]
    monkeypatch.setattr(QFileDialog, "getOpenFileNames", lambda *args, **kwargs: (chosen, ""))
    app_window.act_import.trigger()
    job = app_window.form.job_or_none()
    assert job == import_files([tmp_path / "lora.json", tmp_path / "dataset.toml"]).job
    assert (job.network.rank, job.model.family, job.schedule.warmup_steps) == (32, "sdxl", 160)
    assert app_window.form.editor("network.rank").spin.value() == 32
    assert [(f.path, f.repeats) for f in job.dataset.folders] == [("/data/20_ohwx dog", 20)]
    [report] = app_window.messages
    assert report.startswith("Imported 2 files: The job is in the editor (mapped exactly (")
    assert "lora.json: conv_dim = 8" in report and "lora.json: LoRA_type -> network.kind = 'lora'" in report
    assert "dataset.toml: datasets.0.subsets.0.num_repeats -> dataset.folders.0.repeats = 20" in report


def test_file_import_of_a_bad_file_is_one_line_and_keeps_the_editor(app_window, tmp_path):
    before = app_window.form.job_or_none()
    (tmp_path / "broken.json").write_text('{"network_dim": ')
    assert not app_window.import_configs([tmp_path / "broken.json"])
    [message] = app_window.messages
    assert message.startswith(f"Cannot import: {tmp_path / 'broken.json'}: not valid JSON") and "\n" not in message
    assert app_window.form.job_or_none() == before


def _fill_paths(form, tmp_path):
    form.editor("model.path").set(str(tmp_path / "model"))
    form.editor("output.output_dir").set(str(tmp_path / "run"))
    form.set_dataset_folders([str(tmp_path)])


def test_empty_paths_disable_start_with_reason(app_window, tmp_path):
    assert not app_window.act_start.isEnabled()
    assert "base model" in app_window.reason_label.text()
    _fill_paths(app_window.form, tmp_path)
    assert app_window.act_start.isEnabled(), app_window.start_reasons
    assert app_window.reason_label.text() == ""


@pytest.mark.parametrize("field,text,message", [
    ("optimizer.learning_rate", "-1", "greater than 0"),
    ("optimizer.learning_rate", "abc", "enter a number"),
    ("schedule.max_steps", "ten", "whole number"),
    ("output.name", "bad name!", "pattern"),
    ("optimizer.betas", "0.9", "2 items"),
])
def test_invalid_value_disables_start_with_reason(app_window, tmp_path, field, text, message):
    _fill_paths(app_window.form, tmp_path)
    assert app_window.act_start.isEnabled()
    editor = app_window.form.editor(field)
    editor.edit.setText(text)
    assert not app_window.act_start.isEnabled()
    assert field in app_window.reason_label.text() and message in app_window.reason_label.text()
    assert editor.error_label.isVisibleTo(app_window.form) and message in editor.error_label.text()
    assert "Cannot start" in app_window.act_start.toolTip()
    editor.set(Job().model_dump()[field.split(".")[0]][field.split(".")[1]])
    assert app_window.act_start.isEnabled()
    assert not editor.error_label.isVisibleTo(app_window.form)


def test_resolution_multiple_of_8_and_cross_field_rule(app_window, tmp_path):
    _fill_paths(app_window.form, tmp_path)
    app_window.form.editor("dataset.resolution").spin.setValue(500)
    assert "dataset.resolution" in app_window.reason_label.text()
    app_window.form.editor("dataset.resolution").spin.setValue(512)
    app_window.form.editor("schedule.max_steps").edit.setText("0")
    assert "max_steps or epochs" in app_window.reason_label.text()
    assert app_window.form.group_errors["schedule"].isVisibleTo(app_window.form)


def test_dataset_folder_cell_error_is_marked(app_window, tmp_path):
    _fill_paths(app_window.form, tmp_path)
    table = app_window.form.editor("dataset.folders").table
    table.item(0, 1).setText("-2")  # repeats
    assert "dataset.folders" in app_window.reason_label.text()
    assert table.item(0, 1).background().color().red() == 255


def test_save_preset_is_sparse_and_reloads(app_window, tmp_path):
    app_window.form.editor("network.rank").spin.setValue(4)
    path = tmp_path / "p.json"
    assert app_window.save_preset(path)
    assert json.loads(path.read_text()) == {"version": 1, "network": {"rank": 4}}
    job_path = tmp_path / "job.json"
    assert app_window.save_job_file(job_path)
    assert json.loads(job_path.read_text())["optimizer"]["learning_rate"] == 1e-4  # full file


def test_settings_remember_job_and_preset(qtbot, tmp_path):
    from app.window import MainWindow

    preset = tmp_path / "remember.json"
    preset.write_text('{"network": {"rank": 12}}')
    first = MainWindow()
    qtbot.addWidget(first)
    first.load_preset(preset)
    first.form.editor("network.alpha").set(3.5)
    first.close()
    second = MainWindow()
    qtbot.addWidget(second)
    assert second.current_preset == str(preset)
    job = second.form.job_or_none()
    assert (job.network.rank, job.network.alpha) == (12, 3.5)


def test_dropping_a_folder_sets_the_dataset(app_window, tmp_path):
    from PySide6.QtCore import QMimeData, QPointF, Qt, QUrl
    from PySide6.QtGui import QDropEvent

    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(tmp_path))])
    event = QDropEvent(QPointF(10, 10), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                       Qt.KeyboardModifier.NoModifier)
    app_window.dropEvent(event)
    assert [f.path for f in app_window.form.job_or_none().dataset.folders] == [str(tmp_path)]


def test_missing_dataset_folder_disables_start(app_window, qtbot, tmp_path):
    _fill_paths(app_window.form, tmp_path)
    app_window.form.set_dataset_folders([str(tmp_path / "not-there")])
    qtbot.waitUntil(lambda: "folder not found" in app_window.reason_label.text(), timeout=30_000)
    assert not app_window.act_start.isEnabled()


def test_dataset_view_follows_the_dataset_while_another_field_is_invalid(app_window, qtbot, tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    app_window.form.editor("optimizer.learning_rate").edit.setText("abc")
    with qtbot.waitSignal(app_window.dataset.scanned, timeout=30_000):
        app_window.form.set_dataset_folders([str(tmp_path)])
    assert app_window.dataset.scan.num_images == 1


def test_new_tokens_are_added_as_rows_and_edited_in_cells(qtbot):
    form = JobForm()
    qtbot.addWidget(form)
    editor = form.editor("tokens.new")
    assert editor.add_button.text() == "Add"  # not a folder picker: a token has no path
    editor.add_button.click()
    editor.table.item(0, editor.columns.index("token")).setText("[fernando]")
    editor.table.item(0, editor.columns.index("init_pattern")).setText("^dog</w>$")
    form.editor("network.kind").set("none")
    values, errors = form.values()
    assert not errors and values["tokens"]["new"] == [{"token": "[fernando]", "init_pattern": "^dog</w>$",
                                                       "vectors": 1}]
    job, reasons = form.check()
    assert job is None and not any("token" in r or "network" in r for r in reasons), reasons  # only paths missing
    editor.table.item(0, editor.columns.index("vectors")).setText("0")
    assert any("tokens.new" in r for r in form.check()[1])


@pytest.mark.parametrize("name", ["prodigy", "adafactor", "came", "adamw_schedulefree", "lion"])
def test_each_optimizer_round_trips_with_only_its_fields(qtbot, name):
    from trainer.job import OPTIMIZERS

    model = OPTIMIZERS[name]
    form = JobForm()
    qtbot.addWidget(form)
    data = Job().model_dump(mode="json")
    data["optimizer"] = model().model_dump(mode="json")
    data["schedule"]["lr_scheduler"] = "constant"
    for field, info in model.model_fields.items():
        if field != "name" and field not in ("warmup_init",):  # warmup_init needs relative_step
            data["optimizer"][field] = _other_value(model, field, info, data["optimizer"][field])
    job = Job.model_validate(data)
    form.set_job(job)
    shown = {n for (s, n), ed in form.editors.items() if s == "optimizer" and not ed.widget.isHidden()}
    assert shown == set(model.model_fields)
    back = form.job_or_none()
    assert back is not None, form.check()[1]
    assert back.model_dump(mode="json") == job.model_dump(mode="json")


def test_choosing_an_optimizer_shows_its_fields_and_keeps_the_shared_ones(qtbot):
    form = JobForm()
    qtbot.addWidget(form)
    form.editor("optimizer.max_grad_norm").set(0.5)
    assert form.editor("optimizer.betas").get() == [0.9, 0.999]
    with qtbot.waitSignal(form.changed):
        form.editor("optimizer.name").set("adafactor")
    assert ("optimizer", "betas") not in form.editors and ("optimizer", "relative_step") in form.editors
    job = form.job_or_none()
    assert job.optimizer.name == "adafactor" and job.optimizer.max_grad_norm == 0.5
    form.editor("optimizer.clip_threshold").edit.setText("-1")
    _, reasons = form.check()
    assert any(r.startswith("optimizer.clip_threshold: Input should be greater than 0") for r in reasons)
    assert "greater than 0" in form.editor("optimizer.clip_threshold").error_label.text()
    form.editor("optimizer.name").set("came")
    assert form.job_or_none().optimizer.betas == [0.9, 0.999, 0.9999]
