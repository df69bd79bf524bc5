"""Samples to training batches: rendered live (trainer/data/render.py) or read from the caches cache.prepare indexed.

Every random choice of a sample comes from (seed, epoch, sample index), never from a global generator, so a
resumed run and DataLoader workers see exactly what an uninterrupted single-process run would.
"""

from __future__ import annotations

import torch

from ..job import DatasetSpec
from . import images
from .buckets import Layout
from .cache import CacheIndex, load_entry
from .captions import epoch_caption, sample_rng
from .render import render


class TrainDataset(torch.utils.data.Dataset):
    """Indexed by (sample index, epoch); samples are the layout's, repeats already expanded."""

    def __init__(self, layout: Layout, spec: DatasetSpec, seed: int, index: CacheIndex | None = None):
        self.layout, self.spec, self.seed = layout, spec, seed
        self.index = index or CacheIndex()  # cache.prepare's: cached entries, replacements, crop points
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
        item = self.index.replacement.get(id(item), item)
        u = sample_rng(self.seed, epoch, index).random(6)  # flip, crop x, crop y, brightness, contrast, saturation
        flip = bool(self.spec.random_flip and u[0] < 0.5)
        caption = epoch_caption(item.captions, self.spec, self.seed, epoch, index)
        if self.index.latent_files is not None:
            out = load_entry(self.index.latent_files[index][flip])  # latent_mean, latent_std and the SDXL sizes
        else:
            pixels, original, top_left, mask = render(item, bucket, self.spec, flip, u, self.index.focus)
            out = {"pixels": pixels, "original_size": torch.tensor(original),
                   "crop_top_left": torch.tensor(top_left), "target_size": torch.tensor((bucket[1], bucket[0]))}
            if mask is not None:
                out["mask"] = mask  # (1, H, W); pooled to the latent grid at the loss
        if self.index.text_files is not None:
            out["cond"] = load_entry(self.index.text_files[caption])
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


def collate(batch: list[dict]) -> dict:
    """Stack one bucket's samples; SDXL's micro-conditioning sizes ride along as (B, 2) tensors."""
    out = {"weight": torch.tensor([b["weight"] for b in batch], dtype=torch.float32),
           "skipped": [s for b in batch for s in b["skipped"]]}
    for name in ("pixels", "latent_mean", "latent_std", "original_size", "crop_top_left", "target_size"):
        if name in batch[0]:
            out[name] = torch.stack([b[name] for b in batch])
    masks = [b.get("mask") for b in batch]
    if any(m is not None for m in masks):  # an image without a mask trains everywhere: all ones
        shape = next(m for m in masks if m is not None).shape
        out["mask"] = torch.stack([m if m is not None else torch.ones(shape) for m in masks])  # (B, 1, h, w)
    if "cond" in batch[0]:
        out["cond"] = {k: torch.stack([b["cond"][k] for b in batch]) for k in batch[0]["cond"]}
    else:
        out["captions"] = [b["caption"] for b in batch]
    return out
