"""Masked loss: a mask goes through its image's bucket, resize, crop and flip; it is cached with the latents (a
changed mask misses its entry); the loss is weighted per latent pixel; `check` counts masks; a masked demo trains
and resumes exactly."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from trainer.cli import main
from trainer.data import cache, masks
from trainer.data.buckets import layout
from trainer.data.files import scan_dataset
from trainer.data.images import probe
from trainer.data.render import render
from trainer.events import read_events
from trainer.job import DatasetSpec, load_job, save_job
from trainer.train import _loss

QUIET = ["--set", "validation.prompts=[]"]


def _spec(folder, **settings) -> DatasetSpec:
    return DatasetSpec.model_validate({"folders": [{"path": str(folder), "mask": settings.pop("mask", "folder")}],
                                       **{"resolution": 64, **settings}})


def _box(array: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(array)
    return xs.min(), ys.min(), xs.max(), ys.max()


def _shape_dataset(folder, mask_scale: float = 1.0, alpha: bool = False):
    """A wide 240x120 image with a red rectangle off-centre, and the same rectangle white in its mask (drawn at
    `mask_scale` of the image's size), or in its alpha channel."""
    folder.mkdir()
    rect = (130, 20, 200, 100)
    image = Image.new("RGBA" if alpha else "RGB", (240, 120), (0, 0, 255, 0 if alpha else 255))
    ImageDraw.Draw(image).rectangle(rect, fill=(255, 0, 0, 255))
    image.save(folder / "shape.png")
    if not alpha:
        size = (round(240 * mask_scale), round(120 * mask_scale))
        mask = Image.new("L", size, 0)
        ImageDraw.Draw(mask).rectangle(tuple(round(v * mask_scale) for v in rect), fill=255)
        (folder / "masks").mkdir()
        mask.save(folder / "masks" / "shape.png")


@pytest.mark.parametrize("crop,flip,mask_scale,alpha", [("center", False, 1.0, False), ("random", True, 0.5, False),
                                                         ("center", True, 1.0, True)])
def test_a_mask_is_cropped_exactly_as_its_image(tmp_path, crop, flip, mask_scale, alpha):
    _shape_dataset(tmp_path / "data", mask_scale, alpha)
    spec = _spec(tmp_path / "data", crop=crop, mask="alpha" if alpha else "folder", resolution=128, bucket_step=32)
    scan = scan_dataset(spec)
    epoch, _ = layout(scan.items, [probe(i) for i in scan.items], spec)
    bucket = epoch.buckets[epoch.bucket_of[0]]
    assert bucket[0] > bucket[1], "the wide image must land in a wide bucket"
    pixels, _, _, mask = render(scan.items[0], bucket, spec, flip, (0.5, 0.9, 0.3, 0.5, 0.5, 0.5), {})
    red = ((pixels[0] > 0.5) & (pixels[2] < -0.5)).numpy()  # (H, W)
    assert mask.shape == (1, bucket[1], bucket[0])
    assert red.any() and not red.all()
    got, want = _box(mask[0].numpy() > 0.5), _box(red)
    assert all(abs(int(a) - int(b)) <= 1 for a, b in zip(got, want)), (got, want)


def test_the_rule_of_which_mask_belongs_to_which_image(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "masks").mkdir()
    for name in ("a.jpg", "b.png", "c.webp"):
        Image.new("RGB", (64, 64)).save(data / name)
    Image.new("L", (64, 64)).save(data / "masks" / "a.png")  # a jpg's mask is a png of the same stem
    Image.new("L", (64, 64)).save(data / "masks" / "c.jpg")
    items = {i.path.name: i for i in scan_dataset(_spec(data)).items}
    assert len(items) == 3, "the masks folder holds no training images"
    assert masks.mask_source(items["a.jpg"]) == data / "masks" / "a.png"
    assert masks.mask_source(items["b.png"]) is None
    assert masks.mask_source(items["c.webp"]) == data / "masks" / "c.jpg"
    assert masks.count(list(items.values())) == (2, 1)
    assert masks.count(scan_dataset(_spec(data, mask="none")).items) == (0, 0)


def test_masked_loss_by_hand():
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 4, 8, 8, generator=gen, requires_grad=True)
    target = torch.randn(2, 4, 8, 8, generator=gen)
    mask = torch.zeros(2, 1, 64, 64)  # in pixels: pooled 8x down to the latent grid
    mask[0, :, 0:32, 0:16] = 1.0  # latent rows 0-3, columns 0-1 of sample 0
    mask[1, :, 32:64, :] = 1.0  # the bottom half of sample 1
    weight = torch.tensor([1.0, 2.0])
    loss = _loss(pred, target, weight, mask, 0.0)
    se = (pred.detach() - target) ** 2
    by_hand = (se[0, :, 0:4, 0:2].mean() * 1.0 + se[1, :, 4:8, :].mean() * 2.0) / 2
    torch.testing.assert_close(loss.detach(), by_hand)

    loss.backward()
    grad = pred.grad
    inside = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    inside[0, :, 0:4, 0:2] = True
    inside[1, :, 4:8, :] = True
    inside = inside.expand_as(grad)
    assert (grad[~inside] == 0).all(), "outside the mask the prediction must get no gradient"
    assert (grad[inside] != 0).all()

    changed = pred.detach().clone()
    changed[~inside] += 5.0  # only outside: the loss does not move
    torch.testing.assert_close(_loss(changed, target, weight, mask, 0.0), loss.detach())
    changed[0, 0, 0, 0] += 1.0  # inside: it does
    assert _loss(changed, target, weight, mask, 0.0) != loss.detach()

    outside = 0.1
    pixel_weight = torch.where(inside[:, :1], 1.0, outside)
    per_sample = (se * pixel_weight).sum(dim=(1, 2, 3)) / (pixel_weight.sum(dim=(1, 2, 3)) * 4)
    torch.testing.assert_close(_loss(pred.detach(), target, weight, mask, outside), (per_sample * weight).mean())
    ones = torch.ones(2, 1, 64, 64)
    torch.testing.assert_close(_loss(pred.detach(), target, weight, ones, 0.0), _loss(pred.detach(), target, weight))


def _masked_demo(demo_job, count: int = 5):
    """The demo's first `count` images get a mask of their left half; the job reads masks from the folder."""
    dataset = demo_job.parent / "dataset"
    (dataset / "masks").mkdir()
    for image in sorted(p for p in dataset.iterdir() if p.suffix in (".png", ".jpg"))[:count]:
        width, height = Image.open(image).size
        mask = Image.new("L", (width, height), 0)
        ImageDraw.Draw(mask).rectangle((0, 0, width // 2, height), fill=255)
        mask.save(dataset / "masks" / f"{image.stem}.png")
    job = load_job(demo_job)
    job.dataset.folders[0].mask = "folder"
    save_job(job, demo_job)
    return dataset


def test_check_counts_images_with_and_without_masks(demo_job, capsys):
    _masked_demo(demo_job)
    assert main(["check", str(demo_job), "--set", "dataset.mask_outside_weight=0.1"]) == 0
    assert "masks: 5 images with a mask, 7 without (those train everywhere); weight outside a mask: 0.1" in \
        capsys.readouterr().out


def test_a_changed_mask_misses_only_its_cache_entry(demo_job, tmp_path, monkeypatch):
    dataset = _masked_demo(demo_job)
    root = tmp_path / "cache"
    encoded = []
    original = cache._encode
    monkeypatch.setattr(cache, "_encode", lambda store, contents, items, *a: (encoded.extend(items),
                                                                               original(store, contents, items,
                                                                                        *a))[1])
    job = load_job(demo_job)
    job.dataset.cache_dir = str(root)
    from trainer.families.detect import family_module
    from trainer.plan import make_plan

    plan = make_plan(job)
    family = family_module(plan.family)
    parts = family.load(job.model)
    reporter = type("Quiet", (), {"log": lambda self, *a, **k: None})()

    def prepare():
        encoded.clear()
        return cache.prepare(job, plan.caching, plan.layout, job.dataset, family, parts, reporter)

    index = prepare()
    assert len(encoded) == 12
    masked = {str(p.name) for p in (dataset / "masks").iterdir()}
    for item, files in zip(plan.layout.samples, index.latent_files):
        entry = load_file(files[False])
        assert ("mask" in entry) == (f"{item.path.stem}.png" in masked)
        if "mask" in entry:
            assert entry["mask"].shape == (1, *entry["latent_mean"].shape[-2:])
            left, right = entry["mask"][0, :, 0], entry["mask"][0, :, -1]  # the left half trains
            assert bool((left > 0.9).all()) and bool((right < 0.1).all())
    assert prepare() is not None and encoded == []
    first = sorted((dataset / "masks").iterdir())[0]
    Image.new("L", Image.open(first).size, 255).save(first)
    prepare()
    assert [i.path.stem for i in encoded] == [first.stem]


def _losses(run) -> dict[int, float]:
    events, _ = read_events(run / "events.jsonl")
    return {e["step"]: e["loss"] for e in events if e["type"] == "step"}


def test_a_masked_demo_trains_and_resumes_exactly(demo_job, tmp_path):
    _masked_demo(demo_job)
    every_2 = [*QUIET, "--set", "output.checkpoint_every=2", "--set", "output.keep_last=5", "--set",
               "schedule.max_steps=4", "--set", "dataset.mask_outside_weight=0.05"]
    whole = tmp_path / "whole"
    assert main(["run", str(demo_job), *every_2, "--set", f"output.output_dir={whole}",
                 "--set", "dataset.cache_latents=false"]) == 0
    run = demo_job.parent / "run"
    assert main(["run", str(demo_job), *every_2]) == 0
    assert _losses(run) == pytest.approx(_losses(whole), rel=1e-4), "the cached mask must train as the live one"

    shutil.rmtree(run / "checkpoints" / "step-4")  # a crash right after the step-2 checkpoint
    shutil.rmtree(run / "final")
    (run / "events.jsonl").unlink()
    before = _losses(whole)
    assert main(["run", str(demo_job), *every_2, "--resume"]) == 0
    assert sorted(_losses(run)) == [3, 4]
    for step, loss in _losses(run).items():
        assert loss == pytest.approx(before[step], rel=1e-4)
    assert (run / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_the_mask_follows_any_family_latent_grid():
    """The loss grid is the target's: 8x for the VAE families, Stable Cascade's EfficientNet grid is coarser and
    need not divide the image; each latent pixel gets its share of the mask."""
    mask = torch.zeros(1, 1, 96, 96)
    mask[..., :, :48] = 1.0  # the left half trains
    torch.testing.assert_close(cache.latent_grid(mask, (3, 2)), torch.tensor([[[[1.0, 0.0]] * 3]]))
    grid = cache.latent_grid(mask, (5, 5))
    assert bool((grid[..., :2] == 1).all()) and bool((grid[..., 3:] == 0).all()) and bool((grid[..., 2] == 0.5).all())
    pred, target = torch.zeros(1, 16, 3, 2), torch.ones(1, 16, 3, 2)
    target[..., 1] = 5.0  # a larger error outside the mask, which does not count
    assert _loss(pred, target, torch.ones(1), mask, 0.0).item() == pytest.approx(1.0)
