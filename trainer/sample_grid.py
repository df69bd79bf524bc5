"""One PNG of a `trainer sample` run: rows are prompts, columns the base model and each LoRA at each strength, with
every setting that made it in the PNG's text metadata (no torch: PIL only).

The settings are one JSON text chunk under `GRID_KEY`, so a grid found on disk months later says how to render it
again; `read_settings` reads it back.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

GRID_KEY = "sdtrainer-grid"
MIN_CELL = 128  # demo images are 64 px: smaller cells leave no room for their labels
HEADER = 28  # the column labels' row
LEFT = 160  # the prompts' column
GAP = 4  # white between cells, so noise-like images stay apart


def write_grid(path: Path, cells: dict[tuple[int, int], Path], prompts: list[str], labels: list[str],
               settings: dict) -> Path:
    """Cells keyed (row, column); every image the same size, as one render's are."""
    first = Image.open(next(iter(cells.values())))
    width, height = first.size
    zoom = max(1, -(-MIN_CELL // min(width, height)))  # whole-number enlargement keeps pixels sharp
    cw, ch = width * zoom + GAP, height * zoom + GAP  # a cell's pitch
    grid = Image.new("RGB", (LEFT + cw * len(labels), HEADER + ch * len(prompts)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for column, label in enumerate(labels):
        draw.text((LEFT + column * cw + 4, 6), _fit(draw, font, label, cw - GAP - 8), fill="black", font=font)
    for row, prompt in enumerate(prompts):
        draw.text((4, HEADER + row * ch + 4), _fit(draw, font, prompt, LEFT - 8), fill="black", font=font)
    for (row, column), image_path in cells.items():
        with Image.open(image_path) as image:
            cell = image.convert("RGB").resize((cw - GAP, ch - GAP), Image.Resampling.NEAREST)
        grid.paste(cell, (LEFT + column * cw, HEADER + row * ch))
    info = PngInfo()
    info.add_text(GRID_KEY, json.dumps(settings))
    info.add_text("Software", "sdtrainer")
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path, pnginfo=info)
    return path


def read_settings(path: Path) -> dict:
    """The settings a grid was rendered with; a one-line ValueError naming the file when it carries none."""
    with Image.open(path) as image:
        text = getattr(image, "text", {}).get(GRID_KEY)
    if text is None:
        raise ValueError(f"{path}: no {GRID_KEY} metadata (not a grid written by trainer sample)")
    return json.loads(text)


def _fit(draw: ImageDraw.ImageDraw, font, text: str, width: int) -> str:
    """`text` shortened with an ellipsis until it fits `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."
