"""Broken files never stop a run: each is handled or skipped with one warning naming it, counted in `check` and
in a `log` event; a dataset left with nothing usable exits 2 saying why."""

import io
import shutil

import numpy as np
import pytest

from messy_data import BROKEN, noise_image, write_broken
from trainer.data import images
from trainer.cli import main
from trainer.data.files import ImageItem, scan_dataset
from trainer.events import read_events
from trainer.job import DatasetSpec, load_job, save_job


def _item(path) -> ImageItem:
    return ImageItem(path, "", None, 1, path.parent)


def _corrupt_png(path, seed=9) -> None:
    """A PNG whose header and end are intact but whose pixel data is damaged: only a full decode finds it."""
    buf = io.BytesIO()
    noise_image(seed=seed).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    folder = tmp_path_factory.mktemp("broken") / "data"
    write_broken(folder)
    return folder


@pytest.mark.parametrize("name", [n for n, why in BROKEN.items() if why and why != "too small"])
def test_broken_files_are_refused_by_the_header_probe(broken, name):
    with pytest.raises(images.BadImage, match=BROKEN[name]):
        images.probe(_item(broken / name))


def test_odd_but_valid_images_decode_correctly(broken):
    cmyk, _ = images.load(_item(broken / "cmyk.jpg"))
    assert cmyk.mode == "RGB" and cmyk.getpixel((50, 40)) == (255, 0, 0)
    grey, _ = images.load(_item(broken / "gray16.png"))
    assert grey.mode == "RGB" and grey.getpixel((0, 0)) == (128, 128, 128)  # not clipped to white
    palette, _ = images.load(_item(broken / "palette.png"))
    assert palette.getpixel((10, 10)) == (0, 0, 255) and palette.getpixel((90, 10)) == (255, 255, 255)
    assert images.probe(_item(broken / "rotated.jpg")) == (70, 120)  # EXIF rotation honoured without decoding
    assert images.load(_item(broken / "rotated.jpg"))[0].size == (70, 120)


def test_big_jpegs_decode_at_the_smallest_scale_that_covers_the_bucket(tmp_path):
    noise_image((2000, 1500)).save(tmp_path / "big.jpg", quality=80)
    image, full = images.load(_item(tmp_path / "big.jpg"), cover=(128, 128))
    assert full == (2000, 1500) and image.size == (250, 188)  # 1/8 scale still covers 128x128
    image, _ = images.load(_item(tmp_path / "big.jpg"), cover=(512, 384))
    assert image.size == (1000, 750)  # 1/4 scale (500x375) would not cover 512 wide


def test_unreadable_file(tmp_path):
    noise_image().save(tmp_path / "gone.png")
    item = scan_dataset(DatasetSpec.model_validate({"folders": [{"path": str(tmp_path)}]})).items[0]
    (tmp_path / "gone.png").unlink()  # removed (or made unreadable) between the scan and the read
    with pytest.raises(images.BadImage, match="unreadable"):
        images.probe(item)
    with pytest.raises(images.BadImage, match="unreadable"):
        images.load(item)


def test_damaged_pixel_data_is_found_lazily_and_replaced(tmp_path):
    from trainer.data.buckets import layout
    from trainer.data.dataset import TrainDataset

    for i in range(3):
        noise_image(seed=i).save(tmp_path / f"{i}.png")
    _corrupt_png(tmp_path / "1.png")
    spec = DatasetSpec.model_validate({"folders": [{"path": str(tmp_path)}], "resolution": 64})
    scan = scan_dataset(spec)
    epoch, _ = layout(scan.items, [images.probe(i) for i in scan.items], spec)
    dataset = TrainDataset(epoch, spec, seed=0)
    sample = dataset[(1, 0)]
    assert sample["skipped"] == [(str(tmp_path / "1.png"), sample["skipped"][0][1])]
    assert "cannot decode" in sample["skipped"][0][1] and sample["pixels"].shape == (3, 64, 64)
    assert dataset[(1, 1)]["skipped"] == []  # warned once per process


def _job_on(demo_job, folder, **dataset):
    job = load_job(demo_job)
    job.dataset.folders[0].path = str(folder)
    for key, value in dataset.items():
        setattr(job.dataset, key, value)
    save_job(job, demo_job)
    return demo_job


def test_check_lists_what_is_skipped_and_why(broken, demo_job, capsys):
    _job_on(demo_job, broken)
    assert main(["check", str(demo_job)]) == 0
    out = capsys.readouterr().out
    skipped = [n for n, why in BROKEN.items() if why]
    assert f"skipped {len(skipped)} files (not trained):" in out
    for name in skipped:
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(str(broken / name)))
        assert BROKEN[name] in line, line
    kept = len(BROKEN) - len(skipped)
    assert f"images: {kept} ({kept} with captions, 0 missing" in out


def test_nothing_usable_exits_2_saying_why(demo_job, capsys, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_text("not an image")
    (folder / "b.jpg").write_bytes(b"")
    _job_on(demo_job, folder)
    assert main(["check", str(demo_job)]) == 2
    err = capsys.readouterr().err.strip()
    assert "dataset: no usable images: 2 files skipped" in err and "\n" not in err


def test_a_mixed_folder_trains_end_to_end(broken, demo_job, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(broken, folder)
    for png in sorted((demo_job.parent / "dataset").glob("*"))[:8]:
        shutil.copy(png, folder)
    _corrupt_png(folder / "damaged.png")
    (folder / "damaged.txt").write_text("damaged")
    _job_on(demo_job, folder)
    assert main(["run", str(demo_job), "--set", "validation.prompts=[]", "--set", "schedule.max_steps=3"]) == 0
    events, _ = read_events(demo_job.parent / "run" / "events.jsonl")
    assert events[0]["type"] == "run_started" and events[-1]["status"] == "completed"
    warnings = [e["message"] for e in events if e["type"] == "log" and e["level"] == "warning"]
    for name in [n for n, why in BROKEN.items() if why] + ["damaged.png"]:
        named = [w for w in warnings if w.startswith(f"skipped {folder / name}:")]
        assert len(named) == 1, (name, warnings)
    assert "another image of its bucket" in next(w for w in warnings if "damaged.png" in w)
    assert sum(e["type"] == "step" for e in events) == 3
    assert all(np.isfinite(e["loss"]) for e in events if e["type"] == "step")
