"""FSDP (full shard) on this CPU: the demo's full fine-tune trained by 2 processes over gloo under the shipped
presets/accelerate/fsdp.yaml, its checkpoints whole and resumable, its export loading in diffusers; and the lines
for launches this trainer refuses (FSDP for what it does not shard, DeepSpeed where it is not installed)."""

import importlib.util
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.test_multiprocess import _finished, _launch, _steps
from trainer.events import read_events
from trainer.job import load_job, save_job

STEPS = 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(a 4-step FSDP run, the same run resumed from its step-2 checkpoint): one validation prompt rendered at the
    end, so rendering from the sharded model is exercised too."""
    from trainer.demo import build_demo

    root = tmp_path_factory.mktemp("fsdp") / "demo"
    build_demo(root, steps=STEPS, method="full")
    job = load_job(root / "job.json")
    job.validation.prompts = ["a green square"]
    job.validation.at_start = False
    job.output.checkpoint_every = 2
    job.output.output_dir = str(root / "run")
    save_job(job, root / "job.json")
    _finished(_launch("fsdp.yaml", root / "job.json", launch=("--main_process_port", "0")))
    resumed = root / "resumed"
    shutil.copytree(root / "run", resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step-{STEPS}")
    shutil.rmtree(resumed / "final")
    _finished(_launch("fsdp.yaml", root / "job.json", "--resume", "--set", f"output.output_dir={resumed}",
                      launch=("--main_process_port", "0")))
    return root / "run", resumed


@pytest.mark.slow
def test_two_process_fsdp_writes_one_run_with_whole_checkpoints(runs):
    from diffusers import UNet2DConditionModel

    from trainer.run import checkpoint

    run, _ = runs
    events, _ = read_events(run / "events.jsonl")
    kinds = [e["type"] for e in events]
    assert kinds.count("run_started") == 1 and events[-1]["status"] == "completed"
    assert sorted(_steps(events)) == list(range(1, STEPS + 1))
    assert any(e["type"] == "log" and e["message"].startswith("FSDP: the denoiser's weights, gradients and optimizer "
                                                              "state split over 2 processes") for e in events)
    assert [e["step"] for e in events if e["type"] == "sample"] == [STEPS]

    # Whole tensors, read back by a one-process optimizer as any checkpoint is.
    unet = UNet2DConditionModel.from_pretrained(load_job(run / "job.json").model.path, subfolder="unet")
    params = dict(unet.named_parameters())
    step = run / "checkpoints" / f"step-{STEPS}"
    weights = load_file(step / "weights.safetensors")
    assert {k.removeprefix("unet.") for k in weights} == set(params)
    assert all(weights[f"unet.{k}"].shape == p.shape for k, p in params.items())
    optimizer = torch.optim.AdamW(list(params.values()))
    checkpoint.load(step, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0))
    assert all(optimizer.state[p]["exp_avg"].shape == p.shape and int(optimizer.state[p]["step"]) == STEPS
               for p in params.values())


@pytest.mark.slow
def test_fsdp_resume_continues_exactly(runs):
    run, resumed = runs
    events, _ = read_events(resumed / "events.jsonl")
    starts = [i for i, e in enumerate(events) if e["type"] == "run_started"]
    assert len(starts) == 2 and events[starts[1]]["start_step"] == 2
    continued, original = _steps(events[starts[1]:]), _steps(read_events(run / "events.jsonl")[0])
    assert sorted(continued) == [3, 4]
    # The same 2 processes reduce in the same order: the continuation is the uninterrupted run to the last digit.
    assert all(continued[s] == original[s] for s in continued), (continued, original)
    step = f"checkpoints/step-{STEPS}"
    for name in ("weights.safetensors", "ema.safetensors", "optimizer.safetensors"):
        a, b = load_file(run / step / name), load_file(resumed / step / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow
def test_the_fsdp_export_loads_in_diffusers_and_holds_the_ema(runs):
    from diffusers import StableDiffusionPipeline

    run, _ = runs
    tuned = StableDiffusionPipeline.from_pretrained(run / "final" / "diffusers", safety_checker=None)
    base = StableDiffusionPipeline.from_pretrained(load_job(run / "job.json").model.path, safety_checker=None)
    ema = load_file(run / "checkpoints" / f"step-{STEPS}" / "ema.safetensors")
    exported = tuned.unet.state_dict()
    assert all(torch.equal(exported[k.removeprefix("unet.")], v) for k, v in ema.items())
    assert any(not torch.equal(exported[k], v) for k, v in base.unet.state_dict().items())
    single = StableDiffusionPipeline.from_single_file(run / "final" / "demo_full.safetensors",
                                                      config=str(run / "final" / "diffusers"),
                                                      local_files_only=True, safety_checker=None)
    key = next(iter(ema)).removeprefix("unet.")
    assert torch.equal(single.unet.state_dict()[key], exported[key])


def test_fsdp_settings_and_jobs_it_does_not_shard_are_one_line_each(demo_job, monkeypatch):
    """What an FSDP launch asks for is read before accelerate sees it; what it cannot do stops the run at once."""
    from trainer.job import JobError
    from trainer.run import sharding

    monkeypatch.setattr(sharding, "_active", {"on": False, "reshard": True})
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(JobError, match=r"^fsdp_version: 1; this trainer shards with FSDP2 only"):
        sharding.claim()
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    assert sharding.claim() and sharding.active() and not sharding._active["reshard"]
    assert "ACCELERATE_USE_FSDP" not in __import__("os").environ, "accelerate must not shard (or fall back) itself"

    job = load_job(demo_job)  # the demo trains a LoRA
    with pytest.raises(JobError, match=r"^network.kind: 'lora'; FSDP shards full fine-tunes"):
        sharding.check_job(job)
    job.network.kind = "full"
    sharding.check_job(job)
    job.text_encoder.mode = "lora"
    with pytest.raises(JobError, match=r"^text_encoder.mode: 'lora'; under FSDP only the denoiser trains"):
        sharding.check_job(job)
    job.text_encoder.mode = "off"
    job.speed.compile = "regional"
    with pytest.raises(JobError, match=r"^speed.compile: not tried under FSDP yet"):
        sharding.check_job(job)


def test_check_says_what_fsdp_leaves_on_each_gpu(demo_job, capsys):
    import re

    from trainer.cli import main

    assert main(["check", str(demo_job), "--processes", "2", "--set", "network.kind=full"]) == 0
    out = capsys.readouterr().out
    one = float(re.search(r"memory estimate: ([\d.]+) GiB peak", out).group(1))
    each = float(re.search(r"under FSDP over 2 processes: about ([\d.]+) GiB peak per GPU \(weights, gradients and "
                           r"optimizer state, [\d.]+ MiB, divided by 2;", out).group(1))
    assert each <= one


def test_the_fsdp_figure_divides_the_denoisers_parts_and_keeps_activations_and_encoders():
    import re

    from trainer.estimate import CONTEXT_BYTES, FRAGMENTATION, GIB, Estimate

    peak = {"frozen weights": 8 * GIB, "trainable weights": 4 * GIB, "gradients": 4 * GIB, "optimizer state": 8 * GIB,
            "activations": 3 * GIB, "encoders": 1 * GIB}
    est = Estimate("sdxl", (1024, 1024), 1, "bf16", peak, flops=0, trainable=1, params=1)
    for processes, counted in ((2, 12 + 4), (4, 6 + 4), (8, 3 + 4)):  # 24 GiB split; 4 GiB stay whole
        expected = (counted * GIB * (1 + FRAGMENTATION) + CONTEXT_BYTES) / GIB
        line = est.fsdp_line(processes)
        shown = float(re.search(r"about ([\d.]+) GiB peak per GPU", line).group(1))
        assert abs(shown - expected) <= 0.051, (processes, line)  # printed to 0.1 GiB


def test_a_deepspeed_launch_without_deepspeed_is_one_line(demo_job, monkeypatch, capsys):
    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("DeepSpeed is installed here")
    from trainer.cli import main

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what accelerate launch sets for a DeepSpeed config
    assert main(["run", str(demo_job)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: DeepSpeed was chosen (presets/accelerate/deepspeed_zero2.yaml) but is not installed: `pip install "
        "deepspeed` on a machine with CUDA, or launch with presets/accelerate/fsdp.yaml (FSDP needs nothing more)"]
    assert not (demo_job.parent / "run").exists()


@pytest.mark.gpu
@pytest.mark.slow
def test_deepspeed_zero2_trains_the_demo(tmp_path):
    """Only where DeepSpeed and a GPU are: the shipped ZeRO-2 config trains the demo's full fine-tune to its
    final files."""
    pytest.importorskip("deepspeed")
    from trainer.demo import build_demo

    job = build_demo(tmp_path / "demo", steps=2, method="full")
    _finished(_launch("deepspeed_zero2.yaml", job, "--set", "validation.prompts=[]", "--set", "ema.enabled=false",
                      "--set", "output.checkpoint_every=0",
                      launch=("--num_processes", str(torch.cuda.device_count()), "--main_process_port", "0")))
    events, _ = read_events(tmp_path / "demo" / "run" / "events.jsonl")
    assert events[-1]["status"] == "completed"
    assert (tmp_path / "demo" / "run" / "final" / "diffusers" / "unet").is_dir()


def test_a_deepspeed_run_promises_no_checkpoints(demo_job, monkeypatch):
    """Whether or not DeepSpeed is installed: a job that would checkpoint under it stops with one line."""
    from trainer.job import JobError
    from trainer.run import ranks

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    job = load_job(demo_job)
    job.output.checkpoint_every = 5
    with pytest.raises(JobError, match=r"^output.checkpoint_every: 5; under DeepSpeed no checkpoints are written"):
        ranks.deepspeed_checkpoints(job)
    job.output.checkpoint_every = 0
    ranks.deepspeed_checkpoints(job)
