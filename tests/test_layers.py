"""Layer selection (trainer/methods/layers.py): the header table matches the model, counts match peft, blocks
resolve."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from trainer.demo import build_tiny_sd15
from trainer.job import JobError, from_sparse
from trainer.methods.layers import (Module, count_trainable, describe_trainable, full_trainable_names,
                                    lora_target_names, select, table_from_folder, table_from_model)

ROOT = Path(__file__).resolve().parent.parent
ADANORMS = {"transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm1_context.linear",
            "transformer_blocks.1.norm1.linear", "transformer_blocks.1.norm1_context.linear", "norm_out.linear"}


@pytest.fixture(scope="module")
def sd15(tmp_path_factory) -> Path:
    return build_tiny_sd15(tmp_path_factory.mktemp("layers") / "model")


@pytest.fixture(scope="module")
def header(sd15):
    return table_from_folder(sd15, "unet")


def _unet(path: Path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(path / "unet")


def _tiny_sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                 pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16)


def _job(**sections):
    return from_sparse(sections)


def _names(table, **layers) -> set[str]:
    return set(select(table, _job(network={"kind": "full"}, layers=layers)))


def _wrapped(model) -> set[str]:
    return {name.removesuffix(".lora_A") for name, _ in model.named_modules() if name.endswith(".lora_A")}


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_header_table_is_the_model_table(sd15, header, tmp_path):
    unet = _unet(sd15)
    assert header == table_from_model(unet)
    kinds = {m.name: m.kind for m in header}
    modules = dict(unet.named_modules())
    assert {n for n, k in kinds.items() if k == "linear"} == {
        n for n in kinds if isinstance(modules[n], torch.nn.Linear)}
    assert {n for n, k in kinds.items() if k == "conv"} == {n for n in kinds if isinstance(modules[n], torch.nn.Conv2d)}
    assert sum(m.params for m in header) == sum(p.numel() for p in unet.parameters())
    # SD3's file also holds the positional-embedding buffer, which is not a parameter.
    sd3 = _tiny_sd3()
    sd3.save_pretrained(tmp_path / "transformer")
    assert table_from_folder(tmp_path, "transformer") == table_from_model(sd3)


@pytest.mark.parametrize("sections", [
    {},
    {"network": {"rank": 3, "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out",
                                               "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]},
     "layers": {"train_blocks": ["up_blocks.*", "mid_block"], "freeze_blocks": ["up_blocks.1.attentions.0"]}},
    {"network": {"rank": 5, "target_modules": []}, "layers": {"exclude_patterns": ["*time_emb*", "conv_*"]}},
    {"network": {"target_modules": []}, "layers": {"module_kinds": "attention_mlp"}},
], ids=["default", "convs-and-blocks", "every-layer", "attention-mlp"])
def test_lora_count_matches_peft(sd15, header, sections):
    job = _job(**sections)
    unet = _unet(sd15)
    unet.requires_grad_(False)
    names = lora_target_names(unet, job)
    unet.add_adapter(LoraConfig(r=job.network.rank, lora_alpha=job.network.alpha, target_modules=names))
    assert _wrapped(unet) == set(names) == set(select(header, job))
    assert count_trainable(header, job) == _trainable(unet) > 0


def test_full_count_matches_requires_grad(sd15, header):
    job = _job(network={"kind": "full"}, layers={"freeze_blocks": ["down_blocks.0"],
                                                 "exclude_patterns": ["*norm*"]})
    unet = _unet(sd15)
    names = set(full_trainable_names(unet, job))
    params = dict(unet.named_parameters())
    assert names <= set(params)
    for name, p in params.items():
        p.requires_grad_(name in names)
    assert count_trainable(header, job) == _trainable(unet) == sum(params[n].numel() for n in names)
    assert not any(n.startswith("down_blocks.0.") or "norm" in n for n in names)
    assert any(n.startswith("down_blocks.1.") for n in names)


def test_frozen_blocks_get_no_gradient(sd15):
    job = _job(network={"kind": "full"}, layers={"train_blocks": ["up_blocks"], "freeze_blocks": ["up_blocks[-1:]"]})
    unet = _unet(sd15)
    names = set(full_trainable_names(unet, job))
    for name, p in unet.named_parameters():
        p.requires_grad_(name in names)
    out = unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), encoder_hidden_states=torch.randn(1, 5, 32)).sample
    out.square().mean().backward()
    for name, p in unet.named_parameters():
        if name.startswith("up_blocks.0."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_ranges_slices_and_globs():
    table = [Module(f"transformer_blocks.{i}.attn.to_q", "linear", (("weight", (8, 8)),)) for i in range(24)]
    table.append(Module("norm_out.linear", "linear", (("weight", (16, 8)),)))

    def blocks(**layers):
        return sorted(int(n.split(".")[1]) for n in _names(table, **layers) if n.startswith("transformer_blocks."))

    assert blocks(train_blocks=["transformer_blocks.12-23"]) == list(range(12, 24))
    assert blocks(train_blocks=["transformer_blocks[-8:]"]) == list(range(16, 24))  # by number: 9 is not after 23
    assert blocks(train_blocks=["transformer_blocks[12:24]"]) == list(range(12, 24))
    assert blocks(train_blocks=["transformer_blocks[::6]"]) == [0, 6, 12, 18]
    assert blocks(train_blocks=["transformer_blocks[-1]", "transformer_blocks[3]"]) == [3, 23]
    assert blocks(train_blocks=["transformer_blocks.1*"]) == [1, *range(10, 20)]
    assert blocks(train_blocks=["transformer_blocks.12-23"], freeze_blocks=["transformer_blocks[-2:]"]) == list(
        range(12, 22))
    assert _names(table, train_blocks=["norm_out"]) == {"norm_out.linear"}
    assert _names(table, freeze_blocks=["transformer_blocks"]) == {"norm_out.linear"}


def test_blocks_on_the_unet(header):
    names = [m.name for m in header]

    def under(*prefixes):
        return {n for n in names if any(n.startswith(p + ".") for p in prefixes)}

    assert _names(header, train_blocks=["down_blocks.*"]) == _names(header, train_blocks=["down_blocks"]) == under(
        "down_blocks.0", "down_blocks.1")
    assert _names(header, train_blocks=["up_blocks[-1:]"]) == under("up_blocks.1")
    assert _names(header, train_blocks=["up_blocks.0-0"]) == under("up_blocks.0")
    assert _names(header, train_blocks=["*.attentions.0"]) == under("mid_block.attentions.0")
    assert _names(header, train_blocks=["*.*.attentions.0"]) == under("down_blocks.0.attentions.0",
                                                                      "up_blocks.1.attentions.0")
    assert _names(header, include_patterns=["*attn2*"], exclude_patterns=["*to_out*"]) == {
        n for n in names if ".attn2." in n and "to_out" not in n}


def test_module_kinds(header):
    attention = {n for n in (m.name for m in header) if re.search(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$", n)}
    mlp = {n for n in (m.name for m in header) if re.search(r"\.ff\.net\.(0\.proj|2)$", n)}
    assert len(attention) == 32 and len(mlp) == 8  # 4 transformer blocks, each with attn1 and attn2
    assert _names(header, module_kinds="attention") == attention
    assert _names(header, module_kinds="attention_mlp") == attention | mlp


def test_exclude_adanorm_on_sd3():
    model = _tiny_sd3()
    table = table_from_model(model)
    everything = {m.name for m in table}
    assert ADANORMS <= everything
    assert _names(table) == everything
    assert _names(table, exclude_adanorm=True) == everything - ADANORMS
    attention = _names(table, module_kinds="attention")
    assert {"transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.to_add_out"} <= attention
    assert not any("norm" in n or ".ff" in n for n in attention)

    job = _job(network={"rank": 2, "target_modules": []}, layers={"exclude_adanorm": True})
    model.requires_grad_(False)
    names = lora_target_names(model, job)
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=names))
    assert _wrapped(model) == set(names) and not ADANORMS & set(names)
    assert "pos_embed.proj" in names  # a conv
    assert count_trainable(table, job) == _trainable(model)


def test_bad_block_names_are_one_line_errors(header):
    for layers, field in (({"train_blocks": ["down_blocks.7"]}, "layers.train_blocks"),
                          ({"freeze_blocks": ["middle_block"]}, "layers.freeze_blocks"),
                          ({"train_blocks": ["up_blocks[5:]"]}, "layers.train_blocks"),
                          ({"train_blocks": ["up_blocks[a:b]"]}, "layers.train_blocks"),
                          ({"train_blocks": ["up_blocks[::0]"]}, "layers.train_blocks")):
        with pytest.raises(JobError) as err:
            _names(header, **layers)
        message = str(err.value)
        assert message.startswith(f"{field}: ") and "\n" not in message, message
        assert repr(next(iter(layers.values()))[0]) in message
    with pytest.raises(JobError, match=r"valid: .*down_blocks\.0-1.*mid_block"):
        _names(header, freeze_blocks=["middle_block"])
    with pytest.raises(JobError, match="^network.target_modules: "):
        lora_target_names(_tiny_sd3(), _job(network={"target_modules": ["nope"]}))
    with pytest.raises(JobError, match="^layers.module_kinds: "):
        lora_target_names(_tiny_sd3(), _job(network={"target_modules": ["proj_out"]},
                                            layers={"module_kinds": "attention"}))


def test_check_prints_the_trainable_count_without_torch(demo_job):
    code = ("import sys; from trainer.cli import main; rc = main(['check', sys.argv[1], '--no-estimate']); "
            "assert 'torch' not in sys.modules, 'check imported torch'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(demo_job)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    found = re.search(r"trainable: ([\d,]+) parameters in (\d+) LoRA layers of the unet \(of ([\d,]+) in the "
                      r"model\)", proc.stdout)
    assert found, proc.stdout
    from trainer.job import load_job

    job = load_job(demo_job)
    unet = _unet(Path(job.model.path))
    total = sum(p.numel() for p in unet.parameters())
    unet.requires_grad_(False)
    names = lora_target_names(unet, job)
    unet.add_adapter(LoraConfig(r=job.network.rank, lora_alpha=job.network.alpha, target_modules=names))
    assert int(found[1].replace(",", "")) == _trainable(unet)
    assert int(found[2]) == len(names)
    assert int(found[3].replace(",", "")) == total


def test_describe_when_the_count_cannot_be_read(sd15, tmp_path):
    import huggingface_hub

    hub = _job(model={"path": "someone/not-downloaded"})
    assert "once the model is local" in describe_trainable(hub, "sd1")[0]
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    assert "single-file" in describe_trainable(_job(model={"path": str(single)}), "sd1")[0]
    none = _job(network={"kind": "none"}, text_encoder={"mode": "lora"})
    assert describe_trainable(none, "sd1") == ["trainable: nothing in the unet (network.kind none)"]

    # A hub model already in the cache is counted like a folder.
    repo = Path(huggingface_hub.constants.HF_HUB_CACHE) / "models--someone--cached"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    (snapshot / "unet").mkdir(parents=True)
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (snapshot / "unet" / name).write_bytes((sd15 / "unet" / name).read_bytes())
    cached, folder = _job(model={"path": "someone/cached"}), _job(model={"path": str(sd15)})
    assert describe_trainable(cached, "sd1") == describe_trainable(folder, "sd1")
    assert describe_trainable(folder, "sd1")[0].startswith("trainable: ")
