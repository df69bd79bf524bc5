"""A real-size SDXL (2.6B UNet, both real text encoders, random weights) stored as a bf16 original-layout single
file, trained for 2 LoRA steps in fp32 on the CPU: the case of issue #18, too heavy for the test suite.

    .venv/bin/python bench/real_size_sdxl.py /tmp/real-sdxl      # ~7 GB of disk; about 17 GB of memory

Measured on the 23 GB, 2-core machine (2026-12-06), nothing else running: built in 70 s (6.7 GB), then
`trainer run` exit 0 in 48 s (2 steps, caching through both encoders in fp32), peak resident memory 16.4 GB.
(An earlier try capped at 20.5 GB of *address space* stopped while loading: the cap, not the memory, was short.)
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trainer.demo import write_clip_tokenizer, build_demo_dataset, demo_job  # noqa: E402
from trainer.job import save_job  # noqa: E402


def build(folder: Path, file: Path) -> None:
    """SDXL base's configs in `folder` (no weights: what model.config needs), its random weights in bf16 in
    `file` (written by trainer/export/single_file.py, the layout A1111 and CivitAI use)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from trainer.export.single_file import write_single_file

    unet_config = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                       down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                       transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                       use_linear_projection=True, cross_attention_dim=2048, addition_embed_type="text_time",
                       addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    vae_config = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                      down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                      sample_size=1024, scaling_factor=0.13025, force_upcast=True)
    # The real widths and depths; the vocabulary is our offline byte-level tokenizer's 514 tokens, not CLIP's 49408
    # (the writer cuts the embedding to the tokenizer's size, as it does for added tokens).
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "tokenizer"))
    write_clip_tokenizer(folder / "tokenizer_2")
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    clip_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            projection_dim=768, hidden_act="quick_gelu", **ids)
    clip_g = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                            num_attention_heads=20, projection_dim=1280, hidden_act="gelu", **ids)
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading")
    with torch.device("meta"):
        parts = dict(unet=UNet2DConditionModel(**unet_config), vae=AutoencoderKL(**vae_config),
                     text_encoder=CLIPTextModel(clip_l), text_encoder_2=CLIPTextModelWithProjection(clip_g))
    generator = torch.Generator().manual_seed(0)
    for name, model in parts.items():
        model.to(torch.bfloat16).to_empty(device="cpu")  # dtype set on meta: 2 bytes a weight from the start
        with torch.no_grad():
            for tensor in (*model.parameters(), *model.buffers()):
                if tensor.is_floating_point():  # integer buffers (position ids) are not written to the file
                    tensor.normal_(0, 0.02, generator=generator)
        if hasattr(model, "save_config"):
            model.save_config(folder / name)
        else:
            model.config.save_pretrained(folder / name)
    scheduler.save_pretrained(folder / "scheduler")
    pipe = StableDiffusionXLPipeline(**parts, tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=scheduler,
                                     add_watermarker=False)
    pipe.save_config(folder)  # model_index.json
    print(f"UNet {sum(p.numel() for p in parts['unet'].parameters()) / 1e9:.2f}B parameters; writing {file}")
    write_single_file(pipe, file, {})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    args = parser.parse_args()
    root = args.dir.resolve()
    folder, file = root / "sdxl-config", root / "sdxl-bf16.safetensors"
    if not file.is_file():
        started = time.time()
        build(folder, file)
        print(f"built in {time.time() - started:.0f} s: {file.stat().st_size / 1e9:.1f} GB")
    build_demo_dataset(root / "dataset", count=1)
    job = demo_job(root, "sdxl", steps=2)
    job.model.path, job.model.config = str(file), str(folder)
    job.dataset.folders[0].path = str(root / "dataset")
    job.schedule.batch_size = 1
    job.precision.mixed_precision = "no"
    job.network.target_modules = ["to_q", "to_k", "to_v", "to_out.0"]
    job.validation.prompts = []
    job.output.checkpoint_every = 0
    job.output.output_dir = str(root / f"run-{int(time.time())}")
    save_job(job, root / "job.json")
    started = time.time()
    code = subprocess.call([sys.executable, "-m", "trainer", "run", str(root / "job.json")], cwd=ROOT)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(f"trainer run: exit {code} in {time.time() - started:.0f} s, peak memory {peak:.1f} GB")
    return code


if __name__ == "__main__":
    sys.exit(main())
