"""Every model family on its tiny demo model: detection, full fine-tuning with a frozen block, and a text-encoder
LoRA that loads in the family's diffusers pipeline."""

import json

import numpy as np
import pytest
import torch

from trainer.cli import main
from trainer.demo import build_demo
from trainer.families.detect import detect_family
from trainer.job import ModelSpec

# family -> (the first block of its denoiser, whether the single-file layout exists for it)
FAMILIES = {"sd1": ("down_blocks.0", True), "sd2": ("down_blocks.0", True), "sdxl": ("down_blocks.0", True),
            "sd3": ("transformer_blocks.0", False), "flux": ("transformer_blocks.0", False)}
QUIET = ["--set", "validation.prompts=[]", "--set", "output.checkpoint_every=0"]


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    root = tmp_path_factory.mktemp("family-demos")
    return {family: build_demo(root / family, steps=3, family=family) for family in FAMILIES}


def _pipe(path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _render(pipe) -> np.ndarray:
    return pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_full_finetune_keeps_a_frozen_block_and_exports_a_pipeline(demos, family, tmp_path):
    job = demos[family]
    model = job.parent / "model"
    assert detect_family(ModelSpec(path=str(model))) == family
    block, single_file = FAMILIES[family]
    out = tmp_path / "run"
    assert main(["run", str(job), *QUIET, "--set", f"output.output_dir={out}", "--set", "network.kind=full",
                 "--set", f'layers.freeze_blocks=["{block}"]']) == 0  # save_single_file on: where a layout exists

    base, tuned = _pipe(model), _pipe(out / "final" / "diffusers")
    denoiser = "transformer" if hasattr(base, "transformer") else "unet"
    before, after = getattr(base, denoiser).state_dict(), getattr(tuned, denoiser).state_dict()
    frozen = [k for k in before if k.startswith(block + ".")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen), "a frozen block moved"
    assert any(not torch.equal(before[k], after[k]) for k in before if k not in frozen)
    assert not np.array_equal(_render(base), _render(tuned))
    assert (out / "final" / "demo_lora.safetensors").is_file() == single_file


@pytest.mark.parametrize("family", FAMILIES)
def test_unet_and_text_encoder_lora_load_in_the_family_pipeline_and_change_the_image(demos, family, tmp_path):
    job = demos[family]
    out = tmp_path / "run"
    assert main(["run", str(job), *QUIET, "--set", f"output.output_dir={out}", "--set", "text_encoder.mode=lora",
                 "--set", "text_encoder.learning_rate=0.01"]) == 0
    pipe = _pipe(job.parent / "model")
    encoders = [name for name in ("text_encoder", "text_encoder_2")  # the CLIPs (Flux's second one is T5)
                if type(getattr(pipe, name, None)).__name__.startswith("CLIP")]

    def encoded():
        ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        return [getattr(pipe, name)(ids)[0] for name in encoders]

    before, base_image = encoded(), _render(pipe)
    pipe.load_lora_weights(out / "final")
    after = encoded()
    assert np.abs(_render(pipe) - base_image).mean() > 1e-4, "the LoRA must change the image"
    for name, b, a in zip(encoders, before, after):
        assert (a - b).abs().max() > 1e-5, f"the {name} LoRA did not load"
    if (out / "final" / "demo_lora.safetensors").is_file():  # the kohya file gives the same encoders
        pipe.unload_lora_weights()
        pipe.load_lora_weights(out / "final", weight_name="demo_lora.safetensors")
        for a, k in zip(after, encoded()):
            torch.testing.assert_close(k, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_trains_from_a_single_file_checkpoint_with_a_local_config(demos, family, tmp_path):
    from trainer.export.single_file import write_single_file

    model = demos[family].parent / "model"
    checkpoint = write_single_file(_pipe(model), tmp_path / "model.safetensors", {})
    assert detect_family(ModelSpec(path=str(checkpoint))) == family  # from the checkpoint's keys alone
    out = tmp_path / "run"
    assert main(["run", str(demos[family]), *QUIET, "--set", f"output.output_dir={out}",
                 "--set", f"model.path={checkpoint}", "--set", f"model.config={model}",
                 "--set", "schedule.max_steps=2"]) == 0
    pipe = _pipe(model)
    base = _render(pipe)
    pipe.load_lora_weights(out / "final")
    assert np.abs(_render(pipe) - base).mean() > 1e-4


@pytest.mark.parametrize("family,keys", [("sdxl", {"clip_l", "clip_g"}), ("sd3", {"clip_l", "clip_g"}),
                                         ("flux", {"emb_params"})])
def test_new_token_trains_on_every_clip_of_the_family(demos, family, keys, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    token = [{"token": "<shape>", "init_pattern": "^[a-z]</w>$"}]
    assert main(["run", str(demos[family]), *QUIET, "--set", f"output.output_dir={out}", "--set", "network.kind=none",
                 "--set", f"tokens.new={json.dumps(token)}", "--set", "schedule.max_steps=2"]) == 0
    files = list((out / "final" / "embeddings").glob("*.safetensors"))
    assert len(files) == 1
    saved = load_file(files[0])
    assert set(saved) == keys and all(bool(torch.isfinite(t).all()) for t in saved.values())
