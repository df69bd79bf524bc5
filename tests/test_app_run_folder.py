"""Open run folder: plot, gallery and log rebuilt from events.jsonl and samples/, and followed as it grows."""

import json
import time

import numpy as np
from PIL import Image

from trainer.events import encode, make_event


def write_run(folder, steps, samples_from="/remote/gpu/run/samples", finished=True):
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    lines = [make_event("run_started", job={}, total_steps=steps, start_step=0, output_dir="/remote/gpu/run")]
    for step in range(1, steps + 1):
        lines.append(make_event("step", step=step, epoch=0, loss=1 / step, lr=1e-4, its=5.0, eta=1.0))
        if step % 100 == 0 or step == 1:
            name = f"step-{step}.png"
            Image.new("RGB", (32, 32), (step % 255, 0, 0)).save(folder / "samples" / name)
            # Paths from the machine the run was on: the window finds them in this folder's samples/.
            lines.append(make_event("sample", step=step, prompt="p", seed=0, path=f"{samples_from}/{name}"))
    lines.append(make_event("log", level="info", message="hello from the trainer"))
    if finished:
        lines.append(make_event("run_finished", status="completed", outputs={}))
    with open(folder / "events.jsonl", "ab") as f:
        f.writelines(encode(e) for e in lines)


def test_open_run_folder_rebuilds_plot_gallery_and_log(app_window, qtbot, tmp_path):
    write_run(tmp_path, 1000)
    assert app_window.open_run_folder(tmp_path)
    panel = app_window.run_panel
    qtbot.waitUntil(lambda: panel.plot.point_count == 1000, timeout=30_000)
    assert panel.progress.value() == 1000
    assert panel.gallery.image_count == 11
    assert all(e["path"].startswith(str(tmp_path)) for e in panel.gallery._samples.values())
    assert "hello from the trainer" in panel.log.toPlainText()
    assert "completed" in panel.banner.text()


def test_open_run_folder_follows_a_growing_file(app_window, qtbot, tmp_path):
    write_run(tmp_path, 50, finished=False)
    app_window.open_run_folder(tmp_path)
    qtbot.waitUntil(lambda: app_window.run_panel.plot.point_count == 50, timeout=30_000)
    with open(tmp_path / "events.jsonl", "ab") as f:
        for step in range(51, 61):
            f.write(encode(make_event("step", step=step, epoch=0, loss=0.1, lr=1e-4, its=5.0, eta=1.0)))
        f.write(b'{"type": "step", "step": 61')  # a line still being written is left for later
    qtbot.waitUntil(lambda: app_window.run_panel.plot.point_count == 60, timeout=30_000)
    with open(tmp_path / "events.jsonl", "ab") as f:
        f.write(b', "epoch": 0, "loss": 0.1, "lr": 0.0001, "its": 5.0, "eta": 1.0, "time": 0}\n')
    qtbot.waitUntil(lambda: app_window.run_panel.plot.point_count == 61, timeout=30_000)


def test_a_folder_without_events_is_a_one_line_error(app_window, tmp_path):
    assert not app_window.open_run_folder(tmp_path)
    assert "events.jsonl" in app_window.messages[-1]


def test_plot_stays_fast_with_100k_points(qtbot):
    from app.loss_plot import LossPlot

    plot = LossPlot()
    qtbot.addWidget(plot)
    plot.resize(900, 500)
    plot.show()
    steps = np.arange(1, 100_001)
    plot.add_points(steps, 1 / np.sqrt(steps) + np.random.default_rng(0).random(len(steps)) * 0.1,
                    np.full(len(steps), 1e-4))
    assert plot.point_count == 100_000
    plot.set_log_scale(True)
    timings = []
    for step in range(100_001, 100_021):  # a live run: one point per redraw
        plot.add_point(step, 0.1, 1e-4)
        start = time.perf_counter()
        plot._redraw()
        plot.grab()  # render the frame
        timings.append(time.perf_counter() - start)
    assert plot.point_count == 100_020
    assert np.median(timings) < 0.1, timings  # well under a frame budget at 10 redraws/s


def test_plot_drops_steps_after_a_resume_point(qtbot):
    from app.loss_plot import LossPlot

    plot = LossPlot()
    qtbot.addWidget(plot)
    plot.add_points([1, 2, 3, 4, 5], [1, 1, 1, 1, 1], [0] * 5)
    plot.add_points([4, 5, 6], [2, 2, 2], [0] * 3)  # resumed from the step-3 checkpoint
    assert plot.point_count == 6
    assert list(plot._steps[:6]) == [1, 2, 3, 4, 5, 6]
    json.dumps(float(plot._smooth[5]))


def test_clicking_a_sample_enlarges_it(app_window, qtbot, tmp_path):
    from app.image_dialog import ImageDialog

    write_run(tmp_path, 200)
    app_window.open_run_folder(tmp_path)
    gallery = app_window.run_panel.gallery
    qtbot.waitUntil(lambda: gallery.image_count == 3, timeout=30_000)
    assert [gallery.table.horizontalHeaderItem(c).text() for c in range(3)] == ["step 200", "step 100", "step 1"]
    with qtbot.waitSignal(gallery.imageOpened) as opened:
        gallery._on_clicked(0, 0)
    assert opened.args[0] == str(tmp_path / "samples" / "step-200.png")
    dialogs = [w for w in gallery.findChildren(ImageDialog)]
    assert dialogs and dialogs[-1].isVisible()
