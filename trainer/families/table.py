"""What each model family is and can do, as data: `check`, the window, layer selection, the caches, new tokens and
the demo read it here without importing torch. How a family trains lives in its module (contract.py says what
that module provides); a new family is one module plus one row below.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str  # the job's model.family
    title: str  # for people: errors, the window
    module: str  # trainer/families/<module>.py implements it
    pipeline_class: str  # the diffusers pipeline that loads and saves it
    denoiser: str  # the denoiser's pipeline component (and model folder)
    text_encoders: tuple[str, ...]  # the text encoders that can train (LoRA, new tokens), in order; T5 never does
    # The model folders whose files name the text cache, in order (encoders and tokenizers), and those that
    # count only when the job loads T5 (SD3's optional third encoder).
    text_cache_folders: tuple[str, ...]
    t5_folders: tuple[str, ...] = ()
    image_encoder: str = "vae"  # the folder whose encoder makes the latents (Stable Cascade: its EfficientNet)
    size_multiple: int = 8  # image sides a denoiser accepts: VAE factor x patch size (Cascade: 32)
    kohya: bool = True  # a kohya-format LoRA file exists for it
    # Its kohya file uses kohya's module names (`lora_unet_...`), so LoHa, LoKr and DoRA go in the LyCORIS key layout
    # (hada_*, lokr_*, dora_scale) that ComfyUI and A1111 read; SD3's and Flux's use diffusers' names instead.
    lycoris: bool = False
    class_images: bool = True  # DreamBooth class images can be generated and trained
    # The denoiser's top-level blocks in the block notation (`down_blocks.1`, `transformer_blocks.12-23`).
    block_roots: tuple[str, ...] = ("down_blocks", "mid_block", "up_blocks")
    # T5's prompt length: the pipeline's default max_sequence_length, so training sees prompts as validation
    # renders them (0: no T5).
    t5_tokens: int = 0
    # Which half of the pipeline's classifier-free-guidance batch holds which prediction, for APG at validation
    # (trainer/run/guidance.py); empty: the pipeline batches no CFG (Flux is guidance-distilled).
    cfg_halves: tuple[str, ...] = ("uncond", "cond")
    # What block swap streams to the accelerator, in forward order: lists of blocks, or one block (the UNet's mid).
    swap_blocks: tuple[str, ...] = ("down_blocks", "mid_block", "up_blocks")
    # speed.compile "regional": the class names of the denoiser's repeated blocks where its diffusers class names
    # none (`_repeated_blocks`: the UNet's BasicTransformerBlock and Flux's blocks are named there).
    repeated_blocks: tuple[str, ...] = ()


_ONE = ("text_encoder",)
_TWO = ("text_encoder", "text_encoder_2")
_ONE_CACHE = ("text_encoder", "tokenizer")
_TWO_CACHE = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("sd1", "Stable Diffusion 1.x", "sd", "StableDiffusionPipeline", "unet", _ONE, _ONE_CACHE, lycoris=True),
    Family("sd2", "Stable Diffusion 2.x", "sd", "StableDiffusionPipeline", "unet", _ONE, _ONE_CACHE, lycoris=True),
    Family("sdxl", "Stable Diffusion XL", "sdxl", "StableDiffusionXLPipeline", "unet", _TWO, _TWO_CACHE,
           lycoris=True),
    Family("sd3", "Stable Diffusion 3/3.5", "sd3", "StableDiffusion3Pipeline", "transformer", _TWO, _TWO_CACHE,
           t5_folders=("text_encoder_3", "tokenizer_3"), size_multiple=16, block_roots=("transformer_blocks",),
           t5_tokens=256, swap_blocks=("transformer_blocks",), repeated_blocks=("JointTransformerBlock",)),
    Family("flux", "Flux.1", "flux", "FluxPipeline", "transformer", _ONE, _TWO_CACHE, size_multiple=16,
           block_roots=("transformer_blocks", "single_transformer_blocks"), t5_tokens=512,  # FLUX.1-dev's
           cfg_halves=(), swap_blocks=("transformer_blocks", "single_transformer_blocks")),
    Family("cascade", "Stable Cascade stage C", "cascade", "StableCascadePriorPipeline", "prior", _ONE,
           _ONE_CACHE, image_encoder="effnet", size_multiple=32, kohya=False, class_images=False,
           block_roots=("down_blocks", "up_blocks"), swap_blocks=(),
           repeated_blocks=("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"),
           cfg_halves=("cond", "uncond")),  # StableCascadePriorPipeline
)}


def family_names() -> list[str]:
    return list(FAMILIES)
