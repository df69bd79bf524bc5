"""Stable Cascade stage C: detection, Würstchen's noise by hand, the EfficientNet encoder's layout, LoRA targeting,
a LoRA and a full fine-tune trained end to end on the tiny model, and the project's own LoRA loader."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from trainer.export import cascade_lora
from trainer.cli import main
from trainer.families.detect import detect_family, family_module
from trainer.job import DiffusionSpec, JobError, ModelSpec, load_job

cascade = family_module("cascade")
ATTENTION = {"to_q", "to_k", "to_v", "to_out.0"}


def test_detects_the_prior_and_the_combined_pipeline(tmp_path):
    for name in ("StableCascadePriorPipeline", "StableCascadeCombinedPipeline"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model_index.json").write_text(json.dumps({"_class_name": name}))
        assert detect_family(ModelSpec(path=str(folder))) == "cascade"
    decoder_only = tmp_path / "stage_b"
    decoder_only.mkdir()
    (decoder_only / "model_index.json").write_text(json.dumps({"_class_name": "StableCascadeDecoderPipeline"}))
    with pytest.raises(JobError, match="not a supported family"):
        detect_family(ModelSpec(path=str(decoder_only)))


def test_noisy_input_and_target_by_hand_for_one_sample():
    from diffusers import DDPMWuerstchenScheduler

    scheduler = DDPMWuerstchenScheduler()
    parts = SimpleNamespace(noise_scheduler=scheduler)
    latents = torch.randn(1, 16, 3, 4, generator=torch.Generator().manual_seed(1))
    noisy, ratio, target, weight = cascade.noisy_input_and_target(parts, latents, torch.Generator().manual_seed(5),
                                                                  DiffusionSpec())

    gen = torch.Generator().manual_seed(5)  # the same draws in GDF's order: the noise, then t
    noise = torch.randn(latents.shape, generator=gen)
    t = min(max(1 - torch.rand(1, generator=gen).item() + 0.001, 0.001), 1.0)
    s = 0.008
    alpha_bar = math.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    assert 1e-4 < alpha_bar < 0.9999  # unclamped, so the prior is told t itself
    torch.testing.assert_close(noisy, math.sqrt(alpha_bar) * latents + math.sqrt(1 - alpha_bar) * noise)
    torch.testing.assert_close(target, noise)
    assert ratio.item() == pytest.approx(t, abs=1e-5)
    assert weight.item() == pytest.approx(1 - alpha_bar, abs=1e-6)  # P2: 1 / (1 + SNR)
    # The sampler's own schedule: what stage C learns to undo is what DDPMWuerstchenScheduler adds.
    torch.testing.assert_close(noisy, scheduler.add_noise(latents, noise, torch.tensor([t])))


def test_efficientnet_v2_s_has_torchvisions_layout():
    with torch.device("meta"):
        encoder = cascade.EfficientNetEncoder(cascade.EFFICIENTNET_V2_S)
    # torchvision's efficientnet_v2_s has 21,458,488 parameters, 1,281,000 of them in its ImageNet classifier.
    assert sum(p.numel() for p in encoder.backbone.parameters()) == 21_458_488 - 1_281_000
    keys = set(encoder.state_dict())
    for key in ("backbone.0.0.weight", "backbone.1.1.block.0.1.running_var", "backbone.2.0.block.1.0.weight",
                "backbone.4.0.block.2.fc1.weight", "backbone.6.14.block.3.1.bias", "backbone.7.0.weight",
                "mapper.0.weight", "mapper.1.running_mean"):
        assert key in keys
    assert "mapper.1.weight" not in keys  # Stability's BatchNorm has no affine


def test_a_missing_encoder_is_a_job_error(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(JobError, match="model.path: .*effnet_encoder.safetensors not found"):
        cascade.load_effnet(ModelSpec(path=str(tmp_path)))


@pytest.fixture(scope="module")
def cascade_run(tmp_path_factory):
    """The tiny Stable Cascade demo (with its stage B), trained 4 steps with a LoRA and one validation image."""
    from trainer.demo import build_demo

    root = tmp_path_factory.mktemp("cascade") / "demo"
    job = build_demo(root, steps=4, family="cascade")
    assert load_job(job).model.decoder == str(root / "model" / "decoder")
    assert main(["run", str(job), "--set", 'validation.prompts=["a red circle"]', "--set", "validation.steps=2",
                 "--set", "validation.at_start=false", "--set", "output.checkpoint_every=0"]) == 0
    return root


def test_lora_attaches_only_to_the_filtered_modules(cascade_run):
    from peft.tuners.tuners_utils import BaseTunerLayer

    from trainer.methods import trainable

    job = load_job(cascade_run / "job.json")
    parts = cascade.load(job.model)
    tr = trainable.setup(cascade, parts, job, total_steps=1)
    adapted = {name for name, m in parts.denoiser.named_modules() if isinstance(m, BaseTunerLayer)}
    attention = {f"{blocks}.{i}.2.attention.{p}" for blocks in ("down_blocks", "up_blocks") for i in (0, 1)
                 for p in ATTENTION}
    assert adapted == attention  # Stability's ['.attn'] filter: q, k, v, out of each attention block
    assert all(".lora_" in key for key in tr.params)
    assert all(not p.requires_grad for n, p in parts.denoiser.named_parameters() if ".lora_" not in n)

    job.layers.include_patterns = ["up_blocks.1.*"]
    fresh = cascade.load(job.model)
    trainable.setup(cascade, fresh, job, total_steps=1)
    adapted = {name for name, m in fresh.denoiser.named_modules() if isinstance(m, BaseTunerLayer)}
    assert adapted == {f"up_blocks.1.2.attention.{p}" for p in ATTENTION}


def test_lora_run_exports_a_prior_lora_and_stage_b_validation_images(cascade_run):
    final = cascade_run / "run" / "final"
    assert [p.name for p in final.iterdir()] == ["pytorch_lora_weights.safetensors"]  # no kohya file
    with safe_open(str(final / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
    assert len(keys) == 32 and all(k.startswith("prior.") and ".attention.to_" in k for k in keys)
    adapter = json.loads(metadata["lora_adapter_metadata"])
    assert adapter["prior.r"] == 4 and adapter["prior.lora_alpha"] == 4.0 and len(adapter["prior.target_modules"]) == 16
    sample = np.asarray(Image.open(cascade_run / "run" / "samples" / "step-000004-00.png"))
    assert sample.shape == (128, 128, 3)
    # Stage B's image of the 4x4 stage C latents, not the 16 flat squares of a picture of the latents.
    assert len(np.unique(sample.reshape(-1, 3), axis=0)) > 100
    with pytest.raises(JobError, match="output.save_kohya"):
        cascade.kohya_state_dict({}, 4.0)


def test_the_exported_file_changes_a_fresh_prior_and_remove_lora_restores_it(cascade_run):
    from peft.tuners.tuners_utils import BaseTunerLayer

    prior = cascade.load_pipelines(str(cascade_run / "model"))[0].prior.eval()
    gen = torch.Generator().manual_seed(0)
    inputs = dict(sample=torch.randn(2, 16, 4, 4, generator=gen), timestep_ratio=torch.tensor([0.3, 0.8]),
                  clip_text_pooled=torch.randn(2, 1, 24, generator=gen),
                  clip_text=torch.randn(2, 77, 32, generator=gen), clip_img=torch.zeros(2, 1, 16))
    with torch.no_grad():
        base = prior(**inputs).sample
        assert cascade_lora.apply_lora(prior, cascade_run / "run" / "final" / cascade.LORA_FILE) == 16
        adapted = prior(**inputs).sample
        cascade_lora.remove_lora(prior)
        restored = prior(**inputs).sample
    assert (adapted - base).abs().max() > 1e-4
    assert torch.equal(restored, base)
    assert not any(isinstance(m, BaseTunerLayer) for m in prior.modules()) and not hasattr(prior, "peft_config")
    with pytest.raises(JobError, match="holds no text_encoder LoRA"):
        cascade_lora.apply_lora(prior, cascade_run / "run" / "final" / cascade.LORA_FILE, component="text_encoder")


def test_sample_cascade_renders_the_runs_last_validation_image(cascade_run, tmp_path):
    """The command (the file applied by cascade_lora) and validation (the trained adapter in memory) agree: same
    prompt, seed, steps and guidance; 170 px makes the same 4x4 latents as the 128 px training size."""
    lora = str(cascade_run / "run" / "final" / cascade.LORA_FILE)
    model = str(cascade_run / "model")
    common = ["sample-cascade", "--model", model, "--lora", lora, "--prompt", "a red circle", "--steps", "2",
              "--guidance-scale", "3.0", "--height", "170", "--width", "170"]
    assert main([*common, "--decoder", f"{model}/decoder", "--out", str(tmp_path / "image.png")]) == 0
    validation = np.asarray(Image.open(cascade_run / "run" / "samples" / "step-000004-00.png"), dtype=int)
    assert np.abs(np.asarray(Image.open(tmp_path / "image.png"), dtype=int) - validation).max() <= 1

    assert main([*common, "--out", str(tmp_path / "latents.png")]) == 0
    latents = Image.open(tmp_path / "latents.png")
    assert latents.size == (128, 128)  # 4x4 latents, 32 px each: no decoder, so a picture of the latents
    assert len(np.unique(np.asarray(latents).reshape(-1, 3), axis=0)) <= 16


def test_sample_cascade_with_apg(cascade_run, tmp_path):
    """APG with eta 1, no norm cap and no momentum is CFG, which holds only if the hook reads stage C's halves the
    right way round (the prior pipeline puts the conditional one first); the default APG changes the latents."""
    common = ["sample-cascade", "--model", str(cascade_run / "model"), "--prompt", "a red circle", "--steps", "2",
              "--guidance-scale", "6.0", "--height", "170", "--width", "170"]
    runs = {"cfg": [], "as_cfg": ["--guidance", "apg", "--apg-eta", "1", "--apg-norm-threshold", "0",
                                  "--apg-momentum", "0"], "apg": ["--guidance", "apg"]}
    images = {}
    for name, extra in runs.items():
        assert main([*common, *extra, "--out", str(tmp_path / f"{name}.png")]) == 0
        images[name] = np.asarray(Image.open(tmp_path / f"{name}.png"), dtype=int)
    assert np.abs(images["as_cfg"] - images["cfg"]).max() <= 1
    assert np.abs(images["apg"] - images["cfg"]).max() > 1


def test_text_encoder_lora_travels_in_the_same_file(cascade_run, tmp_path):
    out = tmp_path / "run"
    assert main(["run", str(cascade_run / "job.json"), "--set", "text_encoder.mode=lora", "--set",
                 "text_encoder.learning_rate=0.01", "--set", "schedule.max_steps=2", "--set", "validation.prompts=[]",
                 "--set", "output.checkpoint_every=0", "--set", f"output.output_dir={out}"]) == 0
    lora = out / "final" / cascade.LORA_FILE
    assert cascade_lora.lora_components(lora) == ["prior", "text_encoder"]
    pipe = cascade.load_pipelines(str(cascade_run / "model"))[0]
    with torch.no_grad():
        before = pipe.encode_prompt("cpu", 1, 1, False, prompt=["a red circle"])
        assert cascade_lora.apply_lora(pipe.text_encoder, lora, component="text_encoder") == 8  # 2 layers x q k v out
        after = pipe.encode_prompt("cpu", 1, 1, False, prompt=["a red circle"])
    assert (after[0] - before[0]).abs().max() > 1e-5 and (after[1] - before[1]).abs().max() > 1e-5


def test_full_finetune_leaves_a_frozen_block_unchanged_and_exports_a_loading_prior(cascade_run, tmp_path):
    out = tmp_path / "run"
    assert main(["run", str(cascade_run / "job.json"), "--set", "network.kind=full", "--set",
                 'layers.freeze_blocks=["down_blocks.0"]', "--set", "layers.include_patterns=[]", "--set",
                 "schedule.max_steps=2", "--set", "validation.prompts=[]", "--set", "output.checkpoint_every=0",
                 "--set", f"output.output_dir={out}"]) == 0
    base = cascade.load_pipelines(str(cascade_run / "model"))[0].prior.state_dict()
    tuned = cascade.load_pipelines(str(out / "final" / "diffusers"))[0].prior.state_dict()
    frozen = [k for k in base if k.startswith("down_blocks.0.")]
    assert frozen and all(torch.equal(base[k], tuned[k]) for k in frozen)
    assert any(not torch.equal(base[k], tuned[k]) for k in base if k.startswith("up_blocks."))


def test_combined_folder_gives_stage_c_and_its_stage_b(cascade_run, tmp_path):
    from diffusers import StableCascadeCombinedPipeline

    prior_pipe, _ = cascade.load_pipelines(str(cascade_run / "model"))
    stage_b = cascade.load_decoder(str(cascade_run / "model" / "decoder"), torch.float32)
    StableCascadeCombinedPipeline(
        tokenizer=stage_b.tokenizer, text_encoder=stage_b.text_encoder, decoder=stage_b.decoder,
        scheduler=stage_b.scheduler, vqgan=stage_b.vqgan, prior_prior=prior_pipe.prior,
        prior_text_encoder=prior_pipe.text_encoder, prior_tokenizer=prior_pipe.tokenizer,
        prior_scheduler=prior_pipe.scheduler).save_pretrained(tmp_path / "combined")
    assert detect_family(ModelSpec(path=str(tmp_path / "combined"))) == "cascade"
    loaded_prior, loaded_b = cascade.load_pipelines(str(tmp_path / "combined"))
    assert torch.equal(loaded_prior.prior.state_dict()["clf.1.weight"], prior_pipe.prior.state_dict()["clf.1.weight"])
    assert torch.equal(loaded_b.decoder.state_dict()["clf.1.weight"], stage_b.decoder.state_dict()["clf.1.weight"])


def test_check_wants_sizes_the_encoder_divides(cascade_run, capsys):
    assert main(["check", str(cascade_run / "job.json"), "--set", "dataset.bucket_step=16"]) == 2
    assert "dataset.bucket_step: 16 is not a multiple of 32" in capsys.readouterr().err


def test_check_refuses_what_stable_cascade_cannot_do(cascade_run, capsys):
    job = str(cascade_run / "job.json")
    assert main(["check", job, "--set", "output.save_kohya=true"]) == 2
    assert "output.save_kohya: cascade models have no kohya LoRA format" in capsys.readouterr().err
    assert main(["check", job, "--set", "prior.enabled=true", "--set", "prior.class_prompt=a dog"]) == 2
    assert "prior.enabled" in capsys.readouterr().err


def test_export_says_which_formats_cascade_lacks(cascade_run, capsys):
    assert main(["export", str(cascade_run / "run"), "--format", "merged"]) == 2
    assert "--format merged: not available for cascade models" in capsys.readouterr().err
