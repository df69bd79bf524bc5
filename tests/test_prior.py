"""DreamBooth class images: counts, where they live, and generating the missing ones with the tiny SD1.5 model
(exact count, reuse, resuming an interrupted run to the same pixels, seeds)."""

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.methods import prior
from trainer.data.files import scan_dataset
from trainer.events import Reporter, read_events
from trainer.job import JobError, from_sparse

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a photo of a dog"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from trainer.demo import build_tiny_sd15

    return build_tiny_sd15(tmp_path_factory.mktemp("prior-model") / "model")


@pytest.fixture(scope="module")
def pipe(tiny_model):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)


def _job(tmp_path: Path, model: Path, **prior_fields):
    instances = tmp_path / "instances"
    instances.mkdir(exist_ok=True)
    fields = {"enabled": True, "class_prompt": PROMPT, "sample_steps": 2, "batch_size": 2, **prior_fields}
    return from_sparse({"model": {"path": str(model)},
                        "dataset": {"folders": [{"path": str(instances)}], "resolution": 64,
                                    "cache_dir": str(tmp_path / "cache")},
                        "prior": fields})


def _reporter(tmp_path: Path) -> Reporter:
    return Reporter(tmp_path / "events.jsonl", stream=io.StringIO())


def _messages(tmp_path: Path) -> list[str]:
    return [e["message"] for e in read_events(tmp_path / "events.jsonl")[0] if e["type"] == "log"]


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


class _Interrupting:
    """The pipeline, but it raises once `calls` batches have been generated (a crash or a kill mid-run)."""

    def __init__(self, pipe, calls: int):
        self.pipe, self.calls = pipe, calls

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, *args, **kwargs):
        if self.calls == 0:
            raise RuntimeError("interrupted")
        self.calls -= 1
        return self.pipe(*args, **kwargs)


def test_generates_exactly_the_missing_images_then_reuses_them(tmp_path, tiny_model, pipe):
    folder = tmp_path / "class"
    folder.mkdir()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(folder / "a user image.png")  # no caption: the class prompt
    Image.new("RGB", (80, 64), (10, 200, 10)).save(folder / "b.jpg")
    (folder / "b.txt").write_text("a photo of a green dog\n", encoding="utf-8")
    job = _job(tmp_path, tiny_model, class_dir=str(folder), num_class_images=5)
    assert prior.missing_count(job, 1) == 3

    got = prior.generate_missing(job, pipe, 1, _reporter(tmp_path), "cpu")
    generated = [folder / f"class-{i:05d}.png" for i in range(3)]
    assert got == [folder / "a user image.png", folder / "b.jpg", *generated]
    for path in generated:
        assert Image.open(path).size == (64, 64)
        assert path.with_suffix(".txt").read_text(encoding="utf-8").strip() == PROMPT
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["a user image.png", "b.jpg", "b.txt"] + [f"class-{i:05d}.{e}" for i in range(3) for e in ("png", "txt")])
    assert "generating class images: 3/3" in " ".join(_messages(tmp_path))
    assert prior.missing_count(job, 1) == 0

    # A second run (here of a job wanting fewer) generates nothing and trains on the first ones.
    never = _Interrupting(pipe, 0)
    assert prior.generate_missing(job, never, 1, _reporter(tmp_path), "cpu") == got
    fewer = _job(tmp_path, tiny_model, class_dir=str(folder), num_class_images=4)
    assert prior.generate_missing(fewer, never, 1, _reporter(tmp_path), "cpu") == got[:4]

    # The data pipeline reads the folder: user captions kept, the missing one is the class prompt.
    scan = scan_dataset(prior.class_dataset_spec(job))
    captions = {item.path.name: item.caption for item in scan.items}
    assert captions == {"a user image.png": PROMPT, "b.jpg": "a photo of a green dog",
                        **{p.name: PROMPT for p in generated}}
    assert all(item.repeats == 1 for item in scan.items)


def test_an_interrupted_run_resumes_to_the_same_images(tmp_path, tiny_model, pipe):
    whole = _job(tmp_path, tiny_model, class_dir=str(tmp_path / "whole"), num_class_images=5)
    expected = prior.generate_missing(whole, pipe, 1, _reporter(tmp_path), "cpu")

    job = _job(tmp_path, tiny_model, class_dir=str(tmp_path / "cut"), num_class_images=5)
    with pytest.raises(RuntimeError, match="interrupted"):
        prior.generate_missing(job, _Interrupting(pipe, 1), 1, _reporter(tmp_path), "cpu")
    cut = tmp_path / "cut"
    assert prior.existing_class_images(cut) == [cut / "class-00000.png", cut / "class-00001.png"]
    assert sorted(p.name for p in cut.iterdir() if not p.name.startswith(".")) == [
        "class-00000.png", "class-00000.txt", "class-00001.png", "class-00001.txt"]
    assert prior.missing_count(job, 1) == 3

    resumed = prior.generate_missing(job, pipe, 1, _reporter(tmp_path), "cpu")
    assert [p.name for p in resumed] == [p.name for p in expected]
    for a, b in zip(resumed, expected):
        np.testing.assert_array_equal(_pixels(a), _pixels(b))
    assert not np.array_equal(_pixels(resumed[0]), _pixels(resumed[1]))  # each index has its own seed


def test_image_i_comes_from_seed_plus_i(tmp_path, tiny_model, pipe):
    base = _job(tmp_path, tiny_model, class_dir=str(tmp_path / "s0"), num_class_images=3, batch_size=1, seed=7)
    shifted = _job(tmp_path, tiny_model, class_dir=str(tmp_path / "s1"), num_class_images=2, batch_size=1, seed=8)
    first = prior.generate_missing(base, pipe, 1, _reporter(tmp_path), "cpu")
    second = prior.generate_missing(shifted, pipe, 1, _reporter(tmp_path), "cpu")
    np.testing.assert_array_equal(_pixels(second[0]), _pixels(first[1]))
    np.testing.assert_array_equal(_pixels(second[1]), _pixels(first[2]))
    assert not np.array_equal(_pixels(second[0]), _pixels(first[0]))


@pytest.mark.parametrize("fields, instances, expected", [
    ({}, 3, 600),  # 200 per instance image
    ({}, 10, 1000),  # capped by max_class_images
    ({"images_per_instance": 2, "max_class_images": 5}, 2, 4),
    ({"images_per_instance": 2, "max_class_images": 5}, 3, 5),
    ({"num_class_images": 7}, 100, 7),  # an explicit count wins
    ({}, 0, 0),
])
def test_class_image_count(tmp_path, fields, instances, expected):
    assert prior.class_image_count(_job(tmp_path, tmp_path / "model", **fields), instances) == expected


def test_default_class_dir_is_named_for_model_prompt_and_resolution(tmp_path, tiny_model):
    job = _job(tmp_path, tiny_model)
    folder = prior.class_dir(job)
    assert folder.parent == tmp_path / "cache" / "class-images"
    assert folder.name.startswith("a-photo-of-a-dog-")

    other_run = _job(tmp_path, tiny_model, num_class_images=9, seed=3, sample_steps=5)
    other_run.schedule.seed = 1
    other_run.optimizer.learning_rate = 3e-4
    assert prior.class_dir(other_run) == folder

    other_prompt = _job(tmp_path, tiny_model, class_prompt="a photo of a cat")
    assert prior.class_dir(other_prompt) != folder
    bigger = _job(tmp_path, tiny_model)
    bigger.dataset.resolution = 128
    assert prior.class_dir(bigger) != folder
    # The model's weights are part of its identity (a retrained model makes new class images).
    weights = tiny_model / "unet" / "diffusion_pytorch_model.safetensors"
    stat = weights.stat()
    try:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        assert prior.class_dir(job) != folder
    finally:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    explicit = _job(tmp_path, tiny_model, class_dir="~/dogs")
    assert prior.class_dir(explicit) == Path("~/dogs").expanduser().resolve()


def test_class_dir_inside_a_dataset_folder_is_refused(tmp_path):
    job = _job(tmp_path, tmp_path / "model", class_dir=str(tmp_path / "instances" / "class"))
    with pytest.raises(JobError, match=r"^prior\.class_dir: .*dataset\.folders\.0"):
        prior.class_dir(job)


def test_existing_class_images_counts_only_complete_images(tmp_path):
    folder = tmp_path / "class"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "class-00000.png")
    Image.new("RGB", (8, 8)).save(folder / "user.webp")
    Image.new("RGB", (8, 8)).save(folder / ".class-00001.png.123.tmp", format="PNG")  # a write cut short
    Image.new("RGB", (8, 8)).save(folder / "sub" / "x.png")
    data = (folder / "class-00000.png").read_bytes()
    (folder / "class-00002.png").write_bytes(data[: len(data) // 2])  # truncated
    (folder / "class-00003.txt").write_text(PROMPT, encoding="utf-8")  # a caption whose image never came
    assert prior.existing_class_images(folder) == [folder / "class-00000.png", folder / "user.webp"]
    assert prior.existing_class_images(tmp_path / "absent") == []


def test_check_reports_prior_without_torch(demo_job):
    from trainer.job import load_job, save_job

    job = load_job(demo_job)
    job.prior.enabled, job.prior.class_prompt, job.prior.images_per_instance = True, PROMPT, 2
    save_job(job, demo_job)
    code = ("import sys; from trainer.cli import main; rc = main(['check', sys.argv[1], '--no-estimate']); "
            "assert 'torch' not in sys.modules, 'check imported torch'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(demo_job)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    folder = prior.class_dir(job)
    assert f"prior preservation: 24 class images in {folder} (24 to generate)" in proc.stdout  # 12 images x 2
