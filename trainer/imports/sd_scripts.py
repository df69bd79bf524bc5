"""sd-scripts' dataset config TOML (`--dataset_config`): `[general]`, `[[datasets]]` and `[[datasets.subsets]]`.

A setting in [general] or a dataset applies to the subsets below it, as in sd-scripts; subsets become our
dataset folders, the first `is_reg` subset prior preservation on its images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..job import JobError
from . import kohya
from .report import APPROX, EXACT, KOHYA, Importer, as_bool, as_int, as_str

# Settings that are one value for the whole job in ours; their names match the kohya GUI's, so its table applies.
SHARED = ("enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "shuffle_caption",
          "keep_tokens", "caption_dropout_rate", "caption_separator", "flip_aug")
GLOBAL = {key: kohya.EXACT[key] for key in SHARED} | {"batch_size": ("schedule.batch_size", as_int)}
GLOBAL_RULES = {"resolution": kohya.RULES["max_resolution"], "random_crop": kohya.RULES["random_crop"]}
# subset field -> (our dataset folder field, parser); is_reg sends the subset to prior preservation instead.
FOLDER = {"image_dir": ("path", as_str), "num_repeats": ("repeats", as_int),
          "class_tokens": ("instance_prompt", as_str), "caption_extension": ("caption_extension", as_str),
          "is_reg": ("", as_bool)}
PRIOR = {"image_dir": "prior.class_dir", "class_tokens": "prior.class_prompt"}
DEFAULT_CAPTION_EXTENSION = ".caption"  # sd-scripts' own default when neither the TOML nor the command sets one


def looks_like(config: Any) -> bool:
    return isinstance(config, dict) and isinstance(config.get("datasets"), list)


def convert(imp: Importer, path: Path, config: dict) -> None:
    """A kohya GUI config given with it supplies the caption_extension of subsets that set none, as the command
    line does for sd-scripts."""
    fallback = imp.formats.get(KOHYA)
    general = config.get("general", {})
    if not isinstance(general, dict):
        raise JobError(f"{path.name}: general: expected a table")
    for key, value in config.items():
        if key not in ("general", "datasets"):
            imp.none(f"{path.name}: {key}", value)
    feeds: dict[str, list[tuple[str, Any]]] = {}  # folder-field source -> the (our field, value) it set
    notes: dict[str, str] = {}
    level = _settings(imp, path, "general", general, {}, feeds)
    folders = 0
    for i, dataset in enumerate(config["datasets"]):
        where = f"datasets.{i}"
        if not isinstance(dataset, dict):
            raise JobError(f"{path.name}: {where}: expected a table")
        subsets = dataset.get("subsets", [])
        if not isinstance(subsets, list) or not all(isinstance(s, dict) for s in subsets):
            raise JobError(f"{path.name}: {where}.subsets: expected [[datasets.subsets]] tables")
        inner = _settings(imp, path, where, {k: v for k, v in dataset.items() if k != "subsets"}, level, feeds)
        for j, subset in enumerate(subsets):
            own = _settings(imp, path, f"{where}.subsets.{j}", subset, inner, feeds)
            if "image_dir" not in own:
                raise JobError(f"{path.name}: {where}.subsets.{j}: no image_dir")
            if not own.get("is_reg", (False, ""))[0]:
                _folder(own, folders, fallback or {}, feeds, path)
                folders += 1
            elif any(t == "prior.enabled" for ts in feeds.values() for t, _ in ts):
                notes.update({source: "only the first regularization subset is used" for _, source in own.values()})
            else:
                _prior(own, feeds, notes)
    if not folders:
        raise JobError(f"{path.name}: datasets: no subset that is not is_reg; nothing to train")
    for source, targets in feeds.items():
        if not targets:
            imp.none(source, None, notes.get(source, "every subset below sets its own"))
            continue
        part = APPROX if any(t == "prior.enabled" for t, _ in targets) else EXACT
        note = notes.get(source, "") if part == APPROX else ""  # a skipped subset's note, not for a used key
        entry = imp.record(source, part, ", ".join(f"{t} = {v!r}" for t, v in targets), note)
        for target, value in targets:
            imp.put(target, value, entry)


def _settings(imp: Importer, path: Path, where: str, table: dict, inherited: dict, feeds: dict) -> dict:
    """Report the table's job-wide settings; return the folder fields in force here: key -> (value, source)."""
    out = dict(inherited)
    for key, value in table.items():
        source = f"{path.name}: {where}.{key}"
        if key in FOLDER:
            out[key] = (FOLDER[key][1](value, source), source)
            feeds[source] = []
        elif key in GLOBAL:
            target, parse = GLOBAL[key]
            imp.exact(source, target, parse(value, source))
        elif key in GLOBAL_RULES:
            GLOBAL_RULES[key](imp, source, value, table, path)
        else:
            imp.none(source, value)
    return out


def _folder(own: dict, index: int, fallback: dict, feeds: dict, path: Path) -> None:
    path_source = own["image_dir"][1]
    values = {key: item for key, item in own.items() if key != "is_reg"}
    # what sd-scripts uses when nothing sets them: once per image (our 0 would read N from the folder's name),
    # and the kohya GUI config's caption extension, else ".caption"
    values.setdefault("num_repeats", (1, path_source))
    values.setdefault("caption_extension", (as_str(fallback.get("caption_extension") or DEFAULT_CAPTION_EXTENSION,
                                                   f"{path.name}: caption_extension"), path_source))
    for key, (value, source) in values.items():
        field = FOLDER[key][0]
        if field == "caption_extension" and not value.startswith("."):
            value = "." + value
        feeds[source].append((f"dataset.folders.{index}.{field}", value))


def _prior(own: dict, feeds: dict, notes: dict) -> None:
    class_dir, dir_source = own["image_dir"]
    reg_source = own["is_reg"][1]
    prompt, prompt_source = own.get("class_tokens", (Path(class_dir).name, reg_source))
    values = kohya.prior_values(Path(class_dir).expanduser(), prompt)
    feeds[reg_source] += [(k, values[k]) for k in ("prior.enabled", "prior.num_class_images")]
    notes[reg_source] = "prior preservation on the class images there, as many as it holds (none generated)"
    feeds[dir_source].append(("prior.class_dir", values["prior.class_dir"]))
    feeds[prompt_source].append(("prior.class_prompt", prompt))
    for key, (_, source) in own.items():
        if key not in PRIOR and key != "is_reg" and not feeds[source]:
            notes[source] = "class images have no repeats or caption settings"
