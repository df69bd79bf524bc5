"""`trainer caption`: a tiny random BLIP built here (its captions are gibberish; the files and the flow are real)
writes only the missing captions, --overwrite rewrites them, prefix and suffix are applied, progress events come
out with --json, and a bad model path is one line and exit 2."""

import json

import pytest
from PIL import Image

from trainer.cli import main
from trainer.events import decode

LETTERS = "abcdefghijklmnopqrstuvwxyz"
FAST = ["--max-tokens", "6"]


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    """BlipForConditionalGeneration from a config of 32-wide, 2-layer towers, with a WordPiece vocabulary of
    the letters written here (no hub)."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_blip import BlipImageProcessor

    folder = tmp_path_factory.mktemp("blip")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *LETTERS, *(f"##{c}" for c in LETTERS)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"))
    config = BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, encoder_hidden_size=32, max_position_embeddings=64, pad_token_id=0,
                         bos_token_id=2, sep_token_id=3, eos_token_id=3),
        projection_dim=32)
    torch.manual_seed(0)
    model_dir = folder / "model"
    BlipForConditionalGeneration(config).save_pretrained(model_dir)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(model_dir)
    return model_dir


def _dataset(root):
    """Five images; two have captions already, one of them in a kohya 3_name subfolder."""
    sub = root / "3_cat"
    sub.mkdir(parents=True)
    for i, folder in enumerate([root, root, root, sub, sub]):
        Image.new("RGB", (40 + 8 * i, 32), (40 * i, 90, 200 - 30 * i)).save(folder / f"img{i}.png")
    (root / "img0.txt").write_text("my own caption\n")
    (sub / "img3.txt").write_text("another own caption\n")
    return root


def test_caption_writes_only_the_missing_ones_then_overwrites(tiny_blip, tmp_path, capsys):
    data = _dataset(tmp_path / "data")
    assert main(["caption", str(data), "--model", str(tiny_blip), *FAST, "--prefix", "sks,", "--suffix", "photo",
                 "--json"]) == 0
    out = capsys.readouterr().out
    events = [decode(line) for line in out.splitlines()]
    assert all(e is not None and e["type"] == "progress" and e["task"] == "caption" for e in events)
    assert events[-1]["done"] == events[-1]["total"] == 3
    assert (data / "img0.txt").read_text() == "my own caption\n"
    assert (data / "3_cat" / "img3.txt").read_text() == "another own caption\n"
    written = [data / "img1.txt", data / "img2.txt", data / "3_cat" / "img4.txt"]
    for path in written:
        text = path.read_text().strip()
        assert text.startswith("sks, ") and text.endswith(" photo") and len(text) > len("sks, photo"), text

    assert main(["caption", str(data), "--model", str(tiny_blip), *FAST]) == 0  # nothing missing: nothing loads
    assert "every image has a caption" in capsys.readouterr().err
    assert main(["caption", str(data), "--model", str(tiny_blip), *FAST, "--overwrite", "--prompt", "a photo of"]) == 0
    err = capsys.readouterr().err
    assert "wrote 5 captions" in err
    assert (data / "img0.txt").read_text() != "my own caption\n"
    assert not (data / "img0.txt").read_text().startswith("sks")
    assert not (data / "img0.txt").read_text().startswith("a photo of"), "the prompt is not the caption"


def test_caption_extension_and_a_dataset_that_then_trains(tiny_blip, tmp_path):
    data = _dataset(tmp_path / "data")
    assert main(["caption", str(data), "--model", str(tiny_blip), *FAST, "--extension", ".caption"]) == 0
    assert sorted(p.name for p in data.glob("*.caption")) == ["img0.caption", "img1.caption", "img2.caption"]
    from trainer.data.files import scan_dataset
    from trainer.job import DatasetSpec

    scan = scan_dataset(DatasetSpec(folders=[{"path": str(data), "caption_extension": ".caption"}]))
    assert scan.captions_missing == 0


def test_a_bad_model_is_one_line_and_exit_2(tmp_path, capsys):
    data = _dataset(tmp_path / "data")
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    assert main(["caption", str(data), "--model", str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --model: {empty}: not a captioning model"), err
    assert main(["caption", str(tmp_path / "nowhere"), "--model", str(empty)]) == 2
    assert "DATASET" in capsys.readouterr().err
    assert main(["caption", str(empty), "--model", str(empty)]) == 2
    assert capsys.readouterr().err.startswith(f"error: DATASET: no images (png, jpg, jpeg, webp) found in {empty}")
    assert not list(data.glob("img1.txt"))


def test_a_folder_that_is_no_captioner_says_so(tmp_path, capsys):
    """A folder whose config.json names no transformers model (a diffusers UNet's, say)."""
    data = _dataset(tmp_path / "data")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    assert main(["caption", str(data), "--model", str(tmp_path / "unet")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --model: "), err
