"""`trainer estimate`: the step traced on fake tensors agrees with the same step on real tensors, each memory
setting moves the part it should, and the command's bad inputs are one line. Tiny demo models (each variant
traced once per module: a trace takes seconds), and one real-size SD1.5 through the command line (slow)."""

import json
import shutil

import pytest

from trainer.cli import main
from trainer.estimate import estimate
from trainer.job import load_job, save_job
from trainer.plan import make_plan

UNCACHED = ("dataset.cache_latents=false", "dataset.cache_text=false")
VARIANTS = {  # name: --set overrides of the tiny demo job (which caches latents and text)
    "cached": (),
    "uncached": UNCACHED,
    "checkpointed": (*UNCACHED, "precision.gradient_checkpointing=true"),
    "bf16": ("precision.mixed_precision=bf16",),
    "full": ("network.kind=full",),
    "full_8bit": ("network.kind=full", "optimizer.name=adamw8bit"),
}


@pytest.fixture(scope="module")
def tiny_job(demo_template, tmp_path_factory):
    root = tmp_path_factory.mktemp("estimate") / "demo"
    shutil.copytree(demo_template, root)
    job = load_job(root / "job.json")
    job.model.path, job.dataset.folders[0].path = str(root / "model"), str(root / "dataset")
    job.output.output_dir = str(root / "run")
    save_job(job, root / "job.json")
    return root / "job.json"


@pytest.fixture(scope="module")
def estimates(tiny_job):
    return {name: _estimate(tiny_job, *settings) for name, settings in VARIANTS.items()}


def _estimate(job_path, *settings, real=False):
    job = load_job(job_path, list(settings))
    return estimate(job, make_plan(job, resume=True), real=real)


def test_fake_step_counts_what_the_real_step_allocates(tiny_job, estimates):
    # The same counter on the same step: on fake tensors, and on real ones with the constructors' random weights.
    fake, real = estimates["uncached"], _estimate(tiny_job, *UNCACHED, real=True)
    assert fake.counted == pytest.approx(real.counted, rel=0.02)
    for part in ("frozen weights", "trainable weights", "encoders"):
        assert fake.peak.get(part, 0) == real.peak.get(part, 0), part
    for part in ("frozen weights", "trainable weights"):
        assert fake.between_steps.get(part, 0) == real.between_steps.get(part, 0), part
    # torch's AdamW really stepped: its moments are what the fake trace allocates, plus a step count per tensor
    # (a scalar, which CUDA keeps on the host).
    assert fake.between_steps["optimizer state"] == pytest.approx(real.between_steps["optimizer state"], rel=0.005)
    assert fake.flops == real.flops > 0
    assert fake.trainable == real.trainable > 0


def test_checkpointing_caching_and_bf16_each_lower_their_part(estimates):
    base, checkpointed = estimates["uncached"], estimates["checkpointed"]
    assert checkpointed.peak["activations"] < base.peak["activations"]
    assert checkpointed.flops > base.flops  # the forward pass runs again in the backward
    cached = estimates["cached"]  # the encoders leave the accelerator
    assert base.peak["encoders"] > 0 and cached.peak.get("encoders", 0) == 0 and cached.total < base.total
    half = estimates["bf16"]
    assert half.peak["frozen weights"] == pytest.approx(cached.peak["frozen weights"] / 2, rel=0.01)
    assert half.total < cached.total


def test_lora_trains_and_keeps_less_than_full_and_8bit_adam_keeps_less_state(estimates):
    lora, full, full_8bit = estimates["cached"], estimates["full"], estimates["full_8bit"]
    assert lora.trainable < full.trainable
    kept = {name: e.between_steps for name, e in estimates.items()}
    assert kept["cached"]["optimizer state"] < kept["full"]["optimizer state"]
    assert kept["cached"]["trainable weights"] < kept["full"]["trainable weights"]
    # AdamW: two fp32 moments per weight; 8-bit: two bytes per weight of the large tensors, plus their scales.
    assert kept["full"]["optimizer state"] == pytest.approx(8 * full.trainable, rel=0.001)  # + a step count each
    assert kept["full"]["optimizer state"] / 3 > kept["full_8bit"]["optimizer state"] > 0
    assert any("8-bit AdamW" in note for note in full_8bit.notes)


def test_estimate_command_prints_the_split_and_a_gpu_time(tiny_job, estimates, capsys, monkeypatch):
    monkeypatch.setattr("trainer.estimate.estimate", lambda job, plan: estimates["cached"])
    assert main(["estimate", str(tiny_job), "--gpu", "rtx 4090"]) == 0
    out = capsys.readouterr().out
    for part in ("frozen weights", "trainable weights", "gradients", "optimizer state", "activations", "encoders",
                 "allowance"):
        assert part in out
    assert "RTX 4090:" in out and "s per step at 40%" in out and "fits in 24 GiB: yes" in out


def test_json_is_one_object(tiny_job, estimates, capsys, monkeypatch):
    monkeypatch.setattr("trainer.estimate.estimate", lambda job, plan: estimates["cached"])
    assert main(["estimate", str(tiny_job), "--json", "--memory", "0.5"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total_bytes"] > data["counted_bytes"] > 0 and data["memory_gib"] == 0.5
    assert data["fits"] is False  # the 0.75 GiB CUDA context alone is more
    assert set(data["peak_bytes"]) == {"frozen weights", "trainable weights", "gradients", "optimizer state",
                                       "activations", "encoders"}


def test_unknown_gpu_is_one_line_listing_the_known(tiny_job, capsys):
    assert main(["estimate", str(tiny_job), "--gpu", "gtx 1080"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--gpu: 'gtx 1080'" in err and "RTX 4090" in err and "H100" in err


def test_check_prints_the_summary_line(tiny_job, estimates, capsys, monkeypatch):
    monkeypatch.setattr("trainer.estimate.estimate", lambda job, plan: estimates["cached"])
    assert main(["check", str(tiny_job)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == estimates["cached"].summary() and "GiB peak on the GPU" in lines[-1]


def test_a_step_that_cannot_be_traced_fails_estimate_but_not_check(tiny_job, capsys, monkeypatch):
    def unknown_op(*args):
        raise NotImplementedError("aten::frobnicate has no fake implementation\nmore detail")

    monkeypatch.setattr("trainer.estimate._trace", unknown_op)
    assert main(["check", str(tiny_job)]) == 0
    out = capsys.readouterr().out
    assert "memory estimate: not available (estimate: could not trace the training step (NotImplementedError: " \
           "aten::frobnicate has no fake implementation))" in out
    assert main(["estimate", str(tiny_job)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "aten::frobnicate" in err


def test_run_refuses_a_folder_without_weights(tmp_path, capsys):
    from trainer.demo import build_demo

    job = build_demo(tmp_path / "demo", family="sd1", real_size="default")
    assert main(["run", str(job)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.path" in err and "no weights" in err
    assert not (tmp_path / "demo" / "run").exists()


@pytest.mark.slow
def test_real_size_sd15_estimate_end_to_end(tmp_path, capsys):
    assert main(["demo", str(tmp_path / "demo"), "--family", "sd1", "--real-size"]) == 0
    capsys.readouterr()
    job = tmp_path / "demo" / "job.json"
    assert main(["estimate", str(job), "--json", "--gpu", "rtx3060", "--set", "precision.mixed_precision=bf16"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["denoiser_params"] == 859_520_964  # SD1.5's UNet, from its published config
    assert data["bucket"] == [512, 512]
    # 0.86 B bf16 weights (1.6 GiB), LoRA at 512 px batch 2: a few GiB with the allowance.
    assert 2 < data["total_gib"] < 12


# The denoisers' sizes as their model cards give them, in billions (stored tensors: SD3.5's position embedding
# counts), and the rounding of each figure. SD1.5's exact count is well known: 859,520,964.
MODEL_CARDS = {"sd15": (0.86, 0.005), "sd21": (0.87, 0.005), "sdxl-base": (2.6, 0.05), "sd35-large": (8.1, 0.05),
               "sd35-medium": (2.5, 0.05), "flux1-dev": (12, 0.5), "cascade-c": (3.6, 0.05)}


@pytest.mark.slow
def test_real_size_folders_build_the_published_architectures(tmp_path):
    """Every real-size model folder (configs and stand-in tokenizers, no weights) loads through its family's own
    loader, on the meta device, with the published parameter count; `run` would refuse it."""
    from trainer.families.detect import detect_family, family_module
    from trainer.families.model_files import require_weights
    from trainer.job import JobError, ModelSpec
    from trainer.real_size import MODELS, build_real_size

    for family, names in MODELS.items():
        for name in names:
            folder = build_real_size(tmp_path / name, family, name)
            spec = ModelSpec(path=str(folder))
            assert detect_family(spec) == family
            parts = family_module(family).load(spec)
            assert parts.denoiser.device.type == "meta"
            stored = sum(t.numel() for t in (*parts.denoiser.parameters(), *parts.denoiser.buffers()))
            card, rounding = MODEL_CARDS[name]
            assert abs(stored / 1e9 - card) <= rounding, (name, stored)
            with pytest.raises(JobError, match="no weights"):
                require_weights(spec)


def test_gpu_with_its_reported_memory(tiny_job, estimates, capsys, monkeypatch):
    # The window passes the card's name for its speed and the memory the driver reports.
    monkeypatch.setattr("trainer.estimate.estimate", lambda job, plan: estimates["cached"])
    assert main(["estimate", str(tiny_job), "--json", "--gpu", "rtx 4090", "--memory", "0.5"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["gpu"]["name"] == "RTX 4090" and data["gpu"]["step_seconds"] >= 0
    assert data["memory_gib"] == 0.5 and data["fits"] is False


def test_driver_names_match_the_table():
    from trainer.gpus import match_gpu

    names = {"NVIDIA GeForce RTX 4090": "RTX 4090", "NVIDIA A100-SXM4-80GB": "A100 80GB",
             "NVIDIA A100-SXM4-40GB": "A100 40GB", "NVIDIA H100 80GB HBM3": "H100 SXM", "Tesla T4": "T4",
             "NVIDIA GeForce RTX 4060 Ti": "RTX 4060 Ti 16GB", "NVIDIA GeForce RTX 3060": "RTX 3060 12GB"}
    for reported, entry in names.items():
        assert match_gpu(reported).name == entry, reported
    for unknown in ("NVIDIA GeForce RTX 4060", "NVIDIA H200", "NVIDIA H100 PCIe", "NVIDIA A100 PCIe"):
        assert match_gpu(unknown) is None, unknown  # not in the table, or more than one entry would do
