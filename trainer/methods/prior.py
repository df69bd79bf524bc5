"""DreamBooth prior preservation: where the class images live, how many there must be, and generating the missing
ones with the base model (resumable, the same set however often it is interrupted).

A class image counts once it is complete: a file the data pipeline reads as an image (png, jpg, jpeg, webp) whose
header and end are intact. Generated images are renamed into place only after their caption, so a present image
is always complete; temp files end in `.tmp` and are never counted. User images of any name count too (without a
caption they train with the class prompt). Everything but `generate_missing` is torch-free, for `trainer check`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path

from ..data import images
from ..data.cache import Progress, cache_root, model_identity
from ..data.files import IMAGE_EXTENSIONS, ImageItem
from ..job import DatasetFolder, DatasetSpec, Job, JobError

CLASS_FOLDER = "class-images"  # under the cache root
# Every part of the model that shapes a generated image; model_identity adds the family's tokenizers and other
# encoders to text_encoder's, and a part the model lacks adds only its name.
_MODEL_PARTS = ("unet", "transformer", "vae", "text_encoder", "scheduler")
_GENERATED = re.compile(r"^class-(\d{5,})\.png$")


def class_dir(job: Job) -> Path:
    """prior.class_dir, or a folder in the cache root named for the model, class prompt and resolution (so every
    job with those three reuses it). Never inside a dataset folder: its images would train as instance images."""
    prior = job.prior
    if prior.class_dir:
        folder = Path(prior.class_dir).expanduser().resolve()
    else:
        key = json.dumps([[model_identity(job.model, part) for part in _MODEL_PARTS], job.model.prediction_type,
                          prior.class_prompt, job.dataset.resolution])
        slug = re.sub(r"[^a-z0-9]+", "-", prior.class_prompt.lower()).strip("-")[:40] or "class"
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        folder = cache_root(job.dataset.cache_dir) / CLASS_FOLDER / f"{slug}-{digest}"
    for index, spec in enumerate(job.dataset.folders):
        root = Path(spec.path).expanduser().resolve()
        if folder == root or root in folder.parents:
            field = "prior.class_dir" if prior.class_dir else "dataset.cache_dir"
            raise JobError(f"{field}: class images folder {folder} is inside dataset folder {root} "
                           f"(dataset.folders.{index}); they would train as instance images")
    return folder


def class_image_count(job: Job, num_instance_images: int) -> int:
    """Class images to train with: num_class_images, else images_per_instance per distinct instance image,
    capped by max_class_images."""
    prior = job.prior
    if prior.num_class_images:
        return prior.num_class_images
    return min(prior.images_per_instance * num_instance_images, prior.max_class_images)


def existing_class_images(folder: Path) -> list[Path]:
    """The complete class images in `folder` (not its subfolders), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and _complete(p))


def missing_count(job: Job, num_instance_images: int) -> int:
    """How many class images `generate_missing` would generate (torch-free)."""
    need = class_image_count(job, num_instance_images)
    return max(0, need - len(existing_class_images(class_dir(job))))


def generate_missing(job: Job, pipe, num_instance_images: int, reporter, device) -> list[Path]:
    """Generate the missing class images into class_dir with `pipe` (the base model's pipeline, no LoRA) and
    return the class images to train with: the first class_image_count of the folder's, sorted.

    Image i is `class-{i:05d}.png` from seed prior.seed + i; the missing ones take the lowest free indices, so an
    interrupted run resumed later ends with exactly the images an uninterrupted one makes.
    """
    import torch

    prior, res = job.prior, job.dataset.resolution
    folder = class_dir(job)
    need = class_image_count(job, num_instance_images)
    existing = existing_class_images(folder)
    missing = max(0, need - len(existing))
    if not missing:
        reporter.log(f"class images: using {need} of the {len(existing)} in {folder}")
        return existing[:need]
    folder.mkdir(parents=True, exist_ok=True)
    taken = {int(m.group(1)) for m in (_GENERATED.match(p.name) for p in existing) if m}
    todo = _free_indices(taken, missing)
    device = torch.device(device)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)  # Progress below reports instead of a bar per batch
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(job.precision.mixed_precision)
    # Like validation: under mixed precision the frozen parts are half (trainer/families/precision.py) and the VAE fp32;
    # autocast joins them. fp16 on a CPU has already become fp32 there, so only bf16 reaches a CPU here.
    if half is torch.float16 and device.type == "cpu":
        half = None
    autocast = torch.autocast(device.type, dtype=half) if half is not None else contextlib.nullcontext()
    reporter.log(f"class images: {len(existing)} of {need} in {folder}; generating {missing}")
    progress = Progress(reporter, "generating class images", missing)
    for start in range(0, len(todo), prior.batch_size):
        batch = todo[start:start + prior.batch_size]
        with autocast:
            result = pipe([prior.class_prompt] * len(batch), num_inference_steps=prior.sample_steps,
                          guidance_scale=prior.guidance_scale, height=res, width=res,
                          generator=[torch.Generator().manual_seed(prior.seed + i) for i in batch])
        for i, image in zip(batch, result.images):
            _write_atomic(folder / f"class-{i:05d}.txt",
                          lambda tmp: tmp.write_text(prior.class_prompt + "\n", encoding="utf-8"))
            _write_atomic(folder / f"class-{i:05d}.png", lambda tmp: image.save(tmp, format="PNG"))
        progress.advance(len(batch))
    return existing_class_images(folder)[:need]


def class_dataset_spec(job: Job) -> DatasetSpec:
    """The class folder as a dataset, for the data pipeline's scan: captions default to the class prompt, each
    image seen once per epoch, every other setting as the job's dataset. The scan sees every image there; train
    on those `generate_missing` returned."""
    spec = job.dataset.model_copy(deep=True)
    spec.folders = [DatasetFolder(path=str(class_dir(job)), instance_prompt=job.prior.class_prompt, repeats=1)]
    return spec


def _complete(path: Path) -> bool:
    try:
        images.probe(ImageItem(path, "", None, 1, path.parent))
    except images.BadImage:
        return False
    return True


def _free_indices(taken: set[int], count: int) -> list[int]:
    out, i = [], 0
    while len(out) < count:
        if i not in taken:
            out.append(i)
        i += 1
    return out


def _write_atomic(path: Path, write) -> None:
    # Hidden and ending in .tmp: neither this module nor the data pipeline reads it as an image or caption.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    tmp.replace(path)
