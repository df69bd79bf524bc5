"""New-token training on the tiny SD1.5 and SDXL models: initialisation, errors, training only the new rows,
checkpoint tensors, and embedding files that a fresh pipeline (ours and plain diffusers) loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from trainer.methods import tokens
from trainer.demo import build_tiny_sd15, build_tiny_sdxl
from trainer.job import JobError, NewToken

# The tiny tokenizer's vocabulary is the 256 byte symbols, each also with '</w>' (a word's last symbol).
ABC = r"^[abc]</w>$"
# The input embedding's parameter name (CLIPTextModelWithProjection nests the model one level deeper).
EMBEDDING = {"text_encoder": "embeddings.token_embedding.weight",
             "text_encoder_2": "text_model.embeddings.token_embedding.weight"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("token-models")
    return {"sd1": build_tiny_sd15(root / "sd1"), "sdxl": build_tiny_sdxl(root / "sdxl")}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_new_rows_start_at_the_mean_of_matching_rows(models, family):
    pipe = _pipeline(models, family)
    encoders = _encoders(pipe)
    before = {c: enc.get_input_embeddings().weight.detach().clone() for c, (_, enc) in encoders.items()}
    state = tokens.add_tokens([NewToken(token="[fern]", init_pattern=ABC, vectors=2), NewToken(token="<all>")],
                              encoders)

    assert set(tokens.trainable_parameters(state)) == {f"{c}.{EMBEDDING[c]}" for c in encoders}
    for component, (tokenizer, encoder) in encoders.items():
        weight = encoder.get_input_embeddings().weight
        vocab = tokenizer.get_vocab()
        abc = before[component][[vocab["a</w>"], vocab["b</w>"], vocab["c</w>"]]].mean(0)
        fern = state.encoders[component].ids["[fern]"]
        assert len(fern) == 2 and weight.shape[0] == before[component].shape[0] + 3
        for row in fern:
            torch.testing.assert_close(weight[row].detach(), abc, rtol=0, atol=1e-7)
        torch.testing.assert_close(weight[state.encoders[component].ids["<all>"][0]].detach(),
                                   before[component].mean(0), rtol=0, atol=1e-7)
        assert torch.equal(weight[:before[component].shape[0]].detach(), before[component])
        # Captions reach the new rows: the token (any case) is one id, its second vector another.
        assert tokenizer("[Fern]", add_special_tokens=False).input_ids == fern[:1]
        assert tokenizer("[fern]_1", add_special_tokens=False).input_ids == fern[1:]
        assert [n for n, p in encoder.named_parameters() if p.requires_grad] == [EMBEDDING[component]]


@pytest.mark.parametrize("new, field", [
    ([NewToken(token="[x]", init_pattern="([")], "tokens.new[0].init_pattern"),
    ([NewToken(token="[x]"), NewToken(token="[y]", init_pattern="^zzz</w>$")], "tokens.new[1].init_pattern"),
    ([NewToken(token="a</w>")], "tokens.new[0].token"),
    ([NewToken(token="[Fern]"), NewToken(token="[fern]")], "tokens.new[1].token"),
    ([NewToken(token="tok", vectors=2), NewToken(token="tok_1")], "tokens.new[1].token"),
])
def test_bad_tokens_are_one_line_job_errors(models, new, field):
    with pytest.raises(JobError) as err:
        tokens.add_tokens(new, _encoders(_pipeline(models, "sd1")))
    message = str(err.value)
    assert message.startswith(field + ":") and "\n" not in message


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_training_moves_only_the_new_rows(models, family):
    pipe = _pipeline(models, family)
    state, start, moved_before_restore = _train(pipe, [NewToken(token="[fern]", init_pattern=ABC, vectors=2)])
    assert moved_before_restore  # weight decay and the caption's gradients did move frozen rows

    for component, (_, encoder) in _encoders(pipe).items():
        new_ids = state.encoders[component].ids["[fern]"]
        weight = encoder.get_input_embeddings().weight.detach()
        frozen = torch.ones(weight.shape[0], dtype=torch.bool)
        frozen[new_ids] = False
        initial = start[f"{component}.{EMBEDDING[component]}"]
        assert torch.equal(weight[frozen], initial[frozen])
        assert (weight[new_ids] - initial[new_ids]).abs().min() > 0
        for name, param in encoder.named_parameters():
            if name != EMBEDDING[component]:
                assert torch.equal(param.detach(), start[f"{component}.{name}"]), name


def test_tensors_round_trip_into_a_fresh_state(models):
    new = [NewToken(token="[fern]", init_pattern=ABC, vectors=3), NewToken(token="<b>")]
    pipe = _pipeline(models, "sd1")
    state, _, _ = _train(pipe, new)
    saved = tokens.tensors(state)
    assert {k: tuple(v.shape) for k, v in saved.items()} == {"tokens.text_encoder.[fern]": (3, 32),
                                                             "tokens.text_encoder.<b>": (1, 32)}

    fresh = tokens.add_tokens(new, _encoders(_pipeline(models, "sd1")))
    assert not torch.equal(tokens.tensors(fresh)["tokens.text_encoder.[fern]"], saved["tokens.text_encoder.[fern]"])
    tokens.load_tensors(fresh, {**saved, "unet.other.weight": torch.zeros(1)})
    for key, value in tokens.tensors(fresh).items():
        assert torch.equal(value, saved[key])

    with pytest.raises(JobError, match=r"^tokens\.new: the checkpoint has no embedding"):
        tokens.load_tensors(fresh, {"tokens.text_encoder.[fern]": saved["tokens.text_encoder.[fern]"]})
    with pytest.raises(JobError, match=r"^tokens\.new: the checkpoint's 'tokens.text_encoder.<b>' has shape"):
        tokens.load_tensors(fresh, {**saved, "tokens.text_encoder.<b>": torch.zeros(2, 32)})


def test_expand_prompt_spells_out_every_vector(models):
    encoders = _encoders(_pipeline(models, "sd1"))
    state = tokens.add_tokens([NewToken(token="<cat>", vectors=3), NewToken(token="<one>")], encoders)
    tokenizer = encoders["text_encoder"][0]
    assert tokens.expand_prompt("<cat>, <CAT> and <one>", state) == \
        "<cat> <cat>_1 <cat>_2, <CAT> <cat>_1 <cat>_2 and <one>"
    assert tokens.expand_prompt("<cat>_1 stays", state) == "<cat>_1 stays"
    ids = tokenizer(tokens.expand_prompt("a <cat>", state), add_special_tokens=False).input_ids
    assert ids[-3:] == state.encoders["text_encoder"].ids["<cat>"]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_saved_embeddings_load_into_a_fresh_pipeline(models, family, tmp_path):
    from diffusers import StableDiffusionPipeline

    trained = _pipeline(models, family)
    state, _, _ = _train(trained, [NewToken(token="[fern]", init_pattern=ABC, vectors=2)])
    paths = tokens.save_embeddings(state, tmp_path / "emb", {"sdtrainer_job": "{}"})

    assert [p.name for p in paths] == ["fern.safetensors"]
    keys = {"sd1": ["emb_params"], "sdxl": ["clip_g", "clip_l"]}[family]
    with safe_open(str(paths[0]), framework="pt") as f:
        assert sorted(f.keys()) == keys
        assert all(tuple(f.get_tensor(k).shape) == (2, 32) for k in keys)
        assert f.metadata() == {"sdtrainer_job": "{}", "token": "[fern]"}
        first = f.get_tensor(keys[-1])  # emb_params or clip_l: text_encoder's rows
    assert torch.equal(first, tokens.tensors(state)["tokens.text_encoder.[fern]"])

    prompt = "a photo of [fern] on grass"
    expected = _image(trained, prompt)
    fresh = _pipeline(models, family)
    without = _image(fresh, prompt)
    tokens.load_embeddings_into(fresh, paths)
    loaded = _image(fresh, prompt)
    np.testing.assert_allclose(loaded, expected, atol=1e-6)
    assert np.abs(loaded - without).max() > 1e-3
    if family == "sd1":  # plain diffusers, as a user would
        plain = StableDiffusionPipeline.from_pretrained(models["sd1"], safety_checker=None)
        plain.load_textual_inversion(str(paths[0]), token="[fern]")
        np.testing.assert_allclose(_image(plain, prompt), expected, atol=1e-6)
    with pytest.raises(JobError, match="cannot load"):
        tokens.load_embeddings_into(fresh, paths)  # the token is already there


def _pipeline(models, family):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if family == "sd1":
        pipe = StableDiffusionPipeline.from_pretrained(models["sd1"], safety_checker=None)
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(models["sdxl"])
    pipe.set_progress_bar_config(disable=True)
    for _, encoder in _encoders(pipe).values():
        encoder.requires_grad_(False)  # as the families load them
    return pipe


def _encoders(pipe) -> dict:
    out = {"text_encoder": (pipe.tokenizer, pipe.text_encoder)}
    if getattr(pipe, "text_encoder_2", None) is not None:
        out["text_encoder_2"] = (pipe.tokenizer_2, pipe.text_encoder_2)
    return out


def _train(pipe, new: list[NewToken], steps: int = 3):
    """A few AdamW steps (with weight decay) on the encoders' output for a caption holding the tokens; returns
    the state, every encoder parameter as it was after add_tokens, and whether a frozen row had moved before
    the first restore."""
    encoders = _encoders(pipe)
    state = tokens.add_tokens(new, encoders)
    start = {f"{component}.{n}": p.detach().clone()
             for component, (_, encoder) in encoders.items() for n, p in encoder.named_parameters()}
    params = tokens.trainable_parameters(state)
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2, weight_decay=0.1)
    caption = tokens.expand_prompt("a photo of " + " and ".join(t.token for t in new), state)
    moved = False
    for _ in range(steps):
        loss = 0
        for tokenizer, encoder in encoders.values():
            ids = tokenizer([caption], padding="max_length", max_length=77, return_tensors="pt").input_ids
            loss = loss + (encoder(ids)[0] - 1).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if not moved:
            weight = params[f"text_encoder.{EMBEDDING['text_encoder']}"].detach()
            moved = not torch.equal(weight[:10], state.encoders["text_encoder"].original[:10])
        tokens.restore_frozen_rows(state)
    return state, start, moved


def _image(pipe, prompt: str) -> np.ndarray:
    return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
