"""Real-size model folders without weights: the published configs of SD1.5, SD2.1, SDXL, SD3.5, FLUX.1-dev and
Stable Cascade stage C, kept in resources/real_size, with stand-in tokenizers; what `estimate` and `check` read.

The tokenizers spell any caption with a tiny vocabulary (as the demo's do) at the real maximum lengths (77 for
CLIP, 256 for SD3's T5, 512 for Flux's): the vocabulary does not change memory, the sequence length does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .families.table import FAMILIES
from .job import JobError

CONFIGS = Path(__file__).resolve().parent.parent / "resources" / "real_size"
# The configs each family's real-size demo can write, its default first.
MODELS = {"sd1": ("sd15",), "sd2": ("sd21",), "sdxl": ("sdxl-base",), "sd3": ("sd35-large", "sd35-medium"),
          "flux": ("flux1-dev",), "cascade": ("cascade-c",)}
# The families' training resolution (the models' own): the real-size demo job trains at it.
RESOLUTION = {"sd15": 512, "sd21": 768, "sdxl-base": 1024, "sd35-large": 1024, "sd35-medium": 1024,
              "flux1-dev": 1024, "cascade-c": 1024}


def model_name(family: str, name: str) -> str:
    """The configs to write: `name`, or the family's default when `name` is "default"; a JobError otherwise."""
    names = MODELS[family]
    if name == "default":
        return names[0]
    if name not in names:
        raise JobError(f"--real-size: {name!r} is not a {family} model here; choose {', '.join(names)}")
    return name


def build_real_size(path: Path, family: str, name: str) -> Path:
    """Write the model folder of `name` (configs, model_index.json, stand-in tokenizers; no weights) at `path`."""
    path = Path(path)
    shutil.copytree(CONFIGS / name, path)
    index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    for component, entry in index.items():
        if component.startswith("tokenizer") and isinstance(entry, list):
            _write_tokenizer(path / component, entry[1], FAMILIES[family].t5_tokens)
    return path


def _write_tokenizer(folder: Path, class_name: str, t5_length: int) -> None:
    from .demo import t5_tokenizer, write_clip_tokenizer

    if class_name == "CLIPTokenizer":
        write_clip_tokenizer(folder)  # model_max_length 77, as CLIP's
        return
    tokenizer = t5_tokenizer()
    tokenizer.model_max_length = t5_length
    tokenizer.save_pretrained(folder)
