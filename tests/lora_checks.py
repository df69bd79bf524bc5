"""Shared by the family tests: an exported LoRA, in both formats, loads in the family's pipeline."""

import numpy as np
import torch

# Two renders of the same weights through different loading paths (from_pretrained and from_single_file, a file and
# a tensor) may differ in the last float bits: the kernel chosen follows the tensors' memory layout. What is promised
# is the same image: within 1e-5 of full scale per pixel, far below one 8-bit level (1/255 = 3.9e-3).
SAME_IMAGE_ATOL = 1e-5


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
    np.testing.assert_allclose(render(pipe), base, rtol=0, atol=SAME_IMAGE_ATOL, err_msg="unloading restores the image")
    pipe.load_lora_weights(final_dir, weight_name=kohya_name)
    with_kohya = render(pipe)
    assert np.abs(with_diffusers - base).mean() > 1e-3, "the LoRA must change the image"
    np.testing.assert_allclose(with_kohya, with_diffusers, atol=2e-3)
