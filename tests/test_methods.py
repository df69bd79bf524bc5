"""The training methods end to end on the tiny SD1.5 demo: full fine-tuning with EMA, layer freezing, DreamBooth
with prior preservation and a text-encoder LoRA, textual inversion, and resume for each of them."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lora_checks import SAME_IMAGE_ATOL, render
from trainer.cli import main
from trainer.demo import build_demo
from trainer.events import read_events

ROOT = Path(__file__).resolve().parent.parent
QUIET = ["--set", "validation.prompts=[]"]


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    """One demo folder per method, built once; tests copy them."""
    root = tmp_path_factory.mktemp("method-demos")
    return {method: build_demo(root / method, steps=4, method=method).parent
            for method in ("full", "dreambooth", "textual_inversion")}


def _copy(demos, method: str, tmp_path: Path) -> Path:
    """A private copy of a demo whose job points into it (the class images folder too)."""
    from trainer.job import load_job, save_job

    root = tmp_path / method
    shutil.copytree(demos[method], root)
    job = load_job(root / "job.json")
    job.model.path = str(root / "model")
    job.dataset.folders[0].path = str(root / "dataset")
    job.output.output_dir = str(root / "run")
    if job.prior.enabled:
        job.prior.class_dir = str(root / "class_images")
    save_job(job, root / "job.json")
    return root / "job.json"


def _losses(run: Path) -> dict[int, float]:
    events, _ = read_events(run / "events.jsonl")
    return {e["step"]: e["loss"] for e in events if e["type"] == "step"}


def _pipe(path: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_full_finetune_exports_the_ema_as_a_pipeline_folder_and_a_single_file(demos, tmp_path):
    job = _copy(demos, "full", tmp_path)
    assert main(["run", str(job), *QUIET]) == 0
    run = job.parent / "run"
    base = _pipe(job.parent / "model")
    tuned = _pipe(run / "final" / "diffusers")
    weights, ema = load_file(run / "checkpoints" / "step-4" / "weights.safetensors"), \
        load_file(run / "checkpoints" / "step-4" / "ema.safetensors")
    exported = tuned.unet.state_dict()
    changed = [k for k in weights if not torch.equal(weights[k], ema[k])]
    assert changed, "the EMA must differ from the raw weights"
    for key in changed[:20]:
        torch.testing.assert_close(exported[key.removeprefix("unet.")], ema[key])  # the EMA is what is exported
    assert not np.array_equal(render(tuned), render(base))

    from diffusers import StableDiffusionPipeline

    single = StableDiffusionPipeline.from_single_file(
        run / "final" / "demo_full.safetensors", config=str(run / "final" / "diffusers"), local_files_only=True,
        safety_checker=None)
    single.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(render(single), render(tuned), atol=1e-5)


def test_frozen_blocks_stay_bit_identical_and_check_counts_what_trains(demos, tmp_path):
    job = _copy(demos, "full", tmp_path)
    settings = ["--set", 'layers.freeze_blocks=["down_blocks.0", "mid_block"]', "--set", "ema.enabled=false"]
    check = subprocess.run([sys.executable, "-m", "trainer", "check", str(job), *settings], cwd=ROOT,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    counted = int(re.search(r"trainable: ([\d,]+) parameters", check.stdout).group(1).replace(",", ""))
    assert main(["run", str(job), *QUIET, *settings]) == 0

    before = _pipe(job.parent / "model").unet.state_dict()
    after = _pipe(job.parent / "run" / "final" / "diffusers").unet.state_dict()
    frozen = [k for k in before if k.startswith(("down_blocks.0.", "mid_block."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert sum(before[k].numel() for k in changed) == counted


def test_lora_on_selected_blocks_only(demo_job):
    assert main(["run", str(demo_job), *QUIET, "--set", 'layers.train_blocks=["up_blocks.1"]']) == 0
    keys = load_file(demo_job.parent / "run" / "final" / "pytorch_lora_weights.safetensors").keys()
    assert keys and all(k.startswith("unet.up_blocks.1.") for k in keys)


def test_prior_loss_term_changes_the_update_and_class_images_are_reused(demos, tmp_path):
    job = _copy(demos, "dreambooth", tmp_path)
    one_step = [*QUIET, "--set", "schedule.max_steps=1", "--set", "output.checkpoint_every=0"]
    finals = {}
    for name, settings in (("none", ["prior.enabled=false"]), ("zero", ["prior.loss_weight=0"]),
                           ("one", ["prior.loss_weight=1"])):
        out = tmp_path / f"run-{name}"
        sets = [a for s in settings for a in ("--set", s)]
        assert main(["run", str(job), *one_step, *sets, "--set", f"output.output_dir={out}"]) == 0
        finals[name] = load_file(out / "final" / "pytorch_lora_weights.safetensors")
    class_images = sorted((job.parent / "class_images").glob("*.png"))
    assert len(class_images) == 6 and all(p.with_suffix(".txt").read_text().strip() == "a shape"
                                          for p in class_images)
    for key in finals["none"]:
        torch.testing.assert_close(finals["zero"][key], finals["none"][key], rtol=0, atol=0)
    assert any(not torch.equal(finals["one"][k], finals["none"][k]) for k in finals["none"])


def test_dreambooth_text_encoder_lora_loads_in_diffusers(demos, tmp_path):
    job = _copy(demos, "dreambooth", tmp_path)
    assert main(["run", str(job), *QUIET]) == 0
    final = job.parent / "run" / "final"
    keys = load_file(final / "pytorch_lora_weights.safetensors").keys()
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("unet.") for k in keys)
    pipe = _pipe(job.parent / "model")
    ids = pipe.tokenizer(["a sks shape"], return_tensors="pt").input_ids
    before = pipe.text_encoder(ids)[0]
    base_image = render(pipe)
    pipe.load_lora_weights(final)
    assert (pipe.text_encoder(ids)[0] - before).abs().max() > 1e-4, "the text-encoder LoRA must load"
    assert not np.array_equal(render(pipe), base_image)


def test_textual_inversion_embedding_loads_in_a_fresh_pipeline(demos, tmp_path):
    job = _copy(demos, "textual_inversion", tmp_path)
    assert main(["run", str(job), *QUIET]) == 0
    files = list((job.parent / "run" / "final" / "embeddings").glob("*.safetensors"))
    assert len(files) == 1 and set(load_file(files[0])) == {"emb_params"}
    trained = load_file(files[0])["emb_params"]

    def image_with(embedding):
        pipe = _pipe(job.parent / "model")
        pipe.load_textual_inversion(embedding, token="<shape>")
        return pipe("a red <shape> on a blue background", num_inference_steps=3, height=64, width=64,
                    output_type="np", generator=torch.Generator().manual_seed(0)).images[0]

    pipe = _pipe(job.parent / "model")
    vocab = pipe.tokenizer.get_vocab()
    rows = [i for token, i in vocab.items() if re.search(r"^[a-z]</w>$", token)]
    initial = pipe.text_encoder.get_input_embeddings().weight[rows].mean(0, keepdim=True).detach()
    assert not torch.allclose(trained, initial), "training must move the new embedding"
    from_file = image_with(str(files[0]))
    np.testing.assert_allclose(from_file, image_with(trained), rtol=0, atol=SAME_IMAGE_ATOL)
    assert not np.array_equal(from_file, image_with(initial))


@pytest.mark.parametrize("method", ["full", "dreambooth", "textual_inversion"])
def test_resume_matches_an_uninterrupted_run(demos, tmp_path, method):
    job = _copy(demos, method, tmp_path)
    every_2 = [*QUIET, "--set", "output.checkpoint_every=2", "--set", "output.keep_last=5"]
    whole = tmp_path / "whole"
    assert main(["run", str(job), *every_2, "--set", f"output.output_dir={whole}"]) == 0

    run = job.parent / "run"
    assert main(["run", str(job), *every_2]) == 0
    # A crash right after the step-2 checkpoint: later checkpoints and the final files never got written.
    for later in ("step-4",):
        shutil.rmtree(run / "checkpoints" / later)
    shutil.rmtree(run / "final")
    (run / "events.jsonl").unlink()
    assert main(["run", str(job), *every_2, "--resume"]) == 0

    assert sorted(_losses(run)) == [3, 4]
    for step, loss in _losses(run).items():
        assert loss == pytest.approx(_losses(whole)[step], rel=1e-5)
    a, b = load_file(whole / "checkpoints" / "step-4" / "weights.safetensors"), \
        load_file(run / "checkpoints" / "step-4" / "weights.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    if method == "full":
        ea, eb = load_file(whole / "checkpoints" / "step-4" / "ema.safetensors"), \
            load_file(run / "checkpoints" / "step-4" / "ema.safetensors")
        for key in ea:
            torch.testing.assert_close(ea[key], eb[key], rtol=1e-5, atol=1e-6)


def test_dreambooth_full_finetune_with_text_encoder_8bit_adam_and_checkpointing(demos, tmp_path):
    job = _copy(demos, "dreambooth", tmp_path)
    assert main(["run", str(job), *QUIET, "--set", "schedule.max_steps=2", "--set", "network.kind=full",
                 "--set", "text_encoder.mode=full", "--set", "optimizer.name=adamw8bit",
                 "--set", "precision.gradient_checkpointing=true", "--set", "output.save_single_file=false"]) == 0
    base, tuned = _pipe(job.parent / "model"), _pipe(job.parent / "run" / "final" / "diffusers")
    for name in ("unet", "text_encoder"):
        before, after = getattr(base, name).state_dict(), getattr(tuned, name).state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before), f"the {name} did not train"


def test_text_encoder_stops_after_its_fraction_while_the_unet_trains_on(demo_job):
    run = demo_job.parent / "run"
    assert main(["run", str(demo_job), *QUIET, "--set", "text_encoder.mode=lora", "--set", "text_encoder.stop_fraction=0.5",
                 "--set", "text_encoder.learning_rate=0.01", "--set", "schedule.max_steps=4",
                 "--set", "output.checkpoint_every=1", "--set", "output.keep_last=10"]) == 0
    steps = {n: load_file(run / "checkpoints" / f"step-{n}" / "weights.safetensors") for n in (1, 2, 4)}
    te = [k for k in steps[4] if k.startswith("text_encoder.")]
    unet = [k for k in steps[4] if k.startswith("unet.") and "lora_B" in k]
    assert te and unet
    assert any(not torch.equal(steps[1][k], steps[2][k]) for k in te), "the text encoder trains before the stop"
    assert all(torch.equal(steps[2][k], steps[4][k]) for k in te), "the text encoder moved after its stop step"
    assert any(not torch.equal(steps[2][k], steps[4][k]) for k in unet), "the UNet must train on"


def test_pivotal_tuning_writes_a_lora_and_an_embedding(demos, tmp_path):
    job = _copy(demos, "textual_inversion", tmp_path)
    assert main(["run", str(job), *QUIET, "--set", "schedule.max_steps=2", "--set", "network.kind=lora"]) == 0
    final = job.parent / "run" / "final"
    assert (final / "pytorch_lora_weights.safetensors").is_file() and (final / "demo_ti.safetensors").is_file()
    assert len(list((final / "embeddings").glob("*.safetensors"))) == 1
