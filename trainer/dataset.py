"""Images to training batches: decoding, resize and crop, flips, and a data order fixed by (seed, epoch).

The order of every epoch is a pure function of the seed, so a resumed run sees exactly the batches an
uninterrupted run would, and each process of a multi-GPU run takes its own share.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps

from .data_files import ImageItem


class TrainDataset(torch.utils.data.Dataset):
    """Indexed by (sample index, flip); each sample is one image, repeats already expanded."""

    def __init__(self, items: list[ImageItem], resolution: int):
        self.samples = [item for item in items for _ in range(item.repeats)]
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, bool]) -> dict:
        index, flip = key
        item = self.samples[index]
        image = load_image(item.path, self.resolution)
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3) in [-1, 1]
        return {"pixels": torch.from_numpy(array).permute(2, 0, 1), "caption": item.caption}


def load_image(path, resolution: int) -> Image.Image:
    """RGB, EXIF orientation applied, shorter side resized to the resolution, centre-cropped square."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img).convert("RGB")
    scale = resolution / min(img.size)
    size = (max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale)))
    img = img.resize(size, Image.Resampling.BICUBIC)
    left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def epoch_batches(num_samples: int, batch_size: int, seed: int, epoch: int, random_flip: bool,
                  rank: int = 0, world: int = 1) -> list[list[tuple[int, bool]]]:
    """This process's batches for one epoch: a seeded shuffle, whole batches only (drop last)."""
    gen = torch.Generator().manual_seed(seed * 7919 + epoch)
    order = torch.randperm(num_samples, generator=gen).tolist()
    flips = (torch.rand(num_samples, generator=gen) < 0.5).tolist() if random_flip else [False] * num_samples
    per_batch = batch_size * world
    usable = num_samples // per_batch * per_batch
    keys = [(order[i], bool(flips[i])) for i in range(usable)]
    return [keys[b + rank * batch_size: b + (rank + 1) * batch_size] for b in range(0, usable, per_batch)]


def collate(batch: list[dict]) -> dict:
    return {"pixels": torch.stack([b["pixels"] for b in batch]), "captions": [b["caption"] for b in batch]}
