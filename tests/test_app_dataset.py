"""The dataset view: counts of images and captions, thumbnails off the UI thread, big folders."""

import time

from PIL import Image
from PySide6.QtCore import Qt

from app.dataset_view import DatasetView
from trainer.job import DatasetSpec


def make_images(folder, count, captions=None):
    folder.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (40, 30), (200, 100, 50))
    for i in range(count):
        image.save(folder / f"{i:05d}.png")
        if captions is None or i < captions:
            (folder / f"{i:05d}.txt").write_text(f"caption {i}")
    return folder


def test_counts_and_missing_captions(qtbot, tmp_path):
    make_images(tmp_path / "5_dog", 4, captions=3)
    view = DatasetView()
    qtbot.addWidget(view)
    with qtbot.waitSignal(view.scanned, timeout=30_000) as scanned:
        view.set_spec(DatasetSpec(folders=[{"path": str(tmp_path / "5_dog"), "instance_prompt": "a dog"}]))
    scan = scanned.args[0]
    assert (scan.num_images, scan.captions_found, scan.captions_missing) == (4, 3, 1)
    text = view.counts.text()
    assert "<b>4</b> images" in text and "1 missing captions" in text
    assert view.model.rowCount() == 4
    last = view.model.index(3)
    assert "no caption file" in view.model.data(last) and "×5" in view.model.data(last)
    view.only_missing.setChecked(True)
    assert view.proxy.rowCount() == 1


def test_thumbnails_arrive_by_signal(qtbot, tmp_path):
    make_images(tmp_path, 3)
    view = DatasetView()
    qtbot.addWidget(view)
    view.resize(800, 600)
    view.show()
    with qtbot.waitSignal(view.scanned, timeout=30_000):
        view.set_spec(DatasetSpec(folders=[{"path": str(tmp_path)}]))
    with qtbot.waitSignal(view.model.dataChanged, timeout=30_000):
        view.model.data(view.model.index(0), 1)  # DecorationRole asks for the thumbnail


def test_large_folder_scans_off_the_ui_thread(qtbot, tmp_path):
    make_images(tmp_path, 3000, captions=2900)
    view = DatasetView()
    qtbot.addWidget(view)
    view.resize(1000, 700)
    view.show()
    start = time.perf_counter()
    with qtbot.waitSignal(view.scanned, timeout=20000):
        view.set_spec(DatasetSpec(folders=[{"path": str(tmp_path)}]))
        assert time.perf_counter() - start < 0.2  # returned at once: the scan runs in a worker
    assert view.model.rowCount() == 3000 and "100 missing" in view.counts.text()
    start = time.perf_counter()
    view.grab()  # paint: only visible rows ask for thumbnails
    assert time.perf_counter() - start < 1.0
    assert len(view.model._loader._pending) < 500


def test_missing_folder_is_one_line(qtbot, tmp_path):
    view = DatasetView()
    qtbot.addWidget(view)
    with qtbot.waitSignal(view.scanned, timeout=30_000):
        view.set_spec(DatasetSpec(folders=[{"path": str(tmp_path / "nope")}]))
    assert "folder not found" in view.error and "dataset.folders.0.path" in view.error


def test_imagefolder_captions_are_shown(qtbot, tmp_path):
    folder = make_images(tmp_path / "hf", 2, captions=0)
    (folder / "metadata.jsonl").write_text('{"file_name": "00000.png", "text": "from the metadata"}\n')
    view = DatasetView()
    qtbot.addWidget(view)
    with qtbot.waitSignal(view.scanned, timeout=30_000) as scanned:
        view.set_spec(DatasetSpec(folders=[{"path": str(folder)}]))
    assert (scanned.args[0].captions_found, scanned.args[0].captions_missing) == (1, 1)
    first = view.model.index(0)
    assert view.model.data(first).startswith("from the metadata")
    assert "caption file: " + str(folder / "metadata.jsonl") in view.model.data(first, Qt.ItemDataRole.ToolTipRole)


def test_masks_are_counted_and_overlaid_on_the_thumbnails(qtbot, tmp_path):
    """Left half white in masks/00000.png: the thumbnail's right half is tinted red, its left half untouched;
    the image without a mask file keeps its colours; an alpha-channel mask shows the same way."""
    make_images(tmp_path / "data", 2)
    (tmp_path / "data" / "masks").mkdir()
    mask = Image.new("L", (40, 30), 0)
    mask.paste(255, (0, 0, 20, 30))
    mask.save(tmp_path / "data" / "masks" / "00000.png")
    alpha = Image.new("RGBA", (40, 30), (200, 100, 50, 0))
    alpha.paste((200, 100, 50, 255), (0, 0, 20, 30))
    (tmp_path / "alpha").mkdir()
    alpha.save(tmp_path / "alpha" / "a.png")
    view = DatasetView()
    qtbot.addWidget(view)
    with qtbot.waitSignal(view.scanned, timeout=30_000):
        view.set_spec(DatasetSpec(folders=[{"path": str(tmp_path / "data"), "mask": "folder"},
                                           {"path": str(tmp_path / "alpha"), "mask": "alpha"}]))
    assert view.mask_counts == (2, 1)
    assert "2 masks (1 images without" in view.counts.text()
    assert "masks/00000.png" in view.model.data(view.model.index(0), Qt.ItemDataRole.ToolTipRole)
    for row in range(3):
        with qtbot.waitSignal(view.model.dataChanged, timeout=30_000):
            view.model.data(view.model.index(row), Qt.ItemDataRole.DecorationRole)
    thumbs = [view.model.data(view.model.index(row), Qt.ItemDataRole.DecorationRole).toImage() for row in range(3)]
    for row in (0, 2):
        left, right = thumbs[row].pixelColor(5, 15), thumbs[row].pixelColor(35, 15)
        assert (left.red(), left.green(), left.blue()) == (200, 100, 50), row
        assert right.red() > 2 * right.green() and right.green() < 110, (row, right.getRgb())  # tinted red
    plain = thumbs[1].pixelColor(35, 15)
    assert (plain.red(), plain.green(), plain.blue()) == (200, 100, 50)

    from PySide6.QtWidgets import QLabel

    from app.image_dialog import ImageDialog

    view._open(view.proxy.index(0, 0))  # the large preview shows the mask too
    dialog = view.findChildren(ImageDialog)[0]
    shown = next(label.pixmap() for label in dialog.findChildren(QLabel) if not label.pixmap().isNull()).toImage()
    left, right = shown.pixelColor(shown.width() // 8, shown.height() // 2), \
        shown.pixelColor(shown.width() * 7 // 8, shown.height() // 2)
    assert (left.red(), left.green(), left.blue()) == (200, 100, 50)
    assert right.red() > 2 * right.green(), right.getRgb()
    dialog.close()


# Stands in for `python -m trainer caption … --json` (the real one loads transformers: seconds): captions each image
# that has none as "PREFIX fake caption of NAME", one progress event per image; model "bad" fails as the real one.
FAKE_CAPTION = r"""
import json, sys, pathlib
args = sys.argv[1:]
assert args[0] == "caption", args
opt = lambda name: args[args.index(name) + 1]
if opt("--model") == "bad":
    print("error: --model: bad: not a captioning model folder or hub id (no config.json)", file=sys.stderr)
    sys.exit(2)
folders = args[1:args.index("--extension")]
ext = opt("--extension")
todo = [p for f in folders for p in sorted(pathlib.Path(f).glob("*.png")) if not p.with_suffix(ext).exists()]
pathlib.Path(folders[0], "argv.json").write_text(json.dumps(args))
for i, p in enumerate(todo, 1):
    p.with_suffix(ext).write_text(f"{opt('--prefix')} fake caption of {p.name}\n")
    print(json.dumps({"type": "progress", "time": 0, "task": "caption", "done": i, "total": len(todo)}), flush=True)
print(f"wrote {len(todo)} captions", file=sys.stderr)
"""


def test_caption_missing_runs_the_trainer_command_and_refreshes_the_marks(qtbot, tmp_path):
    import json
    import sys

    data = make_images(tmp_path / "data", 3, captions=1)
    view = DatasetView(trainer_command=[sys.executable, "-c", FAKE_CAPTION])
    qtbot.addWidget(view)
    with qtbot.waitSignal(view.scanned, timeout=30_000):
        view.set_spec(DatasetSpec(folders=[{"path": str(data), "instance_prompt": "sks"}]))
    assert view.caption_button.isEnabled() and "2 missing captions" in view.counts.text()
    asked = []
    view.ask_caption = lambda: asked.append(1) or ("bad", "", "", False)
    with qtbot.waitSignal(view.captioner.finished, timeout=20000) as failed:
        view.caption_button.click()
    assert failed.args[0] is False
    assert "Captioning failed: error: --model: bad: not a captioning model" in view.caption_status.text()
    qtbot.waitUntil(lambda: view.caption_button.isEnabled(), timeout=30_000)

    view.ask_caption = lambda: ("tiny-model", "sks", "", False)
    progress = []
    view.captioner.progress.connect(lambda done, total: progress.append((done, total)))
    with qtbot.waitSignal(view.captioner.finished, timeout=20000) as finished:
        view.caption_button.click()
        assert not view.caption_button.isEnabled() and not view.caption_progress.isHidden()
    assert finished.args[0] is True and progress == [(1, 2), (2, 2)]
    qtbot.waitUntil(lambda: view.scan is not None and view.scan.captions_missing == 0, timeout=30_000)
    assert (data / "00001.txt").read_text() == "sks fake caption of 00001.png\n"
    assert (data / "00000.txt").read_text() == "caption 0", "an existing caption is left alone"
    assert "missing captions" not in view.counts.text() and not view.caption_button.isEnabled()
    assert view.caption_progress.isHidden()
    args = json.loads((data / "argv.json").read_text())
    assert args[:2] == ["caption", str(data)] and "--json" in args and "--overwrite" not in args
    assert args[args.index("--model") + 1] == "tiny-model" and args[args.index("--prefix") + 1] == "sks"
