"""The Memory tab with the real trainer on the tiny demo: the estimate of the job in the editor is shown against the
chosen memory, a figure too small warns and lists a setting that fits, and its Apply sets the field in the editor,
whose new estimate fits. A job the trainer refuses shows the trainer's line."""

import json
import sys

import pytest

from app.estimate_panel import OTHER
from app.settings import settings
from trainer.estimate import GIB, estimate
from trainer.job import load_job
from trainer.plan import make_plan


@pytest.fixture(autouse=True)
def no_remembered_gpu():
    """Each test starts from no saved GPU choice, and leaves none (the settings live as long as the session)."""
    settings().remove("estimate")
    yield
    settings().remove("estimate")


def _devices(memory_gib: float) -> list[str]:
    """A stand-in for `trainer devices --json` on a machine with one GPU (this one has none) of that memory."""
    answer = {"gpus": [{"index": 0, "name": "NVIDIA GeForce RTX 4090", "memory_gib": memory_gib}]}
    return [sys.executable, "-c", f"print({json.dumps(json.dumps(answer))})"]


def test_too_small_warns_and_apply_makes_it_fit(app_window, demo_job, qtbot):
    window, panel = app_window, app_window.estimate
    assert window.load_preset(demo_job)
    job = load_job(demo_job)
    short = round((estimate(job, make_plan(job, resume=True)).total - 2 * 2**20) / GIB, 4)  # 2 MiB short
    panel.suggestion_count, panel.devices_command = 1, _devices(short)
    assert panel.process is None and panel.devices is None, "a hidden tab asks nothing"
    window.show()
    with qtbot.waitSignal(panel.finished, timeout=240_000) as done:
        window.tabs.setCurrentWidget(panel)
    assert done.args == [0], panel.failure.text()
    # The GPU the trainer sees is listed first and chosen; it is in the table, so its time per step is known.
    assert panel.gpu.currentIndex() == 0 and panel.gpu.currentText() == f"GPU 0: NVIDIA GeForce RTX 4090 ({short:g} GiB)"
    assert panel.result["memory_gib"] == short and panel.result["gpu"]["name"] == "RTX 4090"
    assert "s per step on RTX 4090" in panel.speed.text()
    assert panel.result["fits"] is False and "does not fit" in panel.summary.text()
    assert "will not fit" in panel.warning.text() and "1 setting(s) below would fit" in panel.warning.text()
    assert len(panel.suggestions) == 1
    found, apply = panel.suggestions[0]
    assert found["fits"] and found["total_gib"] <= short
    (dotted, value), = found["changes"].items()  # the demo trains in fp32: bf16 alone fits
    assert (dotted, value) == ("precision.mixed_precision", "bf16")
    assert window.form.editor(dotted).get() == "no"

    with qtbot.waitSignal(panel.estimated, timeout=240_000) as shown:
        apply.click()
    assert window.form.editor(dotted).get() == value
    assert shown.args[0]["fits"] is True and shown.args[0]["total_bytes"] == found["total_bytes"]
    assert "fits" in panel.summary.text() and not panel.warning.text() and not panel.suggestions


def test_a_memory_figure_is_remembered(qtbot):
    from app.estimate_panel import EstimatePanel
    from app.job_form import JobForm

    form = JobForm()
    qtbot.addWidget(form)
    panel = EstimatePanel(form)
    panel.choose_memory(5.5)
    assert panel.memory_gib() == 5.5 and panel.memory.isVisibleTo(panel) and panel.table_gpu() == ""
    again = EstimatePanel(form)
    assert again.gpu.currentText() == OTHER and again.memory_gib() == 5.5
    again.gpu.setCurrentIndex(again.gpu.findText("RTX 3090 (24 GiB)"))
    assert again.memory_gib() == 24 and again.table_gpu() == "RTX 3090" and not again.memory.isVisibleTo(again)
    assert EstimatePanel(form).gpu.currentText() == "RTX 3090 (24 GiB)"


def test_a_job_the_trainer_refuses_shows_its_line(app_window, demo_job, qtbot):
    window, panel = app_window, app_window.estimate
    assert window.load_preset(demo_job)
    window.form.editor("model.path").set(str(demo_job.parent / "no-such-model"))
    panel.devices_command = _devices(8.0)
    window.show()
    with qtbot.waitSignal(panel.finished, timeout=120_000) as done:
        window.tabs.setCurrentWidget(panel)
    assert done.args == [2]
    assert panel.failure.text().startswith("No estimate: ") and "model.path" in panel.failure.text()
    assert window.act_start.isEnabled() == (not window.start_reasons)  # the form decides Start, never the estimate
