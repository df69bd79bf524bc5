"""Quantized frozen base weights for LoRA training (`memory.base_weights`): the denoiser's Linear layers held in fp8
(e4m3 with one scale per tensor, upcast layer by layer for the matmul) or in NF4 through bitsandbytes (QLoRA).

They are swapped in before the adapters are attached, so peft wraps them as it wraps any Linear layer: `Fp8Linear`
is an `nn.Linear` whose `compute_dtype` tells peft the adapters' dtype (as bitsandbytes' layers do; without it peft
would cast the adapters to fp8), and bitsandbytes' `Linear4bit` gets peft's own 4-bit LoRA layer. The run and
`trainer estimate` call the same `quantize`; on fake tensors NF4 is a stand-in of the same bytes (bitsandbytes'
kernels cannot run on them).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
NF4_BLOCK = 64  # bitsandbytes' 4-bit block: one absmax per 64 weights
NF4_STATS_BLOCK = 256  # with compress_statistics the absmaxes are 8-bit, one fp32 scale per 256 of them


def quantize(module: torch.nn.Module, kind: str) -> int:
    """Replace every `nn.Linear` in `module` (all frozen: this runs before anything trains) by its `kind` ("fp8" or
    "nf4") form computing in the dtype its weights have now. A model on the meta device (the estimate's) gets NF4
    as a stand-in that holds the bytes bitsandbytes would. Returns the number of layers replaced."""
    fake = any(p.is_meta for p in module.parameters())
    make = {"fp8": Fp8Linear.from_linear, "nf4": Nf4Standin.from_linear if fake else _bnb_nf4}[kind]
    layers = [(name, child) for name, child in module.named_modules() if type(child) is torch.nn.Linear]
    for name, child in layers:
        parent_name, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, attr, make(child))
    if kind == "nf4" and not fake:
        module.is_loaded_in_4bit = True  # peft then wraps the layers with its bitsandbytes 4-bit LoRA layer
    return len(layers)


class Fp8Linear(torch.nn.Linear):
    """A frozen Linear layer whose weight is float8_e4m3fn times one fp32 scale (the weight's largest magnitude
    over 448, so the full fp8 range is used). Forward and backward upcast it to `compute_dtype` for the matmul and
    keep only the fp8 weight for the backward pass."""

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> "Fp8Linear":
        weight = linear.weight.detach()
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.compute_dtype = weight.dtype
        scale = (weight.abs().amax().float() / FP8_MAX).clamp(min=1e-12)
        new.weight = torch.nn.Parameter((weight.float() / scale).to(FP8), requires_grad=False)
        new.register_buffer("weight_scale", scale)
        new.bias = linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Fp8Matmul.apply(x, self.weight, self.weight_scale, self.bias, self.compute_dtype)


class _Fp8Matmul(torch.autograd.Function):
    # A plain `F.linear(x, upcast weight)` would keep every layer's upcast copy alive for the backward pass: the
    # memory fp8 saves. This keeps the fp8 weight and upcasts again in the backward.
    @staticmethod
    def forward(ctx, x, weight, scale, bias, dtype):
        ctx.save_for_backward(weight, scale)
        ctx.dtype = dtype
        return F.linear(x, weight.to(dtype) * scale.to(dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        weight, scale = ctx.saved_tensors
        return grad @ (weight.to(grad.dtype) * scale.to(grad.dtype)), None, None, None, None


def _bnb_nf4(linear: torch.nn.Linear):
    """bitsandbytes' NF4 layer (double-quantized statistics, as QLoRA), quantized on the weight's device (CPU
    tensors work with bitsandbytes 0.50) and moved back to it."""
    import bitsandbytes as bnb

    device, dtype = linear.weight.device, linear.weight.dtype
    new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                            compute_dtype=dtype, compress_statistics=True, quant_type="nf4", device="meta")
    new.weight = bnb.nn.Params4bit(linear.weight.detach().to("cpu"), requires_grad=False, quant_type="nf4",
                                   compress_statistics=True)
    new.bias = linear.bias
    new.register_forward_hook(_output_as_autocast)
    return new.to(device)


def _output_as_autocast(module, args, out: torch.Tensor) -> torch.Tensor:
    # Under autocast an nn.Linear returns the autocast dtype; bitsandbytes returns its input's dtype, which the
    # layers after it (norms whose weights are in the autocast dtype) do not expect.
    device = out.device.type
    return out.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else out


def nf4_bytes(numel: int) -> int:
    """What bitsandbytes keeps for an NF4 weight of `numel` elements: 4 bits each, one 8-bit absmax per block of 64
    with one fp32 scale per 256 absmaxes (its 256-entry fp32 code is shared)."""
    blocks = math.ceil(numel / NF4_BLOCK)
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / NF4_STATS_BLOCK)


class Nf4Standin(torch.nn.Linear):
    """The estimate's NF4 layer: a uint8 buffer of `nf4_bytes` and a forward that makes the upcast weight, as
    bitsandbytes' dequantization does, keeping only the packed bytes for the backward pass."""

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> "Nf4Standin":
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.compute_dtype = linear.weight.dtype
        packed = torch.empty(nf4_bytes(linear.weight.numel()), dtype=torch.uint8, device=linear.weight.device)
        new.weight = torch.nn.Parameter(packed, requires_grad=False)
        new.bias = linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Nf4Matmul.apply(x, self.weight, self.bias, self.compute_dtype, (self.out_features, self.in_features))


class _Nf4Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, bias, dtype, shape):
        ctx.save_for_backward(packed)
        ctx.shape = shape
        return F.linear(x, packed.new_empty(shape, dtype=dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        (packed,) = ctx.saved_tensors
        return grad @ packed.new_empty(ctx.shape, dtype=grad.dtype), None, None, None, None
