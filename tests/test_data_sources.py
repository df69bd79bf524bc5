"""Dataset sources: several folders with their own settings, kohya `N_name` folders, multi-line captions,
webdataset shards, metadata filters written as data, and Hugging Face imagefolders (captions in metadata.jsonl
or metadata.csv)."""

import json
from pathlib import Path

import pytest

from messy_data import noise_image, write_shard
from trainer.cli import main
from trainer.data.files import MAX_MEMBER_BYTES, scan_dataset
from trainer.job import DatasetSpec, JobError, load_job, save_job
from trainer.plan import make_plan


def _images(folder, names, captions=None, ext=".txt"):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        noise_image(seed=i).save(folder / name)
        if captions and captions[i] is not None:
            (folder / name).with_suffix(ext).write_text(captions[i], encoding="utf-8")
    return folder


def _spec(*folders, **settings) -> DatasetSpec:
    return DatasetSpec.model_validate({"folders": list(folders), **settings})


def test_several_folders_each_with_its_own_settings(tmp_path):
    a = _images(tmp_path / "a", ["1.png", "2.png"], ["a cat", None])
    b = _images(tmp_path / "b", ["1.jpg"], ["photo of [instance]\nclose-up of [instance], smiling"], ext=".caption")
    c = _images(tmp_path / "10_dog", ["x.png"], [None])
    scan = scan_dataset(_spec({"path": str(a), "repeats": 2, "instance_prompt": "a thing"},
                              {"path": str(b), "caption_extension": ".caption", "instance_prompt": "sks man",
                               "weight": 0.5},
                              {"path": str(c), "instance_prompt": "a dog"}))
    by_name = {(i.folder.name, i.path.name): i for i in scan.items}
    assert by_name[("a", "1.png")].captions == ["a cat"] and by_name[("a", "1.png")].repeats == 2
    assert by_name[("a", "2.png")].caption == "a thing" and by_name[("a", "2.png")].caption_path is None
    man = by_name[("b", "1.jpg")]
    assert man.captions == ["photo of sks man", "close-up of sks man, smiling"]  # instance token replaced
    assert man.weight == 0.5 and man.repeats == 1
    assert by_name[("10_dog", "x.png")].repeats == 10  # kohya folder name gives the repeats
    assert (scan.num_images, scan.captions_found, scan.captions_missing, scan.num_samples) == (4, 2, 2, 15)


def test_kohya_subfolders_and_explicit_repeats(tmp_path):
    root = _images(tmp_path / "data", ["top.png"], ["top"])
    _images(root / "3_style", ["s.png"], ["style"])
    _images(root / "notes", ["ignored.png"], ["not an N_name folder"])
    scan = scan_dataset(_spec({"path": str(root)}))
    assert sorted((i.path.name, i.repeats) for i in scan.items) == [("s.png", 3), ("top.png", 1)]
    scan = scan_dataset(_spec({"path": str(root), "repeats": 5}))
    assert {i.repeats for i in scan.items} == {5}


def test_webdataset_shard_with_captions_and_metadata_filters(tmp_path):
    samples = [{"stem": f"{i:04d}", "image": noise_image(seed=i), "caption": f"sample {i}",
                "json": {"aesthetic_score": 3.0 + i, "tags": ["a", "b"] if i % 2 else ["c"]}} for i in range(5)]
    samples.append({"stem": "0005", "image": noise_image(seed=5), "json": {"other": 1}})  # no score, no caption
    shard = write_shard(tmp_path / "shards" / "0001.tar", samples)
    scan = scan_dataset(_spec({"path": str(shard), "instance_prompt": "fallback"}))
    assert [i.path.name for i in scan.items] == ["0000.jpg", "0001.jpg", "0002.jpg", "0003.jpg", "0004.jpg",
                                                 "0005.jpg"]
    assert scan.items[2].caption == "sample 2" and scan.items[5].caption == "fallback"
    assert scan.captions_missing == 1 and scan.items[0].archive == shard

    filters = [{"key": "aesthetic_score", "op": ">", "value": 4.5}, {"key": "tags", "op": "contains", "value": "a"}]
    scan = scan_dataset(_spec({"path": str(tmp_path / "shards"), "filters": filters}))  # a folder of shards
    assert [i.caption for i in scan.items] == ["sample 3"]  # 5.0 < 6.0 pass; 4.0 fails; 1 and 3 hold "a"
    assert scan.filtered_out == 5 and scan.filter_reasons["no 'aesthetic_score' in metadata"] == 1

    from trainer.data import images
    item = scan.items[0]
    assert images.load(item)[0].size == (96, 80) and not (tmp_path / "shards" / "0003.jpg").exists()  # never extracted


def test_filters_on_folder_images_with_json_beside_them(tmp_path):
    folder = _images(tmp_path / "f", ["a.png", "b.png", "c.png"], ["a", "b", "c"])
    (folder / "a.json").write_text('{"source": "web", "score": 7}')
    (folder / "b.json").write_text('{"source": "scan", "score": 9}')
    spec = _spec({"path": str(folder), "filters": [{"key": "source", "op": "in", "value": ["web", "photo"]},
                                                   {"key": "score", "op": ">=", "value": 5}]})
    scan = scan_dataset(spec)
    assert [i.path.name for i in scan.items] == ["a.png"]
    assert scan.filtered_out == 2  # b fails "in", c has no metadata at all


def test_filter_ops_are_a_closed_set_of_data():
    with pytest.raises(JobError, match="filters.0.op"):
        from trainer.job import from_sparse
        from_sparse({"dataset": {"folders": [{"path": "x", "filters": [
            {"key": "a", "op": "__import__('os').system('true')", "value": 1}]}]}})


def test_huge_shard_member_is_refused_without_reading_it(tmp_path, monkeypatch):
    shard = write_shard(tmp_path / "s.tar", [{"stem": "big", "image": noise_image((400, 400)), "caption": "big"},
                                             {"stem": "ok", "image": noise_image(), "caption": "ok"}])
    monkeypatch.setattr("trainer.data.files.MAX_MEMBER_BYTES", 20_000)
    scan = scan_dataset(_spec({"path": str(shard)}))
    assert [i.caption for i in scan.items] == ["ok"]
    assert scan.skipped and "refused" in scan.skipped[0][1] and scan.skipped[0][0].endswith("big.jpg")
    assert MAX_MEMBER_BYTES > 20_000


def test_missing_folder_names_the_field(demo_job, capsys, tmp_path):
    job = load_job(demo_job)
    job.dataset.folders.append(job.dataset.folders[0].model_copy(update={"path": str(tmp_path / "nope")}))
    save_job(job, demo_job)
    assert main(["check", str(demo_job)]) == 2
    err = capsys.readouterr().err.strip()
    assert "dataset.folders.1.path" in err and "folder not found" in err and "\n" not in err


def test_check_reports_sources_filters_and_captions(demo_job, capsys, tmp_path):
    write_shard(tmp_path / "web.tar", [{"stem": f"{i}", "image": noise_image(seed=i), "caption": f"web {i}",
                                        "json": {"score": i}} for i in range(4)])
    job = load_job(demo_job)
    job.dataset.folders.append(job.dataset.folders[0].model_copy(update={
        "path": str(tmp_path / "web.tar"), "weight": 2.0,
        "filters": [{"key": "score", "op": ">=", "value": 2}]}))
    save_job(job, demo_job)
    assert main(["check", str(demo_job)]) == 0
    out = capsys.readouterr().out
    assert "images: 14 (13 with captions, 1 missing" in out
    assert f"{tmp_path / 'web.tar'}: 2 images x 1 repeats, weight 2, 2 captions found, 0 missing, 2 left out by " \
           "filters" in out
    assert "2 x score >= 2 is false" in out
    plan = make_plan(load_job(demo_job))
    assert len(plan.layout.samples) == 14


def test_imagefolder_jsonl_captions_and_unusable_rows(tmp_path):
    """The Hugging Face imagefolder layout: captions in metadata.jsonl's `text` column, keyed by file_name."""
    folder = _images(tmp_path / "hf", ["a.png", "b.png", "c.png", "d.png", "e.png"], [None, None, None, None, "own"])
    rows = ['{"file_name": "a.png", "text": "a red [instance]\\nanother caption"}', 'not json at all',
            '{"file_name": "b.png", "caption": "wrong column"}', '["a list"]', '', '{"text": "no file name"}',
            '{"file_name": "gone.png", "text": "an image not there"}', '{"file_name": "c.png", "text": "plain"}']
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    scan = scan_dataset(_spec({"path": str(folder), "instance_prompt": "sks cube"}))
    by_name = {i.path.name: i for i in scan.items}
    assert by_name["a.png"].captions == ["a red sks cube", "another caption"]
    assert by_name["a.png"].caption_path == folder / "metadata.jsonl" and by_name["c.png"].caption == "plain"
    assert by_name["d.png"].caption_path is None and by_name["d.png"].caption == "sks cube"  # no row: no caption
    assert by_name["e.png"].caption == "own"  # no row, but a caption file: that is read
    assert sorted(by_name) == ["a.png", "c.png", "d.png", "e.png"]  # b's row has no caption: skipped, as a bad file
    assert (scan.captions_found, scan.captions_missing) == (3, 1)
    skipped = dict(scan.skipped)
    assert skipped[str(folder / "b.png")] == "its caption is unusable: metadata.jsonl line 3: no 'text' column"
    assert skipped[f"{folder / 'metadata.jsonl'}:2"] == "row skipped: not valid JSON"
    assert skipped[f"{folder / 'metadata.jsonl'}:4"] == "row skipped: not a JSON object"
    assert skipped[f"{folder / 'metadata.jsonl'}:6"] == "row skipped: no file_name"
    assert scan.warnings == [f"{folder / 'metadata.jsonl'}: 1 rows name images not found (first: gone.png)"]


def test_imagefolder_csv_with_a_named_column_and_subfolders(tmp_path):
    folder = _images(tmp_path / "hf", ["top.png"])
    _images(folder / "3_style", ["s.png"])
    (folder / "metadata.csv").write_text('file_name,text,blip\ntop.png,unused,"a top, image"\n'
                                         '3_style/s.png,unused,a styled image\nbroken.png,x\n', encoding="utf-8")
    scan = scan_dataset(_spec({"path": str(folder), "caption_column": "blip"}))
    assert sorted((i.path.name, i.caption, i.repeats) for i in scan.items) == [
        ("s.png", "a styled image", 3), ("top.png", "a top, image", 1)]
    assert dict(scan.skipped) == {f"{folder / 'metadata.csv'}:4": "row skipped: its field count differs from the "
                                                                  "header's"}


def test_check_counts_imagefolder_captions(demo_job, capsys):
    job = load_job(demo_job)
    folder = Path(job.dataset.folders[0].path)
    uncaptioned = next(p for p in sorted(folder.iterdir()) if p.suffix != ".txt" and not p.with_suffix(".txt").exists())
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": uncaptioned.name, "text": "a shape"}) + "\n")
    assert main(["check", str(demo_job)]) == 0
    assert "images: 12 (12 with captions, 0 missing" in capsys.readouterr().out
