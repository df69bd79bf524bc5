"""Latent and text-encoder caches on disk (safetensors), shared by every run of the same model and data.

A latent entry is keyed by the VAE's identity, the image file's content hash, the bucket, the crop mode, the
flip and its mask (the mask file's content hash, or 'alpha'; the entry then holds the mask on the latent grid); a
text entry by the text encoder's identity and the caption. Changing any of those misses exactly the
entries it affects. What can be cached is decided here without torch, so `trainer check` can say it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..families.detect import detect_family
from ..families.table import FAMILIES
from ..job import Job, JobError, ModelSpec
from .files import ImageItem

LATENT_FORMAT = 1  # bump when the pixels fed to the VAE change (resize filter, crop or face rule, colours)
TEXT_FORMAT = 1
HASH_INDEX = "content-hashes.json"
ENCODE_BATCH = 8  # images per VAE call while caching
TEXT_BATCH = 64


@dataclass
class CachePlan:
    latents: bool
    text: bool
    root: Path
    notes: list[str] = field(default_factory=list)


@dataclass
class CacheIndex:
    """What `prepare` hands the dataset: where each sample's cached entries are, and what stands in for images
    that failed to decode."""
    latent_files: list[dict[bool, Path]] | None = None  # per sample, by flip; None: latents rendered live
    text_files: dict[str, Path] | None = None  # per caption; None: captions encoded live
    replacement: dict[int, ImageItem] = field(default_factory=dict)  # id(broken item) -> the image trained instead
    # Face/saliency point per image path, found before training, so DataLoader workers never run mediapipe (a
    # detector inherited through fork deadlocks).
    focus: dict[str, tuple[float, float] | None] = field(default_factory=dict)
    broken: list = field(default_factory=list)  # (item, why) of the images that failed to decode


def decide(job: Job) -> CachePlan:
    """What gets cached for this job, with a note for every cache the job's settings turn off."""
    spec = job.dataset
    notes = []
    latents, text = spec.cache_latents, spec.cache_text
    if latents and spec.crop == "random":
        latents = False
        notes.append("latent cache off: random crops differ every epoch (use crop 'center' or 'face' to cache)")
    if latents and spec.color_jitter:
        latents = False
        notes.append("latent cache off: colour jitter changes the pixels every epoch")
    if text and spec.shuffle_tags:
        text = False
        notes.append("text cache off: shuffled tags make a new caption every epoch")
    if text and job.text_encoder.mode != "off":
        text = False
        notes.append("text cache off: the text encoder is being trained")
    if text and job.tokens.new:
        text = False
        notes.append("text cache off: new token embeddings are being trained")
    if latents and spec.random_flip:
        notes.append("random flip: both the image and its mirror are cached")
    if spec.caption_dropout and text:
        notes.append("caption dropout: the empty caption is cached too")
    return CachePlan(latents, text, cache_root(spec.cache_dir), notes)


def prepare(job: Job, caching: CachePlan, layout, spec, family, parts, reporter, fill: bool = True) -> CacheIndex:
    """Encode what the caches lack for `layout`'s samples (only if `fill`) and index the entries for the dataset.

    Images that failed to decode are listed in `broken`; their samples train on another image of the same
    bucket, so the plan's batches and length stay as planned. Other processes of a multi-GPU run call this
    with fill=False after the main one filled the caches (a `.bad` marker tells them what failed).
    """
    index = CacheIndex()
    if caching.latents:
        _prepare_latents(job, caching.root, layout, spec, family, parts, reporter, fill, index)
    elif spec.crop == "face":
        _prepare_focus(layout, reporter if fill else None, index)
    if caching.text:
        _prepare_text(job, caching.root, layout, spec, family, parts, reporter, fill, index)
    return index


def _prepare_focus(layout, reporter, index: CacheIndex) -> None:
    """Face-crop points of every image, found once in this process (uncached latents: crops are made live)."""
    from .crops import close_detector, focus_point
    from .images import BadImage, load

    unique = _unique(layout)
    progress = Progress(reporter, "finding faces for crops", len(unique)) if reporter is not None else None
    for item, b in unique:
        try:
            image, _ = load(item, cover=layout.buckets[b])
            index.focus[str(item.path)] = focus_point(image)[0]
        except BadImage:
            pass  # found again, and reported, when the dataset reads it
        if progress is not None:
            progress.advance()
    close_detector()


def _prepare_latents(job: Job, root: Path, layout, spec, family, parts, reporter, fill: bool,
                     out: CacheIndex) -> None:
    from .crops import close_detector

    encoder = family.IMAGE_ENCODER  # the model folder's image encoder (Cascade: effnet)
    store = Store(root, "latents", model_identity(job.model, encoder, str(parts.vae.dtype)))
    index = HashIndex(root)
    flips = (False, True) if spec.random_flip else (False,)
    contents: dict[int, str] = {}  # id(item) -> the image's content hash, with its mask's identity
    broken: dict[int, tuple] = {}  # id(item) -> (item, why)
    todo: dict[tuple[int, int], list] = {}  # bucket -> items to encode
    for item, b in _unique(layout):
        bucket = layout.buckets[b]
        try:
            contents[id(item)] = index.content_hash(item) + _mask_identity(item, index)
        except OSError as exc:
            broken[id(item)] = (item, f"unreadable ({exc.strerror or exc})")
            continue
        keys = [latent_key(store.folder.name, contents[id(item)], bucket, spec.crop, f) for f in flips]
        bad = _bad_marker(store, keys[0])
        if bad.is_file():
            broken[id(item)] = (item, bad.read_text(encoding="utf-8"))
        elif not all(store.has(k) for k in keys):
            todo.setdefault(bucket, []).append(item)
    index.save()
    if fill and todo:
        progress = Progress(reporter, "caching latents", sum(len(v) for v in todo.values()))
        for bucket, items in todo.items():
            for start in range(0, len(items), ENCODE_BATCH):
                chunk = items[start:start + ENCODE_BATCH]
                for item, why in _encode(store, contents, chunk, bucket, spec, flips, family, parts):
                    broken[id(item)] = (item, why)
                    marker = _bad_marker(store, latent_key(store.folder.name, contents[id(item)], bucket,
                                                           spec.crop, False))
                    marker.parent.mkdir(parents=True, exist_ok=True)
                    marker.write_text(why, encoding="utf-8")
                progress.advance(len(chunk))
        close_detector()
    # A broken image's samples train on a good image of the same bucket (else of any bucket, encoded for it),
    # so the plan's batches stay as they were: the run's length and order do not depend on what decodes.
    files = []
    for item, b in zip(layout.samples, layout.bucket_of):
        bucket = layout.buckets[b]
        if id(item) in broken:
            good = _replacement(layout, b, broken)
            if good is None:
                first = next(iter(broken.values()))
                raise JobError(f"dataset: no usable images: none of the {len(broken)} images could be decoded "
                               f"(first: {first[0].path}: {first[1]})")
            out.replacement[id(item)] = good
            keys = {f: latent_key(store.folder.name, contents[id(good)], bucket, spec.crop, f) for f in flips}
            if fill and not all(store.has(k) for k in keys.values()):
                _encode(store, contents, [good], bucket, spec, flips, family, parts)
            item = good
        files.append({f: store.path(latent_key(store.folder.name, contents[id(item)], bucket, spec.crop, f))
                      for f in flips})
    out.latent_files = files
    out.broken = list(broken.values())


def _encode(store: Store, contents: dict, items: list, bucket, spec, flips, family, parts) -> list:
    """Decode, crop and VAE-encode images for one bucket; returns (item, why) for those that fail to decode."""
    import torch

    from .render import render
    from .images import BadImage

    rendered, failed = [], []
    for item in items:
        try:
            rendered.append((item, *render(item, bucket, spec, False, (0.5,) * 6, {})))
        except BadImage as exc:
            failed.append((item, str(exc)))
    if not rendered:
        return failed
    pixels = torch.stack([r[1] for r in rendered])  # (B, 3, H, W)
    for flip in flips:
        mean, std = family.encode_image_dists(parts, pixels.flip(-1) if flip else pixels)
        for i, (item, _, original, (top, left), mask) in enumerate(rendered):
            if flip:  # the crop as seen in the mirrored image
                left = _resized_width(original, bucket) - left - bucket[0]
            entry = {"latent_mean": mean[i], "latent_std": std[i], "original_size": torch.tensor(original),
                     "crop_top_left": torch.tensor((top, left)), "target_size": torch.tensor((bucket[1], bucket[0]))}
            if mask is not None:
                entry["mask"] = latent_grid(mask.flip(-1) if flip else mask, mean.shape[-2:])
            store.put(latent_key(store.folder.name, contents[id(item)], bucket, spec.crop, flip), entry)
    return failed


def latent_grid(mask, size):
    """A mask (..., H, W) averaged down to the latent grid `size` (h, w): each latent pixel's share of the mask.
    The family's latents (VAE or Cascade's EfficientNet) set the grid; the loss's target has the same."""
    import torch.nn.functional as F

    batched = mask if mask.ndim == 4 else mask[None]
    out = F.adaptive_avg_pool2d(batched.float(), tuple(size))
    return out if mask.ndim == 4 else out[0]


def _mask_identity(item: ImageItem, index: HashIndex) -> str:
    """'' without a mask (the entry's key stays what it was before masks), else what changes with the mask."""
    from .masks import mask_source

    source = mask_source(item)
    if source is None:
        return ""
    if source == "alpha":
        return ":alpha"  # the image's content hash covers its alpha channel
    return ":mask:" + index.content_hash(ImageItem(source, "", None, 1, source.parent))


def _replacement(layout, bucket: int, broken: dict):
    same = [i for i, b in zip(layout.samples, layout.bucket_of) if b == bucket and id(i) not in broken]
    return same[0] if same else next((i for i in layout.samples if id(i) not in broken), None)


def _bad_marker(store: Store, key: str) -> Path:
    return store.path(key).with_suffix(".bad")  # why an image failed to decode, so no run decodes it again


def _prepare_text(job: Job, root: Path, layout, spec, family, parts, reporter, fill: bool, out: CacheIndex) -> None:
    from .captions import possible_captions

    store = Store(root, "text", model_identity(job.model, "text_encoder", str(parts.text_encoder.dtype)))
    captions: dict[str, str] = {}
    for item, _ in _unique(layout):
        for caption in possible_captions(item.captions, spec):
            captions.setdefault(caption, text_key(store.folder.name, caption))
    todo = [c for c, k in captions.items() if not store.has(k)]
    if fill and todo:
        from torch import no_grad

        progress = Progress(reporter, "caching captions", len(todo))
        for start in range(0, len(todo), TEXT_BATCH):
            chunk = todo[start:start + TEXT_BATCH]
            with no_grad():
                cond = family.encode_prompts(parts, chunk)  # name -> (B, ...)
            for i, caption in enumerate(chunk):
                store.put(captions[caption], {name: value[i] for name, value in cond.items()})
            progress.advance(len(chunk))
    out.text_files = {c: store.path(k) for c, k in captions.items()}


def _unique(layout) -> list:
    """(item, bucket index) once per image, in sample order."""
    seen, out = set(), []
    for item, b in zip(layout.samples, layout.bucket_of):
        if id(item) not in seen:
            seen.add(id(item))
            out.append((item, b))
    return out


def _resized_width(original: tuple[int, int], bucket: tuple[int, int]) -> int:
    from .buckets import fit

    return fit((original[1], original[0]), bucket)[0]


def cache_root(setting: str) -> Path:
    """dataset.cache_dir, else $XDG_CACHE_HOME/sdtrainer (~/.cache/sdtrainer): never inside a dataset folder."""
    if setting:
        return Path(setting).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sdtrainer"


def model_identity(spec: ModelSpec, component: str, extra: str = "") -> str:
    """A short hash naming one frozen part of the model (its config, weight sizes and times) and how it runs. The
    text encoder's names every folder a caption goes through (the family's encoders and tokenizers; SD3's T5 only
    when the job loads it); a folder the model lacks adds nothing."""
    path = Path(spec.path).expanduser()
    parts = [component, extra, f"load_t5={spec.load_t5}" if component == "text_encoder" else ""]
    if path.is_dir():
        names = [component]
        if component == "text_encoder":
            family = FAMILIES[detect_family(spec)]
            names = [*family.text_cache_folders, *(family.t5_folders if spec.load_t5 else ())]
        for folder in (path / name for name in names):
            for f in sorted(folder.glob("*")) if folder.is_dir() else []:
                if f.suffix in (".json", ".txt", ".model"):
                    parts.append(f.name + ":" + hashlib.sha256(f.read_bytes()).hexdigest())
                elif f.is_file():
                    st = f.stat()
                    parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    elif path.is_file():
        st = path.stat()
        parts += [str(path.resolve()), str(st.st_size), str(st.st_mtime_ns), spec.config]
    else:
        parts += [spec.path, spec.revision, spec.variant]  # a hub id: its revision names the weights
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def latent_key(vae_id: str, content: str, bucket: tuple[int, int], crop: str, flip: bool) -> str:
    return _key([LATENT_FORMAT, vae_id, content, list(bucket), crop, flip])


def text_key(text_id: str, caption: str) -> str:
    return _key([TEXT_FORMAT, text_id, caption])


class Store:
    """Entries as `<root>/<kind>/<model id>/<key[:2]>/<key>.safetensors`, written atomically."""

    def __init__(self, root: Path, kind: str, model_id: str):
        self.folder = root / kind / model_id

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def put(self, key: str, tensors: dict) -> None:
        from safetensors.torch import save_file

        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
        tmp.replace(path)


def load_entry(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


class HashIndex:
    """Content hashes of image files, remembered by (path, size, mtime) so thousands are not re-read every run."""

    def __init__(self, root: Path):
        self.path = root / HASH_INDEX
        try:
            self.entries: dict = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.entries = {}
        self.changed = False

    def content_hash(self, item: ImageItem) -> str:
        source = item.archive or item.path
        st = source.stat()
        name = os.path.abspath(item.path)  # for a shard sample: <shard>/<member>
        stamp = [st.st_size, st.st_mtime_ns, list(item.span) if item.span else None]
        known = self.entries.get(name)
        if known and known[:3] == stamp:
            return known[3]
        digest = _hash_bytes(item)
        self.entries[name] = [*stamp, digest]
        self.changed = True
        return digest

    def save(self) -> None:
        if not self.changed:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.entries), encoding="utf-8")
        tmp.replace(self.path)
        self.changed = False


class Progress:
    """'caching latents: 120/1000' as log events, about every tenth and at least every 5 seconds."""

    def __init__(self, reporter, title: str, total: int):
        self.reporter, self.title, self.total = reporter, title, total
        self.done, self.started, self.last = 0, time.monotonic(), 0.0
        self.every = max(1, total // 10)
        reporter.log(f"{title}: {total} to do")

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.done == self.total or self.done % self.every < n or now - self.last > 5:
            self.last = now
            self.reporter.log(f"{self.title}: {self.done}/{self.total} ({now - self.started:.1f} s)")


def _key(parts: list) -> str:
    return hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).hexdigest()[:40]


def _hash_bytes(item: ImageItem) -> str:
    digest = hashlib.sha256()
    with open(item.archive or item.path, "rb") as f:
        if item.span is not None:
            f.seek(item.span[0])
            digest.update(f.read(item.span[1]))
        else:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
