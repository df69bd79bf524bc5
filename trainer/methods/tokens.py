"""New-token training (textual inversion, and pivotal tuning beside a LoRA): add tokens to every text encoder,
train only their embedding rows, and save them as embedding files that A1111, ComfyUI and diffusers load.

The loop calls `add_tokens` once, puts `trainable_parameters` in an optimizer group, calls `restore_frozen_rows`
after every optimizer step, and sends captions and prompts through `expand_prompt`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..job import JobError, NewToken

# The keys A1111 and ComfyUI read: one tensor for SD1/SD2, CLIP-L's and CLIP-G's rows for SDXL.
_FILE_KEYS = {("text_encoder",): {"text_encoder": "emb_params"},
              ("text_encoder", "text_encoder_2"): {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}}


@dataclass
class EncoderTokens:
    """One text encoder's share of the new tokens."""
    tokenizer: Any
    encoder: Any
    param_name: str  # the input embedding weight's name in encoder.named_parameters()
    ids: dict[str, list[int]]  # token -> its rows, one per vector
    original: torch.Tensor  # the whole embedding matrix after initialisation: what frozen rows go back to


@dataclass
class TokenState:
    new: list[NewToken]
    encoders: dict[str, EncoderTokens]  # by pipeline component name
    ignore_case: bool  # the tokenizers lowercase text (CLIP), so '[Fernando]' in a caption is the token too
    pattern: re.Pattern  # every new token name, longest first: how the tokenizer finds them in text


def add_tokens(new: list[NewToken], encoders: dict[str, tuple[Any, Any]]) -> TokenState:
    """Add each token (and its extra vectors 'tok_1', ...) to every tokenizer, grow the embedding matrices,
    start each new row at the mean of the rows whose vocabulary entry matches the token's init_pattern, and
    make the input embeddings trainable (nothing else in the encoders changes)."""
    if not new:
        raise JobError("tokens.new: no tokens to add")
    if tuple(encoders) not in _FILE_KEYS:
        raise JobError(f"tokens.new: new tokens go into one CLIP text encoder or CLIP-L and CLIP-G (SD1/SD2, SDXL, "
                       f"SD3, Flux), not {', '.join(encoders)}")
    ignore_case = any(tok.tokenize("A") == tok.tokenize("a") for tok, _ in encoders.values())
    patterns = [_compile(t.init_pattern, i) for i, t in enumerate(new)]
    _check_names(new, ignore_case)
    added = {component: _add_to_encoder(new, patterns, component, tokenizer, encoder, ignore_case)
             for component, (tokenizer, encoder) in encoders.items()}
    names = sorted((n for t in new for n in _names(t)), key=len, reverse=True)
    return TokenState(list(new), added, ignore_case,
                      re.compile("|".join(map(re.escape, names)), re.IGNORECASE if ignore_case else 0))


def trainable_parameters(state: TokenState) -> dict[str, torch.nn.Parameter]:
    """The input embedding weights, keyed '<component>.<parameter name>'; only their new rows keep changes."""
    return {f"{component}.{enc.param_name}": enc.encoder.get_input_embeddings().weight
            for component, enc in state.encoders.items()}


@torch.no_grad()
def restore_frozen_rows(state: TokenState) -> None:
    """Put every row that is not a new token back to its original value: the optimizer updates the whole
    matrix (weight decay, momentum from earlier gradients), but only the new rows may learn."""
    for enc in state.encoders.values():
        weight = enc.encoder.get_input_embeddings().weight
        if enc.original.device != weight.device or enc.original.dtype != weight.dtype:
            # Once: the loop may move or upcast the encoder after add_tokens; copying across every step is slow.
            enc.original = enc.original.to(weight.device, weight.dtype)
        ids = torch.tensor([i for rows in enc.ids.values() for i in rows], device=weight.device)
        learned = weight.index_select(0, ids)
        weight.copy_(enc.original)
        weight.index_copy_(0, ids, learned)


def expand_prompt(text: str, state: TokenState) -> str:
    """A multi-vector token 'tok' becomes 'tok tok_1 ... tok_{k-1}', matched the way the tokenizer matches
    added tokens (anywhere in the text, longest name first, ignoring case where the tokenizer lowercases)."""
    extra = {_key(t.token, state.ignore_case): " " + " ".join(_names(t)[1:]) for t in state.new if t.vectors > 1}
    if not extra:
        return text
    return state.pattern.sub(lambda m: m.group(0) + extra.get(_key(m.group(0), state.ignore_case), ""), text)


def tensors(state: TokenState) -> dict[str, torch.Tensor]:
    """The new rows, keyed 'tokens.<component>.<token>', each (vectors, dim), on the CPU: for checkpoints."""
    out = {}
    for component, enc in state.encoders.items():
        weight = enc.encoder.get_input_embeddings().weight
        for token, ids in enc.ids.items():
            out[f"tokens.{component}.{token}"] = weight.detach()[ids].to("cpu").contiguous()
    return out


@torch.no_grad()
def load_tensors(state: TokenState, saved: dict[str, torch.Tensor]) -> None:
    """Put rows saved by `tensors` back (resume). Keys not starting with 'tokens.' are ignored, so a whole
    checkpoint can be passed."""
    expected = set()
    for component, enc in state.encoders.items():
        weight = enc.encoder.get_input_embeddings().weight
        for token, ids in enc.ids.items():
            key = f"tokens.{component}.{token}"
            expected.add(key)
            if key not in saved:
                raise JobError(f"tokens.new: the checkpoint has no embedding {key!r}; tokens.new changed since "
                               "it was saved")
            if tuple(saved[key].shape) != (len(ids), weight.shape[1]):
                raise JobError(f"tokens.new: the checkpoint's {key!r} has shape {tuple(saved[key].shape)}, the "
                               f"job needs {(len(ids), weight.shape[1])}")
            weight[ids] = saved[key].to(weight.device, weight.dtype)
    unknown = sorted(k for k in saved if k.startswith("tokens.") and k not in expected)
    if unknown:
        raise JobError(f"tokens.new: the checkpoint has embeddings the job does not ({', '.join(unknown)}); "
                       "tokens.new changed since it was saved")


def save_embeddings(state: TokenState, directory: Path, metadata: dict[str, str]) -> list[Path]:
    """One '<token>.safetensors' per token (unsafe characters replaced), keyed as A1111 and ComfyUI read them:
    'emb_params' (SD1/SD2) or 'clip_l' and 'clip_g' (SDXL), each (vectors, dim) in fp32. The metadata gets
    'token', which `load_embeddings_into` uses (A1111 and ComfyUI use the file name instead)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    keys = _FILE_KEYS[tuple(state.encoders)]
    rows = tensors(state)
    paths = []
    for t in state.new:
        path = directory / f"{_file_stem(t.token)}.safetensors"
        save_file({keys[c]: rows[f"tokens.{c}.{t.token}"].float().contiguous() for c in state.encoders}, path,
                  metadata={**metadata, "token": t.token})
        paths.append(path)
    return paths


def load_embeddings_into(pipe, paths: list[Path]) -> None:
    """Load embedding files written by `save_embeddings` (or A1111-style ones: the token is the file name when
    the metadata has none) into a diffusers SD or SDXL pipeline. In plain diffusers a user writes, for SD1/SD2:

        pipe.load_textual_inversion("fernando.safetensors", token="[fernando]")

    and for SDXL (`from safetensors.torch import load_file`):

        state = load_file("fernando.safetensors")
        pipe.load_textual_inversion(state["clip_l"], token="[fernando]", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(state["clip_g"], token="[fernando]", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    """
    from safetensors import safe_open

    for path in map(Path, paths):
        try:
            with safe_open(str(path), framework="pt") as f:
                token = (f.metadata() or {}).get("token") or path.stem
                saved = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error type for a damaged file
            raise JobError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None
        sdxl = getattr(pipe, "text_encoder_2", None) is not None
        if set(saved) == {"clip_l", "clip_g"} and sdxl:
            loads = [(saved["clip_l"], pipe.text_encoder, pipe.tokenizer),
                     (saved["clip_g"], pipe.text_encoder_2, pipe.tokenizer_2)]
        elif len(saved) == 1 and not sdxl:
            loads = [(next(iter(saved.values())), pipe.text_encoder, pipe.tokenizer)]
        else:
            raise JobError(f"{path}: holds {', '.join(sorted(saved))}; an {'SDXL' if sdxl else 'SD1/SD2'} "
                           f"pipeline needs {'clip_l and clip_g' if sdxl else 'one embedding tensor'}")
        for embedding, encoder, tokenizer in loads:
            try:
                pipe.load_textual_inversion(embedding, token=token, text_encoder=encoder, tokenizer=tokenizer)
            except ValueError as exc:
                raise JobError(f"{path}: cannot load ({_first_line(exc)})") from None


def _add_to_encoder(new: list[NewToken], patterns: list[re.Pattern], component: str, tokenizer, encoder,
                    ignore_case: bool) -> EncoderTokens:
    vocab = tokenizer.get_vocab()
    taken = {_key(name, ignore_case) for name in vocab}
    weight = encoder.get_input_embeddings().weight
    rows = weight.shape[0]
    means = []
    for i, (t, pattern) in enumerate(zip(new, patterns)):
        for name in _names(t):
            if _key(name, ignore_case) in taken:
                raise JobError(f"tokens.new[{i}].token: {name!r} is already in the {component} tokenizer's "
                               "vocabulary; choose another token")
        matched = [index for entry, index in vocab.items() if index < rows and pattern.search(entry)]
        if not matched:
            raise JobError(f"tokens.new[{i}].init_pattern: {t.init_pattern!r} matches no entry of the "
                           f"{component} tokenizer's vocabulary")
        means.append(weight.detach()[matched].float().mean(0))
    tokenizer.add_tokens([name for t in new for name in _names(t)])
    ids = {t.token: tokenizer.convert_tokens_to_ids(_names(t)) for t in new}
    new_ids = [index for token_ids in ids.values() for index in token_ids]
    encoder.resize_token_embeddings(max(rows, 1 + max(new_ids)), mean_resizing=False)  # set just below
    weight = encoder.get_input_embeddings().weight
    with torch.no_grad():
        for t, mean in zip(new, means):
            weight[ids[t.token]] = mean.to(weight.dtype)
    weight.requires_grad_(True)
    for i, t in enumerate(new):
        for name, index in zip(_names(t), ids[t.token]):
            if tokenizer(name, add_special_tokens=False).input_ids != [index]:
                raise JobError(f"tokens.new[{i}].token: the {component} tokenizer does not read {name!r} as "
                               "the new token")
    param_name = next(n for n, p in encoder.named_parameters() if p is weight)
    return EncoderTokens(tokenizer, encoder, param_name, ids, weight.detach().clone())


def _check_names(new: list[NewToken], ignore_case: bool) -> None:
    """Every token name (extra vectors included) and every file name must be distinct."""
    seen: dict[str, int] = {}
    stems: dict[str, int] = {}
    for i, t in enumerate(new):
        for name in _names(t):
            j = seen.setdefault(_key(name, ignore_case), i)
            if j != i:
                raise JobError(f"tokens.new[{i}].token: {name!r} is also a name of tokens.new[{j}] (a token "
                               "with k vectors also takes 'token_1' ... 'token_{k-1}')")
        j = stems.setdefault(_file_stem(t.token).lower(), i)
        if j != i:
            raise JobError(f"tokens.new[{i}].token: its file name {_file_stem(t.token)}.safetensors is the same "
                           f"as tokens.new[{j}]'s; choose a token that differs in letters or digits")


def _compile(pattern: str, index: int) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise JobError(f"tokens.new[{index}].init_pattern: {pattern!r} is not a valid regular expression "
                       f"({exc})") from None


def _names(token: NewToken) -> list[str]:
    """The tokenizer entries of a token: itself, then 'tok_1' ... for extra vectors (diffusers' convention)."""
    return [token.token] + [f"{token.token}_{i}" for i in range(1, token.vectors)]


def _key(name: str, ignore_case: bool) -> str:
    return name.lower() if ignore_case else name


def _file_stem(token: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", token).strip("._") or "embedding"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
