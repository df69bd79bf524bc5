"""`python -m trainer inspect-model MODEL`: a model's block tree with parameter counts, as JSON.

The window builds its layer checkboxes from this without importing torch itself. Models are built from their
configs on the meta device, so nothing is loaded and a multi-GB model is inspected in a second.
"""

from __future__ import annotations

import json
from pathlib import Path

from .families.detect import check_model_path, detect_family
from .families.table import FAMILIES
from .job import JobError, ModelSpec

# How deep the tree goes per component: UNet blocks → their attentions/resnets → transformer blocks.
DEPTH = 3
TRAINABLE_COMPONENTS = ("unet", "transformer", "prior", "text_encoder", "text_encoder_2", "text_encoder_3")
# The classes a model_index.json may name for them, and their library (a name from a file picks only these).
COMPONENT_CLASSES = {"UNet2DConditionModel": "diffusers", "SD3Transformer2DModel": "diffusers",
                     "FluxTransformer2DModel": "diffusers", "StableCascadeUNet": "diffusers",
                     "CLIPTextModel": "transformers", "CLIPTextModelWithProjection": "transformers",
                     "T5EncoderModel": "transformers"}


def inspect_model(spec: ModelSpec) -> dict:
    """{"family", "path", "denoiser", "components": {name: {"params", "children": [{"name", "params",
    "children"}, ...]}}}. Node names are dotted module paths, the notation layers.train_blocks takes."""
    kind = check_model_path(spec)
    family = detect_family(spec)
    if kind != "folder":
        raise JobError(f"model.path: {spec.path}: inspect-model reads a local diffusers folder "
                       "(for a single file, give its diffusers config folder)")
    root = Path(spec.path).expanduser()
    components = {name: _tree(module) for name, module in _empty_components(root).items()}
    return {"family": family, "path": str(root), "denoiser": FAMILIES[family].denoiser, "components": components}


def main_json(spec: ModelSpec) -> str:
    return json.dumps(inspect_model(spec), indent=1)


def _empty_components(root: Path) -> dict:
    """The components that can train, built from their configs without weights, as model_index.json names
    them; only the classes in COMPONENT_CLASSES are built."""
    from accelerate import init_empty_weights

    try:
        index = json.loads((root / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise JobError(f"model.path: {root / 'model_index.json'}: cannot read ({exc})") from None
    out = {}
    with init_empty_weights():
        for name in TRAINABLE_COMPONENTS:
            entry = index.get(name)
            if not isinstance(entry, list) or len(entry) != 2 or entry[1] not in COMPONENT_CLASSES:
                continue
            if not (root / name / "config.json").is_file():
                raise JobError(f"model.path: {root / name}: no config.json")
            out[name] = _build(entry[1], root / name)
    for module in out.values():
        if COMPONENT_CLASSES[type(module).__name__] == "transformers":
            # Built empty, T5's input embedding is not tied to `shared` yet (loading ties it; tying works only
            # outside init_empty_weights).
            module.tie_weights()
    return out


def _build(class_name: str, folder: Path):
    import diffusers
    import transformers

    if COMPONENT_CLASSES[class_name] == "diffusers":
        cls = getattr(diffusers, class_name)
        return cls.from_config(cls.load_config(folder))
    return getattr(transformers, class_name)(transformers.AutoConfig.from_pretrained(folder))


def _tree(module) -> dict:
    # A tied weight (T5's shared embedding) counts once, under its first name, as in named_parameters().
    counts = {name: p.numel() for name, p in module.named_parameters()}
    return _node(module, "", 0, counts)


def _node(module, prefix: str, depth: int, counts: dict[str, int]) -> dict:
    node = {"params": sum(n for name, n in counts.items() if name.startswith(prefix))}
    if depth < DEPTH:
        children = []
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            # Containers (ModuleList, Sequential) add a level with no meaning of its own: show their items.
            if type(child).__name__ in ("ModuleList", "Sequential"):
                items = [(f"{full}.{sub_name}", sub) for sub_name, sub in child.named_children()]
            else:
                items = [(full, child)]
            for item_name, item in items:
                sub = _node(item, f"{item_name}.", depth + 1, counts)
                if sub["params"]:
                    children.append({"name": item_name, **sub})
        if children:
            node["children"] = children
    return node
