"""One image as the denoiser sees it: decoded, resized to cover its bucket, cropped (centre, random, face), flipped
and colour-jittered, as a tensor in [-1, 1]. The dataset renders live; the latent cache renders what it encodes.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageEnhance

from ..job import DatasetSpec
from . import images
from .buckets import fit
from .crops import crop_offset, focus_point
from .files import ImageItem


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
