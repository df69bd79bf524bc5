"""Latent and text caches: a second run does no VAE or text-encoder work, a changed image or caption misses
exactly its own entries, caching changes nothing but speed, and settings that defeat a cache say so."""

import pytest
import torch

from messy_data import noise_image
from trainer.data import cache
from trainer.cli import main
from trainer.events import read_events
from trainer.job import load_job
from trainer.plan import make_plan

RUN = ["--set", "validation.prompts=[]", "--set", "schedule.max_steps=1", "--set", "output.checkpoint_every=0"]


@pytest.fixture
def counts(monkeypatch):
    """Images through the VAE encoder and captions through the text encoder, in this process."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    seen = {"images": 0, "captions": 0}
    encode, forward = AutoencoderKL.encode, CLIPTextModel.forward

    def counting_encode(self, x, *a, **k):
        seen["images"] += x.shape[0]
        return encode(self, x, *a, **k)

    def counting_forward(self, input_ids=None, *a, **k):
        seen["captions"] += input_ids.shape[0]
        return forward(self, input_ids, *a, **k)

    monkeypatch.setattr(AutoencoderKL, "encode", counting_encode)
    monkeypatch.setattr(CLIPTextModel, "forward", counting_forward)
    return seen


def _run(job, out, *extra) -> list[dict]:
    assert main(["run", str(job), *RUN, "--set", f"output.output_dir={out}", *extra]) == 0
    events, _ = read_events(out / "events.jsonl")
    return events


def test_second_run_skips_the_vae_and_a_change_misses_only_its_entries(demo_job, counts, tmp_path):
    root = tmp_path / "cache"
    cache_dir = ["--set", f"dataset.cache_dir={root}"]
    events = _run(demo_job, tmp_path / "r1", *cache_dir)
    assert counts == {"images": 12, "captions": 12}  # each image and caption encoded once, none per step
    assert any("caching latents: 12/12" in e.get("message", "") for e in events)

    counts.update(images=0, captions=0)
    _run(demo_job, tmp_path / "r2", *cache_dir)
    assert counts == {"images": 0, "captions": 0}, "a second run must not touch the VAE or the text encoder"

    dataset = demo_job.parent / "dataset"
    image = sorted(dataset.glob("*.png"))[0]
    noise_image((96, 80), seed=42).save(image)  # the image changes
    sorted(dataset.glob("*.txt"))[-1].write_text("a new caption")  # and another image's caption
    counts.update(images=0, captions=0)
    _run(demo_job, tmp_path / "r3", *cache_dir)
    assert counts == {"images": 1, "captions": 1}
    assert len(list(root.glob("latents/*/*/*.safetensors"))) == 13


def test_caching_changes_nothing_but_speed(demo_job, tmp_path):
    cached = _run(demo_job, tmp_path / "cached", "--set", f"dataset.cache_dir={tmp_path / 'c'}")
    live = _run(demo_job, tmp_path / "live", "--set", "dataset.cache_latents=false",
                "--set", "dataset.cache_text=false")
    a = [e["loss"] for e in cached if e["type"] == "step"]
    b = [e["loss"] for e in live if e["type"] == "step"]
    assert a == pytest.approx(b, rel=1e-4)


def test_settings_that_defeat_a_cache_say_so(demo_job, capsys):
    assert main(["check", str(demo_job), "--set", "dataset.crop=random", "--set", "dataset.shuffle_tags=true",
                 "--set", "dataset.caption_dropout=0.1", "--set", "dataset.random_flip=true"]) == 0
    out = capsys.readouterr().out
    assert "cache: latents off, text off" in out
    assert "note: latent cache off: random crops differ every epoch" in out
    assert "note: text cache off: shuffled tags make a new caption every epoch" in out
    plan = make_plan(load_job(demo_job))
    assert plan.caching.latents and plan.caching.text and str(plan.caching.root).endswith("sdtrainer")


def test_model_identity_follows_the_weights(demo_job):
    spec = load_job(demo_job).model
    before = cache.model_identity(spec, "vae", "torch.float32")
    assert before == cache.model_identity(spec, "vae", "torch.float32")
    assert before != cache.model_identity(spec, "vae", "torch.bfloat16")
    weights = next((demo_job.parent / "model" / "vae").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes())  # rewritten: new mtime
    assert before != cache.model_identity(spec, "vae", "torch.float32")


def test_frozen_parts_are_released_once_cached(demo_job):
    from types import SimpleNamespace

    from trainer.train import _release_frozen

    parts = SimpleNamespace(vae=torch.nn.Linear(2, 2), text_encoder=torch.nn.Linear(2, 2))
    assert _release_frozen(parts, cache.CachePlan(True, True, cache.cache_root("")), needed_again=False) == \
        ["vae", "text_encoder"]
    assert parts.vae.weight.device.type == "meta" and parts.text_encoder.weight.device.type == "meta"
    parts = SimpleNamespace(vae=torch.nn.Linear(2, 2), text_encoder=torch.nn.Linear(2, 2))
    assert _release_frozen(parts, cache.CachePlan(True, False, cache.cache_root("")), needed_again=True) == ["vae"]
    assert parts.vae.weight.device.type == "cpu"  # kept for validation images or a whole-model export
