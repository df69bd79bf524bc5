"""bench/gpu_check.py, as far as a CPU can check it: every preset has its real-size model and makes a valid job on
it, the events are read right, `run --random-weights` trains a configs-only model; on a GPU (marked `gpu`), the
estimate of the SD1.5 LoRA preset is within 10% of the measured peak."""

import json
import sys
from pathlib import Path

import pytest

from trainer.cli import main as trainer
from trainer.job import PRESETS_DIR, load_job
from trainer.real_size import MODELS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import gpu_check  # noqa: E402


def test_every_shipped_preset_has_its_real_size_model():
    presets = {p.stem for p in PRESETS_DIR.glob("*.json")} - {"demo"}
    assert set(gpu_check.PRESET_MODELS) == presets
    for family, name in gpu_check.PRESET_MODELS.values():
        assert name in MODELS[family]


@pytest.mark.parametrize("preset", ["sd15_dreambooth", "flux_dev_lora_16gb", "cascade_stage_c_lora"])
def test_a_preset_becomes_a_short_job_on_its_real_size_configs(preset, tmp_path):
    family, name = gpu_check.PRESET_MODELS[preset]
    job_path = gpu_check.preset_job(preset, family, name, tmp_path, steps=5)
    job = load_job(job_path)
    assert job.schedule.max_steps == 5 and job.validation.prompts == [] and job.output.checkpoint_every == 0
    assert job.precision == load_job(PRESETS_DIR / f"{preset}.json").precision  # what the preset measures stays
    assert trainer(["check", str(job_path), "--no-estimate"]) == 0


def test_the_measurement_is_read_from_the_step_events(tmp_path):
    events = tmp_path / "events.jsonl"
    lines = [{"type": "run_started", "time": 0.0}]
    lines += [{"type": "step", "step": i, "time": 10.0 + 0.5 * i, "peak_mem": 2**30 * (3 + (i == 2))}
              for i in range(1, 7)]
    events.write_text("\n".join(json.dumps(e) for e in lines) + "\n")
    peak, seconds = gpu_check.measured(events)
    assert peak == 4 * 2**30 and seconds == pytest.approx(0.5)
    row = {"preset": "x", "status": "ran", "estimate_gib": 4.4, "measured_gib": 4.0, "estimate_s": None,
           "measured_s": seconds}
    assert gpu_check.error(row) == pytest.approx(0.1)
    assert "| x | 4.4 | 4.0 | +10% | - | 0.50 | ran |" in gpu_check.table([row])
    row.update({"compile_status": "ran", "compiled_s": 0.4, "compiled_gib": 3.9})
    assert "| x | 0.500 | 0.400 | 1.25x | 3.9 | ran |" in gpu_check.compile_table([row])


def test_random_weights_train_a_model_folder_of_configs_alone(demo_job, capsys):
    model = Path(load_job(demo_job).model.path)
    for weights in model.rglob("*.safetensors"):
        weights.unlink()
    settings = ["--set", "schedule.max_steps=2", "--set", "validation.prompts=[]"]
    assert trainer(["run", str(demo_job), *settings]) == 2
    assert "holds configs but no weights" in capsys.readouterr().err
    assert trainer(["run", str(demo_job), *settings, "--random-weights"]) == 0
    run = Path(load_job(demo_job).output.output_dir)
    steps = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in steps if e["type"] == "step"] == [1, 2]
    assert (run / "final").is_dir()


def test_without_a_gpu_the_check_says_so_in_one_line(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert gpu_check.main([]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.gpu
def test_the_sd15_lora_estimate_is_within_ten_percent_of_the_measured_peak(tmp_path):
    import torch

    memory = torch.cuda.get_device_properties(0).total_memory / 2**30
    row = gpu_check.check_preset("sd15_lora_6gb", tmp_path, 4, memory, torch.cuda.get_device_properties(0).name)
    assert row["status"].startswith("ran"), row
    assert abs(gpu_check.error(row)) <= 0.10, row
