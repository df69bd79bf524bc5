"""What a family module provides: the training loop, the caches, export and validation call these and nothing
else. Each module in this folder satisfies `FamilyModule`; tests/test_family_contract.py checks every one.

`parts` is the family's own `Parts` dataclass (denoiser, vae, text_encoder: one module holding every text encoder,
noise and sample schedulers, prediction_type, base_version); states and adapter configs are keyed by pipeline
component ("unet", "text_encoder", ...). No torch import here: `typing` only, so `check` stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class FamilyModule(Protocol):
    DENOISER: str  # the denoiser's pipeline component: the table's `denoiser`
    IMAGE_ENCODER: str  # the folder whose encoder makes the latents: the table's `image_encoder`
    Parts: type

    def load(self, spec: Any) -> Any:
        """The model's parts from a diffusers folder, a hub id or a single file (`spec`: the job's ModelSpec)."""

    def text_encoders(self, parts: Any) -> dict:
        """{pipeline component name: (tokenizer, text encoder)} for every text encoder loaded."""

    def pipeline(self, parts: Any, denoiser: Any) -> Any:
        """The family's diffusers pipeline over these parts (saving, class images)."""

    def validation_pipeline(self, parts: Any, denoiser: Any) -> Any:
        """A callable like the pipeline, for validation images."""

    def prepare_noise(self, parts: Any, diffusion: Any) -> list[str]:
        """Apply the job's noise-schedule options once after load; notes for the log."""

    def encode_prompts(self, parts: Any, captions: list[str]) -> dict:
        """{conditioning name: tensor}; not under no_grad (text encoders may train)."""

    def encode_image_dists(self, parts: Any, pixels: Any) -> tuple:
        """The image encoder's latent distribution (mean, std): what the latent cache keeps."""

    def sample_latents(self, parts: Any, mean: Any, std: Any, generator: Any) -> Any:
        """A seeded draw from a cached distribution, scaled as the denoiser expects."""

    def encode_images(self, parts: Any, pixels: Any, generator: Any) -> Any:
        """Pixels straight to scaled latents (no cache)."""

    def noisy_input_and_target(self, parts: Any, latents: Any, generator: Any, diffusion: Any) -> tuple:
        """(noisy input, timesteps, target, per-sample loss weight (B,)). The target is (B, C, h, w) on the
        latents' grid, as the prediction: the loop averages a loss mask down to (h, w) (trainer/train.py _loss)."""

    def conditioning_extras(self, batch: dict) -> dict:
        """Conditioning read from the batch rather than the caption (SDXL: sizes and crops)."""

    def drop_conditioning(self, parts: Any, cond: dict, generator: Any, diffusion: Any) -> dict:
        """Per-sample embedding dropout for classifier-free guidance."""

    def predict(self, parts: Any, denoiser: Any, noisy: Any, timesteps: Any, cond: dict) -> Any:
        """The denoiser's prediction for the loss."""

    def save_lora_diffusers(self, directory: Path, states: dict, adapter_configs: dict) -> Path:
        """DIRECTORY/pytorch_lora_weights.safetensors that the family's pipeline (or loader) reads."""

    def kohya_state_dict(self, states: dict, alpha: float) -> dict:
        """The LoRA under the names ComfyUI and A1111 read (or a JobError where the family has none)."""

    def kohya_metadata(self, parts: Any) -> dict[str, str]:
        """kohya's ss_* labels for the file."""
