"""Aspect-ratio buckets: the bucket sizes, which bucket each image goes to, and each epoch's seeded batches.

No torch here: `trainer check` prints the bucket histogram from the same functions the training run uses.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from ..job import DatasetSpec
from .files import ImageItem

Size = tuple[int, int]  # (width, height)


@dataclass
class Layout:
    """The samples of one epoch (repeats expanded) and the bucket each one is trained at."""
    buckets: list[Size]
    samples: list[ImageItem]
    bucket_of: list[int]  # index into buckets, per sample

    def histogram(self) -> list[tuple[Size, int, int]]:
        """(bucket, images, samples) for every bucket in use, largest first."""
        samples = Counter(self.bucket_of)
        images: Counter = Counter()
        seen: set[int] = set()
        for item, b in zip(self.samples, self.bucket_of):
            if id(item) not in seen:
                seen.add(id(item))
                images[b] += 1
        return [(self.buckets[b], images[b], n) for b, n in samples.most_common()]


def make_buckets(spec: DatasetSpec) -> list[Size]:
    """Sizes of about resolution² pixels, sides a multiple of the step, between the min and max side."""
    res, step = spec.resolution, spec.bucket_step
    square = max(step, res // step * step)
    if not spec.aspect_buckets:
        return [(square, square)]
    low = _round_up(spec.bucket_min_side or res // 2, step)
    high = max(low, (spec.bucket_max_side or res * 2) // step * step)
    area = res * res
    out = {(square, square)} if low <= square <= high else set()
    for width in range(low, high + 1, step):
        height = min(high, area // width // step * step)
        if height >= low:
            out.add((width, height))
            out.add((height, width))
    if not out:
        out = {(low, low)}
    return sorted(out, key=lambda s: (s[0] / s[1], s[0]))


def assign(size: Size, buckets: list[Size], max_upscale: float) -> tuple[int, str]:
    """(bucket index, '') for the bucket nearest the image's aspect ratio, or (-1, why) if it is too small."""
    w, h = size
    ratio = math.log(w / h)
    best = min(range(len(buckets)),
               key=lambda i: (abs(math.log(buckets[i][0] / buckets[i][1]) - ratio), -buckets[i][0] * buckets[i][1]))
    bw, bh = buckets[best]
    scale = max(bw / w, bh / h)
    if scale > max_upscale + 1e-9:
        return -1, (f"too small: {w}x{h} would need {scale:.2f}x enlargement to fill bucket {bw}x{bh} "
                    f"(dataset.max_upscale is {max_upscale:g})")
    return best, ""


def fit(size: Size, bucket: Size) -> Size:
    """The size an image is resized to so that it covers the bucket (aspect kept, at least the bucket)."""
    w, h = size
    bw, bh = bucket
    scale = max(bw / w, bh / h)
    return max(bw, round(w * scale)), max(bh, round(h * scale))


def layout(items: list[ImageItem], sizes: list[Size], spec: DatasetSpec) -> tuple[Layout, list[tuple]]:
    """Every usable image in its bucket, repeats expanded; and (item, why) for those too small to train."""
    buckets = make_buckets(spec)
    samples, bucket_of, too_small = [], [], []
    for item, size in zip(items, sizes):
        b, why = assign(size, buckets, spec.max_upscale)
        if b < 0:
            too_small.append((item, why))
            continue
        samples += [item] * item.repeats
        bucket_of += [b] * item.repeats
    return Layout(buckets, samples, bucket_of), too_small


def batches_per_epoch(bucket_of: list[int], batch_size: int, world: int = 1) -> int:
    """Every bucket gives ceil(n / (batch x processes)) batches; the last one is topped up from the same bucket."""
    per = batch_size * world
    return sum(math.ceil(n / per) for n in Counter(bucket_of).values())


def epoch_batches(bucket_of: list[int], batch_size: int, seed: int, epoch: int, rank: int = 0,
                  world: int = 1) -> list[list[int]]:
    """This process's batches of sample indices for one epoch, a pure function of (seed, epoch).

    Each bucket is shuffled and cut into batches of batch x processes; an incomplete last batch is topped up
    with the bucket's first samples, so every image is seen every epoch and every batch is one bucket. Then
    the batches are shuffled, and each process takes its slice of every batch.
    """
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    per = batch_size * world
    members: dict[int, list[int]] = {}
    for index, b in enumerate(bucket_of):
        members.setdefault(b, []).append(index)
    chunks = []
    for b in sorted(members):
        order = [members[b][i] for i in rng.permutation(len(members[b]))]
        for start in range(0, len(order), per):
            chunk = order[start:start + per]
            while len(chunk) < per:
                chunk += order[:per - len(chunk)]
            chunks.append(chunk)
    chunks = [chunks[i] for i in rng.permutation(len(chunks))]
    return [chunk[rank * batch_size:(rank + 1) * batch_size] for chunk in chunks]


def _round_up(value: int, step: int) -> int:
    return max(step, -(-value // step) * step)
