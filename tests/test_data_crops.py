"""Face-aware crops on a real photo (scikit-image's astronaut), the saliency fallback, and the centre fallback."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.data import crops
from trainer.data.buckets import fit
from trainer.data.files import ImageItem
from trainer.data.render import render
from trainer.job import DatasetSpec

FACE = (177, 82, 272, 177)  # the astronaut's face in the 512x512 photo (mediapipe finds it with score ~0.92)


@pytest.fixture(scope="module")
def wide_astronaut(tmp_path_factory):
    """The photo at the left of a 1536x512 canvas: a centre crop to a square misses the face."""
    from skimage import data

    canvas = Image.new("RGB", (1536, 512), (90, 90, 90))
    canvas.paste(Image.fromarray(data.astronaut()), (0, 0))
    path = tmp_path_factory.mktemp("face") / "astronaut.png"
    canvas.save(path)
    return path


def _spec(**settings) -> DatasetSpec:
    return DatasetSpec.model_validate({"folders": [{"path": "unused"}], "resolution": 256,
                                       "aspect_buckets": False, **settings})


def _window(path: Path, crop: str) -> tuple[int, int, int, int]:
    """The crop window of a 256x256 bucket, in the original image's pixels."""
    item = ImageItem(path, "", None, 1, path.parent)
    _, (oh, ow), (top, left), _ = render(item, (256, 256), _spec(crop=crop), False, (0.5,) * 6, {})
    scale = ow / fit((ow, oh), (256, 256))[0]
    return round(left * scale), round(top * scale), round((left + 256) * scale), round((top + 256) * scale)


def _inside(box, window) -> bool:
    return window[0] <= box[0] and window[1] <= box[1] and box[2] <= window[2] and box[3] <= window[3]


def test_mediapipe_finds_the_face_offline():
    from skimage import data

    assert crops.face_detection_problem() == ""
    box = crops.largest_face(Image.fromarray(data.astronaut()))
    assert box is not None
    assert all(abs(a - b) < 20 for a, b in zip(box, FACE)), box
    assert crops.largest_face(Image.new("RGB", (300, 200), (128, 128, 128))) is None


def test_face_crop_keeps_the_face_in_frame(wide_astronaut):
    image = Image.open(wide_astronaut).convert("RGB")
    box = crops.largest_face(image)  # found in a 3:1 image, where the face is a few pixels at 128x128
    assert box is not None and all(abs(a - b) < 20 for a, b in zip(box, FACE)), box
    assert crops.focus_point(image)[1] == "face"
    assert not _inside(FACE, _window(wide_astronaut, "center")), "the test needs a centre crop that loses the face"
    assert _inside(FACE, _window(wide_astronaut, "face"))


def test_without_a_face_the_crop_goes_to_the_salient_region(tmp_path):
    rng = np.random.default_rng(0)
    pixels = np.full((128, 384, 3), 120, np.uint8)
    pixels[40:90, 300:360] = rng.integers(0, 255, (50, 60, 3), dtype=np.uint8)  # detail near the right edge
    Image.fromarray(pixels).save(tmp_path / "object.png")
    image = Image.open(tmp_path / "object.png").convert("RGB")
    point, why = crops.focus_point(image)
    assert why == "saliency" and point[0] > 0.7
    assert _inside((300, 40, 360, 90), _window(tmp_path / "object.png", "face"))

    Image.new("RGB", (384, 128), (120, 120, 120)).save(tmp_path / "flat.png")
    assert crops.focus_point(Image.open(tmp_path / "flat.png").convert("RGB")) == (None, "center")
    assert _window(tmp_path / "flat.png", "face") == _window(tmp_path / "flat.png", "center")


def test_edge_energy_map_without_opencv():
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[10:20, 40:50] = 255
    energy = crops.edge_energy(pixels)
    y, x = np.unravel_index(energy.argmax(), energy.shape)
    assert 5 <= y <= 25 and 35 <= x <= 55


def test_face_crops_in_dataloader_workers(wide_astronaut, tmp_path):
    """Faces are found before training, so forked workers never touch mediapipe (it deadlocks after fork)."""
    import shutil

    import torch

    from trainer.data import cache, images
    from trainer.data.buckets import epoch_batches, layout
    from trainer.data.files import scan_dataset
    from trainer.data.dataset import TrainDataset, collate
    from trainer.job import Job

    for i in range(2):
        shutil.copy(wide_astronaut, tmp_path / f"{i}.png")
    spec = _spec(folders=[{"path": str(tmp_path)}], crop="face", color_jitter=0.1, cache_text=False)
    scan = scan_dataset(spec)
    epoch, _ = layout(scan.items, [images.probe(i) for i in scan.items], spec)
    job = Job(dataset=spec)
    index = cache.prepare(job, cache.decide(job), epoch, spec, None, None, None, fill=False)
    assert index.broken == [] and index.latent_files is None
    assert len(index.focus) == 2 and all(p[0] < 0.2 for p in index.focus.values())  # face at the far left
    dataset = TrainDataset(epoch, spec, seed=0, index=index)
    keys = [[(i, 0) for i in b] for b in epoch_batches(epoch.bucket_of, 2, 0, 0)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=keys, collate_fn=collate, num_workers=1, timeout=60)
    for batch in loader:
        assert batch["crop_top_left"].tolist() == [[0, 0], [0, 0]]
