"""`trainer sample`: the base model and a LoRA file at several strengths, with CFG or APG, and its refusals."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.cli import main


@pytest.fixture(scope="module")
def lora_file(demo_template, tmp_path_factory):
    """A diffusers LoRA file for the demo model whose weights all differ from zero (a freshly initialised LoRA's
    up-projections are zero and would change nothing)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(demo_template / "model", safety_checker=None)
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    folder = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    return folder / "pytorch_lora_weights.safetensors"


def _sample(demo_template, out, *extra) -> int:
    args = ["sample", "--model", str(demo_template / "model"), "--steps", "2", "--guidance-scale", "9",
            "--out", str(out), "--json", *extra]
    return main(args)


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=int)


def test_each_prompt_at_each_scale_and_scale_0_is_the_base_model(demo_template, lora_file, tmp_path, capsys,
                                                                one_torch_thread):
    assert _sample(demo_template, tmp_path / "base", "--prompt", "a red circle") == 0
    base_line = json.loads(capsys.readouterr().out.strip())
    assert base_line["scale"] == 0 and base_line["seed"] == 0

    assert _sample(demo_template, tmp_path / "lora", "--prompt", "a red circle", "--prompt", "a shape", "--lora",
                   str(lora_file), "--lora-scale", "0", "1", "--seed", "5") == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [(x["prompt"], x["scale"], x["seed"]) for x in lines] == [
        ("a red circle", 0, 5), ("a red circle", 1, 5), ("a shape", 0, 6), ("a shape", 1, 6)]
    assert [p.name for p in sorted((tmp_path / "lora").iterdir())] == [
        "00-a-red-circle-0.png", "00-a-red-circle-1.png", "01-a-shape-0.png", "01-a-shape-1.png"]
    off, on = _pixels(lines[0]["path"]), _pixels(lines[1]["path"])
    assert np.abs(on - off).mean() > 1, "the LoRA at scale 1 changes the image"

    # seed 5 for the base-only render: the LoRA's scale-0 image of the first prompt must be it exactly
    assert _sample(demo_template, tmp_path / "base5", "--prompt", "a red circle", "--seed", "5") == 0
    capsys.readouterr()
    np.testing.assert_array_equal(_pixels(tmp_path / "base5" / "00-a-red-circle-0.png"), off)


def test_apg_with_eta_1_and_no_cap_or_momentum_is_cfg(demo_template, tmp_path, capsys, one_torch_thread):
    assert _sample(demo_template, tmp_path / "cfg", "--prompt", "a red circle") == 0
    assert _sample(demo_template, tmp_path / "as-cfg", "--prompt", "a red circle", "--guidance", "apg",
                   "--apg-eta", "1", "--apg-norm-threshold", "0", "--apg-momentum", "0") == 0
    assert _sample(demo_template, tmp_path / "apg", "--prompt", "a red circle", "--guidance", "apg") == 0
    capsys.readouterr()
    name = "00-a-red-circle-0.png"
    cfg, as_cfg, apg = (_pixels(tmp_path / d / name) for d in ("cfg", "as-cfg", "apg"))
    assert np.abs(as_cfg - cfg).max() <= 1
    assert np.abs(apg - cfg).mean() > 1, "APG's defaults change the image"


@pytest.mark.parametrize("extra, expected", [
    (["--model", "no/such/folder"], "--model: no/such/folder: not found"),
    (["--lora", "missing.safetensors"], "--lora: missing.safetensors: no such file"),
    (["--apg-eta", "2"], "--apg-eta"),
    (["--width", "60"], "--width: 60 is not a positive multiple of 8"),
])
def test_bad_input_is_one_line_and_exit_2(demo_template, tmp_path, capsys, extra, expected):
    args = ["sample", "--model", str(demo_template / "model"), "--prompt", "x", "--out", str(tmp_path / "o"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expected in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_stable_cascade_is_pointed_at_sample_cascade(tmp_path, capsys):
    model = tmp_path / "cascade"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "StableCascadePriorPipeline"}))
    assert main(["sample", "--model", str(model), "--prompt", "x", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --model: Stable Cascade") and "sample-cascade" in err and "\n" not in err


def test_an_sdxl_lora_through_its_fp32_decode_pipeline(tmp_path, capsys, one_torch_thread):
    """SDXL's validation pipeline is a wrapper (its VAE decodes in fp32): the LoRA still loads and acts."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from trainer.demo import build_tiny_sdxl

    model = build_tiny_sdxl(tmp_path / "model")
    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_v"]))
    StableDiffusionXLPipeline.save_lora_weights(tmp_path / "lora",
                                                unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    assert main(["sample", "--model", str(model), "--lora", str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"),
                 "--prompt", "a red circle", "--steps", "2", "--out", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    off, on = (_pixels(tmp_path / "out" / f"00-a-red-circle-{s}.png") for s in (0, 1))
    assert np.abs(on - off).mean() > 1


def test_runs_and_checkpoints_side_by_side_on_one_seed_with_a_grid(demo_run, tmp_path, capsys, one_torch_thread):
    """No --model: the run's job names it. The last checkpoint's column is the run's final LoRA exactly (export
    rebuilds the same weights), an earlier checkpoint's differs, and the grid carries every setting."""
    from trainer.sample_grid import read_settings

    out, grid = tmp_path / "out", tmp_path / "grid" / "try.png"
    step1, step2 = demo_run / "checkpoints" / "step-1", demo_run / "checkpoints" / "step-2"
    assert main(["sample", "--run", str(demo_run), "--run", str(step1), "--run", str(step2), "--prompt",
                 "a red circle", "--steps", "2", "--seed", "3", "--out", str(out), "--grid", str(grid),
                 "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert lines[-1] == {"grid": str(grid)}
    images = lines[:-1]
    assert [(x["column"], x["label"], x["scale"], x["seed"], x["row"]) for x in images] == [
        (0, "base", 0, 3, 0), (1, "run/final", 1, 3, 0), (2, "run/step-1", 1, 3, 0), (3, "run/step-2", 1, 3, 0)]
    assert [x["source"] for x in images] == ["", str(demo_run), str(step1), str(step2)]
    base, final, first, last = (_pixels(x["path"]) for x in images)
    assert np.abs(final - base).mean() > 0.5, "the trained LoRA changes the image"
    assert np.abs(first - final).mean() > 0.1, "a checkpoint one step earlier is another LoRA"
    np.testing.assert_array_equal(last, final)

    settings = read_settings(grid)
    assert settings["model"] == str(demo_run.parent / "model")
    assert (settings["prompts"], settings["seed"], settings["steps"]) == (["a red circle"], 3, 2)
    assert [(c["label"], c["source"], c["scale"]) for c in settings["columns"]] == [
        ("base", "", 0), ("run/final x1", str(demo_run), 1), ("run/step-1 x1", str(step1), 1),
        ("run/step-2 x1", str(step2), 1)]
    assert settings["columns"][1]["file"] == str(demo_run / "final" / "pytorch_lora_weights.safetensors")
    height, width = base.shape[:2]
    assert (settings["width"], settings["height"]) == (width, height)
    with Image.open(grid) as image:
        assert image.size[0] > 4 * width and image.size[1] > height


def _refused(args, capsys, expected):
    assert main(["sample", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {expected}") and "\n" not in err, err


def test_bad_runs_and_grids_are_one_line_and_exit_2(demo_template, tmp_path, capsys):
    from trainer.job import load_job, save_job

    out = ["--prompt", "x", "--out", str(tmp_path / "o")]
    _refused(out, capsys, "--model: required (or --run")
    _refused(["--run", str(tmp_path / "nothing"), *out], capsys, f"--run: {(tmp_path / 'nothing').resolve()}: not found")
    _refused(["--run", str(tmp_path), *out], capsys, f"--run: {tmp_path.resolve()}: not a run folder")
    run = tmp_path / "run"
    (run / "checkpoints" / "step-3").mkdir(parents=True)
    job = load_job(demo_template / "job.json")
    job.model.path = str(demo_template / "model")
    save_job(job, run / "job.json")
    step = (run / "checkpoints" / "step-3").resolve()
    _refused(["--run", str(step), *out], capsys, f"--run: {step}: an incomplete checkpoint")
    job.network.kind = "full"
    save_job(job, run / "job.json")
    (run / "final" / "diffusers").mkdir(parents=True)
    _refused(["--run", str(run), *out], capsys, f"--run: {run}: the run trained no LoRA (network.kind full)")
    model = ["--model", str(demo_template / "model")]
    _refused([*model, "--grid", str(tmp_path / "g.jpg"), *out], capsys,
             f"--grid: {tmp_path / 'g.jpg'}: expected a .png file")
    _refused([*model, "--embedding", str(tmp_path / "e.safetensors"), *out], capsys,
             f"--embedding: {tmp_path / 'e.safetensors'}: no such file")
    (tmp_path / "e.safetensors").write_bytes(b"not safetensors")
    _refused([*model, "--embedding", str(tmp_path / "e.safetensors"), *out], capsys,
             f"--embedding: {tmp_path / 'e.safetensors'}: not a readable safetensors file")
    assert not (tmp_path / "o").exists()


def test_an_embedding_acts_where_a_prompt_names_its_token(demo_template, tmp_path, capsys, one_torch_thread):
    from safetensors.torch import save_file

    width = json.loads((demo_template / "model" / "text_encoder" / "config.json").read_text())["hidden_size"]
    embedding = tmp_path / "shape.safetensors"
    torch.manual_seed(0)
    save_file({"emb_params": torch.randn(1, width)}, embedding, metadata={"token": "<shape>"})
    prompts = ["--prompt", "a <shape>", "--prompt", "a red circle"]
    assert _sample(demo_template, tmp_path / "plain", *prompts) == 0
    assert _sample(demo_template, tmp_path / "with", *prompts, "--embedding", str(embedding), "--grid",
                   str(tmp_path / "grid.png")) == 0
    capsys.readouterr()
    token, plain_token = _pixels(tmp_path / "with" / "00-a-shape-0.png"), _pixels(tmp_path / "plain" / "00-a-shape-0.png")
    assert np.abs(token - plain_token).mean() > 0.5, "the embedding changes the prompt that names its token"
    np.testing.assert_array_equal(_pixels(tmp_path / "with" / "01-a-red-circle-0.png"),
                                  _pixels(tmp_path / "plain" / "01-a-red-circle-0.png"))
    from trainer.sample_grid import read_settings

    assert read_settings(tmp_path / "grid.png")["embeddings"] == [str(embedding)]
