"""bench/preset_table.py: the README's preset table is the generated one, with a row for every shipped preset, and no
preset named for a memory tier is over it by its estimate."""

import re
import sys
from pathlib import Path

import pytest

from trainer.job import PRESETS_DIR

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import preset_table  # noqa: E402


def _readme_rows() -> dict[str, list[str]]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split(preset_table.BEGIN, 1)[1].split(preset_table.END, 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.strip().splitlines()[2:]]
    return {row[0].strip("`"): row for row in rows}


def test_the_readme_table_has_every_preset_and_each_tier_holds():
    rows = _readme_rows()
    assert set(rows) == {p.stem for p in PRESETS_DIR.glob("*.json")} - {"demo"}
    for preset, row in rows.items():
        tier = preset_table.tier_gb(preset)
        assert row[7] == (f"{tier} GB" if tier else "-")
        peak = float(re.fullmatch(r"([\d.]+) GiB", row[6]).group(1))
        assert row[8] == ("-" if tier is None else "yes"), f"{preset}: estimated {peak} GiB, over its {tier} GB"


def test_the_table_goes_between_its_markers_and_nowhere_else():
    text = f"intro\n{preset_table.BEGIN}\nold\n{preset_table.END}\nafter\n"
    assert preset_table.replace_table(text, "| new |") == f"intro\n{preset_table.BEGIN}\n| new |\n" \
                                                          f"{preset_table.END}\nafter\n"
    with pytest.raises(ValueError, match="markers"):
        preset_table.replace_table("no markers", "| new |")


@pytest.mark.parametrize("name,tier", [("sdxl_lora_12gb", 12), ("flux_dev_lora_40gb", 40), ("sd21_lora", None),
                                       ("sd15_finetune", None)])
def test_the_tier_is_read_from_the_preset_name(name, tier):
    assert preset_table.tier_gb(name) == tier
