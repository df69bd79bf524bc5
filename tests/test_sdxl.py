"""SDXL: detection, micro-conditioning from each sample's sizes, and a LoRA trained end to end on a tiny model
whose exported files load in diffusers' SDXL pipeline."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora_checks import assert_both_lora_files_change_the_image
from trainer.cli import main
from trainer.data.dataset import collate
from trainer.families.detect import detect_family, family_module
from trainer.job import JobError, ModelSpec, load_job


def test_detects_sdxl_from_a_folder_and_from_checkpoint_keys(tmp_path):
    folder = tmp_path / "xl"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline", "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}))
    assert detect_family(ModelSpec(path=str(folder))) == "sdxl"

    refiner = tmp_path / "refiner"
    refiner.mkdir()
    (refiner / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": [None, None],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}))
    with pytest.raises(JobError, match="not a supported family"):
        detect_family(ModelSpec(path=str(refiner)))

    single = tmp_path / "xl.safetensors"
    save_file({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.ones(2),
               "conditioner.embedders.1.model.ln_final.weight": torch.ones(2),
               "model.diffusion_model.out.0.weight": torch.ones(2)}, single)
    assert detect_family(ModelSpec(path=str(single))) == "sdxl"


def test_detects_sdxl_from_the_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    repo = tmp_path / "models--someone--my-xl"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert detect_family(ModelSpec(path="someone/my-xl")) == "sdxl"
    assert detect_family(ModelSpec(path="someone/not-downloaded")) == "sd1"


def test_time_ids_are_each_samples_original_size_crop_and_target():
    # Two 64x64-bucket samples: a 96x80 (w x h) image resized to 77x64 and centre-cropped 6 px from the
    # left, and an 80x96 one resized to 64x77 and cropped 6 px from the top. Sizes are (h, w), crops (top, left).
    samples = [{"weight": 1.0, "skipped": [], "caption": "a", "original_size": torch.tensor((80, 96)),
                "crop_top_left": torch.tensor((0, 6)), "target_size": torch.tensor((64, 64))},
               {"weight": 1.0, "skipped": [], "caption": "b", "original_size": torch.tensor((96, 80)),
                "crop_top_left": torch.tensor((6, 0)), "target_size": torch.tensor((64, 64))}]
    time_ids = family_module("sdxl").conditioning_extras(collate(samples))["time_ids"]
    assert time_ids.dtype == torch.float32
    assert time_ids.tolist() == [[80, 96, 0, 6, 64, 64], [96, 80, 6, 0, 64, 64]]
    assert family_module("sd1").conditioning_extras(collate(samples)) == {}


@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory):
    from trainer.demo import build_demo

    root = tmp_path_factory.mktemp("sdxl") / "demo"
    job = build_demo(root, steps=4, family="sdxl")
    assert load_job(job).model.family == "auto"
    assert main(["run", str(job), "--set", 'validation.prompts=["a red circle"]', "--set", "validation.steps=2",
                 "--set", "validation.at_start=false", "--set", "output.checkpoint_every=0"]) == 0
    return root


def test_sdxl_lora_trains_and_both_files_load_in_the_sdxl_pipeline(sdxl_run):
    from diffusers import StableDiffusionXLPipeline

    run = sdxl_run / "run"
    assert (run / "samples" / "step-000004-00.png").is_file()
    kohya = run / "final" / "demo_lora.safetensors"
    with safe_open(str(kohya), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        alphas = {float(f.get_tensor(k)) for k in keys if k.endswith(".alpha")}
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert any(k.startswith("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.") for k in keys)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and alphas == {4.0}  # the demo job's alpha

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_run / "model", add_watermarker=False)
    assert_both_lora_files_change_the_image(pipe, run / "final", "demo_lora.safetensors")


def test_validation_decodes_like_the_pipeline(sdxl_run):
    """The validation wrapper (VAE decode kept out of autocast) gives the pipeline's own image."""
    family = family_module("sdxl")
    parts = family.load(ModelSpec(path=str(sdxl_run / "model")))
    wrapped = family.validation_pipeline(parts, parts.denoiser)
    args = dict(prompt="a green square", num_inference_steps=2, height=64, width=64, output_type="np")
    ours = wrapped(**args, generator=torch.Generator().manual_seed(1)).images[0]
    theirs = wrapped.pipe(**args, generator=torch.Generator().manual_seed(1)).images[0]
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    assert wrapped("a green square", num_inference_steps=2, height=64, width=64).images[0].size == (64, 64)


def test_embedding_dropout_zeroes_each_encoders_part_with_its_probability():
    from types import SimpleNamespace

    from trainer.job import DiffusionSpec

    one = SimpleNamespace(config=SimpleNamespace(hidden_size=3))
    parts = SimpleNamespace(text_encoder=SimpleNamespace(one=one))
    cond = {"encoder_hidden_states": torch.ones(4000, 2, 5), "pooled": torch.ones(4000, 6)}
    spec = DiffusionSpec(encoder_dropout=[0.5, 0.0], pooled_dropout=0.25)
    family = family_module("sdxl")
    out = family.drop_conditioning(parts, cond, torch.Generator().manual_seed(0), spec)
    first, second = out["encoder_hidden_states"][..., :3], out["encoder_hidden_states"][..., 3:]
    dropped = (first.abs().sum(dim=(1, 2)) == 0).float().mean().item()
    assert abs(dropped - 0.5) < 0.04 and bool((second == 1).all())
    assert abs((out["pooled"].abs().sum(dim=1) == 0).float().mean().item() - 0.25) < 0.04
    assert family.drop_conditioning(parts, cond, torch.Generator(), DiffusionSpec()) is cond
