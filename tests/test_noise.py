"""Noise and loss options of the SD families: the v-prediction and epsilon targets against a hand computation,
zero terminal SNR, min-SNR-gamma weights, offset noise, timestep bias, and a short run with them switched on."""

import numpy as np
import pytest
import torch

from trainer.cli import main
from trainer.demo import build_tiny_sd15
from trainer.events import read_events
from trainer.families import sd
from trainer.job import DiffusionSpec, JobError, ModelSpec
from trainer.families.noise import draw_timesteps, min_snr_weights, timestep_weights

T = 1000  # the tiny model has SD1.5's schedule


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_sd15(tmp_path_factory.mktemp("noise") / "model")


def _parts(model, prediction_type):
    return sd.load(ModelSpec(path=str(model), prediction_type=prediction_type))


def _latents(shape=(2, 4, 8, 8)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(123))


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_target_matches_a_hand_computation(tiny_model, prediction_type):
    parts = _parts(tiny_model, prediction_type)
    x0 = _latents()
    noisy, timesteps, target, weight = sd.noisy_input_and_target(parts, x0, torch.Generator().manual_seed(7),
                                                                 DiffusionSpec())

    # The same draws, in the same order: noise, then uniform timesteps (what runs without a bias always drew).
    gen = torch.Generator().manual_seed(7)
    eps = torch.randn(x0.shape, generator=gen)
    expected_t = torch.randint(0, T, (x0.shape[0],), generator=gen)
    assert torch.equal(timesteps, expected_t)

    alphas_cumprod = parts.noise_scheduler.alphas_cumprod
    by_hand = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2, 0)
    assert torch.allclose(alphas_cumprod.double(), by_hand, rtol=1e-5)
    for i, t in enumerate(expected_t.tolist()):
        a = alphas_cumprod[t].item()
        assert torch.allclose(noisy[i], a**0.5 * x0[i] + (1 - a) ** 0.5 * eps[i], atol=1e-6)
        if prediction_type == "v_prediction":
            assert torch.allclose(target[i], a**0.5 * eps[i] - (1 - a) ** 0.5 * x0[i], atol=1e-6)
        else:
            assert torch.allclose(target[i], eps[i], atol=1e-6)
    assert torch.equal(weight, torch.ones(2))


def test_zero_terminal_snr_rescales_both_schedulers(tiny_model):
    parts = _parts(tiny_model, "v_prediction")
    spec = DiffusionSpec(zero_terminal_snr=True)
    with pytest.raises(RuntimeError, match="prepare_noise"):  # never silently trained without it
        sd.noisy_input_and_target(parts, _latents(), torch.Generator().manual_seed(0), spec)
    before = parts.noise_scheduler.alphas_cumprod.clone()

    notes = sd.prepare_noise(parts, spec)
    after = parts.noise_scheduler.alphas_cumprod
    assert after.shape == before.shape == (T,)
    assert after[-1].item() == pytest.approx(0.0, abs=1e-12) and before[-1].item() > 1e-3
    assert torch.all(after[1:] < after[:-1])  # still a noise schedule: monotonically noisier
    # The PNDM sampler cannot rescale: DDIM replaces it, starting sampling at the last (pure noise) timestep.
    sampler = parts.sample_scheduler
    assert type(sampler).__name__ == "DDIMScheduler" and sampler.config.rescale_betas_zero_snr
    assert sampler.config.prediction_type == "v_prediction" and not sampler.config.clip_sample
    sampler.set_timesteps(4)
    assert sampler.timesteps[0].item() == T - 1
    assert len(notes) == 1 and "DDIM" in notes[0]

    # At the terminal timestep SNR is 0: the min-SNR weight is 1, not NaN or 0.
    w = min_snr_weights(parts.noise_scheduler, torch.tensor([0, 500, T - 1]), 5.0, "v_prediction")
    assert torch.isfinite(w).all() and w[-1].item() == 1.0

    eps_parts = _parts(tiny_model, "epsilon")
    notes = sd.prepare_noise(eps_parts, spec)
    assert any("v_prediction" in n for n in notes)
    w = min_snr_weights(eps_parts.noise_scheduler, torch.tensor([0, 500, T - 1]), 5.0, "epsilon")
    assert torch.isfinite(w).all() and w[-1].item() == 1.0


def test_min_snr_weights_follow_the_formula(tiny_model):
    parts = _parts(tiny_model, "epsilon")
    sched = parts.noise_scheduler
    ts = torch.tensor([0, 10, 200, 500, 999])
    a = sched.alphas_cumprod[ts].double()
    snr = a / (1 - a)
    gamma = 5.0
    eps_w = min_snr_weights(sched, ts, gamma, "epsilon")
    v_w = min_snr_weights(sched, ts, gamma, "v_prediction")
    assert torch.allclose(eps_w.double(), torch.clamp(snr, max=gamma) / snr, rtol=1e-5)
    assert torch.allclose(v_w.double(), torch.clamp(snr, max=gamma) / (snr + 1), rtol=1e-5)
    assert eps_w[0].item() < 0.01 and eps_w[-1].item() == pytest.approx(1.0)  # low noise is damped
    assert torch.allclose(min_snr_weights(sched, ts, 1e6, "epsilon"), torch.ones(5))

    # Through the family: the returned weights are those of the timesteps it drew.
    _, drawn, _, weight = sd.noisy_input_and_target(parts, _latents((6, 4, 8, 8)),
                                                    torch.Generator().manual_seed(1), DiffusionSpec(min_snr_gamma=5))
    a = sched.alphas_cumprod[drawn].double()
    snr = a / (1 - a)
    assert torch.allclose(weight.double(), torch.clamp(snr, max=5.0) / snr, rtol=1e-5)


def test_noise_offset_adds_one_draw_per_sample_and_channel(tiny_model):
    parts = _parts(tiny_model, "epsilon")
    x0 = _latents()
    _, timesteps, noise, _ = sd.noisy_input_and_target(parts, x0, torch.Generator().manual_seed(3),
                                                       DiffusionSpec(noise_offset=0.1))
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(x0.shape, generator=gen)
    offset = 0.1 * torch.randn((2, 4, 1, 1), generator=gen)
    assert torch.equal(timesteps, torch.randint(0, T, (2,), generator=gen))

    diff = noise - base
    assert torch.allclose(diff.mean(dim=(2, 3)), offset[:, :, 0, 0], atol=1e-6)
    assert diff.std(dim=(2, 3)).max().item() < 1e-6  # constant over each channel
    assert offset.abs().max().item() > 0.01


def test_later_bias_draws_the_last_quarter_ten_times_as_often():
    spec = DiffusionSpec(timestep_bias="later", timestep_bias_portion=0.25, timestep_bias_multiplier=10)
    weights = timestep_weights(spec, T)
    assert weights.sum().item() == pytest.approx(1.0)
    drawn = draw_timesteps(20_000, T, torch.Generator().manual_seed(0), "cpu", weights)
    expected = 250 * 10 / (250 * 10 + 750 * 1)  # 10/13 of the draws fall in the biased quarter
    assert (drawn >= 750).float().mean().item() == pytest.approx(expected, abs=0.015)

    earlier = timestep_weights(DiffusionSpec(timestep_bias="earlier", timestep_bias_multiplier=4), T)
    assert earlier[249].item() == pytest.approx(4 * earlier[250].item())
    tiny = timestep_weights(DiffusionSpec(timestep_bias="later", timestep_bias_portion=1e-4,
                                          timestep_bias_multiplier=3), T)
    assert tiny[-1].item() == pytest.approx(3 * tiny[-2].item()) and tiny[0] == tiny[-2]


def test_range_bias_respects_begin_and_end(tiny_model):
    spec = DiffusionSpec(timestep_bias="range", timestep_bias_begin=200, timestep_bias_end=500,
                         timestep_bias_multiplier=5)
    weights = timestep_weights(spec, T)
    assert weights[200].item() == pytest.approx(5 * weights[199].item())
    assert weights[499].item() == pytest.approx(5 * weights[500].item())
    drawn = draw_timesteps(20_000, T, torch.Generator().manual_seed(1), "cpu", weights)
    inside = ((drawn >= 200) & (drawn < 500)).float().mean().item()
    assert inside == pytest.approx(300 * 5 / (300 * 5 + 700), abs=0.015)

    # Through the family: the timesteps are the multinomial draw after the noise, from the same generator.
    parts = _parts(tiny_model, "epsilon")
    x0 = _latents()
    _, timesteps, _, _ = sd.noisy_input_and_target(parts, x0, torch.Generator().manual_seed(5), spec)
    gen = torch.Generator().manual_seed(5)
    torch.randn(x0.shape, generator=gen)
    assert torch.equal(timesteps, torch.multinomial(weights, 2, replacement=True, generator=gen))

    with pytest.raises(JobError, match="diffusion.timestep_bias_end"):
        timestep_weights(DiffusionSpec(timestep_bias="range", timestep_bias_end=1000), 500)


def test_none_bias_keeps_the_uniform_draw():
    assert timestep_weights(DiffusionSpec(timestep_bias="none", timestep_bias_multiplier=9), T) is None
    drawn = draw_timesteps(4, T, torch.Generator().manual_seed(9), "cpu", None)
    assert torch.equal(drawn, torch.randint(0, T, (4,), generator=torch.Generator().manual_seed(9)))


def test_short_run_with_noise_options_has_finite_losses(demo_job):
    run = demo_job.parent / "run"
    assert main(["run", str(demo_job), "--set", "schedule.max_steps=3", "--set", "validation.prompts=[]",
                 "--set", "diffusion.noise_offset=0.1", "--set", "diffusion.min_snr_gamma=5",
                 "--set", "diffusion.timestep_bias=later", "--set", "diffusion.timestep_bias_multiplier=5"]) == 0
    events, _ = read_events(run / "events.jsonl")
    losses = [e["loss"] for e in events if e["type"] == "step"]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert events[-1]["type"] == "run_finished" and events[-1]["status"] == "completed"
