"""`python -m trainer import FILE [FILE...] --out job.json`: other trainers' configs as one job, and the report.

Each file's format is read from its content; files are applied in FORMATS' order (a kohya GUI JSON before its
dataset TOML), whatever order they are given in.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml  # PyYAML: in the lock already (transformers, accelerate and huggingface_hub need it)
from pydantic import ValidationError

from ..job import Job, JobError, defaults, first_error, from_sparse, merge, migrate, save_job
from . import ai_toolkit, kohya, onetrainer, sd_scripts, simpletuner
from .report import (AI_TOOLKIT, KOHYA, ONETRAINER, ONETRAINER_CONCEPTS, SD_SCRIPTS, SIMPLETUNER, SIMPLETUNER_DATA,
                     Entry, Importer, render)

MAX_BYTES = 10_000_000  # a config is a few kB; anything this big is not one
# format name -> (recognises a parsed file, converts it), in the order files are applied (later ones win)
FORMATS = {
    KOHYA: (kohya.looks_like, kohya.convert),
    SD_SCRIPTS: (sd_scripts.looks_like, sd_scripts.convert),
    ONETRAINER: (onetrainer.looks_like, onetrainer.convert),
    ONETRAINER_CONCEPTS: (onetrainer.looks_like_concepts, onetrainer.convert_concepts),
    SIMPLETUNER: (simpletuner.looks_like, simpletuner.convert),
    SIMPLETUNER_DATA: (simpletuner.looks_like_backends, simpletuner.convert_backends),
    AI_TOOLKIT: (ai_toolkit.looks_like, ai_toolkit.convert),
}


@dataclass
class Imported:
    job: Job
    entries: list[Entry]
    formats: list[tuple[Path, str]]  # each file and the format it was read as

    def report(self) -> list[str]:
        read = [f"read {path} as {name}" for path, name in self.formats]
        return read + render(self.entries)


def import_files(paths: list[Path]) -> Imported:
    """Read every file, map it into one job and validate it; any problem is one JobError naming file and field."""
    parsed = sorted(((path, *_identify(path)) for path in paths), key=lambda item: list(FORMATS).index(item[1]))
    imp = Importer(formats={name: config for _, name, config in parsed})
    for path, name, config in parsed:
        FORMATS[name][1](imp, path, config)
    return Imported(_validate(imp, paths), imp.entries, [(p, n) for p, n, _ in parsed])


def write_job(imported: Imported, out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise JobError(f"{out}: already exists; pass --force to replace it")
    save_job(imported.job, out, sparse=True)


def _identify(path: Path) -> tuple[str, Any]:
    """(format name, parsed content) of one file."""
    try:
        if path.stat().st_size > MAX_BYTES:
            raise JobError(f"{path}: over {MAX_BYTES // 1_000_000} MB; not a trainer config")
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise JobError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise JobError(f"{path}: cannot read ({exc})") from None
    config = _parse(path, text)
    for name, (looks_like, _) in FORMATS.items():
        if looks_like(config):
            return name, config
    raise JobError(f"{path}: not a format this trainer imports ({', '.join(FORMATS)})")


def _parse(path: Path, text: str) -> Any:
    """JSON, TOML or YAML by the extension, else JSON when it looks like it, else TOML."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            return yaml.safe_load(text)  # plain data only: no tags that build objects or run code
        if suffix == ".toml" or not text.lstrip().startswith(("{", "[")):
            return tomllib.loads(text)
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise JobError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except tomllib.TOMLDecodeError as exc:
        raise JobError(f"{path}: neither JSON nor valid TOML ({exc})") from None
    except yaml.YAMLError as exc:
        raise JobError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    except RecursionError:
        raise JobError(f"{path}: nested too deeply; not a trainer config") from None


def _validate(imp: Importer, paths: list[Path]) -> Job:
    """The imported job, or one line naming the source field whose value our schema refuses."""
    try:
        Job.model_validate(migrate(merge(defaults(), imp.job)))
    except ValidationError as exc:
        loc = ".".join(str(p) for p in exc.errors()[0]["loc"])
        source = imp.source_of(loc) or ", ".join(str(p) for p in paths)
        raise JobError(f"{source}: {first_error(exc)}") from None
    return from_sparse(imp.job, "imported job")  # also refuses a NUL or lone surrogate, naming our field
