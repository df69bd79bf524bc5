"""The demo builder: a tiny SD1.5 folder that diffusers loads offline, a shape dataset, and a valid job."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from trainer.demo import build_demo, build_demo_dataset, build_tiny_sd15
from trainer.job import PRESETS_DIR, JobError, load_job, load_preset, read_json, to_sparse

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
IMAGE_EXTS = {".png", ".jpg"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_sd15(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def test_pipeline_loads_offline_and_generates(model_dir, monkeypatch):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    assert pipe.safety_checker is None
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3)
    assert np.isfinite(image).all() and image.std() > 0.01  # a random model still draws something, not a flat fill

    scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    assert scheduler.config.prediction_type == "epsilon"
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.config.num_train_timesteps == 1000

    ids = pipe.tokenizer("a photo of sks dog, red", padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    assert ids.shape == (1, 77)
    assert int(ids.max()) < pipe.text_encoder.config.vocab_size
    assert ids[0, 0] == pipe.tokenizer.bos_token_id
    assert pipe.tokenizer.decode(ids[0], skip_special_tokens=True).replace(" ,", ",") == "a photo of sks dog, red"


def test_same_seed_same_weights(model_dir, tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_sd15(tmp_path / "same", seed=0)
    assert torch.equal(torch.rand(3), expected), "building must not disturb the caller's RNG"
    build_tiny_sd15(tmp_path / "other", seed=1)

    ref, same, other = (load_file(d / UNET_WEIGHTS) for d in (model_dir, tmp_path / "same", tmp_path / "other"))
    assert ref.keys() == same.keys()
    assert all(torch.equal(ref[k], same[k]) for k in ref)
    assert not torch.equal(ref["conv_in.weight"], other["conv_in.weight"])
    total = sum(f.stat().st_size for f in model_dir.rglob("*") if f.is_file())
    assert total < 10_000_000


def test_dataset_images_and_captions(tmp_path):
    folder = build_demo_dataset(tmp_path / "data", count=7, seed=3)
    images = sorted(p for p in folder.iterdir() if p.suffix in IMAGE_EXTS)
    assert len(images) == 7
    assert {p.suffix for p in images} == IMAGE_EXTS
    assert all(p.is_file() for p in folder.iterdir())  # flat: no subfolders
    uncaptioned = [p for p in images if not p.with_suffix(".txt").exists()]
    assert len(uncaptioned) == 1
    sizes = set()
    for p in images:
        with Image.open(p) as im:
            im.load()
            assert im.mode == "RGB" and min(im.size) > 64
            sizes.add(im.size)
    assert any(w != h for w, h in sizes)
    for p in set(images) - set(uncaptioned):
        words = p.with_suffix(".txt").read_text(encoding="utf-8").split()  # "a red circle on a blue background"
        assert f"{words[1]}_{words[2]}" in p.stem and words[-1] == "background"

    again = build_demo_dataset(tmp_path / "again", count=7, seed=3)
    png = next(p for p in images if p.suffix == ".png")
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(again / png.name)))


def test_preset_is_sparse_and_valid():
    preset = read_json(PRESETS_DIR / "demo.json")
    job = load_preset("demo")
    assert to_sparse(job) == preset  # nothing in the preset restates a default
    assert job.dataset.resolution == 64 and job.network.rank == 4 and job.output.name == "demo_lora"


def test_build_demo_writes_a_valid_job(tmp_path):
    (tmp_path / "demo").mkdir()  # an existing empty folder is fine
    job_path = build_demo(tmp_path / "demo", steps=7)
    root = (tmp_path / "demo").resolve()
    assert job_path == root / "job.json"
    job = load_job(job_path)
    assert job.model.path == str(root / "model")
    assert [(f.path, f.instance_prompt) for f in job.dataset.folders] == [(str(root / "dataset"), "a shape")]
    assert job.output.output_dir == str(root / "run")
    assert job.schedule.max_steps == 7
    assert job.optimizer.learning_rate == 2e-3 and job.dataset.resolution == 64
    assert (root / "model" / "model_index.json").is_file()
    assert json.loads(job_path.read_text())["version"] == 1


def test_build_demo_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(JobError, match="not empty; choose a new folder"):
        build_demo(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "mine"
