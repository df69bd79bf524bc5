"""`python -m trainer import`: other trainers' configs, written by hand from the field names those projects
document, become jobs that `check` accepts; the report accounts for every field; bad input is one line, exit 2."""

import json
import re
import shutil
import tomllib

import pytest

from trainer.cli import main
from trainer.demo import build_demo
from trainer.imports.report import flat_keys
from trainer.events import read_events
from trainer.job import load_job

QUIET = ["--set", "validation.prompts=[]", "--set", "output.checkpoint_every=0"]
# What makes an imported job a 2-step run of the tiny demo model: one image at a time at 64 px, in fp32 without
# accumulation or checkpointing (bf16 autocast on a CPU, accumulation and checkpointing would triple the time).
TINY_RUN = ["--set", "dataset.resolution=64", "--set", "dataset.bucket_min_side=0",
            "--set", "dataset.bucket_max_side=0", "--set", "schedule.max_steps=2", "--set", "schedule.warmup_steps=0",
            "--set", "schedule.batch_size=1",
            "--set", "precision.mixed_precision=no", "--set", "schedule.gradient_accumulation=1",
            "--set", "precision.gradient_checkpointing=false", "--set", "ema.enabled=false", *QUIET]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The tiny demo (SDXL: the one model every test here can use), its images also laid out kohya style:
    train/10_sks shape, reg/1_shape."""
    root = tmp_path_factory.mktemp("import-demo")
    build_demo(root / "demo", steps=2, family="sdxl")
    files = sorted((root / "demo" / "dataset").iterdir())  # images and their captions
    pictures = [path for path in files if path.suffix != ".txt"]
    for folder, chosen in ((root / "train" / "10_sks shape", files), (root / "reg" / "1_shape", pictures[:3])):
        folder.mkdir(parents=True)
        for path in chosen:
            shutil.copy(path, folder / path.name)
    return root


def kohya_lora(root, **fields) -> dict:
    """A kohya_ss GUI LoRA config as its LoRA tab saves it (a representative part of its fields)."""
    return {"LoRA_type": "Standard", "pretrained_model_name_or_path": str(root / "demo" / "model"),
            "sdxl": False, "v2": False, "v_parameterization": False, "network_dim": 8, "network_alpha": 4,
            "conv_dim": 1, "conv_alpha": 1, "max_resolution": "64,64", "enable_bucket": True,
            "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 64, "optimizer": "AdamW",
            "optimizer_args": "", "learning_rate": 0.0001, "unet_lr": 0.0001, "text_encoder_lr": 5e-05,
            "network_train_unet_only": True, "lr_scheduler": "cosine", "lr_warmup": 10, "max_train_steps": 100,
            "epoch": 1, "max_train_epochs": "", "train_batch_size": 1, "gradient_accumulation_steps": 1,
            "mixed_precision": "no", "save_precision": "fp16", "gradient_checkpointing": False,
            "cache_latents": True, "cache_latents_to_disk": False, "shuffle_caption": False, "keep_tokens": 0,
            "caption_dropout_rate": 0, "caption_extension": ".txt", "noise_offset": 0, "noise_offset_type": "Original",
            "min_snr_gamma": 0, "seed": 0, "train_data_dir": str(root / "train"), "reg_data_dir": "",
            "output_dir": str(root / "out"), "output_name": "shape", "save_every_n_steps": 0,
            "save_every_n_epochs": 1, "sample_prompts": "", "sample_every_n_steps": 0, "prior_loss_weight": 1,
            "xformers": "xformers", "clip_skip": 1, "save_model_as": "safetensors", "vae": "", **fields}


def run_import(tmp_path, capsys, *configs, out="job.json"):
    """Write each (name, text) config, import them; (exit code, report lines, stderr, the job path)."""
    paths = []
    for name, text in configs:
        paths.append(tmp_path / name)
        paths[-1].write_text(text, encoding="utf-8")
    job = tmp_path / out
    code = main(["import", *map(str, paths), "--out", str(job)])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err, job


def parts(report: list[str]) -> dict[str, list[str]]:
    """The report's three parts: their lines `FILE: key ...` as `FILE: key`."""
    out, current = {}, None
    for line in report:
        head = re.match(r"^(mapped exactly|mapped approximately|no equivalent) \(\d+\):$", line)
        if head:
            current = out.setdefault(head.group(1), [])
        elif line.startswith("  ") and current is not None:
            current.append(re.match(r"^  (\S+: \S+)", line).group(1))
    return out


def assert_every_key_reported_once(report, **configs):
    found = parts(report)
    reported = [key for lines in found.values() for key in lines]
    expected = [f"{name}: {key}" for name, config in configs.items() for key in flat_keys(config)]
    assert sorted(reported) == sorted(expected)
    return found


def line_of(report, key):
    return next(line for line in report if line.startswith(f"  {key}"))


def test_kohya_lora_imports_and_checks(demo, tmp_path, capsys):
    config = kohya_lora(demo, lr_scheduler="cosine_with_min_lr", optimizer_args="weight_decay=0.1 betas=0.9,0.99 "
                        "decouple=True", sample_prompts="a sks shape --n blurry --s 12 --l 5\na shape on grass")
    code, report, err, job_path = run_import(tmp_path, capsys, ("lora.json", json.dumps(config)))
    assert code == 0, err
    found = assert_every_key_reported_once(report, **{"lora.json": config})
    assert "lora.json: network_dim" in found["mapped exactly"]
    assert {"lora.json: lr_scheduler", "lora.json: optimizer_args", "lora.json: train_data_dir",
            "lora.json: sample_prompts", "lora.json: epoch"} <= set(found["mapped approximately"])
    assert {"lora.json: conv_dim", "lora.json: xformers", "lora.json: clip_skip"} <= set(found["no equivalent"])
    assert "decouple=True" in line_of(report, "lora.json: optimizer_args")
    job = load_job(job_path)
    assert (job.network.rank, job.network.alpha, job.text_encoder.mode) == (8, 4.0, "off")
    assert (job.schedule.epochs, job.schedule.max_steps, job.schedule.lr_scheduler) == (1, 0, "cosine")
    assert (job.optimizer.weight_decay, job.optimizer.betas) == (0.1, [0.9, 0.99])
    assert job.validation.prompts == ["a sks shape", "a shape on grass"]
    assert (job.validation.negative_prompt, job.validation.steps, job.validation.guidance_scale) == ("blurry", 12, 5)
    [folder] = job.dataset.folders  # the N_name subfolder, its name the caption of uncaptioned images
    assert (folder.path, folder.instance_prompt) == (str(demo / "train" / "10_sks shape"), "sks shape")
    assert main(["check", str(job_path)]) == 0
    assert "12 images x 10 repeats" in capsys.readouterr().out


def test_dreambooth_with_regularization_images(demo, tmp_path, capsys):
    config = kohya_lora(demo, reg_data_dir=str(demo / "reg"), network_train_unet_only=False, prior_loss_weight=0.5,
                        text_encoder_lr=0)
    code, report, err, job_path = run_import(tmp_path, capsys, ("db.json", json.dumps(config)))
    assert code == 0, err
    found = assert_every_key_reported_once(report, **{"db.json": config})
    assert "db.json: reg_data_dir" in found["mapped approximately"]
    job = load_job(job_path)
    assert (job.prior.enabled, job.prior.class_prompt, job.prior.loss_weight) == (True, "shape", 0.5)
    assert (job.prior.class_dir, job.prior.num_class_images) == (str(demo / "reg" / "1_shape"), 3)
    assert (job.text_encoder.mode, job.text_encoder.learning_rate) == ("lora", 1e-4)  # kohya: learning_rate
    assert main(["check", str(job_path)]) == 0
    assert "prior preservation: 3 class images in" in capsys.readouterr().out  # existing ones: none generated


@pytest.mark.parametrize("kind", ["LyCORIS/LoCon", "LyCORIS/LoHa", "LyCORIS/LoKr"])
def test_lycoris_kinds_are_reported_as_plain_lora(demo, tmp_path, capsys, kind):
    config = kohya_lora(demo, LoRA_type=kind, conv_dim=16, conv_alpha=8, optimizer="Prodigy")
    code, report, err, job_path = run_import(tmp_path, capsys, ("lyco.json", json.dumps(config)))
    assert code == 0, err
    found = assert_every_key_reported_once(report, **{"lyco.json": config})
    assert {"lyco.json: LoRA_type", "lyco.json: optimizer"} <= set(found["mapped approximately"])
    assert {"lyco.json: conv_dim", "lyco.json: conv_alpha"} <= set(found["no equivalent"])
    assert kind in line_of(report, "lyco.json: LoRA_type") and "plain LoRA" in line_of(report, "lyco.json: LoRA_type")
    assert load_job(job_path).network.kind == "lora"
    assert main(["check", str(job_path)]) == 0


SDXL_TOML = """
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1
flip_aug = false
color_aug = false

[[datasets]]
resolution = [1024, 1024]
batch_size = 2
enable_bucket = true
min_bucket_reso = 512
max_bucket_reso = 2048
bucket_no_upscale = true

  [[datasets.subsets]]
  image_dir = '/home/someone/train/img/20_ohwx shape'
  num_repeats = 20
  class_tokens = 'ohwx shape'

  [[datasets.subsets]]
  is_reg = true
  image_dir = '/home/someone/train/reg/1_shape'
  class_tokens = 'shape'
  num_repeats = 1
"""


def test_kohya_sdxl_lora_with_dataset_toml_checks_and_trains(demo, tmp_path, capsys):
    """The issue's 'done when': an SDXL LoRA config from kohya_ss's GUI plus its sd-scripts dataset TOML, both
    naming another machine's paths, import into a job that checks and trains the tiny SDXL demo for 2 steps once
    its paths (and the sizes a tiny model needs) are replaced through --set."""
    config = {"LoRA_type": "Standard",
              "pretrained_model_name_or_path": "/home/someone/models/sd_xl_base_1.0.safetensors",
              "sdxl": True, "v2": False, "v_parameterization": False, "network_dim": 16, "network_alpha": 8,
              "conv_dim": 1, "conv_alpha": 1, "max_resolution": "1024,1024", "enable_bucket": True,
              "optimizer": "AdamW8bit", "optimizer_args": "weight_decay=0.01", "learning_rate": 0.0001,
              "unet_lr": 0.0001, "text_encoder_lr": 0.00005, "network_train_unet_only": False,
              "lr_scheduler": "constant_with_warmup", "lr_warmup": 5, "max_train_steps": 2000, "epoch": 0,
              "train_batch_size": 1, "gradient_accumulation_steps": 2, "mixed_precision": "bf16",
              "gradient_checkpointing": True, "cache_latents": True, "cache_latents_to_disk": True,
              "cache_text_encoder_outputs": False, "shuffle_caption": False, "keep_tokens": 0,
              "caption_dropout_rate": 0.05, "caption_extension": ".txt", "noise_offset": 0.0357,
              "min_snr_gamma": 5, "seed": 42, "train_data_dir": "", "reg_data_dir": "",
              "dataset_config": "/home/someone/train/dataset.toml", "output_dir": "/home/someone/out",
              "output_name": "ohwx_sdxl", "save_every_n_steps": 500, "save_every_n_epochs": 0,
              "sample_prompts": "ohwx shape on a table --w 1024 --h 1024 --s 28", "sample_every_n_steps": 250,
              "prior_loss_weight": 1.0, "full_bf16": False, "fp8_base": False, "xformers": "sdpa",
              "save_model_as": "safetensors", "save_precision": "bf16", "vae": ""}
    code, report, err, job_path = run_import(tmp_path, capsys, ("sdxl.json", json.dumps(config)),
                                             ("dataset.toml", SDXL_TOML))
    assert code == 0, err
    found = assert_every_key_reported_once(report, **{"sdxl.json": config,
                                                      "dataset.toml": tomllib.loads(SDXL_TOML)})
    assert {"sdxl.json: fp8_base", "sdxl.json: full_bf16", "sdxl.json: conv_dim", "dataset.toml: general.color_aug",
            "dataset.toml: datasets.0.subsets.1.num_repeats"} <= set(found["no equivalent"])
    assert {"sdxl.json: dataset_config", "sdxl.json: train_data_dir"} <= set(found["mapped approximately"])
    job = load_job(job_path)
    assert (job.model.family, job.dataset.resolution, job.schedule.batch_size) == ("sdxl", 1024, 2)  # TOML wins
    assert (job.optimizer.name, job.schedule.warmup_steps, job.text_encoder.mode) == ("adamw8bit", 100, "lora")
    assert [(f.path, f.repeats, f.instance_prompt) for f in job.dataset.folders] == [
        ("/home/someone/train/img/20_ohwx shape", 20, "ohwx shape")]
    assert (job.prior.enabled, job.prior.class_prompt) == (True, "shape")

    assert main(["check", str(job_path)]) == 2  # another machine's paths: one line naming the missing one
    assert "not found" in capsys.readouterr().err

    tiny = demo / "demo"
    classes = tmp_path / "classes"
    classes.mkdir()
    for path in sorted((tiny / "dataset").glob("*.png"))[:2]:
        shutil.copy(path, classes / path.name)
    here = ["--set", f"model.path={tiny / 'model'}", "--set", "model.family=sdxl",
            "--set", f'dataset.folders=[{{"path": "{tiny / "dataset"}", "instance_prompt": "ohwx shape"}}]',
            "--set", f"prior.class_dir={classes}", "--set", "prior.num_class_images=2",
            "--set", f"dataset.cache_dir={tmp_path / 'cache'}"]
    assert main(["check", str(job_path), *here, *TINY_RUN]) == 0
    assert "prior preservation: 2 class images" in capsys.readouterr().out
    trains_two_steps(job_path, tmp_path, *here)
    assert (tmp_path / "run" / "final" / "ohwx_sdxl.safetensors").is_file()


def trains_two_steps(job_path, tmp_path, *extra):
    """The imported job, its sizes made tiny (TINY_RUN), trains 2 steps and writes its LoRA."""
    assert main(["run", str(job_path), "--set", f"output.output_dir={tmp_path / 'run'}", *TINY_RUN, *extra]) == 0
    steps = [e for e in read_events(tmp_path / "run" / "events.jsonl")[0] if e["type"] == "step"]
    assert [e["step"] for e in steps] == [1, 2]
    assert (tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_bad_input_is_one_line_and_writes_nothing(demo, tmp_path, capsys):
    cases = [("broken.json", '{"network_dim": 8,', "broken.json: not valid JSON (line 1"),
             ("other.json", '{"foo": 1}', "other.json: not a format this trainer imports"),
             ("bad.toml", "[[datasets]\n", "bad.toml: neither JSON nor valid TOML"),
             ("rank.json", json.dumps(kohya_lora(demo, network_dim="many")),
              "rank.json: network_dim: expected a number"),
             ("big.json", json.dumps(kohya_lora(demo, network_dim=5000)), "big.json: network_dim: network.rank: Input "
                                                                          "should be less than or equal to 1024"),
             ("empty.toml", "[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 2\n",
              "empty.toml: datasets.0.subsets.0: no image_dir")]
    for name, text, message in cases:
        code, report, err, job_path = run_import(tmp_path, capsys, (name, text))
        assert code == 2 and err.startswith("error: ")
        assert len(err.strip().splitlines()) == 1 and message in err, err
        assert report == [] and not job_path.exists()


def test_an_existing_out_file_is_kept_unless_forced(demo, tmp_path, capsys):
    job = tmp_path / "job.json"
    job.write_text("mine\n")
    config = tmp_path / "lora.json"
    config.write_text(json.dumps(kohya_lora(demo)))
    assert main(["import", str(config), "--out", str(job)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {job}: already exists; pass --force to replace it\n" and job.read_text() == "mine\n"
    assert main(["import", str(config), "--out", str(job), "--force"]) == 0
    assert load_job(job).network.rank == 8


def test_the_readme_table_matches_the_mapping_tables():
    """Each source field the README's tables name is one the importer maps, onto fields the job has; each
    field the importer maps is in the README; and a row that says exact names the field the table maps to."""
    from pathlib import Path

    from trainer.imports import ai_toolkit, kohya, onetrainer, sd_scripts, simpletuner
    from trainer.job import Job

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = text.split("## Coming from another trainer", 1)[1].split("\n## ", 1)[0]
    tables = {"kohya_ss GUI JSON": set(kohya.EXACT) | set(kohya.RULES),
              "sd-scripts dataset TOML": {*sd_scripts.GLOBAL, *sd_scripts.GLOBAL_RULES, *sd_scripts.FOLDER},
              "OneTrainer config (preset or saved config)": {*onetrainer.EXACT, *onetrainer.RULES},
              "OneTrainer concepts": set(onetrainer.CONCEPT_RULES),
              "SimpleTuner config.json (keys with or without `--`)": {*simpletuner.EXACT, *simpletuner.RULES},
              "SimpleTuner multidatabackend.json": set(simpletuner.BACKEND_RULES),
              "ai-toolkit job YAML (under `config.process[0]`)": {*ai_toolkit.EXACT, *ai_toolkit.RULES},
              "ai-toolkit datasets": set(ai_toolkit.DATASET_RULES)}
    exact = {"kohya_ss GUI JSON": kohya.EXACT, "sd-scripts dataset TOML": sd_scripts.GLOBAL,
             "OneTrainer config (preset or saved config)": onetrainer.EXACT, "OneTrainer concepts": {},
             "SimpleTuner config.json (keys with or without `--`)": simpletuner.EXACT,
             "SimpleTuner multidatabackend.json": {}, "ai-toolkit datasets": {},
             "ai-toolkit job YAML (under `config.process[0]`)": ai_toolkit.EXACT}
    for title, mapped in tables.items():
        rows = section.split(f"| {title} |", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
        named = set()
        for row in rows:
            source, ours, how = [cell.strip() for cell in row.strip("|").split(" | ")]
            keys = re.findall(r"`([A-Za-z0-9_.]+)`", source)
            assert keys and set(keys) <= mapped, row
            named |= set(keys)
            fields = [f for f in re.findall(r"`([a-z_.N0-9]+)`", ours) if "." in f or f in Job.model_fields]
            for field in fields:
                assert _has_field(Job, field.replace(".N.", ".")), (row, field)
            if how.startswith("exact") and fields:
                assert all(exact[title][k][0] in fields for k in keys if k in exact[title]), row
        assert named == mapped, sorted(mapped ^ named)


def _has_field(model, dotted):
    for part in dotted.split("."):
        if part not in model.model_fields:
            return False
        annotation = model.model_fields[part].annotation
        model = getattr(annotation, "__args__", [annotation])[0] if hasattr(annotation, "__args__") else annotation
    return True


def onetrainer_preset(root) -> dict:
    """A OneTrainer SDXL LoRA config as its UI saves one (nested sections, upper-case enum names)."""
    return {"__version": 6, "training_method": "LORA", "model_type": "STABLE_DIFFUSION_XL_10_BASE",
            "base_model_name": str(root / "demo" / "model"), "workspace_dir": str(root / "ot-run"),
            "cache_dir": str(root / "ot-cache"), "output_model_destination": "models/ohwx.safetensors",
            "output_model_format": "SAFETENSORS", "concept_file_name": "training_concepts/concepts.json",
            "resolution": "64", "batch_size": 2, "gradient_accumulation_steps": 1, "epochs": 3,
            "learning_rate": 0.0003, "learning_rate_scheduler": "COSINE_WITH_HARD_RESTARTS",
            "learning_rate_warmup_steps": 10, "learning_rate_cycles": 1, "lora_rank": 8, "lora_alpha": 4.0,
            "optimizer": {"optimizer": "ADAMW_8BIT", "weight_decay": 0.01, "beta1": 0.9, "beta2": 0.99,
                          "eps": 1e-8, "fused": False},
            "text_encoder": {"train": True, "learning_rate": 5e-5, "stop_training_after": 30},
            "unet": {"train": True, "learning_rate": 0.0002}, "ema": "OFF", "ema_decay": 0.999,
            "offset_noise_weight": 0.05, "train_dtype": "BFLOAT_16", "gradient_checkpointing": "ON",
            "latent_caching": True, "aspect_ratio_bucketing": True, "loss_weight_fn": "MIN_SNR_GAMMA",
            "loss_weight_strength": 5.0, "attention_mechanism": "SDP", "backup_after": 100,
            "backup_after_unit": "STEP", "sample_after": 10, "sample_after_unit": "MINUTE",
            "samples": [{"enabled": True, "prompt": "ohwx shape on a table", "height": 1024, "seed": 42},
                        {"enabled": False, "prompt": "unused", "height": 1024, "seed": 1}]}


def onetrainer_concepts(root) -> list:
    return [{"__version": 1, "name": "ohwx", "path": str(root / "train" / "10_sks shape"), "enabled": True,
             "balancing": 4.0, "balancing_strategy": "REPEATS", "loss_weight": 1.0, "include_subdirectories": False,
             "image": {"enable_random_flip": True, "enable_crop_jitter": True},
             "text": {"prompt_source": "sample", "prompt_path": "", "enable_tag_shuffling": True,
                      "tag_delimiter": ",", "keep_tags_count": 1}},
            {"name": "held out", "path": "/nowhere", "enabled": False, "balancing": 1.0}]


def test_onetrainer_config_and_concepts_import_check_and_train(demo, tmp_path, capsys):
    config, concepts = onetrainer_preset(demo), onetrainer_concepts(demo)
    code, report, err, job_path = run_import(tmp_path, capsys, ("concepts.json", json.dumps(concepts)),
                                             ("ohwx.json", json.dumps(config)))
    assert code == 0, err
    assert report[:2] == [f"read {tmp_path / 'ohwx.json'} as OneTrainer config",
                          f"read {tmp_path / 'concepts.json'} as OneTrainer concepts"]
    found = assert_every_key_reported_once(report, **{"ohwx.json": config, "concepts.json": concepts})
    assert {"ohwx.json: learning_rate_scheduler", "ohwx.json: output_model_destination",
            "ohwx.json: samples.0.prompt"} <= set(found["mapped approximately"])
    assert {"ohwx.json: attention_mechanism", "ohwx.json: sample_after", "concepts.json: 1.path",
            "concepts.json: 0.image.enable_crop_jitter"} <= set(found["no equivalent"])
    job = load_job(job_path)
    assert (job.model.family, job.network.rank, job.optimizer.name, job.optimizer.betas) == (
        "sdxl", 8, "adamw8bit", [0.9, 0.99])
    assert (job.optimizer.learning_rate, job.text_encoder.mode, job.schedule.epochs) == (2e-4, "lora", 3)
    assert (job.diffusion.min_snr_gamma, job.precision.mixed_precision, job.output.checkpoint_every) == (5, "bf16", 100)
    assert (job.output.name, job.validation.prompts) == ("ohwx", ["ohwx shape on a table"])
    [folder] = job.dataset.folders
    assert (folder.repeats, job.dataset.shuffle_tags, job.dataset.random_flip) == (4, True, True)
    assert main(["check", str(job_path)]) == 0
    assert "12 images x 4 repeats" in capsys.readouterr().out
    trains_two_steps(job_path, tmp_path)


def test_simpletuner_config_and_databackends_import_check_and_train(demo, tmp_path, capsys):
    """SimpleTuner's options with and without their `--`, and its dataset list: an image dataset (repeats 0 is
    once), a regularisation dataset, and the text-embed cache entry it needs but we do not."""
    config = {"--model_family": "sdxl", "--model_type": "lora", "--lora_type": "standard",
              "--pretrained_model_name_or_path": str(demo / "demo" / "model"), "--output_dir": str(tmp_path / "st"),
              "--data_backend_config": "config/multidatabackend.json", "--lora_rank": 8, "lora_alpha": 8,
              "--learning_rate": 1e-4, "--lr_scheduler": "polynomial", "--lr_warmup_steps": 10,
              "--max_train_steps": 500, "--num_train_epochs": 0, "--train_batch_size": 1,
              "--gradient_accumulation_steps": 1, "--mixed_precision": "bf16", "--optimizer": "adamw_bf16",
              "--resolution": 64, "--resolution_type": "pixel_area", "--validation_prompt": "ohwx shape",
              "--validation_steps": 100, "--snr_gamma": 5, "--checkpointing_steps": 250, "--report_to": "wandb",
              "--base_model_precision": "int8-quanto", "--seed": 7}
    backends = [{"id": "ohwx", "type": "local", "instance_data_dir": str(demo / "train" / "10_sks shape"),
                 "caption_strategy": "textfile", "instance_prompt": "ohwx shape", "repeats": 2, "resolution": 64,
                 "resolution_type": "pixel_area", "crop": True, "crop_style": "center",
                 "cache_dir_vae": "cache/vae/ohwx", "minimum_image_size": 32},
                {"id": "reg", "type": "local", "instance_data_dir": str(demo / "reg" / "1_shape"),
                 "is_regularisation_data": True, "instance_prompt": "shape", "caption_strategy": "instanceprompt"},
                {"id": "text-embeds", "dataset_type": "text_embeds", "default": True, "type": "local",
                 "cache_dir": "cache/text"}]
    code, report, err, job_path = run_import(tmp_path, capsys, ("config.json", json.dumps(config)),
                                             ("multidatabackend.json", json.dumps(backends)))
    assert code == 0, err
    found = assert_every_key_reported_once(report, **{"config.json": config, "multidatabackend.json": backends})
    assert {"config.json: --report_to", "config.json: --base_model_precision", "multidatabackend.json: 2.cache_dir",
            "multidatabackend.json: 0.cache_dir_vae"} <= set(found["no equivalent"])
    assert {"config.json: --optimizer", "multidatabackend.json: 1.is_regularisation_data"} <= set(
        found["mapped approximately"])
    job = load_job(job_path)
    assert (job.model.family, job.network.rank, job.network.alpha, job.schedule.max_steps) == ("sdxl", 8, 8, 500)
    assert (job.validation.prompts, job.diffusion.min_snr_gamma, job.optimizer.name) == (["ohwx shape"], 5, "adamw")
    [folder] = job.dataset.folders
    assert (folder.repeats, folder.instance_prompt) == (3, "ohwx shape")
    assert (job.prior.enabled, job.prior.class_prompt, job.prior.num_class_images) == (True, "shape", 3)
    assert main(["check", str(job_path)]) == 0
    assert "12 images x 3 repeats" in capsys.readouterr().out
    trains_two_steps(job_path, tmp_path)


AI_TOOLKIT_YAML = """
job: extension
config:
  name: ohwx_lora
  process:
    - type: sd_trainer
      training_folder: {out}
      device: cuda:0
      trigger_word: ohwx
      network:
        type: lokr
        linear: 8
        linear_alpha: 8
      save:
        dtype: float16
        save_every: 250
        max_step_saves_to_keep: 4
      datasets:
        - folder_path: {folder}
          caption_ext: txt
          caption_dropout_rate: 0.05
          shuffle_tokens: false
          cache_latents_to_disk: true
          resolution: [32, 48, 64]
      train:
        batch_size: 1
        steps: 300
        gradient_accumulation_steps: 1
        train_unet: true
        train_text_encoder: false
        gradient_checkpointing: true
        noise_scheduler: ddpm
        optimizer: adamw8bit
        lr: 1.0e-4
        ema_config:
          use_ema: true
          ema_decay: 0.99
        dtype: bf16
      model:
        name_or_path: {model}
        is_xl: true
        quantize: false
      sample:
        sampler: ddpm
        sample_every: 100
        width: 64
        height: 64
        prompts:
          - "[trigger] shape on a table"
        neg: ""
        seed: 42
        walk_seed: true
        guidance_scale: 4
        sample_steps: 20
meta:
  name: "[name]"
  version: '1.0'
"""


def test_ai_toolkit_yaml_imports_checks_and_trains(demo, tmp_path, capsys):
    import yaml

    text = AI_TOOLKIT_YAML.format(out=tmp_path / "aitk", folder=demo / "train" / "10_sks shape",
                                  model=demo / "demo" / "model")
    code, report, err, job_path = run_import(tmp_path, capsys, ("ohwx.yaml", text))
    assert code == 0, err
    found = assert_every_key_reported_once(report, **{"ohwx.yaml": yaml.safe_load(text)})
    assert {"ohwx.yaml: config.process.0.network.type", "ohwx.yaml: config.process.0.trigger_word",
            "ohwx.yaml: config.process.0.datasets.0.resolution"} <= set(found["mapped approximately"])
    assert {"ohwx.yaml: config.process.0.train.noise_scheduler", "ohwx.yaml: meta.version",
            "ohwx.yaml: config.process.0.model.quantize"} <= set(found["no equivalent"])
    job = load_job(job_path)
    assert (job.model.family, job.network.rank, job.optimizer.name, job.ema.enabled) == ("sdxl", 8, "adamw8bit", True)
    assert (job.dataset.resolution, job.dataset.instance_token, job.output.name) == (64, "[trigger]", "ohwx_lora")
    assert job.validation.prompts == ["ohwx shape on a table"]
    [folder] = job.dataset.folders
    assert (folder.instance_prompt, folder.caption_extension) == ("ohwx", ".txt")
    assert main(["check", str(job_path)]) == 0
    trains_two_steps(job_path, tmp_path)


def test_bad_yaml_is_one_line(tmp_path, capsys):
    code, report, err, job_path = run_import(tmp_path, capsys, ("bad.yaml", "config: [unclosed\n"))
    assert code == 2 and err.startswith(f"error: {tmp_path / 'bad.yaml'}: not valid YAML (")
    assert len(err.strip().splitlines()) == 1 and not job_path.exists()
