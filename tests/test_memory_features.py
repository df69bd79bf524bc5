"""The job's `memory` settings: each trains as the plain run does (within a stated tolerance where precision is
given up), resumes exactly, and lowers the part of `trainer estimate` it should. Tiny demo models, 2-3 steps."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from trainer.cli import main
from trainer.events import read_events
from trainer.estimate import estimate
from trainer.job import JobError, load_job
from trainer.plan import make_plan

pytestmark = pytest.mark.usefixtures("one_torch_thread")
QUICK = ["validation.prompts=[]", "schedule.max_steps=2", "schedule.batch_size=1", "output.checkpoint_every=1"]
FULL = ["network.kind=full", "optimizer.max_grad_norm=0", "output.save_single_file=false"]


# Traces and gradients depend only on the demo model (the same in every test's copy) and the settings: each is
# made once per module.
_ESTIMATES: dict = {}
_GRADIENTS: dict = {}


def _estimate(job_path, *settings):
    if settings not in _ESTIMATES:
        job = load_job(job_path, list(settings))
        _ESTIMATES[settings] = estimate(job, make_plan(job, resume=True))
    return _ESTIMATES[settings]


def _run(job_path, out, *settings, resume=False):
    args = ["run", str(job_path), "--set", f"output.output_dir={out}"]
    for item in (*QUICK, *settings):
        args += ["--set", item]
    assert main(args + (["--resume"] if resume else [])) == 0


def _checkpoint(out, step, name="weights.safetensors"):
    return load_file(out / "checkpoints" / f"step-{step}" / name)


def test_fused_backward_trains_as_the_plain_step_and_resumes_exactly(demo_job, tmp_path):
    plain, fused = tmp_path / "plain", tmp_path / "fused"
    _run(demo_job, plain, *FULL)
    _run(demo_job, fused, *FULL, "memory.fused_backward=true")
    a, b = _checkpoint(plain, 2), _checkpoint(fused, 2)
    assert a.keys() == b.keys() and len(a) > 100  # the whole UNet trains
    moved = 0
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7)
        moved += not torch.equal(a[key], _checkpoint(plain, 1)[key])
    assert moved > len(a) / 2

    # Resumed from step 1, the second step gives the same weights and AdamW moments as the uninterrupted run.
    resumed = tmp_path / "resumed"
    shutil.copytree(fused, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-2")
    shutil.rmtree(resumed / "final")
    _run(demo_job, resumed, *FULL, "memory.fused_backward=true", resume=True)
    for name in ("weights.safetensors", "optimizer.safetensors"):
        want, got = _checkpoint(fused, 2, name), _checkpoint(resumed, 2, name)
        assert want.keys() == got.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), (name, key)


@pytest.mark.parametrize("setting, needs", [("optimizer.max_grad_norm=1", "max_grad_norm 0"),
                                            ("schedule.gradient_accumulation=2", "gradient_accumulation 1"),
                                            ("optimizer.on_nonfinite=skip", "on_nonfinite 'stop'")])
def test_fused_backward_refuses_what_needs_every_gradient_at_once(demo_job, setting, needs):
    with pytest.raises(JobError, match=f"memory.fused_backward: .*{needs}"):
        load_job(demo_job, [*FULL, "memory.fused_backward=true", setting])


def test_fused_backward_estimate_keeps_no_gradients(demo_job):
    plain = _estimate(demo_job, *FULL)
    fused = _estimate(demo_job, *FULL, "memory.fused_backward=true")
    # (The tiny model's peak is its activations: the gradients alive there are few, but none with the hooks.)
    assert plain.peak["gradients"] > 0 and fused.peak.get("gradients", 0) == 0
    assert fused.between_steps["optimizer state"] == plain.between_steps["optimizer state"]
    assert any("fused backward" in note for note in fused.notes)


def _lora_gradients(job_path, *settings):
    """One forward and backward pass of the demo UNet with its LoRA (lora_B drawn, not zero, so every adapter
    weight gets a gradient) on fixed inputs: the LoRA gradients, and the denoiser."""
    if settings not in _GRADIENTS:
        _GRADIENTS[settings] = _forward_backward(job_path, *settings)
    return _GRADIENTS[settings]


def _forward_backward(job_path, *settings):
    from trainer.families import precision
    from trainer.families.detect import family_module
    from trainer.methods import trainable

    job = load_job(job_path, list(settings))
    family = family_module("sd1")
    parts = family.load(job.model)
    held = precision.dtypes(job.precision.mixed_precision)
    precision.place(parts.denoiser, "cpu", held.frozen)
    torch.manual_seed(0)
    tr = trainable.setup(family, parts, job, 10)
    gen = torch.Generator().manual_seed(1)
    for key, p in tr.params.items():
        p.data = torch.randn(p.shape, generator=gen) * 0.05 if "lora_B" in key else p.data.float()
    noisy, cond = torch.randn(2, 4, 32, 32, generator=gen), torch.randn(2, 77, 32, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=held.frozen != torch.float32):
        pred = parts.denoiser(noisy, torch.tensor([100, 700]), cond).sample
    torch.nn.functional.mse_loss(pred.float(), noisy).backward()
    return torch.cat([p.grad.flatten() for p in tr.params.values()]), parts.denoiser


def _relative_error(got, want):
    return ((got - want).norm() / want.norm()).item()


def test_fp8_base_weights_keep_the_lora_gradients_of_bf16(demo_job):
    from trainer.methods.base_weights import Fp8Linear

    bf16, _ = _lora_gradients(demo_job, "precision.mixed_precision=bf16")
    fp8, unet = _lora_gradients(demo_job, "precision.mixed_precision=bf16", "memory.base_weights=fp8")
    layers = [m for m in unet.modules() if isinstance(m, Fp8Linear)]
    assert layers and all(m.weight.dtype == torch.float8_e4m3fn and m.compute_dtype == torch.bfloat16
                          for m in layers)
    assert not any(type(m) is torch.nn.Linear and m.weight.dtype != torch.float32 for m in unet.modules())
    to_q = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q  # peft's LoRA layer around it
    assert isinstance(to_q.base_layer, Fp8Linear) and to_q.lora_A["default"].weight.dtype == torch.float32
    # Measured: 2.5% of the gradient's norm (bf16 rounding alone, against fp32: 2.1%); fp8 keeps 3 mantissa bits.
    assert _relative_error(fp8, bf16) < 0.05
    assert torch.nn.functional.cosine_similarity(fp8, bf16, dim=0) > 0.998


def test_fp8_demo_trains_and_the_estimate_halves_the_linear_weights(demo_job, tmp_path):
    _run(demo_job, tmp_path / "run", "memory.base_weights=fp8")
    assert (tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors").is_file()
    bf16 = _estimate(demo_job, "precision.mixed_precision=bf16")
    fp8 = _estimate(demo_job, "precision.mixed_precision=bf16", "memory.base_weights=fp8")
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(demo_job.parent / "model" / "unet")
    linears = [m.weight.numel() for m in unet.modules() if type(m) is torch.nn.Linear]
    # 2 bytes per bf16 weight, 1 per fp8 one, plus one fp32 scale per layer.
    assert bf16.peak["frozen weights"] - fp8.peak["frozen weights"] == sum(linears) - 4 * len(linears)
    assert fp8.peak["trainable weights"] == bf16.peak["trainable weights"]
    assert any("fp8" in note for note in fp8.notes)


def test_nf4_base_weights_through_bitsandbytes_keep_the_lora_gradients(demo_job):
    # bitsandbytes 0.50 quantizes and runs its 4-bit layers on CPU tensors, so this needs no GPU.
    bnb = pytest.importorskip("bitsandbytes")
    bf16, _ = _lora_gradients(demo_job, "precision.mixed_precision=bf16")
    nf4, unet = _lora_gradients(demo_job, "precision.mixed_precision=bf16", "memory.base_weights=nf4")
    layers = [m for m in unet.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.quant_type == "nf4" and m.weight.bnb_quantized for m in layers)
    to_q = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert type(to_q).__module__ == "peft.tuners.lora.bnb"  # peft's own 4-bit LoRA layer
    # Measured: 4.8% of the gradient's norm against fp32 (bf16 alone: 2.1%).
    assert _relative_error(nf4, bf16) < 0.10
    assert torch.nn.functional.cosine_similarity(nf4, bf16, dim=0) > 0.99


def test_nf4_estimate_counts_what_bitsandbytes_keeps(demo_job):
    from trainer.methods.base_weights import _bnb_nf4, nf4_bytes

    layer = _bnb_nf4(torch.nn.Linear(320, 1280))
    state = layer.weight.quant_state
    kept = layer.weight.nbytes + state.absmax.nbytes + state.state2.absmax.nbytes  # the 1 KiB code is shared
    assert nf4_bytes(320 * 1280) == kept
    bf16 = _estimate(demo_job, "precision.mixed_precision=bf16")
    nf4 = _estimate(demo_job, "precision.mixed_precision=bf16", "memory.base_weights=nf4")
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(demo_job.parent / "model" / "unet")
    linears = [m.weight.numel() for m in unet.modules() if type(m) is torch.nn.Linear]
    assert bf16.peak["frozen weights"] - nf4.peak["frozen weights"] == sum(2 * n - nf4_bytes(n) for n in linears)
    assert any("nf4" in note and "formula" in note for note in nf4.notes)


def test_nf4_demo_trains(demo_job, tmp_path):
    pytest.importorskip("bitsandbytes")
    _run(demo_job, tmp_path / "run", "memory.base_weights=nf4")
    assert (tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_block_swap_trains_exactly_as_without(demo_job, tmp_path):
    # On a CPU the moves leave the tensors where they are; what could differ is the hooks' order and the recompute.
    _run(demo_job, tmp_path / "plain", "schedule.max_steps=2", "precision.gradient_checkpointing=true")
    _run(demo_job, tmp_path / "swap", "schedule.max_steps=2", "precision.gradient_checkpointing=true",
         "memory.block_swap=3")
    events = {name: read_events(tmp_path / name / "events.jsonl")[0] for name in ("plain", "swap")}
    losses = {name: [e["loss"] for e in got if e["type"] == "step"] for name, got in events.items()}
    assert len(losses["plain"]) == 2 and losses["plain"] == losses["swap"]
    a = load_file(tmp_path / "plain" / "final" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "swap" / "final" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any("block swap: 3 of 5 blocks" in str(e.get("message")) for e in events["swap"])


class _Recorder:
    """A Mover that keeps the tensors where they are and records where each is meant to be."""

    def __init__(self):
        self.where, self.moves = {}, []

    def to_host(self, index, tensors):
        self.where.update({id(t): "host" for t in tensors})
        self.moves.append(("out", index))

    def to_device(self, index, tensors, prefetch=False):
        self.where.update({id(t): "device" for t in tensors})
        self.moves.append(("in", index))

    def ready(self, index, tensors):
        pass


@pytest.mark.parametrize("checkpointing", [False, True])
def test_block_swap_has_each_block_on_the_device_whenever_it_computes(demo_job, checkpointing):
    from trainer.families.detect import family_module
    from trainer.families.table import FAMILIES
    from trainer.methods import trainable
    from trainer.run.block_swap import BlockSwap, frozen_tensors, swap_blocks

    job = load_job(demo_job)
    family = family_module("sd1")
    parts = family.load(job.model)
    tr = trainable.setup(family, parts, job, 10)
    unet = parts.denoiser
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    blocks = swap_blocks(unet, FAMILIES["sd1"].swap_blocks)
    assert [type(b).__name__ for b in blocks] == ["CrossAttnDownBlock2D", "DownBlock2D", "UNetMidBlock2DCrossAttn",
                                                   "UpBlock2D", "CrossAttnUpBlock2D"]
    recorder = _Recorder()
    swap = BlockSwap(blocks, 3, recorder)
    assert all(recorder.where[id(t)] == "host" for b in blocks[:3] for t in frozen_tensors(b))
    wrong, most = [], [0]

    def check(module, *_):
        most[0] = max(most[0], len(swap.inside))
        for p in module.parameters(recurse=False):
            if not p.requires_grad and recorder.where.get(id(p), "device") != "device":
                wrong.append(module)

    def check_in_backward(module, args, out):
        if out.requires_grad:  # called when the layer's backward is about to run
            out.register_hook(lambda grad: check(module))

    for block in blocks:
        for module in block.modules():
            if not list(module.children()):  # the layers that compute
                module.register_forward_pre_hook(check)
                module.register_forward_hook(check_in_backward)
    for step in range(2):
        gen = torch.Generator().manual_seed(step)
        noisy, cond = torch.randn(1, 4, 32, 32, generator=gen), torch.randn(1, 77, 32, generator=gen)
        unet(noisy, torch.tensor([500]), cond).sample.square().mean().backward()
        assert not wrong, wrong[:3]
        assert swap.inside == {0}  # the first block stays for the next forward pass
    assert most[0] <= 2  # a block and the one prefetched
    assert all(p.grad is not None for p in tr.params.values())
    forward = recorder.moves[3:3 + 6]
    assert forward == [("in", 0), ("in", 1), ("out", 0), ("in", 2), ("out", 1), ("out", 2)]


def test_block_swap_estimate_drops_the_swapped_blocks_weights(demo_job):
    from diffusers import UNet2DConditionModel

    from trainer.families.table import FAMILIES
    from trainer.run.block_swap import frozen_tensors, swap_blocks

    plain, swap = _estimate(demo_job), _estimate(demo_job, "memory.block_swap=3")
    unet = UNet2DConditionModel.from_pretrained(demo_job.parent / "model" / "unet").requires_grad_(False)
    sizes = [sum(t.nbytes for t in frozen_tensors(b)) for b in swap_blocks(unet, FAMILIES["sd1"].swap_blocks)]
    # Between steps only the first block is back on the device; at the peak at most two of them are.
    assert plain.between_steps["frozen weights"] - swap.between_steps["frozen weights"] == sum(sizes[1:3])
    assert plain.peak["frozen weights"] - swap.peak["frozen weights"] >= min(sizes[:3])
    assert swap.flops == plain.flops
    assert any("block swap: 3 of 5 blocks" in note for note in swap.notes)
    with pytest.raises(JobError, match="memory.block_swap: 6, but this model has 5 blocks"):
        _estimate(demo_job, "memory.block_swap=6")


def test_check_says_which_memory_settings_are_on(demo_job, capsys):
    assert main(["check", str(demo_job), "--no-estimate"]) == 0
    assert "memory: no memory-saving setting on" in capsys.readouterr().out
    assert main(["check", str(demo_job), "--no-estimate", "--set", "memory.base_weights=fp8", "--set",
                 "memory.block_swap=2", "--set", "precision.gradient_checkpointing=true"]) == 0
    assert "memory: base weights fp8, block swap of 2 blocks, gradient checkpointing" in capsys.readouterr().out


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_fused_steps_are_the_optimizers_own_step(optimizer):
    # Two parameter groups with their own learning rates; the per-weight step must use each weight's group.
    from trainer.run.fused_backward import FusedBackward, stepping

    def train(fused):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.Linear(128, 64))
        groups = [{"params": list(model[0].parameters()), "lr": 1e-3}, {"params": list(model[1].parameters()),
                                                                         "lr": 1e-2}]
        if optimizer == "adamw8bit":
            opt = pytest.importorskip("bitsandbytes").optim.AdamW8bit(groups)
        else:
            opt = torch.optim.AdamW(groups)
        if fused:
            FusedBackward(list(model.parameters()), stepping(opt))
        for i in range(3):
            model(torch.randn(4, 128, generator=torch.Generator().manual_seed(i))).square().mean().backward()
            if not fused:
                opt.step()
                opt.zero_grad(set_to_none=True)
            assert all(p.grad is None for p in model.parameters())
        return list(model.parameters())

    for got, want in zip(train(True), train(False)):
        assert torch.equal(got, want)
