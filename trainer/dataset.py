"""Samples to training batches: decode, resize to the bucket, crop, flip and jitter, or read the cached latents.

Every random choice of a sample comes from (seed, epoch, sample index), never from a global generator, so a
resumed run and DataLoader workers see exactly what an uninterrupted single-process run would.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance

from . import images
from .buckets import Layout, fit
from .cache import load_entry
from .captions import epoch_caption, sample_rng
from .crops import crop_offset, focus_point
from .data_files import ImageItem
from .job import DatasetSpec


class TrainDataset(torch.utils.data.Dataset):
    """Indexed by (sample index, epoch); samples are the layout's, repeats already expanded."""

    def __init__(self, layout: Layout, spec: DatasetSpec, seed: int):
        self.layout, self.spec, self.seed = layout, spec, seed
        self.latent_files: list[dict[bool, Path]] | None = None  # set when latents are cached: per sample, by flip
        self.text_files: dict[str, Path] | None = None  # set when captions are cached
        self.replacement: dict[int, ImageItem] = {}  # id(broken item) -> the image trained in its place
        # Face/saliency point per image path. Filled before training (cache.prepare), so DataLoader workers
        # never run mediapipe: a detector inherited through fork deadlocks.
        self.focus: dict[str, tuple[float, float] | None] = {}
        self._broken: dict[int, str] = {}  # id(item) -> why, found while decoding in this process

    def __len__(self) -> int:
        return len(self.layout.samples)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, epoch = key
        bucket = self.layout.buckets[self.layout.bucket_of[index]]
        skipped: list[tuple[str, str]] = []
        for candidate in self._candidates(index):
            item = self.layout.samples[candidate]
            if id(item) in self._broken:
                continue
            try:
                sample = self._sample(candidate, epoch, bucket)
            except images.BadImage as exc:
                self._broken[id(item)] = str(exc)
                skipped.append((str(item.path), str(exc)))
                continue
            sample["skipped"] = skipped
            return sample
        raise images.BadImage(f"no image of the dataset could be decoded (last: {skipped[-1:]})")

    def _sample(self, index: int, epoch: int, bucket: tuple[int, int]) -> dict:
        item = self.layout.samples[index]
        item = self.replacement.get(id(item), item)
        u = sample_rng(self.seed, epoch, index).random(6)  # flip, crop x, crop y, brightness, contrast, saturation
        flip = bool(self.spec.random_flip and u[0] < 0.5)
        caption = epoch_caption(item.captions, self.spec, self.seed, epoch, index)
        if self.latent_files is not None:
            out = load_entry(self.latent_files[index][flip])  # latent_mean, latent_std and the SDXL sizes
        else:
            pixels, original, top_left = render(item, bucket, self.spec, flip, u, self.focus)
            out = {"pixels": pixels, "original_size": torch.tensor(original),
                   "crop_top_left": torch.tensor(top_left), "target_size": torch.tensor((bucket[1], bucket[0]))}
        if self.text_files is not None:
            out["cond"] = load_entry(self.text_files[caption])
        else:
            out["caption"] = caption
        out["weight"] = item.weight
        return out

    def _candidates(self, index: int):
        """The sample, then (if its image is broken) the others of its bucket, then any other image."""
        yield index
        same = self.layout.bucket_of[index]
        order = sorted(range(len(self.layout.samples)), key=lambda i: (self.layout.bucket_of[i] != same,
                                                                         (i - index) % len(self.layout.samples)))
        yield from (i for i in order if i != index)


def render(item: ImageItem, bucket: tuple[int, int], spec: DatasetSpec, flip: bool, u, focus_memo: dict):
    """(pixels (3, H, W) in [-1, 1], original (h, w), crop top-left (top, left)) of one image in its bucket."""
    image, original = images.load(item, cover=bucket)  # a big JPEG may come decoded smaller than `original`
    resized = fit(original, bucket)
    focus = None
    if spec.crop == "face":
        key = str(item.path)
        if key not in focus_memo:
            focus_memo[key] = focus_point(image)[0]
        focus = focus_memo[key]
    left, top = crop_offset(resized, bucket, spec.crop, focus, (u[1], u[2]))
    image = image.resize(resized, Image.Resampling.BICUBIC).crop((left, top, left + bucket[0], top + bucket[1]))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = resized[0] - left - bucket[0]  # the crop as seen in the mirrored image
    if spec.color_jitter:
        image = jitter(image, spec.color_jitter, u[3:6])
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3) in [-1, 1]
    return torch.from_numpy(array).permute(2, 0, 1), (original[1], original[0]), (top, left)


def jitter(image: Image.Image, strength: float, u) -> Image.Image:
    """Brightness, contrast and saturation each scaled by 1 +- strength (u: three uniforms in [0, 1))."""
    for enhancer, value in zip((ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color), u):
        image = enhancer(image).enhance(1.0 + (2.0 * float(value) - 1.0) * strength)
    return image


def collate(batch: list[dict]) -> dict:
    """Stack one bucket's samples; SDXL's micro-conditioning sizes ride along as (B, 2) tensors."""
    out = {"weight": torch.tensor([b["weight"] for b in batch], dtype=torch.float32),
           "skipped": [s for b in batch for s in b["skipped"]]}
    for name in ("pixels", "latent_mean", "latent_std", "original_size", "crop_top_left", "target_size"):
        if name in batch[0]:
            out[name] = torch.stack([b[name] for b in batch])
    if "cond" in batch[0]:
        out["cond"] = {k: torch.stack([b["cond"][k] for b in batch]) for k in batch[0]["cond"]}
    else:
        out["captions"] = [b["caption"] for b in batch]
    return out
