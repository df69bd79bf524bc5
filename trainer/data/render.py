"""One image as the denoiser sees it: decoded, resized to cover its bucket, cropped (centre, random, face), flipped
and colour-jittered, as a tensor in [-1, 1]. The dataset renders live; the latent cache renders what it encodes.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageEnhance

from ..job import DatasetSpec
from . import images, masks
from .buckets import fit
from .crops import crop_offset, focus_point
from .files import ImageItem


def render(item: ImageItem, bucket: tuple[int, int], spec: DatasetSpec, flip: bool, u, focus_memo: dict):
    """(pixels (3, H, W) in [-1, 1], original (h, w), crop top-left (top, left), mask (1, H, W) in [0, 1] or
    None) of one image in its bucket. The mask goes through the very resize, crop and flip of its image."""
    image, original = images.load(item, cover=bucket)  # a big JPEG may come decoded smaller than `original`
    mask = masks.load(item)
    resized = fit(original, bucket)
    focus = None
    if spec.crop == "face":
        key = str(item.path)
        if key not in focus_memo:
            focus_memo[key] = focus_point(image)[0]
        focus = focus_memo[key]
    left, top = crop_offset(resized, bucket, spec.crop, focus, (u[1], u[2]))
    box = (left, top, left + bucket[0], top + bucket[1])
    image = image.resize(resized, Image.Resampling.BICUBIC).crop(box)
    if mask is not None:  # a mask file of another size covers the same view: stretched onto the image
        mask = mask.resize(resized, Image.Resampling.BILINEAR).crop(box)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mask is not None else None
        left = resized[0] - left - bucket[0]  # the crop as seen in the mirrored image
    if spec.color_jitter:
        image = jitter(image, spec.color_jitter, u[3:6])
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3) in [-1, 1]
    if mask is not None:
        mask = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]  # (1, H, W)
    return torch.from_numpy(array).permute(2, 0, 1), (original[1], original[0]), (top, left), mask


def jitter(image: Image.Image, strength: float, u) -> Image.Image:
    """Brightness, contrast and saturation each scaled by 1 +- strength (u: three uniforms in [0, 1))."""
    for enhancer, value in zip((ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color), u):
        image = enhancer(image).enhance(1.0 + (2.0 * float(value) - 1.0) * strength)
    return image
