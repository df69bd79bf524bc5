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


def test_tree_names_are_block_names(demo_template):
    """Any name the tree shows, put in layers.train_blocks, trains exactly that block."""
    from trainer.job import from_sparse
    from trainer.methods.layers import select, table_from_folder

    model = demo_template / "model"
    table = table_from_folder(model, "unet")
    tree = inspect_model(ModelSpec(path=str(model)))

    def walk(node):
        for child in node.get("children", []):
            job = from_sparse({"network": {"kind": "full"}, "layers": {"train_blocks": [child["name"]]}})
            chosen = set(select(table, job))
            assert chosen == {m.name for m in table if m.name.startswith(child["name"] + ".")
                              or m.name == child["name"]}
            assert sum(m.params for m in table if m.name in chosen) == child["params"]
            walk(child)

    walk(tree["components"]["unet"])


def test_sdxl_lists_its_second_text_encoder(tmp_path):
    from transformers import CLIPTextModelWithProjection

    from trainer.demo import build_tiny_sdxl

    model = build_tiny_sdxl(tmp_path / "model")
    tree = inspect_model(ModelSpec(path=str(model)))
    assert tree["family"] == "sdxl" and tree["denoiser"] == "unet"
    assert set(tree["components"]) == {"unet", "text_encoder", "text_encoder_2"}
    encoder = CLIPTextModelWithProjection.from_pretrained(model / "text_encoder_2")
    node = tree["components"]["text_encoder_2"]
    assert node["params"] == sum(p.numel() for p in encoder.parameters())
    assert "text_projection" in [c["name"] for c in node["children"]]


def test_sd3_components_from_configs(tmp_path):
    """SD3: the transformer and three text encoders, from their configs alone (no weights needed)."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
                                        pos_embed_max_size=16)
    transformer.save_config(tmp_path / "transformer")
    clip = CLIPTextConfig(hidden_size=16, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                          projection_dim=16)
    t5 = T5Config(d_model=32, d_ff=37, num_layers=2, num_heads=4, d_kv=8, vocab_size=100)
    for name, config in (("text_encoder", clip), ("text_encoder_2", clip), ("text_encoder_3", t5)):
        config.save_pretrained(tmp_path / name)
    index = {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
             "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "text_encoder_3": ["transformers", "T5EncoderModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))

    tree = inspect_model(ModelSpec(path=str(tmp_path), family="sd3"))
    components = tree["components"]
    assert tree["denoiser"] == "transformer"
    assert set(components) == {"transformer", "text_encoder", "text_encoder_2", "text_encoder_3"}
    assert components["transformer"]["params"] == sum(p.numel() for p in transformer.parameters())
    names = [c["name"] for c in components["transformer"]["children"]]
    assert "transformer_blocks.0" in names and "transformer_blocks.1" in names
    assert components["text_encoder"]["params"] == sum(
        p.numel() for p in CLIPTextModelWithProjection(clip).parameters())
    # T5 ties its input embedding to `shared`: the tree counts it once, so the children add up to the total.
    encoder = components["text_encoder_3"]
    assert encoder["params"] == sum(p.numel() for p in T5EncoderModel(t5).parameters())
    assert sum(c["params"] for c in encoder["children"]) == encoder["params"]
