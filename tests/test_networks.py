"""LoHa, LoKr and DoRA (peft's own layers): the job's rules, the kohya/LyCORIS file's key names and math against
peft's, and each kind training the demo, freezing blocks and resuming exactly."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lora_checks import render
from resume_checks import assert_resume_is_exact
from trainer.job import JobError, from_sparse

ROOT = Path(__file__).resolve().parent.parent
KINDS = {  # name -> network section
    "lora": {"kind": "lora"},
    "dora": {"kind": "lora", "dora": True},
    "loha": {"kind": "loha"},
    "lokr": {"kind": "lokr"},
    "lokr_decomposed": {"kind": "lokr", "lokr_factor": 4, "lokr_decompose_both": True, "rank": 1},
}
TARGETS = ["to_q", "to_out.0", "conv1", "proj_in"]  # linears, a 3x3 conv and a 1x1 conv


def test_dora_is_for_lora_only():
    assert from_sparse({"network": {"kind": "lora", "dora": True}}).network.dora
    with pytest.raises(JobError, match=r"^job: network.dora: DoRA applies to network.kind 'lora' only \(got 'loha'\)$"):
        from_sparse({"network": {"kind": "loha", "dora": True}})


def _adapted_unet(model: Path, name: str):
    """The demo UNet with the kind's peft adapter on TARGETS, every adapter tensor moved off its initial value."""
    from diffusers import UNet2DConditionModel

    from trainer.methods.trainable import adapter_config, _inject

    net = from_sparse({"network": {"rank": 4, "alpha": 3.0, **KINDS[name]}}).network  # KINDS may set the rank
    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    torch.manual_seed(0)
    _inject(adapter_config(net, TARGETS), unet, "network")
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    return unet, net


def _kohya_file_tensors(unet, net) -> dict:
    """What trainer/export/lora_files.write_lora_kohya puts in the file, for this UNet."""
    from peft.utils import get_peft_model_state_dict

    from trainer.export.lora_files import fold_full_lokr_scale
    from trainer.families import sd

    state = fold_full_lokr_scale(get_peft_model_state_dict(unet), net.alpha, net.rank)
    return sd.kohya_state_dict({"unet": state}, net.alpha)


def _adapted_modules(unet) -> dict:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer)}


@pytest.mark.parametrize("name", list(KINDS))
def test_kohya_keys_are_kohya_module_names_with_lycoris_suffixes(demo_template, name):
    """The key set built the way kohya's and LyCORIS's writers name it: `lora_unet_` + the module's path with _
    for ., then the adapter's tensor names (LoKr's factors full or low-rank by LyCORIS's own rule)."""
    from peft.tuners.lokr.layer import factorization

    unet, net = _adapted_unet(demo_template / "model", name)
    expected = set()
    for module_name, module in _adapted_modules(unet).items():
        base = f"lora_unet_{module_name.replace('.', '_')}"
        weight = module.get_base_layer().weight
        if net.kind == "lora":
            suffixes = ["lora_down.weight", "lora_up.weight", "alpha"] + (["dora_scale"] if net.dora else [])
        elif net.kind == "loha":
            suffixes = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"]
        else:
            out_l, out_k = factorization(weight.shape[0], net.lokr_factor)
            in_m, in_n = factorization(weight.shape[1], net.lokr_factor)
            w1 = ["lokr_w1_a", "lokr_w1_b"] if net.lokr_decompose_both and net.rank < max(out_l, in_m) / 2 \
                else ["lokr_w1"]
            w2 = ["lokr_w2_a", "lokr_w2_b"] if net.rank < max(out_k, in_n) / 2 else ["lokr_w2"]
            suffixes = [*w1, *w2, "alpha"]
        expected |= {f"{base}.{s}" for s in suffixes}
    keys = set(_kohya_file_tensors(unet, net))
    assert keys == expected
    assert any(k.endswith("_to_out_0.alpha") for k in keys) and any("_resnets_0_conv1." in k for k in keys)
    if name == "lokr_decomposed":
        assert any(k.endswith(".lokr_w1_a") for k in keys)


def _lycoris_delta(tensors: dict, base: str, weight: torch.Tensor) -> torch.Tensor:
    """The weight a LyCORIS-layout module gives, computed as ComfyUI's weight adapters do (comfy/weight_adapter
    lora.py, loha.py, lokr.py: alpha / rank only where the file has a rank; base.py's weight_decompose for
    dora_scale, on the output axis with the norm of the adapted weight)."""
    t = {k[len(base) + 1:]: v.double() for k, v in tensors.items() if k.startswith(base + ".")}
    alpha = t["alpha"].item() if "alpha" in t else None
    w = weight.double()
    if "lora_down.weight" in t:
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        diff = (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * (alpha / down.shape[0])
    elif "hada_w1_a" in t:
        diff = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        diff = diff.reshape(w.shape) * (alpha / t["hada_w1_b"].shape[0])
    else:
        dim = None
        w1 = t.get("lokr_w1")
        if w1 is None:
            dim, w1 = t["lokr_w1_b"].shape[0], t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t.get("lokr_w2")
        if w2 is None:
            dim, w2 = t["lokr_w2_b"].shape[0], t["lokr_w2_a"] @ t["lokr_w2_b"]
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        diff = torch.kron(w1, w2).reshape(w.shape) * (alpha / dim if dim is not None else 1.0)
    if "dora_scale" not in t:
        return diff
    adapted = w + diff
    norm = adapted.reshape(w.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (w.ndim - 1))
    return t["dora_scale"] * adapted / norm - w


@pytest.mark.parametrize("name", list(KINDS))
def test_lycoris_math_on_the_file_gives_peft_weights(demo_template, name):
    """Reading the written tensors back with ComfyUI's formulas gives the weight change peft trained, module by
    module (for DoRA, what merging the adapter into the weight gives)."""
    unet, net = _adapted_unet(demo_template / "model", name)
    tensors = _kohya_file_tensors(unet, net)
    for module_name, module in _adapted_modules(unet).items():
        weight = module.get_base_layer().weight.detach().clone()
        if net.dora:
            module.merge()
            peft_delta = module.get_base_layer().weight.detach() - weight
            module.unmerge()
        else:
            peft_delta = module.get_delta_weight("default")
        ours = _lycoris_delta(tensors, f"lora_unet_{module_name.replace('.', '_')}", weight)
        assert peft_delta.abs().max() > 1e-3, module_name
        torch.testing.assert_close(ours.float(), peft_delta.float(), rtol=1e-4, atol=1e-5, msg=module_name)


def test_check_counts_what_each_kind_trains(demo_job):
    """`check` counts the adapter's parameters from the model's headers (no torch) as peft builds them."""
    from diffusers import UNet2DConditionModel

    from trainer.job import load_job
    from trainer.methods.layers import lora_target_names
    from trainer.methods.trainable import adapter_config, _inject

    for name in ("dora", "loha", "lokr_decomposed"):
        settings = [a for k, v in KINDS[name].items() for a in ("--set", f"network.{k}={json.dumps(v)}")]
        out = subprocess.run([sys.executable, "-m", "trainer", "check", str(demo_job), "--no-estimate", *settings],
                             cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        counted = int(re.search(r"trainable: ([\d,]+) parameters", out.stdout).group(1).replace(",", ""))
        job = load_job(demo_job, [s for s in settings if s != "--set"])
        unet = UNet2DConditionModel.from_pretrained(Path(job.model.path) / "unet")
        _inject(adapter_config(job.network, lora_target_names(unet, job)), unet, "network")
        assert counted == sum(p.numel() for p in unet.parameters() if p.requires_grad), name


@pytest.mark.slow  # a minute or more each on a busy 2-core machine
@pytest.mark.parametrize("name", ["dora", "loha", "lokr"])
def test_each_kind_trains_the_demo_with_frozen_blocks_and_resumes_exactly(demo_job, tmp_path, name):
    settings = [f"network.{k}={json.dumps(v)}" for k, v in KINDS[name].items()]
    settings += ['layers.freeze_blocks=["down_blocks.0"]', "validation.prompts=[]"]
    whole = assert_resume_is_exact(demo_job, [a for s in settings for a in ("--set", s)], tmp_path)
    final = whole / "final"
    kohya = load_file(final / "demo_lora.safetensors")
    assert kohya and not any(k.startswith("lora_unet_down_blocks_0_") for k in kohya)
    suffix = {"dora": ".dora_scale", "loha": ".hada_w1_a", "lokr": ".lokr_w1"}[name]
    assert any(k.endswith(suffix) for k in kohya)
    weights = load_file(whole / "checkpoints" / "step-4" / "weights.safetensors")
    assert weights and not any(".down_blocks.0." in k for k in weights)
    if name != "dora":  # diffusers' pipelines load no LoHa or LoKr: only the LyCORIS file is written
        assert not (final / "pytorch_lora_weights.safetensors").exists()
        from trainer.cli import main

        assert main(["export", str(whole), "--format", "diffusers"]) == 2
        assert main(["export", str(whole), "--format", "merged", "--out", str(tmp_path / "merged")]) == 0
        base = load_file(demo_job.parent / "model" / "unet" / "diffusion_pytorch_model.safetensors")
        merged = load_file(next((tmp_path / "merged" / "unet").glob("*.safetensors")))
        changed = {k for k in base if not torch.equal(base[k], merged[k])}
        assert changed and not any(k.startswith("down_blocks.0.") for k in changed)  # fused, frozen block kept
        return
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(demo_job.parent / "model", safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    base = render(pipe)
    pipe.load_lora_weights(final)
    assert any("lora_magnitude_vector" in n for n, _ in pipe.unet.named_parameters())  # loaded as a DoRA
    assert np.abs(render(pipe) - base).mean() > 1e-4, "the DoRA must change the image"


def test_loha_needs_the_lycoris_file(demo_job):
    out = subprocess.run([sys.executable, "-m", "trainer", "check", str(demo_job), "--no-estimate", "--set",
                          "network.kind=loha", "--set", "output.save_kohya=false"], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].endswith("output.save_kohya: loha is written only in the "
                                                        "kohya/LyCORIS layout (diffusers' pipelines load no LoHa "
                                                        "or LoKr); set it to true")
