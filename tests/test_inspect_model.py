"""`trainer inspect-model`: the block tree the window offers for layer selection."""

import json

import pytest

from trainer.cli import main
from trainer.job import JobError, ModelSpec
from trainer.inspect_model import inspect_model


def test_tree_matches_the_real_model(demo_template):
    from diffusers import UNet2DConditionModel

    tree = inspect_model(ModelSpec(path=str(demo_template / "model")))
    unet = UNet2DConditionModel.from_pretrained(demo_template / "model" / "unet")
    modules = dict(unet.named_modules())
    assert tree["family"] == "sd1"
    node = tree["components"]["unet"]
    assert node["params"] == sum(p.numel() for p in unet.parameters())
    names = [c["name"] for c in node["children"]]
    assert "down_blocks.0" in names and "mid_block" in names and "up_blocks.1" in names

    def walk(n):
        for child in n.get("children", []):
            assert child["name"] in modules, child["name"]
            assert child["params"] == sum(p.numel() for p in modules[child["name"]].parameters())
            walk(child)

    walk(node)
    assert sum(c["params"] for c in node["children"]) == node["params"]


def test_cli_prints_json(demo_template, capsys):
    assert main(["inspect-model", str(demo_template / "model")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["components"]) == {"unet", "text_encoder"}


def test_missing_model_is_one_line(tmp_path):
    with pytest.raises(JobError, match="model.path"):
        inspect_model(ModelSpec(path=str(tmp_path / "none")))
