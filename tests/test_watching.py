"""Watching a run: TensorBoard logs, the held-out validation loss and its curve in the window, what step events say
about speed and memory, and adaptive projected guidance at validation."""

import shutil

import pytest
import torch

from trainer.cli import main
from trainer.events import read_events
from trainer.job import JobError, load_job, save_job
from trainer.plan import make_plan
from trainer.run import guidance, throughput
from trainer.run.logbook import wandb_problem

RUN_SETTINGS = ["--set", "schedule.max_steps=3", "--set", "validation.holdout_images=2",
                "--set", "validation.loss_every_n_steps=2", "--set", "validation.loss_draws=2",
                "--set", "validation.every_n_steps=0", "--set", "output.checkpoint_every=0"]


@pytest.fixture(scope="module")
def two_runs(demo_template, tmp_path_factory, one_torch_thread):
    """The demo trained twice from the same job: one validation prompt rendered with APG in the first, none in the
    second."""
    root = tmp_path_factory.mktemp("watching") / "demo"
    shutil.copytree(demo_template, root)
    job = load_job(root / "job.json")
    job.model.path, job.dataset.folders[0].path = str(root / "model"), str(root / "dataset")
    save_job(job, root / "job.json")
    runs = []
    for name, extra in (("a", ["--set", "validation.prompts=[\"a red circle\"]", "--set", "validation.steps=2",
                               "--set", "validation.guidance=apg"]),
                        ("b", ["--set", "validation.prompts=[]", "--set", "logging.tensorboard=false"])):
        out = root / name
        assert main(["run", str(root / "job.json"), "--set", f"output.output_dir={out}", *RUN_SETTINGS,
                     *extra]) == 0
        runs.append(out)
    return runs


def _events(run, kind):
    return [e for e in read_events(run / "events.jsonl")[0] if e["type"] == kind]


def test_tensorboard_logs_load_in_tensorboards_reader(two_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = EventAccumulator(str(two_runs[0] / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    logs.Reload()
    tags = logs.Tags()
    for tag in ("loss/train", "loss/smoothed", "lr/denoiser", "train/grad_norm", "loss/validation",
                "speed/it_per_s", "speed/samples_per_s", "memory/peak_bytes"):
        assert tag in tags["scalars"], tag
    assert [s.step for s in logs.Scalars("loss/train")] == [1, 2, 3]
    assert [s.step for s in logs.Scalars("loss/validation")] == [0, 2, 3]
    losses = {e["step"]: e["loss"] for e in _events(two_runs[0], "step")}
    assert [s.value for s in logs.Scalars("loss/train")] == pytest.approx([losses[1], losses[2], losses[3]])
    smoothed = [s.value for s in logs.Scalars("loss/smoothed")]  # the window's debiased EMA: first point = loss
    assert smoothed[0] == pytest.approx(losses[1]) and smoothed[2] == pytest.approx(
        sum(w * losses[s] for w, s in zip((0.97**2 * 0.03, 0.97 * 0.03, 0.03), (1, 2, 3))) / (1 - 0.97**3))
    (image_tag,) = tags["images"]
    assert [i.step for i in logs.Images(image_tag)] == [0, 3]  # the baseline and the end
    assert not (two_runs[1] / "tensorboard").exists()  # logging.tensorboard=false


def test_step_events_carry_throughput_memory_and_gradient_norm(two_runs):
    for event in _events(two_runs[0], "step"):
        assert event["samples_s"] == pytest.approx(event["its"] * 2, rel=0.01)  # the demo's batch of 2
        assert event["peak_mem"] > 50 * 2**20  # RSS of a process holding torch and a model
        assert event["grad_norm"] > 0
        assert set(event["lrs"]) == {"denoiser"}
        assert "tflops" not in event and "mfu" not in event  # a CPU: no FLOP count, no GPU peak to compare


def test_val_loss_is_evaluated_on_fixed_draws(two_runs):
    a, b = (_events(run, "val_loss") for run in two_runs)
    assert [e["step"] for e in a] == [0, 2, 3] and all(e["images"] == 2 for e in a)
    # Same job, same weights at each step: the same value, to the last bit, as the draws are seeded.
    assert [e["loss"] for e in a] == [e["loss"] for e in b]
    assert len({e["loss"] for e in a}) == 3  # and it moves as the weights train


def test_held_out_images_are_not_trained(demo_job):
    job = load_job(demo_job, ["validation.holdout_images=3"])
    plan, whole = make_plan(job), make_plan(load_job(demo_job))
    held = {item.path for item in plan.holdout.samples}
    trained = {item.path for item in plan.layout.samples}
    assert len(held) == 3 and not held & trained
    assert held | trained == {item.path for item in whole.layout.samples}
    assert held == {item.path for item in make_plan(job).holdout.samples}  # chosen by seed: the same each time
    assert any("validation loss: 3 held-out images" in line for line in plan.describe())


def test_a_held_out_folder_and_its_refusals(demo_job, tmp_path):
    folder = tmp_path / "held"
    folder.mkdir()
    images = sorted((demo_job.parent / "dataset").glob("*.png"))[:2]
    for image in images:
        shutil.copy(image, folder / image.name)
    plan = make_plan(load_job(demo_job, [f"validation.holdout_folder={folder}"]))
    assert sorted(i.path.name for i in plan.holdout.samples) == sorted(i.name for i in images)
    with pytest.raises(JobError, match="validation.holdout_images: 99 would leave none"):
        make_plan(load_job(demo_job, ["validation.holdout_images=99"]))
    with pytest.raises(JobError, match="validation.holdout_folder: .* is also a training folder"):
        make_plan(load_job(demo_job, [f"validation.holdout_folder={demo_job.parent / 'dataset'}"]))
    both = make_plan(load_job(demo_job, [f"validation.holdout_folder={folder}", "validation.holdout_images=1"]))
    assert len(both.holdout.samples) == 3 and len(both.layout.samples) == len(plan.layout.samples) - 1


def test_the_window_plots_val_loss_beside_the_training_loss(two_runs, qtbot):
    from app.run_panel import RunPanel

    panel = RunPanel()
    qtbot.addWidget(panel)
    panel.add_events(read_events(two_runs[0] / "events.jsonl")[0])
    plot = panel.plot
    qtbot.waitUntil(lambda: plot.val_curve.getData()[0] is not None and len(plot.val_curve.getData()[0]) == 3,
                    timeout=2000)  # drawn at the next redraw
    x, y = plot.val_curve.getData()
    assert list(x) == [0, 2, 3]
    assert list(y) == pytest.approx([e["loss"] for e in _events(two_runs[0], "val_loss")])
    assert plot.point_count == 3 and "validation" in plot.summary.text()


def test_wandb_without_the_package_is_one_line(demo_job, capsys):
    job = load_job(demo_job, ["logging.wandb_project=demo"])
    assert "wandb package is not installed" in wandb_problem(job)
    assert main(["check", str(demo_job), "--no-estimate", "--set", "logging.wandb_project=demo"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "not installed" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: logging.wandb_project")


def test_one_apg_step_matches_the_hand_computation():
    gen = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    scale, eta, threshold, beta = 5.0, 0.3, 6.0, -0.5
    previous = torch.randn(2, 4, 8, 8, generator=gen)

    def by_hand(cond, uncond, running):
        diff = (cond - uncond) + beta * running  # momentum: the update plus beta times the running one
        norm = diff.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        diff = diff * torch.clamp(threshold / norm, max=1.0)  # capped at the threshold
        unit = cond / cond.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        parallel = (diff * unit).flatten(1).sum(dim=1).view(-1, 1, 1, 1) * unit
        return uncond + scale * ((diff - parallel) + eta * parallel), diff

    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer

    momentum = MomentumBuffer(beta)
    momentum.running_average = previous
    expected, _ = by_hand(cond, uncond, previous)
    torch.testing.assert_close(guidance.apg(cond, uncond, scale, eta, threshold, momentum), expected)
    # eta 1, no threshold, no momentum: plain CFG
    torch.testing.assert_close(guidance.apg(cond, uncond, scale, 1.0, 0.0, None), uncond + scale * (cond - uncond))


@pytest.mark.parametrize("halves", [("uncond", "cond"), ("cond", "uncond")])
def test_the_guided_denoiser_makes_any_cfg_combination_the_apg_prediction(halves):
    """The hook on the denoiser: a pipeline's `uncond + s * (cond - uncond)` of the two halves it returns is APG's
    prediction, whichever half the family's pipeline puts first."""
    from trainer.job import ValidationSpec

    gen = torch.Generator().manual_seed(1)
    cond, uncond = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    first, second = (cond, uncond) if halves[0] == "cond" else (uncond, cond)
    denoiser = torch.nn.Identity()
    spec = ValidationSpec(guidance="apg", guidance_scale=7.0, apg_eta=0.0, apg_norm_threshold=3.0, apg_momentum=0.0)
    with guidance.guided(denoiser, spec, halves):
        out = denoiser(torch.cat([first, second]))
    a, b = out.chunk(2)
    expected = guidance.apg(cond, uncond, 7.0, 0.0, 3.0, None)
    torch.testing.assert_close(a + 7.0 * (b - a), expected)
    assert torch.equal(denoiser(torch.cat([first, second])), torch.cat([first, second]))  # the hook is gone
    with guidance.guided(denoiser, spec.model_copy(update={"guidance": "cfg"}), halves):
        assert torch.equal(denoiser(torch.cat([first, second])), torch.cat([first, second]))


def test_the_flop_count_of_a_step_and_what_it_gives():
    layer = torch.nn.Linear(32, 16)
    x = torch.randn(8, 32, requires_grad=True)  # as a LoRA's input: it needs its gradient too
    with throughput.FlopCount() as counted:
        layer(x).sum().backward()
    assert counted.total == 3 * 2 * 8 * 32 * 16  # forward, input gradient, weight gradient: 2*B*in*out each
    h100 = throughput.gpu_of("NVIDIA H100 80GB HBM3")
    assert h100.name == "H100 SXM" and throughput.gpu_of("NVIDIA GeForce RTX 4090").name == "RTX 4090"
    assert throughput.gpu_of("Tesla V100-SXM2-16GB") is None
    assert throughput.achieved(10**12, 2.0, h100) == (2.0, round(2.0 / h100.tflops, 4))
    assert throughput.achieved(10**12, 2.0, None) == (2.0, None)
    assert throughput.peak_memory(torch.device("cpu")) > 0


def test_apg_in_the_sd_pipeline_with_eta_1_is_cfg(demo_template):
    """APG with eta 1, no norm cap and no momentum is CFG: the SD pipeline's image is then CFG's, which holds only
    if the hook reads the pipeline's halves the right way round (uncond first); the defaults change the image."""
    import numpy as np

    from trainer.families import sd
    from trainer.families.table import FAMILIES
    from trainer.job import ValidationSpec

    parts = sd.load(load_job(demo_template / "job.json").model)
    pipe = sd.validation_pipeline(parts, parts.denoiser)

    def render(spec):
        with guidance.guided(parts.denoiser, spec, FAMILIES["sd1"].cfg_halves):
            image = pipe("a red circle", num_inference_steps=2, guidance_scale=spec.guidance_scale, height=64,
                         width=64, generator=torch.Generator().manual_seed(0)).images[0]
        return np.asarray(image, dtype=int)

    cfg = render(ValidationSpec(guidance_scale=9.0))
    as_cfg = render(ValidationSpec(guidance="apg", guidance_scale=9.0, apg_eta=1.0, apg_norm_threshold=0.0,
                                   apg_momentum=0.0))
    apg = render(ValidationSpec(guidance="apg", guidance_scale=9.0))
    assert np.abs(as_cfg - cfg).max() <= 1
    assert np.abs(apg - cfg).mean() > 1
