"""The caption a sample is trained with this epoch: one line picked, tags shuffled, or dropped to empty.

Every choice comes from a generator seeded by (seed, epoch, sample index), so resume and workers agree.
"""

from __future__ import annotations

import numpy as np

from ..job import DatasetSpec

SALT = 0xCA7  # keeps the caption stream apart from the crop and flip stream of the same sample


def sample_rng(seed: int, epoch: int, index: int, salt: int = 0) -> np.random.Generator:
    """The generator for one sample in one epoch; nothing else draws from it."""
    return np.random.default_rng([seed, epoch, index, salt])


def epoch_caption(captions: list[str], spec: DatasetSpec, seed: int, epoch: int, index: int) -> str:
    """One of the image's captions, tags shuffled past the first `keep_tokens`, or '' with caption_dropout."""
    rng = sample_rng(seed, epoch, index, SALT)
    pick, drop = rng.random(2)
    if spec.caption_dropout and drop < spec.caption_dropout:
        return ""
    caption = captions[min(int(pick * len(captions)), len(captions) - 1)] if captions else ""
    if spec.shuffle_tags:
        caption = shuffle_tags(caption, spec.tag_separator, spec.keep_tokens, rng)
    return caption


def shuffle_tags(caption: str, separator: str, keep: int, rng: np.random.Generator) -> str:
    tags = [t.strip() for t in caption.split(separator) if t.strip()]
    head, tail = tags[:keep], tags[keep:]
    tail = [tail[i] for i in rng.permutation(len(tail))]
    joiner = separator + " " if not separator.endswith(" ") and separator.strip() else separator
    return joiner.join(head + tail)


def possible_captions(captions: list[str], spec: DatasetSpec) -> list[str]:
    """Every caption `epoch_caption` can return when tags are not shuffled (what the text cache holds)."""
    out = list(dict.fromkeys(captions))
    if spec.caption_dropout:
        out.append("")
    return out
