"""Caption rules: one line picked per epoch, caption dropout, tag shuffle with kept leading tags, the instance
token, captions that are not UTF-8, and the found/missing counts of `trainer check`."""

from trainer.data.captions import epoch_caption, possible_captions
from trainer.cli import main
from trainer.data.files import scan_dataset
from trainer.job import DatasetSpec

from messy_data import noise_image


def _spec(**settings) -> DatasetSpec:
    return DatasetSpec.model_validate({"folders": [{"path": "unused"}], **settings})


def test_one_line_is_picked_per_epoch_and_replayed_exactly():
    lines = ["a", "b", "c"]
    spec = _spec()
    picks = [epoch_caption(lines, spec, seed=1, epoch=e, index=0) for e in range(30)]
    assert set(picks) == {"a", "b", "c"}
    assert picks == [epoch_caption(lines, spec, seed=1, epoch=e, index=0) for e in range(30)]  # resume agrees
    assert picks != [epoch_caption(lines, spec, seed=2, epoch=e, index=0) for e in range(30)]


def test_caption_dropout_rate_and_the_cached_empty_caption():
    spec = _spec(caption_dropout=0.25)
    captions = [epoch_caption(["a dog"], spec, 0, epoch, index) for epoch in range(20) for index in range(50)]
    assert 0.2 < captions.count("") / len(captions) < 0.3
    assert set(captions) == {"", "a dog"}
    assert possible_captions(["a dog", "a cat"], spec) == ["a dog", "a cat", ""]
    assert "" not in possible_captions(["a dog"], _spec())


def test_tag_shuffle_keeps_the_first_tags_in_place():
    spec = _spec(shuffle_tags=True, keep_tokens=2)
    caption = "sks, woman, red hair, smiling, outdoors, sunset"
    results = {epoch_caption([caption], spec, 0, epoch, 3) for epoch in range(40)}
    assert len(results) > 10
    for r in results:
        tags = r.split(", ")
        assert tags[:2] == ["sks", "woman"] and sorted(tags) == sorted(caption.split(", "))
    pipe = _spec(shuffle_tags=True, tag_separator="|")
    assert sorted(epoch_caption(["a|b|c"], pipe, 0, 5, 0).split("| ")) == ["a", "b", "c"]


def test_instance_token_and_non_utf8_captions(tmp_path):
    for i, name in enumerate(["a.png", "b.png", "c.png", "d.png"]):
        noise_image(seed=i).save(tmp_path / name)
    (tmp_path / "a.txt").write_text("photo of [instance] at the beach", encoding="utf-8")
    (tmp_path / "b.txt").write_bytes("caf\xe9 au lait, [instance]".encode("cp1252"))  # Windows-1252
    (tmp_path / "c.txt").write_bytes(b"\x00\x01\x02\xff binary junk")
    spec = DatasetSpec.model_validate({"folders": [{"path": str(tmp_path), "instance_prompt": "ohwx cat"}]})
    scan = scan_dataset(spec)
    by_name = {i.path.name: i for i in scan.items}
    assert by_name["a.png"].caption == "photo of ohwx cat at the beach"
    assert by_name["b.png"].caption == "café au lait, ohwx cat"
    assert any("b.txt" in w and "Windows-1252" in w for w in scan.warnings)
    assert "c.png" not in by_name and scan.skipped[0][0].endswith("c.png") and "c.txt" in scan.skipped[0][1]
    assert by_name["d.png"].caption == "ohwx cat" and by_name["d.png"].caption_path is None


def test_check_counts_captions_found_and_missing(demo_job, capsys):
    dataset = demo_job.parent / "dataset"
    for txt in sorted(dataset.glob("*.txt"))[:3]:
        txt.rename(txt.with_suffix(".caption"))  # captions with another extension are silently missed elsewhere
    assert main(["check", str(demo_job)]) == 0
    out = capsys.readouterr().out
    assert "images: 12 (8 with captions, 4 missing: those use the instance prompt)" in out
    assert f"{dataset}: 12 images x 1 repeats, 8 captions found, 4 missing" in out
