"""Single files as users have them: a baked-in fp16 VAE, fp8 (e4m3) weights, and a checkpoint without its text
encoders, which `check` refuses with one line until model.config names where they are; `check` reports what it
found."""

from pathlib import Path

import pytest
import torch

from stored_models import recast
from trainer.cli import main
from trainer.demo import build_demo_dataset, demo_job
from trainer.job import save_job
from trainer.families.model_files import TEXT_ENCODER_PREFIXES

pytestmark = pytest.mark.usefixtures("one_torch_thread", "any_precision")


@pytest.fixture
def job_for(tmp_path_factory):
    """job_for(family, path, config): a 2-step LoRA job on one demo image for that model."""
    data = build_demo_dataset(tmp_path_factory.mktemp("single-data") / "dataset", count=1)

    def make(family: str, path: str, config: str = "") -> Path:
        root = tmp_path_factory.mktemp("single-run")
        job = demo_job(root, family, steps=2)
        job.model.path, job.model.config = path, config
        job.dataset.folders[0].path = str(data)
        job.schedule.batch_size = 1
        job.validation.prompts = []
        job.output.checkpoint_every = 0
        job.network.target_modules = ["to_q", "to_k", "to_v", "to_out.0"]
        save_job(job, root / "job.json")
        return root / "job.json"

    return make


def test_check_reports_family_stored_dtype_and_bundled_parts(stored_model, job_for, capsys):
    path, config, _ = stored_model("sdxl", "fp16", "single")  # the VAE baked in, in fp16 like the rest
    assert main(["check", str(job_for("sdxl", path, config))]) == 0
    out = capsys.readouterr().out
    assert "model family: sdxl" in out
    assert "model files: single file, stored F16; text encoders present, VAE present" in out
    folder, _, variant = stored_model("sdxl", "fp16", "variant")
    job = job_for("sdxl", folder)
    assert main(["check", str(job), "--set", f"model.variant={variant}"]) == 0
    assert "model files: diffusers folder, stored F16; text encoders present, VAE present" in capsys.readouterr().out


def test_fp8_single_file_is_upcast_and_trains(stored_model, job_for, capsys):
    path, config, _ = stored_model("sd1", "fp8", "single")
    job = job_for("sd1", path, config)
    assert main(["check", str(job)]) == 0
    assert "stored F8_E4M3" in capsys.readouterr().out
    assert main(["run", str(job)]) == 0
    assert (job.parent / "run" / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_checkpoint_without_text_encoders_needs_model_config(stored_model, job_for, tmp_path, capsys):
    full, folder, _ = stored_model("sdxl", "bf16", "single")
    unet_only = recast(Path(full), tmp_path / "unet_only.safetensors", torch.bfloat16,
                       drop_prefixes=TEXT_ENCODER_PREFIXES)
    job = job_for("sdxl", str(unet_only))
    capsys.readouterr()  # the models' loading bars
    assert main(["check", str(job)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no text encoders" in err[0] and "model.config" in err[0], err
    job = job_for("sdxl", str(unet_only), folder)  # the encoders come from the folder model.config names
    assert main(["check", str(job)]) == 0
    assert "text encoders missing, VAE present" in capsys.readouterr().out
    assert main(["run", str(job)]) == 0
