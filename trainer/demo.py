"""A self-contained demo: a tiny random-weight SD1.5 (or SD2, SDXL, SD3, Flux, Stable Cascade) pipeline, a
procedural dataset and a job that trains on them.

It lets a new user (and the end-to-end tests) run the whole trainer in under a minute on a CPU, offline.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from trainer.job import DEMO_METHODS, JobError, load_preset, merge, save_job, validate

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
           "purple": (140, 50, 170), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle")
# Not all square, and all above 64 px, so the trainer's resize and center-crop are exercised.
SIZES = ((96, 80), (80, 96), (72, 72), (112, 88))


def build_tiny_sd15(path: Path, seed: int = 0, widths: tuple[int, ...] = (32,), vae_factor: int = 2) -> Path:
    """Write a tiny SD1.5-layout diffusers folder with random weights (~6 MB); loads offline. `widths`: the text
    encoder's (CLIP ViT-L's real 768 in MID_WIDTHS)."""
    from diffusers import PNDMScheduler

    # SD1.5's own scheduler config, so prediction type and noise schedule match what real models use.
    scheduler = PNDMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type="epsilon", steps_offset=1,
                              skip_prk_steps=True, set_alpha_to_one=False)
    return _build_tiny_sd(path, seed, widths[0], scheduler, vae_factor)


def build_tiny_sd2(path: Path, seed: int = 0, widths: tuple[int, ...] = (1024,), vae_factor: int = 2) -> Path:
    """A tiny SD2.x-layout folder (~40 MB): a 1024-wide text encoder (what tells SD2 from SD1) and SD 2.1's
    v-prediction DDIM scheduler config."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type="v_prediction", steps_offset=1,
                              clip_sample=False, set_alpha_to_one=False)
    return _build_tiny_sd(path, seed, widths[0], scheduler, vae_factor)


def _build_tiny_sd(path: Path, seed: int, text_width: int, scheduler, vae_factor: int) -> Path:
    # Imported here so the dataset and job builders (and importing this module) stay light and torch-free.
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = Path(path)
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(path / "tokenizer"))
    # fork_rng: seeding here must not change the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=text_width,
            attention_head_dim=8)
        torch.manual_seed(seed)
        vae = _tiny_vae(vae_factor, latent_channels=4)
        torch.manual_seed(seed)
        text_encoder = _tiny_clip(CLIPTextModel, tokenizer, text_width, projection=32)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_sdxl(path: Path, seed: int = 0, widths: tuple[int, ...] = (32, 32), vae_factor: int = 2) -> Path:
    """Write a tiny SDXL-layout diffusers folder with random weights (two CLIP encoders of `widths`); loads
    offline."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = Path(path)
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(path / "tokenizer"))
    tokenizer_2 = CLIPTokenizer.from_pretrained(write_clip_tokenizer(path / "tokenizer_2"))
    (width_l, width_g), time_dim = widths, 8  # the encoders' widths; the size embedding's width per number
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
            use_linear_projection=True,
            cross_attention_dim=width_l + width_g,  # both encoders' hidden states, concatenated
            addition_embed_type="text_time", addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=6 * time_dim + width_g)  # 6 size numbers + pooled text
        torch.manual_seed(seed)
        vae = _tiny_vae(vae_factor, latent_channels=4, scaling_factor=0.13025, force_upcast=True)
        torch.manual_seed(seed)
        text_encoder = _tiny_clip(CLIPTextModel, tokenizer, width_l)
        torch.manual_seed(seed + 1)
        text_encoder_2 = _tiny_clip(CLIPTextModelWithProjection, tokenizer, width_g)
    # SDXL base's own scheduler config.
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", prediction_type="epsilon", steps_offset=1,
                                       timestep_spacing="leading", interpolation_type="linear")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     add_watermarker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_sd3(path: Path, seed: int = 0, widths: tuple[int, ...] = (32, 48, 96), vae_factor: int = 2) -> Path:
    """Write a tiny SD3-layout diffusers folder with random weights (MMDiT, 16-channel VAE, CLIP-L, CLIP-G and T5
    encoders); loads offline, with or without T5."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

    path = Path(path)
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(path / "tokenizer"))
    tokenizer_2 = CLIPTokenizer.from_pretrained(write_clip_tokenizer(path / "tokenizer_2"))
    tokenizer_3 = t5_tokenizer()
    # Unequal widths, as in SD3 (768, 1280, 4096), so a slip between the encoders' slices of the prompt shows.
    width_l, width_g, width_t5 = widths

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=width_t5,
            pooled_projection_dim=width_l + width_g,  # both CLIPs' projections, concatenated
            pos_embed_max_size=64, qk_norm="rms_norm")  # 64 patches a side: buckets up to 256 px
        torch.manual_seed(seed)
        vae = _tiny_vae(vae_factor, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                        use_quant_conv=False, use_post_quant_conv=False)  # SD3's VAE config, but for the sizes
        torch.manual_seed(seed)
        text_encoder = _tiny_clip(CLIPTextModelWithProjection, tokenizer, width_l)
        torch.manual_seed(seed + 1)
        text_encoder_2 = _tiny_clip(CLIPTextModelWithProjection, tokenizer, width_g)
        torch.manual_seed(seed + 2)
        text_encoder_3 = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer_3), d_model=width_t5, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            pad_token_id=tokenizer_3.pad_token_id, eos_token_id=tokenizer_3.eos_token_id))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)  # SD3's own
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_flux(path: Path, seed: int = 0, widths: tuple[int, ...] = (32, 48)) -> Path:
    """Write a tiny Flux.1-dev-layout diffusers folder with random weights (a guidance-embedding transformer on
    2x2-packed latents, a 16-channel VAE that downsamples 8x, CLIP-L and T5 encoders); loads offline."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    path = Path(path)
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(path / "tokenizer"))
    tokenizer_2 = t5_tokenizer()
    width_clip, width_t5 = widths  # unequal (768 and 4096 in Flux), so a slip between the two shows
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=width_t5, pooled_projection_dim=width_clip,
            guidance_embeds=True, axes_dims_rope=(4, 6, 6))  # 64 = 16 latent channels x a 2x2 patch
        torch.manual_seed(seed)
        vae = _tiny_vae(8, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                        use_post_quant_conv=False)  # Flux's VAE config, but for the sizes
        torch.manual_seed(seed)
        text_encoder = _tiny_clip(CLIPTextModel, tokenizer, width_clip)
        torch.manual_seed(seed + 1)
        text_encoder_2 = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer_2), d_model=width_t5, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            pad_token_id=tokenizer_2.pad_token_id, eos_token_id=tokenizer_2.eos_token_id))
    # FLUX.1-dev's own scheduler config: the shift grows with the image's token count.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_cascade(path: Path, seed: int = 0, widths: tuple[int, ...] = (32, 24)) -> Path:
    """Write a tiny Stable Cascade stage C folder with random weights (StableCascadePriorPipeline: the prior, a CLIP
    text encoder with projection, DDPMWuerstchenScheduler), its EfficientNet encoder in effnet/ (the stride-32
    EfficientNetV2 layout, narrow and shallow), and in decoder/ a tiny stage B (StableCascadeDecoderPipeline with
    a Paella VQGAN as stage A) that turns 4x4 stage C latents into 128 px images; loads offline."""
    import torch
    from diffusers import (DDPMWuerstchenScheduler, StableCascadeDecoderPipeline, StableCascadePriorPipeline,
                           StableCascadeUNet)
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    from trainer.families.cascade import EfficientNetEncoder, save_effnet

    path = Path(path)
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(path / "tokenizer"))
    # The text encoder's hidden and pooled widths: unequal in the tiny model (both 1280 in Stable Cascade), so a
    # slip between the two shows.
    hidden, pooled = widths
    effnet_config = {"stem": 8, "stages": [["fused", 1, 3, 1, 8, 8, 1], ["fused", 2, 3, 2, 8, 16, 1],
                                           ["fused", 2, 3, 2, 16, 16, 1], ["mb", 2, 3, 2, 16, 24, 1],
                                           ["mb", 2, 3, 1, 24, 24, 1], ["mb", 2, 3, 2, 24, 32, 1]],
                     "last": 64, "latent_channels": 16}

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        prior = StableCascadeUNet(  # stage C's layout (switch_level False: no down-sampling), but for the sizes
            in_channels=16, out_channels=16, conditioning_dim=32, block_out_channels=(32, 32),
            num_attention_heads=(2, 2), down_num_layers_per_block=(1, 1), up_num_layers_per_block=(1, 1),
            switch_level=(False,), clip_text_in_channels=hidden, clip_text_pooled_in_channels=pooled,
            clip_image_in_channels=16, dropout=(0.1, 0.1))
        torch.manual_seed(seed)
        text_encoder = _tiny_clip(CLIPTextModelWithProjection, tokenizer, hidden, projection=pooled)
        torch.manual_seed(seed)
        effnet = EfficientNetEncoder(effnet_config)
        # Running statistics as a trained encoder has them (fresh ones are 0 and 1, which leave latents tiny).
        for module in effnet.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
        torch.manual_seed(seed + 1)
        decoder = StableCascadeUNet(  # stage B's layout: effnet and pixel conditioning, no text but the pooled
            in_channels=4, out_channels=4, conditioning_dim=32, block_out_channels=(16, 32),
            num_attention_heads=(-1, 2), down_num_layers_per_block=(1, 1), up_num_layers_per_block=(1, 1),
            block_types_per_layer=(("SDCascadeResBlock", "SDCascadeTimestepBlock"),
                                   ("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock")),
            clip_text_pooled_in_channels=pooled, effnet_in_channels=16, pixel_mapper_in_channels=3,
            timestep_conditioning_type=("sca",), dropout=(0.0, 0.0), switch_level=None)
        torch.manual_seed(seed + 1)
        vqgan = PaellaVQModel(levels=2, bottleneck_blocks=1, embed_dim=16, latent_channels=4, num_vq_embeddings=8)
        torch.manual_seed(seed + 1)
        decoder_text_encoder = _tiny_clip(CLIPTextModelWithProjection, tokenizer, hidden, projection=pooled)
    scheduler = DDPMWuerstchenScheduler()  # Stable Cascade's own config (scaler 1, s 0.008)
    StableCascadePriorPipeline(tokenizer=tokenizer, text_encoder=text_encoder, prior=prior,
                               scheduler=scheduler).save_pretrained(path, safe_serialization=True)
    save_effnet(effnet, path)
    # latent_dim_scale 8: 4x4 stage C latents make 32x32 stage B latents, which the VQGAN decodes to 128 px.
    StableCascadeDecoderPipeline(decoder=decoder, tokenizer=tokenizer, text_encoder=decoder_text_encoder,
                                 scheduler=scheduler, vqgan=vqgan, latent_dim_scale=8.0).save_pretrained(
        path / "decoder", safe_serialization=True)
    return path


BUILDERS = {"sd1": build_tiny_sd15, "sd2": build_tiny_sd2, "sdxl": build_tiny_sdxl, "sd3": build_tiny_sd3,
            "flux": build_tiny_flux, "cascade": build_tiny_cascade}
# The real models' text-encoder widths (CLIP ViT-L 768, OpenCLIP ViT-H 1024, OpenCLIP bigG 1280, T5-XXL 4096),
# for `build_mid_size`: single-file loaders tell the encoders apart by their widths, which the tiny ones share.
MID_WIDTHS = {"sd1": (768,), "sd2": (1024,), "sdxl": (768, 1280), "sd3": (768, 1280, 4096), "flux": (768, 4096),
              "cascade": (1280, 1280)}
# And the real VAEs' 8x downsampling where the tiny model halves (Flux's tiny VAE and Stable Cascade's EfficientNet
# already reduce as the real ones do): a 64 px image is then 8x8 latents, as a 512 px one is 64x64 in SD1.5.
MID_VAE = {"sd1": {"vae_factor": 8}, "sd2": {"vae_factor": 8}, "sdxl": {"vae_factor": 8}, "sd3": {"vae_factor": 8}}


# And captions padded to 16 tokens, not CLIP's 77: encoding a caption costs its tokens times the width squared,
# which at the real widths took a third or more of a 2-step bf16 run on a CPU without bf16 instructions (there bf16
# matmuls are five times slower than fp32's). The position table keeps CLIP's 77 rows, so the files hold the real
# encoders' shapes.
MID_TOKENS = 16


def build_mid_size(family: str, path: Path, seed: int = 0) -> Path:
    """The family's tiny model with its real text-encoder widths and latent scale (still two layers deep;
    10-60 MB), its CLIP tokenizers padding to MID_TOKENS."""
    BUILDERS[family](path, seed, widths=MID_WIDTHS[family], **MID_VAE.get(family, {}))
    for file in Path(path).glob("tokenizer*/tokenizer_config.json"):
        config = json.loads(file.read_text(encoding="utf-8"))
        if config.get("tokenizer_class") == "CLIPTokenizer":
            file.write_text(json.dumps({**config, "model_max_length": MID_TOKENS}, indent=2), encoding="utf-8")
    return Path(path)


# What a family's demo job changes: transformer models bucket in steps of 16 (VAE 8 x patch 2) and take a LoRA on
# their joint attention's image and text projections.
FAMILY_OVERRIDES = {
    "sd3": {"dataset": {"bucket_step": 16},
            "network": {"target_modules": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                           "add_v_proj", "to_add_out"]}},
    "flux": {"dataset": {"bucket_step": 16},
             "network": {"target_modules": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                            "add_v_proj", "to_add_out"]}},
    # Stable Cascade: sides in steps of the EfficientNet's 32 (128 px: 4x4 latents), Stability's LoRA filter
    # ['.attn'] (the attention projections of its attention blocks), and no kohya or single-file export.
    "cascade": {"dataset": {"resolution": 128, "bucket_step": 32},
                "network": {"target_modules": ["to_q", "to_k", "to_v", "to_out.0"]},
                "layers": {"include_patterns": ["*.attention.*"]},
                "output": {"save_kohya": False, "save_single_file": False}},
}


def build_demo_dataset(path: Path, count: int = 12, seed: int = 0) -> Path:
    """Write `count` procedural shape images (PNG and JPG) with captions; exactly one has no caption."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    for i in range(count):
        shape = SHAPES[i % len(SHAPES)]
        fg, bg = rng.choice(len(names), size=2, replace=False)
        image = _draw(shape, COLOURS[names[fg]], COLOURS[names[bg]], SIZES[i % len(SIZES)], rng)
        stem = f"{i:02d}_{names[fg]}_{shape}"
        image.save(path / f"{stem}.{'png' if i % 2 == 0 else 'jpg'}")
        if i != count - 1:  # the last image stays uncaptioned: the folder's instance_prompt covers it
            caption = f"{_a(names[fg])} {shape} on {_a(names[bg])} background"
            (path / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")
    return path


def build_demo(dir: Path, steps: int = 40, family: str = "sd1", method: str = "lora", real_size: str = "") -> Path:
    """Build model (of `family`), dataset and job.json (training by `method`, see METHODS) in an empty or new
    `dir`; return the job.json path. With `real_size` (a name of real_size.MODELS, or "default") the model is
    the real one's configs without weights, and the job trains at its resolution: for `estimate` and `check`."""
    dir = Path(dir).resolve()
    if family not in BUILDERS:
        raise JobError(f"family: {family!r}: the demo builds {', '.join(BUILDERS)}")
    if method not in METHODS:
        raise JobError(f"method: {method!r}: the demo trains by {', '.join(METHODS)}")
    if dir.exists() and (not dir.is_dir() or any(dir.iterdir())):
        raise JobError(f"{dir}: not empty; choose a new folder")
    job = demo_job(dir, family, steps, method)
    if real_size:
        from .real_size import RESOLUTION, build_real_size, model_name

        name = model_name(family, real_size)
        build_real_size(dir / "model", family, name)
        # The demo's small images fill the real resolution's buckets: enlargement allowed, for the estimate. No
        # stage B decoder is written beside a real-size Stable Cascade.
        job = validate(merge(job.model_dump(mode="json"), {
            "dataset": {"resolution": RESOLUTION[name], "max_upscale": 16}, "model": {"decoder": ""}}), "demo job")
    else:
        BUILDERS[family](dir / "model")
    build_demo_dataset(dir / "dataset")
    save_job(job, dir / "job.json")
    return dir / "job.json"


def demo_job(dir: Path, family: str = "sd1", steps: int = 40, method: str = "lora"):
    """The demo's job for the model in `dir`/model and the images in `dir`/dataset, writing to `dir`/run."""
    job = validate(merge(load_preset("demo").model_dump(mode="json"), {
        "model": {"path": str(dir / "model")},
        "dataset": {"folders": [{"path": str(dir / "dataset"), "instance_prompt": "a shape"}]},
        "output": {"output_dir": str(dir / "run")},
        "schedule": {"max_steps": steps},
    }), "demo job")
    job = validate(merge(job.model_dump(mode="json"), FAMILY_OVERRIDES.get(family, {})), "demo job")
    if family == "cascade":  # stage B, built beside stage C, renders the validation images
        job.model.decoder = str(dir / "model" / "decoder")
    return validate(merge(job.model_dump(mode="json"), _method_overrides(method, dir)), "demo job")


# What each training method (job.DEMO_METHODS) changes in the demo job; each trains on a CPU in about a minute.
METHODS = {method: what for method, (_, what) in DEMO_METHODS.items()}


def _method_overrides(method: str, dir: Path) -> dict:
    if method == "dreambooth":
        return {"dataset": {"folders": [{"path": str(dir / "dataset"), "instance_prompt": "a sks shape"}]},
                "text_encoder": {"mode": "lora", "learning_rate": 1e-3},
                "prior": {"enabled": True, "class_prompt": "a shape", "class_dir": str(dir / "class_images"),
                          "num_class_images": 6, "sample_steps": 4, "guidance_scale": 3.0},
                "validation": {"prompts": ["a sks shape", "a shape"]},
                "output": {"name": "demo_dreambooth"}}
    if method == "full":
        return {"network": {"kind": "full"}, "optimizer": {"learning_rate": 3e-4},
                "ema": {"enabled": True, "decay": 0.9}, "output": {"name": "demo_full"}}
    if method == "textual_inversion":
        return {"network": {"kind": "none"},
                "tokens": {"new": [{"token": "<shape>", "init_pattern": "^[a-z]</w>$"}], "learning_rate": 5e-2},
                "dataset": {"folders": [{"path": str(dir / "dataset"), "instance_prompt": "a <shape>"}]},
                "validation": {"prompts": ["a red <shape> on a blue background"]},
                "output": {"name": "demo_ti"}}
    return {}


def _tiny_vae(factor: int, **config):
    """A tiny AutoencoderKL that downsamples `factor` times (2 or 8: one block per halving after the first)."""
    from diffusers import AutoencoderKL

    channels = {2: (32, 64), 8: (16, 16, 32, 32)}[factor]
    return AutoencoderKL(block_out_channels=channels, in_channels=3, out_channels=3, sample_size=64,
                         down_block_types=("DownEncoderBlock2D",) * len(channels),
                         up_block_types=("UpDecoderBlock2D",) * len(channels),
                         norm_num_groups=8 if factor == 8 else 32, **config)


def _tiny_clip(model_class, tokenizer, width: int, projection: int = 0):
    """A 2-layer CLIP text encoder of `width` (projection: its pooled width, default the same) for `tokenizer`."""
    from transformers import CLIPTextConfig

    return model_class(CLIPTextConfig(
        hidden_size=width, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        projection_dim=projection or width, vocab_size=len(tokenizer), max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))


def write_clip_tokenizer(path: Path) -> Path:
    # No merges: a byte-level BPE of ~514 tokens tokenizes any text, which is all a random model needs.
    symbols = list(_bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}), encoding="utf-8")
    return path


def t5_tokenizer():
    # A Unigram vocabulary of single characters, with and without the word-start mark: spells any caption made
    # of them (anything else is <unk>), which is all a random model needs.
    from transformers import T5Tokenizer

    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,:;!?'()<>[]-_"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in chars] + [("▁" + c, -2.5) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP's byte alphabet: printable bytes map to themselves, the rest to code points above 255.
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _draw(shape: str, fg: tuple, bg: tuple, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    w, h = size
    # A vertical gradient from the background colour to a darker shade, so images are not flat fills.
    t = np.linspace(1.0, 0.55, h)[:, None, None]
    pixels = (np.array(bg, dtype=np.float32) * t).repeat(w, axis=1)  # (H, W, 3)
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")
    r = int(min(w, h) * rng.uniform(0.25, 0.38))
    cx, cy = int(rng.integers(r, w - r + 1)), int(rng.integers(r, h - r + 1))
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fg)
    else:
        draw.polygon([(cx + r * math.cos(a), cy + r * math.sin(a))
                      for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)], fill=fg)
    return image
