"""Where to crop an image to its bucket: centre, random, or around the largest face, else the most salient region.

Face detection is mediapipe's BlazeFace (short range) through its Tasks API, with the model file shipped in
resources/ (mediapipe 1.x ships none), so it works offline. Saliency is OpenCV's spectral residual when cv2 is
there, else an edge-energy map.
"""

from __future__ import annotations

import atexit
import math
import os
import threading
from pathlib import Path

import numpy as np
from PIL import Image

FACE_MODEL = Path(__file__).resolve().parents[2] / "resources" / "face_detection_short_range.tflite"
DETECT_SIDE = 384  # tiles are shrunk to this before detection: BlazeFace itself looks at 128x128
MIN_FACE_SCORE = 0.5

Box = tuple[int, int, int, int]  # (left, top, right, bottom) in pixels
_detector = None  # one per process (DataLoader workers each make their own)
_face_error = ""
_registered = False


def crop_offset(resized: tuple[int, int], bucket: tuple[int, int], mode: str, focus: tuple[float, float] | None,
                u: tuple[float, float] = (0.5, 0.5)) -> tuple[int, int]:
    """(left, top) of the bucket-sized window in an image resized to `resized`.

    center: the middle; random: `u` (two uniforms in [0, 1)) picks the window; face: the window is centred on
    `focus` (fractions of width and height) and clamped to the image, so a face smaller than the window stays in.
    """
    spare_x, spare_y = resized[0] - bucket[0], resized[1] - bucket[1]
    if mode == "random":
        return int(u[0] * (spare_x + 1)), int(u[1] * (spare_y + 1))
    if mode == "face" and focus is not None:
        left = round(focus[0] * resized[0] - bucket[0] / 2)
        top = round(focus[1] * resized[1] - bucket[1] / 2)
        return min(max(left, 0), spare_x), min(max(top, 0), spare_y)
    return spare_x // 2, spare_y // 2


def focus_point(image: Image.Image) -> tuple[tuple[float, float] | None, str]:
    """The centre of the largest face, else of the most salient region, as fractions of the image size.

    Returns (point or None, 'face' | 'saliency' | 'center'): None means no face and a flat saliency map.
    """
    face = largest_face(image)
    if face is not None:
        left, top, right, bottom = face
        return ((left + right) / 2 / image.width, (top + bottom) / 2 / image.height), "face"
    point = salient_point(image)
    return (point, "saliency") if point is not None else (None, "center")


def largest_face(image: Image.Image) -> Box | None:
    """The largest face's box in the image's pixels, or None (no face, or mediapipe unavailable).

    BlazeFace sees a 128x128 square, so a wide or tall image is searched in overlapping square tiles (a face
    in a 3:1 panorama would otherwise shrink to a few pixels).
    """
    detector = _face_detector()
    if detector is None:
        return None
    import mediapipe as mp

    side = min(image.size)
    long_axis = 0 if image.width > image.height else 1
    spare = image.size[long_axis] - side
    count = 1 if spare == 0 else math.ceil(spare / (side / 2)) + 1
    boxes = []
    for i in range(count):
        offset = round(spare * i / max(count - 1, 1))
        left, top = (offset, 0) if long_axis == 0 else (0, offset)
        tile = image.crop((left, top, left + side, top + side))
        scale = min(1.0, DETECT_SIDE / side)
        if scale < 1.0:
            tile = tile.resize((round(side * scale),) * 2, Image.Resampling.BILINEAR)
        rgb = np.ascontiguousarray(np.asarray(tile.convert("RGB"), dtype=np.uint8))
        for d in detector.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=rgb)).detections:
            if d.categories and d.categories[0].score >= MIN_FACE_SCORE:
                b = d.bounding_box
                boxes.append((round(left + b.origin_x / scale), round(top + b.origin_y / scale),
                              round(left + (b.origin_x + b.width) / scale),
                              round(top + (b.origin_y + b.height) / scale)))
    if not boxes:
        return None
    return max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))


def salient_point(image: Image.Image) -> tuple[float, float] | None:
    """The saliency-weighted centre of the most salient tenth of the image, or None if nothing stands out."""
    small = image.convert("RGB")
    small.thumbnail((128, 128), Image.Resampling.BILINEAR)
    sal = saliency_map(np.asarray(small, dtype=np.uint8))
    if sal.max() - sal.min() < 1e-6 or sal.std() < 0.02 * max(sal.max(), 1e-6):
        return None
    threshold = np.quantile(sal, 0.9)
    weights = np.where(sal >= threshold, sal, 0.0)
    ys, xs = np.indices(sal.shape)
    total = weights.sum()
    x = float((xs * weights).sum() / total) + 0.5  # + 0.5: the centre of a pixel
    y = float((ys * weights).sum() / total) + 0.5
    return x / sal.shape[1], y / sal.shape[0]


def saliency_map(rgb: np.ndarray) -> np.ndarray:
    """(H, W) float saliency in [0, 1]: OpenCV's spectral residual, else blurred edge energy."""
    try:
        import cv2

        ok, sal = cv2.saliency.StaticSaliencySpectralResidual_create().computeSaliency(rgb)
        if ok:
            return sal.astype(np.float64)
    except (ImportError, AttributeError):
        pass
    return edge_energy(rgb)


def edge_energy(rgb: np.ndarray) -> np.ndarray:
    """Gradient magnitude of the luminance, box-blurred: where the detail is."""
    gray = rgb.astype(np.float64).mean(axis=2)
    gx = np.abs(np.diff(gray, axis=1, append=gray[:, -1:]))
    gy = np.abs(np.diff(gray, axis=0, append=gray[-1:, :]))
    energy = gx + gy
    k = max(1, min(energy.shape) // 16)
    padded = np.pad(energy, k, mode="edge").cumsum(0).cumsum(1)
    blurred = (padded[2 * k:, 2 * k:] - padded[:-2 * k, 2 * k:] - padded[2 * k:, :-2 * k] + padded[:-2 * k, :-2 * k])
    return blurred / max(blurred.max(), 1e-9)


def close_detector() -> None:
    """Free mediapipe's detector (after the caching pass); the next face crop makes a new one."""
    global _detector
    if _detector is not None:
        detector, _detector = _detector, None
        detector.close()


def face_detection_problem(create: bool = True) -> str:
    """'' if face detection works here (or was not tried, with create=False), else why not."""
    if create:
        _face_detector()
    return _face_error


def _face_detector():
    global _detector, _face_error, _registered
    if _detector is not None or _face_error:
        return _detector
    if not FACE_MODEL.is_file():
        _face_error = f"face crops need {FACE_MODEL}, which is missing; saliency crops are used instead"
        return None
    os.environ.setdefault("GLOG_minloglevel", "2")  # mediapipe's C++ side is chatty on stderr
    try:
        from mediapipe.tasks.python import BaseOptions, vision

        options = vision.FaceDetectorOptions(base_options=BaseOptions(model_asset_path=str(FACE_MODEL)),
                                             min_detection_confidence=MIN_FACE_SCORE)
        _detector = vision.FaceDetector.create_from_options(options)
        if not _registered:
            # Close it before interpreter shutdown stops the thread mediapipe closes through (plain atexit
            # runs too late and prints a traceback); threading's hook runs first, newest registration first.
            getattr(threading, "_register_atexit", atexit.register)(close_detector)
            _registered = True
    except Exception as exc:  # noqa: BLE001 - any failure means "no face detection", said once
        _face_error = f"face detection unavailable ({type(exc).__name__}: {exc}); saliency crops are used instead"
        return None
    return _detector
