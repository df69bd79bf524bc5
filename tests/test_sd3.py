"""SD3: detection, the flow-matching math, per-encoder embedding dropout, and LoRAs trained end to end on a tiny
SD3 model (with and without T5) whose exported files load in diffusers' SD3 pipeline."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora_checks import assert_both_lora_files_change_the_image
from trainer.families import flow
from trainer.cli import main
from trainer.families.detect import detect_family, family_module
from trainer.job import DiffusionSpec, JobError, ModelSpec, load_job

sd3 = family_module("sd3")


def test_detects_sd3_from_a_folder_checkpoint_keys_and_the_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    folder = tmp_path / "sd3"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]}))
    assert detect_family(ModelSpec(path=str(folder))) == "sd3"

    single = tmp_path / "sd3.5_large.safetensors"
    save_file({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.ones(2),
               "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.ones(2),
               "first_stage_model.decoder.conv_in.weight": torch.ones(2)}, single)
    assert detect_family(ModelSpec(path=str(single))) == "sd3"

    snapshot = tmp_path / "hub" / "models--someone--my-sd3" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    (snapshot / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert detect_family(ModelSpec(path="someone/my-sd3")) == "sd3"


def test_shifted_schedule_is_the_schedulers_table():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sigmas, timesteps = flow.shifted_schedule(1000, 3.0)
    torch.testing.assert_close(sigmas, sched.sigmas.flip(0), atol=1e-7, rtol=0)
    torch.testing.assert_close(timesteps, sched.timesteps.flip(0), atol=1e-4, rtol=0)


def test_noisy_input_and_target_by_hand_for_one_sample():
    latents = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    diffusion = DiffusionSpec(weighting_scheme="logit_normal", logit_mean=0.3, logit_std=0.8)
    parts = _scheduler_only(shift=3.0)
    noisy, timesteps, target, weight = sd3.noisy_input_and_target(parts, latents, torch.Generator().manual_seed(7),
                                                                   diffusion)

    gen = torch.Generator().manual_seed(7)  # the same draws, in the same order: noise, then the noise level
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.sigmoid(0.3 + 0.8 * torch.randn(1, generator=gen)).item()
    step = int(t * 1000) + 1  # the schedule's t = step / 1000, step = 1..1000
    sigma = 3.0 * (step / 1000) / (1 + 2.0 * (step / 1000))
    assert timesteps.item() == pytest.approx(sigma * 1000, abs=1e-3)
    torch.testing.assert_close(noisy, (1 - sigma) * latents + sigma * noise, atol=1e-6, rtol=0)
    torch.testing.assert_close(target, noise - latents, atol=1e-6, rtol=0)
    assert weight.tolist() == [1.0]

    # flow_shift overrides the scheduler's shift; 1 leaves the noise level unshifted.
    _, unshifted, _, _ = sd3.noisy_input_and_target(parts, latents, torch.Generator().manual_seed(7),
                                                    diffusion.model_copy(update={"flow_shift": 1.0}))
    assert unshifted.item() == pytest.approx(step, abs=1e-3)


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "uniform", "none"])
def test_noise_level_draws_replay_from_the_generator(scheme):
    diffusion = DiffusionSpec(weighting_scheme=scheme)

    def draw(seed):
        return flow.sample_noise_levels(diffusion, 20000, torch.Generator().manual_seed(seed), "cpu")

    t = draw(3)
    assert torch.equal(t, draw(3)) and not torch.equal(t, draw(4))
    assert 0 <= t.min() and t.max() <= 1 and t.mean().item() == pytest.approx(0.5, abs=0.01)
    middle = ((t > 0.25) & (t < 0.75)).float().mean().item()
    if scheme == "logit_normal":  # logit(t) ~ N(0, 1): P(|logit t| < logit 0.75) = P(|z| < 1.0986)
        assert middle == pytest.approx(0.728, abs=0.015)
    elif scheme == "mode":  # f_mode with scale 1.29 gathers the middle
        assert middle > 0.7
    else:
        assert middle == pytest.approx(0.5, abs=0.015)
    if scheme == "none":  # the same draws as uniform
        assert torch.equal(t, flow.sample_noise_levels(DiffusionSpec(weighting_scheme="uniform"), 20000,
                                                       torch.Generator().manual_seed(3), "cpu"))


def test_logit_mean_moves_the_noise_levels_towards_noise():
    diffusion = DiffusionSpec(weighting_scheme="logit_normal", logit_mean=1.0, logit_std=0.5)
    t = flow.sample_noise_levels(diffusion, 20000, torch.Generator().manual_seed(0), "cpu")
    assert torch.logit(t).mean().item() == pytest.approx(1.0, abs=0.02)
    assert torch.logit(t).std().item() == pytest.approx(0.5, abs=0.02)


@pytest.fixture(scope="module")
def sd3_run(tmp_path_factory):
    """The tiny SD3 demo, trained 4 steps with T5 (alpha 8 over rank 4, so the kohya file's folded scale is
    checked) and validation images."""
    from trainer.demo import build_demo

    root = tmp_path_factory.mktemp("sd3") / "demo"
    job = build_demo(root, steps=4, family="sd3")
    assert load_job(job).model.family == "auto" and load_job(job).dataset.bucket_step == 16
    assert main(["run", str(job), "--set", 'validation.prompts=["a red circle"]', "--set", "validation.steps=2",
                 "--set", "validation.at_start=false", "--set", "output.checkpoint_every=0",
                 "--set", "network.alpha=8"]) == 0
    return root


@pytest.fixture(scope="module")
def parts(sd3_run):
    return sd3.load(ModelSpec(path=str(sd3_run / "model")))


def test_prompt_layout_with_and_without_t5(sd3_run, parts):
    captions = ["a red circle", "a green square on a blue background"]
    with torch.no_grad():
        full = sd3.encode_prompts(parts, captions)
        no_t5_parts = sd3.load(ModelSpec(path=str(sd3_run / "model"), load_t5=False))
        no_t5 = sd3.encode_prompts(no_t5_parts, captions)
    assert no_t5_parts.text_encoder.three is None and "text_encoder_3" not in sd3.text_encoders(no_t5_parts)
    assert list(sd3.text_encoders(parts)) == ["text_encoder", "text_encoder_2"]  # T5 never trains
    hidden = full["encoder_hidden_states"]
    assert hidden.shape == (2, 77 + 256, 96) and full["pooled"].shape == (2, 32 + 48)
    assert hidden[:, :77, 80:].abs().max() == 0  # CLIP-L 32 + CLIP-G 48 wide, padded to T5's 96
    assert hidden[:, 77:].abs().amax(dim=(1, 2)).gt(0).all()  # T5's tokens
    torch.testing.assert_close(no_t5["encoder_hidden_states"][:, :77], hidden[:, :77])
    torch.testing.assert_close(no_t5["pooled"], full["pooled"])
    assert no_t5["encoder_hidden_states"][:, 77:].abs().max() == 0


def test_latents_are_shifted_then_scaled(parts):
    mean = torch.randn(1, 16, 4, 4)
    latents = sd3.sample_latents(parts, mean, torch.zeros_like(mean), torch.Generator().manual_seed(0))
    torch.testing.assert_close(latents, (mean - 0.0609) * 1.5305)


def test_encoder_dropout_zeroes_each_encoders_slice_with_its_probability(parts):
    batch = 4000
    cond = {"encoder_hidden_states": torch.ones(batch, 77 + 256, 96), "pooled": torch.ones(batch, 80)}
    cond["encoder_hidden_states"][:, :77, 80:] = 0  # the padding after the CLIP slices
    diffusion = DiffusionSpec(encoder_dropout=[0.1, 0.5, 0.8], pooled_dropout=0.3)
    out = sd3.drop_conditioning(parts, cond, torch.Generator().manual_seed(0), diffusion)
    hidden = out["encoder_hidden_states"]
    slices = {"clip_l": hidden[:, :77, :32], "clip_g": hidden[:, :77, 32:80], "t5": hidden[:, 77:],
              "pooled": out["pooled"]}
    dropped = {}
    for name, part in slices.items():
        flat = part.reshape(batch, -1)
        assert torch.equal(flat.amin(dim=1), flat.amax(dim=1)), f"{name}: a sample is zeroed whole or not at all"
        dropped[name] = flat[:, 0] == 0
    rates = {name: d.float().mean().item() for name, d in dropped.items()}
    assert rates == pytest.approx({"clip_l": 0.1, "clip_g": 0.5, "t5": 0.8, "pooled": 0.3}, abs=0.03)
    both = (dropped["clip_l"] & dropped["t5"]).float().mean().item()
    assert both == pytest.approx(0.1 * 0.8, abs=0.02)  # each encoder draws on its own
    assert hidden[:, :77, 80:].abs().max() == 0
    again = sd3.drop_conditioning(parts, cond, torch.Generator().manual_seed(0), diffusion)
    assert torch.equal(again["encoder_hidden_states"], hidden)

    one_value = sd3.drop_conditioning(parts, cond, torch.Generator().manual_seed(0),
                                      DiffusionSpec(encoder_dropout=[0.5]))
    for part in (one_value["encoder_hidden_states"][:, :77, :32], one_value["encoder_hidden_states"][:, 77:]):
        assert (part.reshape(batch, -1)[:, 0] == 0).float().mean().item() == pytest.approx(0.5, abs=0.03)
    for probabilities in ([], [0.0, 0.0, 0.0]):
        kept = sd3.drop_conditioning(parts, cond, torch.Generator().manual_seed(0),
                                     DiffusionSpec(encoder_dropout=probabilities))
        assert torch.equal(kept["encoder_hidden_states"], cond["encoder_hidden_states"])
        assert torch.equal(kept["pooled"], cond["pooled"])


def test_flow_family_refuses_ddpm_settings(sd3_run, parts):
    with pytest.raises(JobError, match="model.prediction_type"):
        sd3.load(ModelSpec(path=str(sd3_run / "model"), prediction_type="v_prediction"))
    notes = sd3.prepare_noise(parts, DiffusionSpec(min_snr_gamma=5.0))
    assert len(notes) == 1 and notes[0].startswith("diffusion.min_snr_gamma: not used by SD3")
    odd = torch.zeros(1, 16, 6, 5)
    with pytest.raises(JobError, match="dataset.bucket_step"):
        sd3.predict(parts, parts.denoiser, odd, torch.tensor([500.0]), {})


def test_sd3_lora_trains_and_both_files_load_in_the_sd3_pipeline(sd3_run):
    from diffusers import StableDiffusion3Pipeline

    run = sd3_run / "run"
    assert (run / "samples" / "step-000004-00.png").is_file()
    kohya = run / "final" / "demo_lora.safetensors"
    with safe_open(str(kohya), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("transformer.transformer_blocks.") for k in keys)
    assert "transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight" in keys
    assert not any(k.endswith(".alpha") for k in keys)
    assert meta["ss_base_model_version"] == "sd3" and meta["ss_network_alpha"] == "8"

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_run / "model")
    assert_both_lora_files_change_the_image(pipe, run / "final", "demo_lora.safetensors")


def test_without_t5_the_transformer_and_clip_loras_train_and_load(sd3_run, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    out = tmp_path / "run"
    assert main(["run", str(sd3_run / "job.json"), "--set", "model.load_t5=false", "--set", "schedule.max_steps=2",
                 "--set", "text_encoder.mode=lora", "--set", "network.alpha=8", "--set", f"output.output_dir={out}",
                 "--set", "validation.prompts=[]", "--set", "output.checkpoint_every=0"]) == 0
    with safe_open(str(out / "final" / "demo_lora.safetensors"), "pt") as f:
        components = {k.split(".")[0] for k in f.keys()}
    assert components == {"transformer", "text_encoder", "text_encoder_2"}
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_run / "model", text_encoder_3=None, tokenizer_3=None)
    assert_both_lora_files_change_the_image(pipe, out / "final", "demo_lora.safetensors")


def _scheduler_only(shift: float):
    from types import SimpleNamespace

    from diffusers import FlowMatchEulerDiscreteScheduler

    return SimpleNamespace(noise_scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift))


def test_check_refuses_sizes_the_transformer_cannot_patch(sd3_run, capsys):
    job = str(sd3_run / "job.json")
    assert main(["check", job, "--set", "dataset.bucket_step=8"]) == 2
    assert "dataset.bucket_step: 8 is not a multiple of 16" in capsys.readouterr().err
    assert main(["check", job, "--set", "dataset.resolution=72"]) == 2
