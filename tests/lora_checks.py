"""Shared by the family tests: an exported LoRA, in both formats, loads in the family's pipeline."""

import numpy as np
import torch


def render(pipe) -> np.ndarray:
    out = pipe("a red circle on a blue background", num_inference_steps=3, height=64, width=64,
               generator=torch.Generator().manual_seed(0), output_type="np")
    return out.images[0]


def assert_both_lora_files_change_the_image(pipe, final_dir, kohya_name: str) -> None:
    """The diffusers file changes the image, unloading restores it exactly, the kohya file gives the same image."""
    pipe.set_progress_bar_config(disable=True)
    base = render(pipe)
    pipe.load_lora_weights(final_dir)
    with_diffusers = render(pipe)
    pipe.unload_lora_weights()
    assert np.array_equal(render(pipe), base)
    pipe.load_lora_weights(final_dir, weight_name=kohya_name)
    with_kohya = render(pipe)
    assert np.abs(with_diffusers - base).mean() > 1e-3, "the LoRA must change the image"
    np.testing.assert_allclose(with_kohya, with_diffusers, atol=2e-3)
