"""Single-file (original-layout) export, merged models and `trainer export`, on the tiny demo models."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_checks import SAME_IMAGE_ATOL
from trainer.run import checkpoint
from trainer.methods import trainable
from trainer.cli import main
from trainer.export.command import FORMATS, export
from trainer.demo import build_tiny_sd15
from trainer.export.lora_files import JOB_FILE, JOB_METADATA_KEY, job_json, read_job_metadata, write_full
from trainer.families.detect import family_module
from trainer.job import JobError, from_sparse, save_job
from trainer.export.single_file import (original_layout, original_state_dict, unet_state_dict, vae_state_dict,
                                 write_single_file)

LORA_FILE = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    return build_tiny_sd15(tmp_path_factory.mktemp("sd15") / "model")


def test_single_file_round_trip_sd15(sd15, tmp_path):
    """diffusers' own single-file loader reads the file back to every tensor, and the image is the same."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd15, safety_checker=None)
    job = from_sparse({"model": {"path": str(sd15)}, "output": {"name": "tiny"}})
    path = write_single_file(pipe, tmp_path / "tiny.safetensors", {JOB_METADATA_KEY: job_json(job)})
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        q = f.get_slice("first_stage_model.encoder.mid.attn_1.q.weight").get_shape()
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys
    assert "model.diffusion_model.output_blocks.2.1.transformer_blocks.0.attn2.to_k.weight" in keys
    assert len(q) == 4, "the VAE's attention is a 1x1 convolution in the original layout"
    assert read_job_metadata(path) == job.model_dump(mode="json")

    loaded = StableDiffusionPipeline.from_single_file(str(path), config=str(sd15), local_files_only=True,
                                                      safety_checker=None)
    _assert_same_weights(pipe, loaded, ("unet", "vae", "text_encoder"))
    np.testing.assert_allclose(_render(loaded), _render(pipe), rtol=0, atol=SAME_IMAGE_ATOL)


def test_names_match_the_sd15_checkpoint_layout():
    """Full-size SD 1.5 configs (on the meta device): names where the numbering is easy to get wrong, as every
    SD 1.x checkpoint has them, and diffusers recognises the result as SD 1.x."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    with init_empty_weights():
        unet = UNet2DConditionModel(cross_attention_dim=768)  # the defaults are SD 1.x's UNet
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    unet_sd = {"model.diffusion_model." + k: v for k, v in unet_state_dict(unet).items()}
    vae_sd = vae_state_dict(vae)
    for key in ("input_blocks.3.0.op.weight", "input_blocks.4.0.skip_connection.weight",
                "input_blocks.11.0.out_layers.3.weight", "middle_block.1.proj_in.weight",
                "middle_block.2.emb_layers.1.weight", "output_blocks.2.1.conv.weight",
                "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.weight",
                "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight", "time_embed.2.weight", "out.2.weight"):
        assert "model.diffusion_model." + key in unet_sd, key
    assert len(unet_sd) == len(unet.state_dict()) == 686  # no two names collapse; SD 1.5's UNet tensor count
    assert infer_diffusers_model_type(unet_sd) == "v1"
    for key in ("encoder.down.0.downsample.conv.weight", "encoder.down.1.block.0.nin_shortcut.weight",
                "encoder.mid.block_2.conv2.weight", "decoder.up.0.block.2.conv1.weight",
                "decoder.up.1.block.0.nin_shortcut.weight", "decoder.up.3.upsample.conv.weight",
                "decoder.norm_out.weight"):
        assert key in vae_sd, key
    assert len(vae_sd) == len(vae.state_dict())
    assert vae_sd["decoder.mid.attn_1.proj_out.weight"].shape == (512, 512, 1, 1)


def test_single_file_round_trip_sd2_and_sdxl(sd15, tmp_path):
    """OpenCLIP text encoders (q, k, v fused; the projection transposed) and SDXL's two encoders read back."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    for name, build, cls in (("sd2", _tiny_sd2, StableDiffusionPipeline),
                             ("sdxl", _tiny_sdxl, StableDiffusionXLPipeline)):
        folder = build(sd15, tmp_path / name)
        pipe = cls.from_pretrained(folder)
        path = write_single_file(pipe, tmp_path / f"{name}.safetensors", {})
        tensors = load_file(path)
        loaded = cls.from_single_file(str(path), config=str(folder), local_files_only=True)
        encoders = ("text_encoder", "text_encoder_2") if name == "sdxl" else ("text_encoder",)
        _assert_same_weights(pipe, loaded, ("unet", "vae", *encoders))
        assert original_layout(pipe) == name
        if name == "sd2":
            qkv = tensors["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"]
            assert qkv.shape == (3 * 1024, 1024)
            assert "model.diffusion_model.output_blocks.2.1.conv.weight" in tensors  # up block 0 has no attention
        else:
            assert torch.equal(tensors["conditioner.embedders.1.model.text_projection"],
                               pipe.text_encoder_2.text_projection.weight.T)
            assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in tensors


def test_pipelines_without_an_original_layout_are_refused():
    with pytest.raises(JobError, match="StableDiffusion3Pipeline has no original-layout mapping"):
        original_state_dict(type("StableDiffusion3Pipeline", (), {})())


def test_merged_equals_base_plus_scaled_lora(sd15, tmp_path):
    """Fused at scale S: W + S * alpha/r * B @ A; the merged folder renders what the LoRA-loaded base renders at S,
    and the single file holds the same merged weights."""
    from diffusers import StableDiffusionPipeline

    rank, alpha, scale = 4, 8.0, 0.5
    run = _lora_run(sd15, tmp_path / "run", rank, alpha)
    written = export(run, "merged", lora_scale=scale)
    folder = run / "export" / "merged"
    assert written == [folder, folder / "lora.safetensors"]
    assert json.loads((folder / JOB_FILE).read_text())["network"]["alpha"] == alpha
    assert read_job_metadata(folder / "lora.safetensors")["network"]["alpha"] == alpha

    base = StableDiffusionPipeline.from_pretrained(sd15, safety_checker=None)
    merged = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    lora = load_file(run / "final" / LORA_FILE)
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    a, b = lora[f"unet.{layer}.lora_A.weight"], lora[f"unet.{layer}.lora_B.weight"]
    expected = base.unet.state_dict()[f"{layer}.weight"] + scale * alpha / rank * (b @ a)
    torch.testing.assert_close(merged.unet.state_dict()[f"{layer}.weight"], expected)
    assert torch.equal(merged.unet.conv_in.weight, base.unet.conv_in.weight)

    base.load_lora_weights(run / "final")
    base.set_adapters(base.get_active_adapters(), adapter_weights=[scale])
    np.testing.assert_allclose(_render(merged), _render(base), atol=1e-4)

    single = export(run, "single-file", lora_scale=scale)[0]
    assert single == run / "export" / "single-file" / "lora.safetensors"
    loaded = StableDiffusionPipeline.from_single_file(str(single), config=str(sd15), local_files_only=True,
                                                      safety_checker=None)
    _assert_same_weights(merged, loaded, ("unet", "vae", "text_encoder"))

    with pytest.raises(JobError, match="pass --force"):
        export(run, "merged")
    assert export(run, "merged", force=True)[0] == folder


def test_write_full_writes_a_folder_and_one_file(sd15, tmp_path):
    """What a full fine-tune leaves in final/: a diffusers folder with the job beside it, and (when asked) the
    single file."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd15, safety_checker=None)
    job = from_sparse({"model": {"path": str(sd15)}, "network": {"kind": "full"}, "output": {"name": "mine"}})
    outputs = write_full(tmp_path / "final", pipe, job, single_file=True)
    assert outputs == {"diffusers": tmp_path / "final" / "diffusers",
                       "single_file": tmp_path / "final" / "mine.safetensors"}
    _assert_same_weights(pipe, StableDiffusionPipeline.from_pretrained(outputs["diffusers"], safety_checker=None),
                         ("unet", "vae", "text_encoder"))
    assert json.loads((outputs["diffusers"] / JOB_FILE).read_text()) == job.model_dump(mode="json")
    assert read_job_metadata(outputs["single_file"]) == job.model_dump(mode="json")
    assert set(write_full(tmp_path / "again", pipe, job, single_file=False)) == {"diffusers"}
    assert not (tmp_path / "again" / "mine.safetensors").exists()


def test_full_finetune_checkpoint_exports_its_ema_unless_raw(sd15, tmp_path):
    """A checkpoint of a full fine-tune: the model is rebuilt, its EMA tensors go in (the raw ones with --raw)."""
    from diffusers import StableDiffusionPipeline

    run = tmp_path / "run"
    job = from_sparse({"model": {"path": str(sd15)}, "network": {"kind": "full"}, "ema": {"enabled": True},
                       "output": {"output_dir": str(run), "name": "full"}})
    save_job(job, run / "job.json")
    family = family_module("sd1")
    tr = trainable.setup(family, family.load(job.model), job, 3)
    gen = torch.Generator().manual_seed(0)
    raw = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in trainable.tensors(tr).items()}
    ema = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in trainable.tensors(tr).items()}
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    step = checkpoint.save(run / "checkpoints", 3, raw, optimizer.state_dict(), lr_scheduler, {"epoch": 0},
                           keep_last=1, ema=ema)

    single = export(step, "single-file")[0]
    loaded = StableDiffusionPipeline.from_single_file(str(single), config=str(sd15), local_files_only=True,
                                                      safety_checker=None)
    _assert_holds(loaded.unet, ema)
    assert read_job_metadata(single)["network"]["kind"] == "full"

    folder = export(run, "diffusers", raw=True)[0]
    _assert_holds(StableDiffusionPipeline.from_pretrained(folder, safety_checker=None).unet, raw)
    with pytest.raises(JobError, match="--format kohya: the run trained no LoRA"):
        export(run, "kohya")


def test_cli_exports_a_demo_run_in_every_format(demo_job, capsys):
    from diffusers import StableDiffusionPipeline

    assert main(["export", str(demo_job.parent / "no-such-run"), "--format", "merged"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no-such-run: not found" in err

    run, model = demo_job.parent / "run", demo_job.parent / "model"
    assert main(["run", str(demo_job), "--set", "schedule.max_steps=2", "--set", "validation.prompts=[]"]) == 0
    for fmt in FORMATS:
        assert main(["export", str(run), "--format", fmt]) == 0
    out, final = run / "export", run / "final"
    for name in (LORA_FILE, "demo_lora.safetensors"):
        fmt = "diffusers" if name == LORA_FILE else "kohya"
        exported, trained = load_file(out / fmt / name), load_file(final / name)
        assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)
        assert read_job_metadata(out / fmt / name)["output"]["name"] == "demo_lora"
    with safe_open(str(out / "kohya" / "demo_lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_steps"] == "2" and f.metadata()["ss_num_train_images"] == "12"

    base = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    merged = StableDiffusionPipeline.from_pretrained(out / "merged", safety_checker=None)
    single = StableDiffusionPipeline.from_single_file(str(out / "single-file" / "demo_lora.safetensors"),
                                                      config=str(model), local_files_only=True, safety_checker=None)
    _assert_same_weights(merged, single, ("unet", "vae", "text_encoder"))
    base.load_lora_weights(out / "diffusers")
    np.testing.assert_allclose(_render(merged), _render(base), atol=1e-4)
    assert json.loads((out / "merged" / JOB_FILE).read_text())["output"]["name"] == "demo_lora"
    assert read_job_metadata(out / "single-file" / "demo_lora.safetensors")["output"]["name"] == "demo_lora"

    assert main(["export", str(run), "--format", "kohya"]) == 2
    assert "--force" in capsys.readouterr().err


def _render(pipe) -> np.ndarray:
    """Two steps without classifier-free guidance: enough to compare pipelines, and quick on a shared CPU."""
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle on a blue background", num_inference_steps=2, guidance_scale=1.0, height=32, width=32,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def _assert_same_weights(a, b, components) -> None:
    for name in components:
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key}"


def _assert_holds(unet, tensors: dict) -> None:
    state = unet.state_dict()
    for key, value in tensors.items():
        assert torch.equal(state[key.removeprefix("unet.")], value), key


def _lora_run(model: Path, run: Path, rank: int, alpha: float) -> Path:
    """A run folder as a finished LoRA run leaves it (job.json, final/ LoRA) with random A and B, so the LoRA
    changes the model."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    unet = StableDiffusionPipeline.from_pretrained(model, safety_checker=None).unet
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    meta = {"r": rank, "lora_alpha": alpha, "target_modules": targets, "lora_dropout": 0.0}
    family_module("sd1").save_lora_diffusers(run / "final", {"unet": get_peft_model_state_dict(unet)},
                                              {"unet": meta})
    job = from_sparse({"model": {"path": str(model)}, "network": {"rank": rank, "alpha": alpha},
                       "output": {"output_dir": str(run), "name": "lora"}})
    save_job(job, run / "job.json")
    return run


def _tiny_sd2(sd15: Path, path: Path) -> Path:
    """SD 2.x's shape in miniature: 1024-wide OpenCLIP-style text states (gelu), linear projections, v-prediction,
    three blocks of two layers with the first up block attention-free."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(sd15 / "tokenizer")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64, 64), layers_per_block=2, sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=1024,
        attention_head_dim=(2, 4, 4), use_linear_projection=True)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=1024, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, hidden_act="gelu",
        vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    scheduler = DDIMScheduler(prediction_type="v_prediction", clip_sample=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=_tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def _tiny_sdxl(sd15: Path, path: Path) -> Path:
    """trainer.demo's tiny SDXL, but with encoders of different widths: diffusers' single-file loader tells
    SDXL's two encoders apart by width, as real SDXL's (768 and 1280) are."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(sd15 / "tokenizer")

    def config(width: int) -> CLIPTextConfig:
        return CLIPTextConfig(hidden_size=width, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              projection_dim=width, vocab_size=len(tokenizer), max_position_embeddings=77,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=32 + 48,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 48)
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(), text_encoder=CLIPTextModel(config(32)),
        text_encoder_2=CLIPTextModelWithProjection(config(48)), tokenizer=tokenizer, tokenizer_2=tokenizer,
        unet=unet, scheduler=EulerDiscreteScheduler(), add_watermarker=False)
    pipe.save_pretrained(path)
    return path


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(32, 64), latent_channels=4, sample_size=64,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
