"""`python -m trainer inspect-model MODEL`: a model's block tree with parameter counts, as JSON.

The window builds its layer checkboxes from this without importing torch itself. Models are built from their
configs on the meta device, so nothing is loaded and a multi-GB model is inspected in a second.
"""

from __future__ import annotations

import json
from pathlib import Path

from .families import check_model_path, detect_family
from .job import JobError, ModelSpec

# How deep the tree goes per component: UNet blocks → their attentions/resnets → transformer blocks.
DEPTH = 3


def inspect_model(spec: ModelSpec) -> dict:
    """{"family", "components": {name: {"params", "children": [{"name", "params", "children"}, ...]}}}."""
    kind = check_model_path(spec)
    family = detect_family(spec)
    if kind != "folder":
        raise JobError(f"model.path: {spec.path}: inspect-model reads a local diffusers folder "
                       "(for a single file, give its diffusers config folder)")
    root = Path(spec.path).expanduser()
    components = {name: _tree(module) for name, module in _empty_components(root).items()}
    return {"family": family, "path": str(root), "components": components}


def main_json(spec: ModelSpec) -> str:
    return json.dumps(inspect_model(spec), indent=1)


def _empty_components(root: Path) -> dict:
    """The trainable components, built from their configs without weights."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import AutoConfig, CLIPTextModel

    out = {}
    with init_empty_weights():
        out["unet"] = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet"))
        if (root / "text_encoder").is_dir():
            out["text_encoder"] = CLIPTextModel(AutoConfig.from_pretrained(root / "text_encoder"))
    return out


def _tree(module, prefix: str = "", depth: int = 0) -> dict:
    node = {"params": sum(p.numel() for p in module.parameters())}
    if depth < DEPTH:
        children = []
        for name, child in module.named_children():
            count = sum(p.numel() for p in child.parameters())
            if count == 0:
                continue
            full = f"{prefix}{name}"
            # Containers (ModuleList, Sequential) add a level with no meaning of its own: show their items.
            if type(child).__name__ in ("ModuleList", "Sequential"):
                for sub_name, sub in child.named_children():
                    if any(True for _ in sub.parameters()):
                        children.append({"name": f"{full}.{sub_name}", **_tree(sub, f"{full}.{sub_name}.", depth + 1)})
            else:
                children.append({"name": full, **_tree(child, f"{full}.", depth + 1)})
        if children:
            node["children"] = children
    return node
