"""Aspect-ratio buckets: sizes, assignment, no upscaling past the limit, one bucket per batch, seeded epochs,
the SDXL sizes carried with each sample, and DataLoader workers that agree with the main process."""

import math
from collections import Counter

import pytest
import torch

from messy_data import noise_image
from trainer.data.buckets import assign, batches_per_epoch, epoch_batches, fit, layout, make_buckets
from trainer.cli import main
from trainer.data.files import scan_dataset
from trainer.data.dataset import TrainDataset, collate
from trainer.job import DatasetSpec, load_job, save_job
from trainer.plan import make_plan


def _spec(**settings) -> DatasetSpec:
    return DatasetSpec.model_validate({"folders": [{"path": "unused"}], **settings})


@pytest.mark.parametrize("resolution,step", [(512, 64), (1024, 64), (1024, 16), (768, 64)])
def test_buckets_hold_about_resolution_squared(resolution, step):
    buckets = make_buckets(_spec(resolution=resolution, bucket_step=step))
    assert (resolution // step * step,) * 2 in buckets
    for w, h in buckets:
        assert w % step == 0 and h % step == 0
        assert resolution // 2 <= min(w, h) and max(w, h) <= resolution * 2
        assert (resolution - step) ** 2 * 0.8 < w * h <= resolution ** 2
    assert len(buckets) == len(set(buckets)) > 5


def test_min_max_sides_and_buckets_off():
    buckets = make_buckets(_spec(resolution=512, bucket_min_side=384, bucket_max_side=704))
    assert min(min(b) for b in buckets) >= 384 and max(max(b) for b in buckets) <= 704
    assert make_buckets(_spec(resolution=512, aspect_buckets=False)) == [(512, 512)]


def test_nearest_aspect_cover_and_upscale_limit():
    buckets = make_buckets(_spec(resolution=512))
    b, _ = assign((1920, 1080), buckets, 2.0)
    w, h = buckets[b]
    assert w > h and abs(math.log(w / h) - math.log(16 / 9)) < 0.15
    resized = fit((1920, 1080), (w, h))
    assert resized[0] >= w and resized[1] >= h and (resized[0] == w or resized[1] == h)  # covers, then crops
    b, why = assign((200, 200), buckets, 2.0)
    assert b < 0 and "too small" in why and "2.56x" in why
    assert assign((200, 200), buckets, 3.0)[0] >= 0


def test_every_batch_is_one_bucket_and_every_sample_is_seen():
    bucket_of = [0] * 7 + [1] * 5 + [2] * 1 + [3] * 12
    for world in (1, 2):
        per_rank = [epoch_batches(bucket_of, 4, seed=3, epoch=2, rank=r, world=world) for r in range(world)]
        assert all(len(b) == batches_per_epoch(bucket_of, 4, world) for b in per_rank)
        seen = set()
        for batches in per_rank:
            for batch in batches:
                assert len(batch) == 4 and len({bucket_of[i] for i in batch}) == 1
                seen |= set(batch)
        assert seen == set(range(len(bucket_of)))
    assert epoch_batches(bucket_of, 4, 3, 2) == epoch_batches(bucket_of, 4, 3, 2)
    assert epoch_batches(bucket_of, 4, 3, 2) != epoch_batches(bucket_of, 4, 3, 3)


SIZES = [(96, 64)] * 5 + [(64, 96)] * 3 + [(80, 80)] * 4 + [(400, 100)]  # wide, tall, square, very wide


def _folder(folder):
    folder.mkdir()
    for i, size in enumerate(SIZES):
        noise_image(size, seed=i).save(folder / f"{i:02d}.png")
    return folder


def test_dataset_items_carry_sdxl_sizes_and_workers_agree(tmp_path):
    spec = DatasetSpec.model_validate({"folders": [{"path": str(_folder(tmp_path / "imgs"))}], "resolution": 64,
                                       "bucket_step": 16, "crop": "random", "random_flip": True,
                                       "color_jitter": 0.1})
    scan = scan_dataset(spec)
    sizes = SIZES
    epoch, too_small = layout(scan.items, sizes, spec)
    assert not too_small
    hist = Counter(epoch.buckets[b] for b in epoch.bucket_of)
    assert len(hist) == 4 and hist[(64, 64)] == 4
    dataset = TrainDataset(epoch, spec, seed=5)
    batches = [[(i, 1) for i in b] for b in epoch_batches(epoch.bucket_of, 2, 5, 1)]
    direct = [collate([dataset[k] for k in b]) for b in batches]
    for batch, keys in zip(direct, batches):
        (w, h) = epoch.buckets[epoch.bucket_of[keys[0][0]]]
        assert batch["pixels"].shape == (2, 3, h, w)
        assert batch["target_size"].tolist() == [[h, w]] * 2
        for j, (index, _) in enumerate(keys):
            ow, oh = sizes[scan.items.index(epoch.samples[index])]
            assert batch["original_size"][j].tolist() == [oh, ow]
            top, left = batch["crop_top_left"][j].tolist()
            rw, rh = fit((ow, oh), (w, h))
            assert 0 <= top <= rh - h and 0 <= left <= rw - w
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=1)
    for a, b in zip(direct, loader):
        assert torch.equal(a["pixels"], b["pixels"]) and a["captions"] == b["captions"]
        assert torch.equal(a["crop_top_left"], b["crop_top_left"])


def test_check_prints_the_bucket_histogram_and_skips_tiny_images(demo_job, capsys, tmp_path):
    job = load_job(demo_job)
    job.dataset.folders[0].path = str(_folder(tmp_path / "imgs"))
    job.dataset.bucket_step = 16
    save_job(job, demo_job)
    noise_image((20, 20)).save(tmp_path / "imgs" / "tiny.png")
    assert main(["check", str(demo_job)]) == 0
    out = capsys.readouterr().out
    assert "buckets: 4 in use (about 64x64 pixels, sides a multiple of 16)" in out
    assert "  64x64: 4 images, 4 samples, 2 batches" in out
    assert "  80x48: 5 images, 5 samples, 3 batches" in out
    assert f"{tmp_path / 'imgs' / 'tiny.png'}: too small: 20x20 would need 3.20x enlargement" in out
    assert "batches per epoch: 8" in out  # 2 + 3 + 2 + 1, each bucket topped up to whole batches
    assert make_plan(load_job(demo_job)).batches_per_epoch == 8
