"""Single-file export: a diffusers SD 1.x/2.x/XL pipeline's weights as one .safetensors in the original
CompVis/Stability layout (`model.diffusion_model.*`, `first_stage_model.*`, ...), the file ComfyUI and A1111 load.

The names invert diffusers' own single-file loader (diffusers/loaders/single_file_utils.py). They are built from the
model's configs rather than fixed tables, so any number of blocks and layers maps, the tiny test models included.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..job import JobError

SD_CLASSES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
SDXL_CLASSES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")

# (diffusers prefix, original prefix, renames of what follows the prefix): what follows starts at a module name.
Rule = tuple[str, str, tuple[tuple[str, str], ...]]

_UNET_RESNET = (("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("norm2.", "out_layers.0."),
                ("conv2.", "out_layers.3."), ("time_emb_proj.", "emb_layers.1."),
                ("conv_shortcut.", "skip_connection."))
_VAE_RESNET = (("conv_shortcut.", "nin_shortcut."),)
_VAE_ATTENTION = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                  ("to_out.0.", "proj_out."))
_OPEN_CLIP_LAYER = (("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."), ("self_attn.out_proj.", "attn.out_proj."),
                    ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj."))
_QKV = re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")
_VAE_CONV_ATTENTION = re.compile(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def write_single_file(pipe, path: Path, metadata: dict[str, str]) -> Path:
    """Write the pipeline's UNet, VAE and text encoder(s) as one original-layout file (written under a temporary
    name, then renamed, so a crash never leaves half a file under the real name)."""
    tensors = original_state_dict(pipe)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata=metadata)
    tmp.replace(path)
    return path


def original_state_dict(pipe) -> dict[str, torch.Tensor]:
    """Every UNet, VAE and text-encoder tensor of the pipeline under its original-layout name (on the CPU)."""
    layout = original_layout(pipe)
    if layout is None:
        raise JobError(f"single-file export: {type(pipe).__name__} has no original-layout mapping (Stable "
                       "Diffusion 1.x, 2.x and XL base have)")
    out = _prefixed("model.diffusion_model.", unet_state_dict(pipe.unet))
    out.update(_prefixed("first_stage_model.", vae_state_dict(pipe.vae)))
    if layout == "sd1":
        text = [("cond_stage_model.transformer.text_model.", clip_state_dict(pipe.text_encoder), pipe.tokenizer)]
    elif layout == "sd2":
        text = [("cond_stage_model.model.", open_clip_state_dict(pipe.text_encoder), pipe.tokenizer)]
    else:
        text = [("conditioner.embedders.0.transformer.text_model.", clip_state_dict(pipe.text_encoder),
                 pipe.tokenizer),
                ("conditioner.embedders.1.model.", open_clip_state_dict(pipe.text_encoder_2), pipe.tokenizer_2)]
    for prefix, state, tokenizer in text:
        out.update(_prefixed(prefix, _without_added_tokens(state, tokenizer)))
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def original_layout(pipe) -> str | None:
    """Which original layout the pipeline maps to: "sd1" (CLIP ViT-L), "sd2" (OpenCLIP ViT-H), "sdxl", or None
    (no mapping: other families, the SDXL refiner)."""
    name = type(pipe).__name__
    if name in SDXL_CLASSES and pipe.text_encoder is not None:
        return "sdxl"
    if name in SD_CLASSES:
        # SD 2.x's OpenCLIP has 1024-wide states, CLIP ViT-L 768: the same test diffusers' loader and
        # trainer.families use to tell them apart.
        return "sd2" if pipe.unet.config.cross_attention_dim == 1024 else "sd1"
    return None


def unet_state_dict(unet) -> dict[str, torch.Tensor]:
    """The UNet's tensors as `input_blocks/middle_block/output_blocks` names (no prefix)."""
    return _renamed(_plain_state(unet, "unet"), _unet_rules(unet.config), "unet")


def vae_state_dict(vae) -> dict[str, torch.Tensor]:
    """The VAE's tensors as `encoder.down.N.block.M` names; its mid-block attention as 1x1 convolutions."""
    out = _renamed(_plain_state(vae, "vae"), _vae_rules(vae.config), "vae")
    for key, value in out.items():
        if _VAE_CONV_ATTENTION.search(key) and value.ndim == 2:
            out[key] = value.reshape(*value.shape, 1, 1)
    return out


def clip_state_dict(encoder) -> dict[str, torch.Tensor]:
    """A CLIP text model's tensors under the names below `text_model.` (transformers 5 leaves that prefix out of
    CLIPTextModel's state dict but keeps it in CLIPTextModelWithProjection's)."""
    return {k.removeprefix("text_model."): v for k, v in _plain_state(encoder, "text encoder").items()
            if not k.endswith("position_ids")}


def open_clip_state_dict(encoder) -> dict[str, torch.Tensor]:
    """A CLIP text model's tensors as OpenCLIP names: q, k and v concatenated into `attn.in_proj_*`, the
    projection as the bare `text_projection` matrix (transposed: OpenCLIP multiplies x @ P)."""
    state = clip_state_dict(encoder)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    rest = {}
    for key, value in state.items():
        if key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T
        elif match := _QKV.match(key):
            qkv.setdefault((match[1], match[3]), {})[match[2]] = value
        else:
            rest[key] = value
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise JobError(f"single-file export: text encoder layer {layer} lacks one of q/k/v_proj.{kind}")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    rules: list[Rule] = [("embeddings.token_embedding.", "token_embedding.", ()),
                         ("final_layer_norm.", "ln_final.", ())]
    rules += [(f"encoder.layers.{i}.", f"transformer.resblocks.{i}.", _OPEN_CLIP_LAYER)
              for i in range(encoder.config.num_hidden_layers)]
    out.update(_renamed(rest, rules, "text encoder"))
    return out


def _unet_rules(config) -> list[Rule]:
    """diffusers' down/up blocks of `layers_per_block` resnets (+ attentions) to the original's flat numbering:
    input_blocks.0 is conv_in, then each down block's layers and its downsampler; output_blocks hold each up
    block's layers + 1, its upsampler beside the last one's resnet (slot 1) or attention (slot 2)."""
    per = config.layers_per_block
    if not isinstance(per, int):
        raise JobError("single-file export: a UNet with a different depth per block has no original layout")
    n = len(config.block_out_channels)
    rules: list[Rule] = [
        ("time_embedding.linear_1.", "time_embed.0.", ()), ("time_embedding.linear_2.", "time_embed.2.", ()),
        ("add_embedding.linear_1.", "label_emb.0.0.", ()), ("add_embedding.linear_2.", "label_emb.0.2.", ()),
        ("conv_in.", "input_blocks.0.0.", ()), ("conv_norm_out.", "out.0.", ()), ("conv_out.", "out.2.", ()),
        ("mid_block.resnets.0.", "middle_block.0.", _UNET_RESNET),
        ("mid_block.attentions.0.", "middle_block.1.", ()),
        ("mid_block.resnets.1.", "middle_block.2.", _UNET_RESNET)]
    for i in range(n):
        for j in range(per):
            index = 1 + i * (per + 1) + j
            rules += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{index}.0.", _UNET_RESNET),
                      (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{index}.1.", ())]
        for j in range(per + 1):
            index = i * (per + 1) + j
            rules += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{index}.0.", _UNET_RESNET),
                      (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{index}.1.", ())]
        if i < n - 1:
            last = (i + 1) * (per + 1) - 1
            slot = 2 if "Attn" in config.up_block_types[i] else 1
            rules += [(f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{last + 1}.0.op.", ()),
                      (f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{last}.{slot}.conv.", ())]
    return rules


def _vae_rules(config) -> list[Rule]:
    """The encoder's down blocks keep their order; the decoder's up blocks are numbered from the other end."""
    n, per = len(config.block_out_channels), config.layers_per_block
    rules: list[Rule] = [("quant_conv.", "quant_conv.", ()), ("post_quant_conv.", "post_quant_conv.", ())]
    for part in ("encoder", "decoder"):
        rules += [(f"{part}.conv_in.", f"{part}.conv_in.", ()), (f"{part}.conv_out.", f"{part}.conv_out.", ()),
                  (f"{part}.conv_norm_out.", f"{part}.norm_out.", ()),
                  (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", _VAE_RESNET),
                  (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", _VAE_RESNET),
                  (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _VAE_ATTENTION)]
    for i in range(n):
        rules += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", _VAE_RESNET)
                  for j in range(per)]
        rules += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}.", _VAE_RESNET)
                  for j in range(per + 1)]
        rules += [(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.", ()),
                  (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample.", ())]
    return rules


def _renamed(state: dict[str, torch.Tensor], rules: list[Rule], what: str) -> dict[str, torch.Tensor]:
    """Each key's longest matching diffusers prefix swapped for the original one, then what follows renamed."""
    table = {prefix: (new, inner) for prefix, new, inner in rules}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        prefix = next((p for p in (".".join(parts[:d]) + "." for d in range(len(parts) - 1, 0, -1)) if p in table),
                      None)
        if prefix is None:
            raise JobError(f"single-file export: no original-layout name for {what} tensor {key}")
        new, inner = table[prefix]
        rest = key[len(prefix):]
        old = next((o for o, _ in inner if rest.startswith(o)), None)
        if old is not None:
            rest = dict(inner)[old] + rest[len(old):]
        out[new + rest] = value
    return out


def _without_added_tokens(state: dict[str, torch.Tensor], tokenizer) -> dict[str, torch.Tensor]:
    """The token embedding cut to the tokenizer's own vocabulary: the original layout has no tokenizer to
    hold added tokens (new tokens travel as embedding files), and tools expect the base vocabulary's size."""
    for key in ("embeddings.token_embedding.weight", "token_embedding.weight"):
        if key in state and tokenizer is not None and state[key].shape[0] > tokenizer.vocab_size:
            state = {**state, key: state[key][:tokenizer.vocab_size]}
    return state


def _plain_state(module, what: str) -> dict[str, torch.Tensor]:
    """The module's state dict; one still carrying adapters would export adapter names, not the merged weights."""
    state = module.state_dict()
    if any(".base_layer." in k or ".lora_" in k for k in state):
        raise ValueError(f"single-file export: the {what} still carries LoRA adapters; fuse and unload them first")
    return state


def _prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}
