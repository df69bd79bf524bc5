"""GPU speed defaults, checked on the CPU: TF32 switched on only for Ampere and newer, the fused AdamW kernel only
when every parameter is a CUDA tensor, and every family's attention through PyTorch's SDPA."""

import inspect
from types import SimpleNamespace

import pytest
import torch

from trainer.demo import BUILDERS
from trainer.families.detect import family_module
from trainer.job import ModelSpec
from trainer.run import speed


@pytest.fixture
def tf32_flags():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("capability,expected", [((8, 6), True), ((9, 0), True), ((7, 5), False)])
def test_tf32_only_from_ampere_on(tf32_flags, monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    note = speed.enable_tf32(torch.device("cuda", 0))
    assert torch.backends.cuda.matmul.allow_tf32 is expected and bool(note) is expected


def test_tf32_untouched_on_the_cpu(tf32_flags):
    assert speed.enable_tf32(torch.device("cpu")) == ""
    assert torch.backends.cuda.matmul.allow_tf32 is False


def test_fused_adamw_only_when_every_parameter_is_on_cuda():
    cuda = SimpleNamespace(is_cuda=True, is_floating_point=lambda: True)
    cpu = torch.zeros(2, requires_grad=True)
    assert speed.fused_adamw([{"params": [cuda, cuda]}, {"params": [cuda]}])
    assert not speed.fused_adamw([{"params": [cuda]}, {"params": [cpu]}])
    assert not speed.fused_adamw([{"params": []}])
    torch.optim.AdamW([cpu], fused=speed.fused_adamw([{"params": [cpu]}]) or None).step()  # the CPU path runs


@pytest.mark.parametrize("family", list(BUILDERS))
def test_every_attention_of_the_family_runs_through_sdpa(family, tmp_path):
    """diffusers' processors call F.scaled_dot_product_attention, or its dispatcher whose default backend is
    SDPA; the old processors that multiply out the attention matrix (AttnProcessor) would fail this."""
    BUILDERS[family](tmp_path / "model")
    denoiser = family_module(family).load(ModelSpec(path=str(tmp_path / "model"))).denoiser
    processors = {type(m.processor) for m in denoiser.modules() if hasattr(m, "processor")}
    assert processors
    for processor in processors:
        source = inspect.getsource(processor)
        assert "scaled_dot_product_attention" in source or "dispatch_attention_fn" in source, processor.__name__
