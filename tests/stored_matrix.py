"""The checkpoints users bring, as a matrix: every family stored in fp32, fp16 and bf16, as a folder, a `variant`
folder and an original-layout single file, trains a LoRA under `mixed_precision` no and bf16, and its LoRA loads.
Two test modules run it, test_stored_precision_sd1_sd3_flux.py and test_stored_precision_sd2_sdxl_cascade.py:
families split so that each of the suite's two workers takes about half of the time.

The models are mid-size (each family's real text-encoder widths and 8x VAE, two layers deep, captions of 16 CLIP
tokens), built once per session (conftest's `stored_model`). The matrix: per family, folder x {fp32, fp16, bf16}, a
variant folder of fp16 files, and for SD1, SD2 and SDXL (the families our single-file writer lays out) a single file
x {fp32, fp16, bf16}: 33 stored models, each trained under both precisions: 66 runs of 2 steps, all of them in the
full suite.

FAST, the 19 runs not marked slow, cover in a quick run: every family under both precisions and in all three
dtypes; every dtype and every form under both precisions; SDXL's fp16 single file (an fp16 VAE baked in, as
CivitAI's) and its bf16 single file trained in fp32 (the case that failed in `text_projection`)."""

import json
from pathlib import Path

import pytest
import torch

from trainer.cli import main
from trainer.demo import demo_job
from trainer.job import save_job

FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "flux", "cascade")
SINGLE_FILE = ("sd1", "sd2", "sdxl")
DTYPES = ("fp32", "fp16", "bf16")
PRECISIONS = ("no", "bf16")
STORED = [(f, d, "folder") for f in FAMILIES for d in DTYPES] + [(f, "fp16", "variant") for f in FAMILIES] + \
         [(f, d, "single") for f in SINGLE_FILE for d in DTYPES]
FAST = {("sd1", "fp32", "folder", "no"), ("sd1", "fp16", "variant", "bf16"), ("sd1", "bf16", "single", "no"),
        ("sd2", "bf16", "folder", "bf16"), ("sd2", "fp16", "variant", "no"), ("sd2", "fp32", "single", "bf16"),
        ("sdxl", "fp32", "folder", "bf16"), ("sdxl", "fp16", "variant", "no"), ("sdxl", "fp16", "single", "bf16"),
        ("sdxl", "bf16", "single", "no"),
        ("sd3", "fp32", "folder", "bf16"), ("sd3", "fp16", "variant", "no"), ("sd3", "bf16", "folder", "no"),
        ("flux", "fp32", "folder", "no"), ("flux", "fp16", "variant", "bf16"), ("flux", "bf16", "folder", "bf16"),
        ("cascade", "fp32", "folder", "no"), ("cascade", "fp16", "variant", "bf16"),
        ("cascade", "bf16", "folder", "no")}


def cells(families: tuple[str, ...]) -> list:
    """The matrix's cells of these families, those outside FAST marked slow."""
    return [pytest.param(*stored, precision, marks=() if (*stored, precision) in FAST else pytest.mark.slow,
                         id="-".join((*stored, precision)))
            for stored in STORED if stored[0] in families for precision in PRECISIONS]


def matrix_test(families: tuple[str, ...]):
    """The matrix's test over these families' cells, for a test module to hold as
    `test_stored_model_trains_a_lora_that_loads`."""
    @pytest.mark.usefixtures("one_torch_thread", "any_precision")
    @pytest.mark.parametrize("family,dtype,form,precision", cells(families))
    def test(stored_model, matrix_dataset, matrix_pipelines, family, dtype, form, precision, tmp_path):
        trains_a_lora_that_loads(stored_model, matrix_dataset, matrix_pipelines, family, dtype, form, precision,
                                 tmp_path)

    return test


def trains_a_lora_that_loads(stored_model, dataset: Path, base: dict, family: str, dtype: str, form: str,
                             precision: str, tmp_path: Path) -> None:
    """One cell: the stored files hold what the cell says, 2 LoRA steps train with finite losses, the LoRA loads.
    `base`: the family's fp32 pipeline once loaded (Stable Cascade: its prior), kept by the module."""
    from trainer.job import ModelSpec
    from trainer.families.model_files import stored_model as read_stored

    model = stored_model(family, dtype, form)
    found = read_stored(ModelSpec(path=model[0], variant=model[2]))
    assert found.dtypes == [dtype.upper().replace("FP", "F")]  # the files hold what the cell says
    assert found.text_encoders and found.vae
    job = _job(tmp_path, dataset, family, model, precision)
    assert main(["run", str(job)]) == 0
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in events if e["type"] == "step"]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    _loads(family, base, stored_model, tmp_path / "run" / "final")


def _job(tmp_path: Path, dataset: Path, family: str, model: tuple[str, str, str], precision: str) -> Path:
    job = demo_job(tmp_path, family, steps=2)
    job.model.path, job.model.config, job.model.variant = model
    job.model.decoder = ""
    job.dataset.folders[0].path = str(dataset)
    job.schedule.batch_size = 1
    job.precision.mixed_precision = precision
    job.validation.prompts = []
    job.output.checkpoint_every = 0
    job.logging.tensorboard = False  # what the matrix checks is loading and training, not the logs
    if family in SINGLE_FILE:  # attention only: peft's conv LoRA is slow on a CPU, and no dtype path differs
        job.network.target_modules = ["to_q", "to_k", "to_v", "to_out.0"]
    save_job(job, tmp_path / "job.json")
    return tmp_path / "job.json"


def _loads(family: str, base: dict, stored_model, final: Path) -> None:
    """The exported LoRA files load: diffusers' file (and the kohya file where written) in the family's pipeline,
    attaching an adapter to every module the run trained; Stable Cascade's through trainer/cascade_lora."""
    from safetensors import safe_open

    with safe_open(str(final / "pytorch_lora_weights.safetensors"), "pt") as f:
        trained = {k.split(".lora_A.")[0] for k in f.keys() if ".lora_A." in k}
    assert trained
    if family == "cascade":
        from diffusers import StableCascadeUNet

        from trainer.export import cascade_lora

        if family not in base:
            base[family] = StableCascadeUNet.from_pretrained(stored_model(family, "fp32", "folder")[0],
                                                             subfolder="prior")
        assert cascade_lora.apply_lora(base[family], final / "pytorch_lora_weights.safetensors") == len(trained)
        cascade_lora.remove_lora(base[family])
        return
    from diffusers import DiffusionPipeline

    if family not in base:
        base[family] = DiffusionPipeline.from_pretrained(stored_model(family, "fp32", "folder")[0])
    pipe = base[family]
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    for name in ("pytorch_lora_weights.safetensors", "demo_lora.safetensors"):
        if (final / name).is_file():
            pipe.load_lora_weights(final, weight_name=name)
            adapted = [n for n, m in denoiser.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)]
            assert len(adapted) == len(trained), name
            pipe.unload_lora_weights()

