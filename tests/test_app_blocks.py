"""The block picker: the form's "Pick blocks…" button, the tree from `trainer inspect-model`, the checks written
back as the shortest layers lists, and errors as one line."""

import json
import sys

import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QPushButton

from app.job_form import JobForm
from trainer.job import JobError, ModelSpec

LOAD_MS = 90000  # the real command imports torch and diffusers: seconds, more on a busy machine
C, U, P = Qt.CheckState.Checked, Qt.CheckState.Unchecked, Qt.CheckState.PartiallyChecked


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from trainer.demo import build_tiny_sd15

    return build_tiny_sd15(tmp_path_factory.mktemp("blocks") / "model")


@pytest.fixture(scope="module")
def unet_tree(tiny_model):
    """The tiny model's UNet tree as inspect-model reports it, read here independently of the window."""
    from trainer.inspect_model import inspect_model

    return inspect_model(ModelSpec(path=str(tiny_model)))["components"]["unet"]


@pytest.fixture
def fake_command(tiny_model, unet_tree, tmp_path):
    """A trainer command that prints the saved inspect-model JSON at once (instead of importing torch)."""
    path = tmp_path / "inspect.json"
    path.write_text(json.dumps({"family": "sd1", "path": str(tiny_model), "denoiser": "unet",
                                "components": {"unet": unet_tree}}))
    return [sys.executable, "-c", f"import sys; sys.stdout.write(open({str(path)!r}).read())"]


def test_unchecked_blocks_become_freeze_blocks_then_one_checked_block_train_blocks(qtbot, tiny_model, unet_tree,
                                                                                   tmp_path, fake_command):
    form = _form(qtbot, tiny_model, tmp_path)
    params = {node["name"]: node["params"] for node in _walk(unet_tree)}
    top = [node["name"] for node in unet_tree["children"]]

    picker = _open_picker(qtbot, form, "layers.freeze_blocks")
    assert picker.status.text() == "Reading the model…"  # the command is still running: the UI is not waiting
    assert not picker.ok_button.isEnabled()
    form.editor("output.name").set("typed-while-reading")  # the form takes edits meanwhile
    with qtbot.waitSignal(picker.loaded, timeout=LOAD_MS):
        pass
    assert [picker.tree.topLevelItem(i).text(0) for i in range(picker.tree.topLevelItemCount())] == top
    assert picker.item("mid_block").text(1) == f"{params['mid_block']:,}"
    assert picker.total() == unet_tree["params"] == sum(params[n] for n in top)
    assert f"{unet_tree['params']:,}" in picker.total_label.text()

    picker.item("down_blocks.0").setCheckState(0, U)
    after_one = picker.total_label.text()
    picker.item("mid_block").setCheckState(0, U)
    expected = sum(params[n] for n in top if n not in ("down_blocks.0", "mid_block"))
    assert picker.total() == expected
    assert f"<b>{expected:,}</b>" in picker.total_label.text() != after_one
    assert picker.item("mid_block.resnets.0").checkState(0) == U  # a block's box sets its children
    assert "freeze_blocks" in picker.result_label.text()
    with qtbot.waitSignal(form.changed, timeout=30_000):
        qtbot.mouseClick(picker.ok_button, Qt.MouseButton.LeftButton)
    assert form.editor("layers.freeze_blocks").edit.toPlainText() == "down_blocks.0\nmid_block"
    assert form.editor("layers.train_blocks").edit.toPlainText() == ""
    job, reasons = form.check()
    assert reasons == [] and job is not None
    assert (job.layers.train_blocks, job.layers.freeze_blocks) == ([], ["down_blocks.0", "mid_block"])

    # Reopened, the picker starts from the lists it wrote (the same tree, printed by a quick fake this time).
    form.trainer_command = fake_command
    picker = _open_picker(qtbot, form, "layers.train_blocks")
    with qtbot.waitSignal(picker.loaded, timeout=LOAD_MS):
        pass
    assert {n: picker.item(n).checkState(0) for n in top} == {
        n: U if n in ("down_blocks.0", "mid_block") else C for n in top}
    qtbot.mouseClick(picker.uncheck_all, Qt.MouseButton.LeftButton)
    assert picker.total() == 0 and not picker.ok_button.isEnabled()
    picker.item("up_blocks.1").setCheckState(0, C)
    assert picker.total() == params["up_blocks.1"]
    assert f"<b>{params['up_blocks.1']:,}</b>" in picker.total_label.text()
    assert "train_blocks" in picker.result_label.text()
    qtbot.mouseClick(picker.ok_button, Qt.MouseButton.LeftButton)
    assert form.editor("layers.train_blocks").get() == ["up_blocks.1"]
    assert form.editor("layers.freeze_blocks").get() == []
    job, reasons = form.check()
    assert reasons == [] and (job.layers.train_blocks, job.layers.freeze_blocks) == (["up_blocks.1"], [])


def test_bad_model_folder_shows_the_commands_one_line_error(qtbot, tmp_path):
    from trainer.inspect_model import inspect_model

    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    with pytest.raises(JobError) as raised:  # what `trainer inspect-model` prints after "error: " (exit code 2)
        inspect_model(ModelSpec(path=str(not_a_model)))
    expected = str(raised.value)
    form = _form(qtbot, not_a_model, tmp_path)
    picker = _open_picker(qtbot, form, "layers.train_blocks")
    with qtbot.waitSignal(picker.failed, timeout=LOAD_MS) as failed:
        pass
    assert failed.args == [expected] and str(not_a_model) in expected
    assert picker.status.text() == expected and "\n" not in expected
    assert not picker.tree.isEnabled() and not picker.ok_button.isEnabled()


@pytest.mark.parametrize("code,message", [
    ("import sys; print('noise from a library', file=sys.stderr); print('error: model.path: x: broken', "
     "file=sys.stderr); sys.exit(2)", "model.path: x: broken"),
    ("raise RuntimeError('boom')", "RuntimeError: boom"),
    ("print('not json')", "inspect-model: Expecting value: line 1 column 1 (char 0)"),
    ("print('{\"components\": {\"text_encoder\": {\"params\": 1}}}')",
     "inspect-model: no denoiser (unet or transformer) in the model"),
])
def test_a_failing_command_is_one_line(qtbot, tmp_path, code, message):
    form = _form(qtbot, tmp_path, tmp_path)
    form.trainer_command = [sys.executable, "-c", code]
    picker = _open_picker(qtbot, form, "layers.train_blocks")
    with qtbot.waitSignal(picker.failed, timeout=30000) as failed:
        pass
    assert failed.args == [message] and picker.status.text() == message


@pytest.mark.parametrize("path,message", [
    ("", "model.path: choose a base model first"),
    ("/no/such/model", "model.path: /no/such/model: not a local folder"),
])
def test_missing_model_path_fails_without_running_anything(qtbot, tmp_path, path, message):
    form = _form(qtbot, tmp_path, tmp_path)
    form.editor("model.path").set(path)
    form.trainer_command = [sys.executable, "-c", "raise SystemExit('must not run')"]
    picker = _open_picker(qtbot, form, "layers.train_blocks")
    assert picker.error.startswith(message) and picker.status.text() == picker.error
    assert picker.process.state() == picker.process.ProcessState.NotRunning and not picker.ok_button.isEnabled()


def test_patterns_in_the_lists_set_the_checks_and_partial_blocks_count_their_checked_children(
        qtbot, tiny_model, unet_tree, tmp_path, fake_command):
    form = _form(qtbot, tiny_model, tmp_path)
    form.trainer_command = fake_command
    form.editor("layers.train_blocks").set(["up_blocks.*", "mid_block.resnets.0-1", "conv_in.weight.x"])
    form.editor("layers.freeze_blocks").set(["up_blocks.1.resnets[-1:]"])
    picker = _open_picker(qtbot, form, "layers.train_blocks")
    with qtbot.waitSignal(picker.loaded, timeout=30000):
        pass
    params = {node["name"]: node["params"] for node in _walk(unet_tree)}
    states = {n: picker.item(n).checkState(0) for n in ("up_blocks.0", "up_blocks.1", "up_blocks.1.resnets.0",
                                                        "up_blocks.1.resnets.1", "mid_block", "down_blocks.0")}
    assert states == {"up_blocks.0": C, "up_blocks.1": P, "up_blocks.1.resnets.0": C,
                      "up_blocks.1.resnets.1": U, "mid_block": P, "down_blocks.0": U}
    assert "conv_in.weight.x" in picker.note_label.text() and picker.note_label.isVisibleTo(picker)
    checked = ["up_blocks.0", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1", "up_blocks.1.resnets.0",
               "mid_block.resnets.0", "mid_block.resnets.1"]
    assert picker.total() == sum(params[n] for n in checked)
    assert picker.lists() == (checked, [])  # 6 checked blocks against 8 unchecked ones

    picker.item("up_blocks.1.attentions.0.proj_in").setCheckState(0, U)
    assert picker.item("up_blocks.1.attentions.0").checkState(0) == P
    checked[1:2] = [n for n in ("up_blocks.1.attentions.0.norm", "up_blocks.1.attentions.0.transformer_blocks.0",
                                "up_blocks.1.attentions.0.proj_out")]
    assert picker.total() == sum(params[n] for n in checked)
    assert f"<b>{picker.total():,}</b>" in picker.total_label.text()

    qtbot.mouseClick(picker.check_all, Qt.MouseButton.LeftButton)
    assert picker.total() == unet_tree["params"] and picker.lists() == ([], [])
    assert "every block trains" in picker.result_label.text()
    qtbot.mouseClick(picker.ok_button, Qt.MouseButton.LeftButton)
    assert form.editor("layers.train_blocks").get() == [] and form.editor("layers.freeze_blocks").get() == []


def test_cancel_keeps_the_lists(qtbot, tiny_model, tmp_path, fake_command):
    form = _form(qtbot, tiny_model, tmp_path)
    form.trainer_command = fake_command
    form.editor("layers.freeze_blocks").set(["mid_block"])
    picker = _open_picker(qtbot, form, "layers.freeze_blocks")
    with qtbot.waitSignal(picker.loaded, timeout=30000):
        pass
    picker.item("conv_in").setCheckState(0, U)
    picker.reject()
    assert form.editor("layers.freeze_blocks").get() == ["mid_block"]


def _form(qtbot, model_path, tmp_path) -> JobForm:
    form = JobForm()
    qtbot.addWidget(form)
    form.editor("model.path").set(str(model_path))
    form.editor("output.output_dir").set(str(tmp_path / "run"))
    form.set_dataset_folders([str(tmp_path)])
    return form


def _open_picker(qtbot, form: JobForm, field: str):
    buttons = [b for b in form.editor(field).widget.findChildren(QPushButton) if b.text() == "Pick blocks…"]
    assert len(buttons) == 1
    qtbot.mouseClick(buttons[0], Qt.MouseButton.LeftButton)
    picker = form.block_picker
    assert picker is not None and picker.isVisible()
    return picker


def _walk(node):
    for child in node.get("children", []):
        yield child
        yield from _walk(child)
