"""Captioning the images that have none: `python -m trainer caption DATASET --model ID_OR_FOLDER`.

Any model that transformers loads with AutoProcessor + AutoModelForImageTextToText and that captions from
`processor(images=..., text=prompt)` then `generate`: BLIP (Salesforce/blip-image-captioning-base/-large),
BLIP-2, GIT, Pix2Struct and the like, from the hub or a local folder. Models that need remote code
(Florence-2: trust_remote_code) or a chat template (Qwen-VL, LLaVA) are not supported: the command says so.

A caption is written as IMAGE<extension> beside its image (the extension the dataset's folder reads); an image
that has one keeps it unless --overwrite. Progress: a bar in the terminal, or with --json one `progress` event
per image on stdout (the window's dataset view reads them).
"""

from __future__ import annotations

import sys
from pathlib import Path

from .data.files import ImageItem, scan_dataset
from .job import DatasetFolder, DatasetSpec, JobError

BATCH = 4  # images per generate call
MAX_NEW_TOKENS = 60


def to_caption(dataset: list[Path], extension: str, overwrite: bool) -> list[ImageItem]:
    """The images of these folders (and their N_name subfolders) whose caption file is missing, or every image
    with --overwrite; images inside .tar shards or captioned by an imagefolder's metadata file are left alone."""
    if not extension.startswith(".") or len(extension) < 2 or "/" in extension:
        raise JobError(f"--extension: {extension!r} is not a file extension such as .txt")
    for folder in dataset:
        if not folder.is_dir():
            raise JobError(f"DATASET: {folder}: folder not found")
    spec = DatasetSpec(folders=[DatasetFolder(path=str(f), caption_extension=extension) for f in dataset])
    scan = scan_dataset(spec)
    if not scan.items:
        raise JobError(f"DATASET: no images (png, jpg, jpeg, webp) found in {', '.join(map(str, dataset))}")
    items = []
    for item in scan.items:
        sidecar = item.path.with_suffix(extension)
        if item.archive is not None or (item.caption_path is not None and item.caption_path != sidecar):
            continue
        if item.caption_path is None or overwrite:
            items.append(item)
    return items


def load_captioner(model: str):
    """(processor, model) for a hub id or a local folder; one line naming --model when it cannot be used."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as exc:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "trust_remote_code" in str(exc):
            why = "it needs remote code (trust_remote_code), which is not run; use a BLIP-style model"
        raise JobError(f"--model: {model}: not a captioning model folder or hub id ({why})") from None
    try:
        processor = AutoProcessor.from_pretrained(model)
        captioner = AutoModelForImageTextToText.from_pretrained(model)
    except (OSError, ValueError, KeyError) as exc:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise JobError(f"--model: {model}: a {config.model_type} model cannot caption here ({why}); BLIP-style "
                       "image-to-text models are supported") from None
    return processor, captioner.eval()


def caption_images(processor, captioner, images: list, prompt: str, max_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """One caption per PIL image. The prompt conditions the model and is not part of the caption: a decoder
    that continues it (BLIP, decoder-only models) repeats it first, and that text is cut."""
    import torch

    inputs = processor(images=images, text=[prompt] * len(images) if prompt else None, return_tensors="pt")
    with torch.no_grad():
        out = captioner.generate(**inputs, max_new_tokens=max_tokens)
    texts = [" ".join(text.split()) for text in processor.batch_decode(out, skip_special_tokens=True)]
    given = inputs.get("input_ids")
    if prompt and given is not None:  # the prompt as the tokenizer spells it back (case, spaces)
        said = " ".join(processor.batch_decode(given[:1], skip_special_tokens=True)[0].split())
        texts = [text[len(said):].strip() if said and text.startswith(said) else text for text in texts]
    return texts


def run_captioning(dataset: list[Path], model: str, extension: str = ".txt", overwrite: bool = False,
                   prefix: str = "", suffix: str = "", prompt: str = "", json_events: bool = False,
                   max_tokens: int = MAX_NEW_TOKENS) -> int:
    """Caption the images that need it; returns how many files were written."""
    from .data.images import BadImage, load
    from .events import encode, make_event

    items = to_caption(dataset, extension, overwrite)
    total = len(items)
    if not total:
        print("every image has a caption (--overwrite rewrites them)", file=sys.stderr)
        if json_events:
            _emit(encode(make_event("progress", task="caption", done=0, total=0)))
        return 0
    processor, captioner = load_captioner(model)
    bar = None
    if not json_events:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="image", desc="captioning", file=sys.stderr)
    written = done = 0
    for start in range(0, total, BATCH):
        chunk, images = [], []
        for item in items[start:start + BATCH]:
            try:
                images.append(load(item)[0])
                chunk.append(item)
            except BadImage as exc:
                print(f"skipped {item.path}: {exc}", file=sys.stderr)
        captions = caption_images(processor, captioner, images, prompt, max_tokens) if images else []
        for item, text in zip(chunk, captions):
            caption = " ".join(part for part in (prefix.strip(), text, suffix.strip()) if part)
            path = item.path.with_suffix(extension)
            path.write_text(caption + "\n", encoding="utf-8")
            written += 1
        done = min(start + BATCH, total)
        if bar is not None:
            bar.update(len(items[start:start + BATCH]))
        if json_events:
            last = str(chunk[-1].path) if chunk else ""
            _emit(encode(make_event("progress", task="caption", done=done, total=total, path=last)))
    if bar is not None:
        bar.close()
    print(f"wrote {written} captions ({total - written} images skipped)", file=sys.stderr)
    return written


def _emit(line: bytes) -> None:
    sys.stdout.write(line.decode("utf-8"))
    sys.stdout.flush()
