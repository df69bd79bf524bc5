"""Flux: detection, the flow-matching math with its resolution-dependent shift, packing, embedding dropout, and runs
on a tiny Flux model (LoRA, text-encoder LoRA, full fine-tuning with a frozen block) whose exported files load in
diffusers' FluxPipeline."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora_checks import assert_both_lora_files_change_the_image, render
from trainer.families import flow
from trainer.cli import main
from trainer.families.detect import detect_family, family_module
from trainer.job import DiffusionSpec, JobError, ModelSpec, load_job

flux = family_module("flux")
QUIET = ["--set", "validation.prompts=[]", "--set", "output.checkpoint_every=0"]


def test_detects_flux_from_a_folder_and_checkpoint_keys(tmp_path):
    folder = tmp_path / "flux"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    assert detect_family(ModelSpec(path=str(folder))) == "flux"

    transformer_only = tmp_path / "flux1-dev.safetensors"  # BFL's own file: the transformer alone
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.ones(2),
               "single_blocks.0.linear1.weight": torch.ones(2), "guidance_in.in_layer.weight": torch.ones(2)},
              transformer_only)
    assert detect_family(ModelSpec(path=str(transformer_only))) == "flux"
    bundled = tmp_path / "flux1-dev-fp8.safetensors"  # ComfyUI's all-in-one checkpoint
    save_file({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": torch.ones(2),
               "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.ones(2),
               "vae.decoder.conv_in.weight": torch.ones(2)}, bundled)
    assert detect_family(ModelSpec(path=str(bundled))) == "flux"


def test_resolution_shift_is_the_pipelines_mu_and_the_schedulers_time_shift():
    sched = _flux_scheduler()
    for tokens, mu in ((256, 0.5), (4096, 1.15), (1024, 0.5 + 0.65 * 768 / 3840)):
        assert flow.resolution_shift(sched.config, tokens) == pytest.approx(math.exp(mu))
    t = torch.tensor([0.1, 0.5, 0.9])
    mu = 0.5 + 0.65 * (24 - 256) / 3840
    shift = flow.resolution_shift(sched.config, 24)
    torch.testing.assert_close(shift * t / (1 + (shift - 1) * t), sched.time_shift(mu, 1.0, t))
    linear = _flux_scheduler(time_shift_type="linear")
    assert flow.resolution_shift(linear.config, 24) == pytest.approx(mu)
    torch.testing.assert_close(mu * t / (1 + (mu - 1) * t), linear.time_shift(mu, 1.0, t))


def test_noisy_input_and_target_by_hand_for_one_sample_with_the_dynamic_shift():
    latents = torch.randn(1, 16, 8, 12, generator=torch.Generator().manual_seed(1))  # 4 x 6 = 24 tokens
    diffusion = DiffusionSpec(weighting_scheme="logit_normal", logit_mean=0.3, logit_std=0.8)
    parts = SimpleNamespace(noise_scheduler=_flux_scheduler())
    noisy, timesteps, target, weight = flux.noisy_input_and_target(parts, latents, torch.Generator().manual_seed(7),
                                                                    diffusion)

    noise, step = _replay(latents.shape, seed=7, logit_mean=0.3, logit_std=0.8)
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (24 - 256)  # calculate_shift for 24 image tokens
    s = step / 1000
    sigma = math.exp(mu) / (math.exp(mu) + (1 / s - 1))  # the scheduler's exponential time shift
    assert timesteps.item() == pytest.approx(sigma * 1000, abs=1e-3)
    torch.testing.assert_close(noisy, (1 - sigma) * latents + sigma * noise, atol=1e-6, rtol=0)
    torch.testing.assert_close(target, noise - latents, atol=1e-6, rtol=0)
    assert weight.tolist() == [1.0]

    # flow_shift overrides the resolution's shift; 1 leaves the noise level unshifted.
    _, unshifted, _, _ = flux.noisy_input_and_target(parts, latents, torch.Generator().manual_seed(7),
                                                     diffusion.model_copy(update={"flow_shift": 1.0}))
    assert unshifted.item() == pytest.approx(step, abs=1e-3)
    # A 1024 px image (64 x 64 tokens) gets max_shift: mu = 1.15.
    _, big, _, _ = flux.noisy_input_and_target(parts, torch.zeros(1, 16, 128, 128), torch.Generator().manual_seed(7),
                                               diffusion)
    s = _replay((1, 16, 128, 128), seed=7, logit_mean=0.3, logit_std=0.8)[1] / 1000
    assert big.item() == pytest.approx(1000 * math.exp(1.15) / (math.exp(1.15) + (1 / s - 1)), abs=1e-3)
    # Without dynamic shifting (schnell's config) the scheduler's fixed shift applies.
    fixed = SimpleNamespace(noise_scheduler=_flux_scheduler(use_dynamic_shifting=False, shift=1.0))
    _, schnell, _, _ = flux.noisy_input_and_target(fixed, latents, torch.Generator().manual_seed(7), diffusion)
    assert schnell.item() == pytest.approx(step, abs=1e-3)


def test_predict_packs_2x2_patches_and_unpacks_the_output():
    """A stand-in transformer that returns its tokens: predict must give the latents back exactly, after
    handing the transformer 2x2 patches with their position ids, zero text ids, t in [0, 1] and the guidance."""
    latents = torch.randn(2, 16, 4, 6, generator=torch.Generator().manual_seed(0))
    seen = {}

    def transformer(**kwargs):
        seen.update(kwargs)
        return SimpleNamespace(sample=kwargs["hidden_states"])

    transformer.config = SimpleNamespace(guidance_embeds=True)
    parts = SimpleNamespace(noise_scheduler=_flux_scheduler(), guidance=3.5)
    cond = {"encoder_hidden_states": torch.zeros(2, 7, 48), "pooled": torch.zeros(2, 32)}
    out = flux.predict(parts, transformer, latents, torch.tensor([250.0, 900.0]), cond)
    assert torch.equal(out, latents)

    tokens = seen["hidden_states"]
    assert tokens.shape == (2, 2 * 3, 64)
    torch.testing.assert_close(tokens[1, 4], latents[1, :, 2:4, 2:4].reshape(64))  # row 1, column 1 of patches
    assert seen["img_ids"].tolist()[4] == [0.0, 1.0, 1.0]
    assert seen["txt_ids"].shape == (7, 3) and not seen["txt_ids"].any()
    torch.testing.assert_close(seen["timestep"], torch.tensor([0.25, 0.9]))
    assert seen["guidance"].tolist() == [3.5, 3.5]

    transformer.config.guidance_embeds = False  # schnell: no guidance embedding
    flux.predict(parts, transformer, latents, torch.tensor([250.0, 900.0]), cond)
    assert seen["guidance"] is None
    with pytest.raises(JobError, match="dataset.bucket_step"):
        flux.predict(parts, transformer, torch.zeros(1, 16, 5, 6), torch.tensor([500.0]), cond)


@pytest.fixture(scope="module")
def flux_run(tmp_path_factory):
    """The tiny Flux demo made by `python -m trainer demo --family flux`, trained 4 steps (alpha 8 over rank 4,
    so the kohya file's folded scale is checked, gradient checkpointing on) with a validation image."""
    root = tmp_path_factory.mktemp("flux") / "demo"
    assert main(["demo", str(root), "--family", "flux", "--steps", "4"]) == 0
    job = load_job(root / "job.json")
    assert job.model.family == "auto" and job.dataset.bucket_step == 16
    assert main(["run", str(root / "job.json"), "--set", 'validation.prompts=["a red circle"]',
                 "--set", "validation.negative_prompt=blurry", "--set", "validation.steps=2",
                 "--set", "validation.at_start=false", "--set", "output.checkpoint_every=0",
                 "--set", "network.alpha=8", "--set", "precision.gradient_checkpointing=true"]) == 0
    return root


@pytest.fixture(scope="module")
def parts(flux_run):
    return flux.load(ModelSpec(path=str(flux_run / "model")))


def test_the_demo_model_renders_in_flux_pipeline(flux_run):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(flux_run / "model")
    assert pipe.transformer.config.guidance_embeds and pipe.scheduler.config.use_dynamic_shifting
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (0.3611, 0.1159)
    assert pipe.vae_scale_factor == 8
    pipe.set_progress_bar_config(disable=True)
    image = render(pipe)
    assert image.shape == (64, 64, 3) and image.std() > 0


def test_prompt_layout_and_what_can_train(flux_run, parts):
    with torch.no_grad():
        cond = flux.encode_prompts(parts, ["a red circle", "a green square on a blue background"])
    assert cond["encoder_hidden_states"].shape == (2, 512, 48) and cond["pooled"].shape == (2, 32)
    assert cond["encoder_hidden_states"].abs().amax(dim=(1, 2)).gt(0).all()
    assert not torch.equal(cond["pooled"][0], cond["pooled"][1])
    assert list(flux.text_encoders(parts)) == ["text_encoder"]  # CLIP; T5 never trains
    with pytest.raises(JobError, match="model.load_t5"):
        flux.load(ModelSpec(path=str(flux_run / "model"), load_t5=False))
    with pytest.raises(JobError, match="model.prediction_type"):
        flux.load(ModelSpec(path=str(flux_run / "model"), prediction_type="epsilon"))


def test_latents_are_shifted_then_scaled(parts):
    mean = torch.randn(1, 16, 4, 4)
    latents = flux.sample_latents(parts, mean, torch.zeros_like(mean), torch.Generator().manual_seed(0))
    torch.testing.assert_close(latents, (mean - 0.1159) * 0.3611)


def test_prepare_noise_keeps_the_guidance_and_notes_ddpm_options(parts):
    notes = flux.prepare_noise(parts, DiffusionSpec(min_snr_gamma=5.0, timestep_bias="later", flux_guidance=2.5))
    assert parts.guidance == 2.5
    assert [n.split(":")[0] for n in notes] == ["diffusion.min_snr_gamma", "diffusion.timestep_bias"]
    assert flux.prepare_noise(parts, DiffusionSpec()) == [] and parts.guidance == 1.0


def test_encoder_dropout_zeroes_t5_and_the_pooled_embedding_with_their_probabilities(parts):
    batch = 4000
    cond = {"encoder_hidden_states": torch.ones(batch, 5, 48), "pooled": torch.ones(batch, 32)}
    diffusion = DiffusionSpec(encoder_dropout=[0.2, 0.6], pooled_dropout=0.5)
    out = flux.drop_conditioning(parts, cond, torch.Generator().manual_seed(0), diffusion)
    dropped = {}
    for name, part in (("t5", out["encoder_hidden_states"]), ("pooled", out["pooled"])):
        flat = part.reshape(batch, -1)
        assert torch.equal(flat.amin(dim=1), flat.amax(dim=1)), f"{name}: a sample is zeroed whole or not at all"
        dropped[name] = flat[:, 0] == 0
    rates = {name: d.float().mean().item() for name, d in dropped.items()}
    # CLIP's probability and pooled_dropout both act on the pooled embedding: 1 - 0.8 * 0.5 = 0.6.
    assert rates == pytest.approx({"t5": 0.6, "pooled": 0.6}, abs=0.03)
    both = (dropped["t5"] & dropped["pooled"]).float().mean().item()
    assert both == pytest.approx(0.36, abs=0.03)  # drawn independently
    again = flux.drop_conditioning(parts, cond, torch.Generator().manual_seed(0), diffusion)
    assert torch.equal(again["pooled"], out["pooled"])

    one_value = flux.drop_conditioning(parts, cond, torch.Generator().manual_seed(0),
                                       DiffusionSpec(encoder_dropout=[0.3]))
    for part in (one_value["encoder_hidden_states"], one_value["pooled"]):
        assert (part.reshape(batch, -1)[:, 0] == 0).float().mean().item() == pytest.approx(0.3, abs=0.03)
    kept = flux.drop_conditioning(parts, cond, torch.Generator().manual_seed(0), DiffusionSpec())
    assert kept is cond


def test_flux_lora_trains_and_both_files_load_in_flux_pipeline(flux_run):
    from diffusers import FluxPipeline

    run = flux_run / "run"
    assert (run / "samples" / "step-000004-00.png").is_file()
    kohya = run / "final" / "demo_lora.safetensors"
    with safe_open(str(kohya), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith(("transformer.transformer_blocks.", "transformer.single_transformer_blocks."))
                        for k in keys)
    assert {"transformer.transformer_blocks.1.attn.add_q_proj.lora_A.weight",
            "transformer.single_transformer_blocks.0.attn.to_v.lora_B.weight"} <= set(keys)
    assert not any(k.endswith(".alpha") for k in keys)
    assert meta["ss_base_model_version"] == "flux1" and meta["ss_network_alpha"] == "8"

    pipe = FluxPipeline.from_pretrained(flux_run / "model")
    assert_both_lora_files_change_the_image(pipe, run / "final", "demo_lora.safetensors")


def test_clip_lora_trains_and_loads_from_both_files(flux_run, tmp_path):
    from diffusers import FluxPipeline

    out = tmp_path / "run"
    assert main(["run", str(flux_run / "job.json"), *QUIET, "--set", "schedule.max_steps=2",
                 "--set", "text_encoder.mode=lora", "--set", "text_encoder.learning_rate=0.01",
                 "--set", f"output.output_dir={out}"]) == 0
    with safe_open(str(out / "final" / "demo_lora.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert {k.split(".")[0] for k in keys} == {"transformer", "text_encoder"}
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in keys  # ComfyUI's CLIP-L
    pipe = FluxPipeline.from_pretrained(flux_run / "model")

    def pooled():
        with torch.no_grad():
            return pipe.encode_prompt("a red circle", None, max_sequence_length=flux.T5_TOKENS)[1]

    base = pooled()
    pipe.load_lora_weights(out / "final")
    with_diffusers = pooled()
    pipe.unload_lora_weights()
    pipe.load_lora_weights(out / "final", weight_name="demo_lora.safetensors")
    assert (with_diffusers - base).abs().max() > 1e-4, "the CLIP LoRA did not load"
    torch.testing.assert_close(pooled(), with_diffusers, rtol=1e-4, atol=1e-5)


def test_full_finetune_with_a_frozen_block_exports_a_loading_pipeline(flux_run, tmp_path):
    from diffusers import FluxPipeline

    out = tmp_path / "run"
    assert main(["run", str(flux_run / "job.json"), *QUIET, "--set", "schedule.max_steps=3",
                 "--set", "network.kind=full", "--set", "output.save_single_file=false",
                 "--set", 'layers.freeze_blocks=["transformer_blocks.0"]', "--set", f"output.output_dir={out}"]) == 0
    base = FluxPipeline.from_pretrained(flux_run / "model")
    tuned = FluxPipeline.from_pretrained(out / "final" / "diffusers")
    before, after = base.transformer.state_dict(), tuned.transformer.state_dict()
    frozen = [k for k in before if k.startswith("transformer_blocks.0.")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen), "a frozen block moved"
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("transformer_blocks.1."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("single_transformer_blocks."))
    for pipe in (base, tuned):
        pipe.set_progress_bar_config(disable=True)
    assert not np.array_equal(render(base), render(tuned))


def test_check_refuses_sizes_flux_cannot_pack(flux_run, capsys):
    job = str(flux_run / "job.json")
    assert main(["check", job, "--set", "dataset.bucket_step=8"]) == 2
    assert "dataset.bucket_step: 8 is not a multiple of 16" in capsys.readouterr().err


def _replay(shape, seed: int, logit_mean: float, logit_std: float) -> tuple[torch.Tensor, int]:
    """The noise and the schedule step (1..1000) that a logit-normal draw from this seed gives: the same draws,
    in the same order, as flow.noisy_input_and_target makes them."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape, generator=gen)
    t = torch.sigmoid(logit_mean + logit_std * torch.randn(1, generator=gen)).item()
    return noise, int(t * 1000) + 1  # the schedule's t = step / 1000


def _flux_scheduler(**overrides):
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                  base_image_seq_len=256, max_image_seq_len=4096)
    return FlowMatchEulerDiscreteScheduler(**{**config, **overrides})
