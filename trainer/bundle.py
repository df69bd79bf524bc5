"""`python -m trainer bundle JOB OUT`: a job made ready to travel to another machine, and the check that it
arrived whole.

A bundle is a folder (or a .tar of one):

    job.json               the job, its local paths relative to the bundle (read from there, see job.py)
    bundle-manifest.json   every dataset and class-image file (path in the bundle, size, sha256) and the model
                           reference: a hub id, or a local path with its size and hash
    data/N/NAME/...        dataset folder N (its own name kept: a kohya 'N_name' folder keeps its repeats);
                           copied with --with-data, else put there by the user (the manifest says what)
    data/class/NAME/...    the class images of prior preservation, the same way
    model/ ...             the local model, with --with-model

`trainer run` and `trainer check` verify the manifest when one lies beside the job: every file's size, and its
sha256 (always: a re-encoded image keeps its name and often its size, and hashing a LoRA data set of a few
thousand images takes seconds). Torch-free: the window bundles too.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from .job import JobError, load_job, save_job, validate

MANIFEST = "bundle-manifest.json"
FORMAT = "sdtrainer-bundle/1"
OUTPUT = "output"  # the run folder inside the bundle
MODEL_FOLDERS = {"path": "model", "config": "model-config", "decoder": "decoder"}  # with --with-model


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(root: Path) -> list[Path]:
    """A folder's files (every one, recursively, in a stable order), or the file itself."""
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file())


def _entries(src: Path, dest: str) -> list[dict]:
    """Manifest entries for the files of `src` as they lie in the bundle under `dest`."""
    if src.is_file():
        return [{"path": dest, "size": src.stat().st_size, "sha256": sha256(src)}]
    return [{"path": f"{dest}/{p.relative_to(src).as_posix()}", "size": p.stat().st_size, "sha256": sha256(p)}
            for p in _files(src)]


def _copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.is_file():
        shutil.copy2(src, dest)
    else:
        shutil.copytree(src, dest)


def bundle(job_path: str | Path, out: str | Path, with_data: bool = False, with_model: bool = False,
           tar: bool = False) -> Path:
    """Write the bundle of the job at `job_path` to `out` (a new or empty folder, or a .tar with `tar`); return
    what was written."""
    job = load_job(job_path)
    out = Path(out)
    if tar and out.suffix != ".tar":
        out = out.with_name(out.name + ".tar")
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise JobError(f"{out}: already exists; pick a new or empty folder")
    if not tar:
        return _write(job, out, with_data, with_model)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".bundle-") as tmp:
        folder = _write(job, Path(tmp) / out.stem, with_data, with_model)
        partial = out.with_name(out.name + ".part")
        with tarfile.open(partial, "w") as archive:
            archive.add(folder, arcname=out.stem)  # unpacks as one folder named like the .tar
        partial.replace(out)
    return out


def _write(job, out: Path, with_data: bool, with_model: bool) -> Path:
    data = job.model_dump(mode="json")
    files: list[dict] = []
    copies: list[tuple[Path, str]] = []

    def local(src: Path, dest: str, field: str) -> None:
        if not src.exists():
            raise JobError(f"{field}: {src}: not found")
        files.extend(_entries(src, dest))
        copies.append((src, dest))

    for i, folder in enumerate(job.dataset.folders):
        src = Path(folder.path).expanduser()
        dest = f"data/{i}/{src.name}"
        local(src, dest, f"dataset.folders[{i}].path")
        data["dataset"]["folders"][i]["path"] = dest
    if job.prior.enabled and job.prior.class_dir:
        src = Path(job.prior.class_dir).expanduser()
        dest = f"data/class/{src.name}"
        if src.is_dir() and any(src.iterdir()):
            local(src, dest, "prior.class_dir")
        data["prior"]["class_dir"] = dest  # absent or empty: generated there on the other machine
    data["dataset"]["cache_dir"] = ""  # a cache belongs to its machine; the other one makes its own
    data["output"]["output_dir"] = OUTPUT

    models, model_copies = [], []
    for key, name in MODEL_FOLDERS.items():
        value = getattr(job.model, key)
        ref = _model_reference(value, f"model.{key}")
        if ref is None:
            continue
        if "local" in ref and with_model:
            src = Path(ref["local"])
            dest = f"{name}/{src.name}" if src.is_file() else name
            files.extend(_entries(src, dest))
            model_copies.append((src, dest))
            ref["bundled"] = dest
            data["model"][key] = f"./{dest}"
        models.append(ref)

    out.mkdir(parents=True, exist_ok=True)
    if with_data:
        for src, dest in copies:
            _copy(src, out / dest)
    for src, dest in model_copies:
        _copy(src, out / dest)
    save_job(validate(data, "bundled job"), out / "job.json")
    manifest = {"format": FORMAT, "with_data": with_data, "files": files, "models": models}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return out


def _model_reference(value: str, field: str) -> dict | None:
    """A hub id as it is; a local folder or file with its size and a hash over its files."""
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.exists():
        return {"field": field, "hub": value}
    files = _files(path)
    tree = hashlib.sha256()
    for p in files:
        rel = p.name if path.is_file() else p.relative_to(path).as_posix()
        tree.update(f"{rel}\t{p.stat().st_size}\t{sha256(p)}\n".encode())
    return {"field": field, "local": str(path.resolve()), "bytes": sum(p.stat().st_size for p in files),
            "files": len(files), "sha256": tree.hexdigest()}


def verify(job_path: str | Path) -> list[str]:
    """One line for each file of the manifest beside `job_path` that is missing or differs; [] when all match
    or no manifest lies there."""
    root = Path(job_path).parent
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        return []
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        entries = [(str(e["path"]), int(e["size"]), str(e["sha256"])) for e in manifest["files"]]
        models = [m for m in manifest.get("models", []) if isinstance(m, dict)]
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}, expected {FORMAT!r}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise JobError(f"{manifest_path}: not a bundle manifest ({exc})") from None
    problems = []
    for rel, size, digest in entries:
        path = root / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            problems.append(f"{rel}: outside the bundle; the manifest is damaged")
        elif not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != size:
            problems.append(f"{rel}: differs (size {path.stat().st_size:,} bytes, the manifest says {size:,})")
        elif sha256(path) != digest:
            problems.append(f"{rel}: differs (same size, other content)")
    for ref in models:
        if "local" in ref and "bundled" not in ref:  # a path on this machine too, e.g. a shared disk
            path = Path(ref["local"])
            found = _files(path) if path.exists() else []
            if not found:
                problems.append(f"{ref.get('field')}: {path}: missing (bundle it with --with-model, or put it there)")
            elif (len(found), sum(p.stat().st_size for p in found)) != (ref.get("files"), ref.get("bytes")):
                problems.append(f"{ref.get('field')}: {path}: differs from the bundled job's model (other files or "
                                "sizes)")
    return problems


def check_beside(job_path: str | Path, stream=None) -> None:
    """Before `run` or `check`: the bundle's files, each problem on its own line, then a JobError (exit 2)."""
    problems = verify(job_path)
    if problems:
        for line in problems:
            print(f"bundle: {line}", file=stream or sys.stderr)
        raise JobError(f"{Path(job_path).parent / MANIFEST}: {len(problems)} file(s) missing or different "
                       "(listed above); nothing was trained")


def describe(out: Path) -> list[str]:
    """What `trainer bundle` prints after writing."""
    folder = out
    if out.suffix == ".tar":
        with tarfile.open(out) as archive:
            member = archive.extractfile(f"{out.stem}/{MANIFEST}")
            manifest = json.loads(member.read())
    else:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    size = sum(e["size"] for e in manifest["files"])
    lines = [f"wrote {out}: {len(manifest['files'])} files listed ({size / 1e6:.1f} MB), "
             + ("data included" if manifest["with_data"] else "data not included: copy each dataset folder to "
                "the data/N/NAME folder the manifest names")]
    for ref in manifest["models"]:
        where = ref.get("hub") or (f"bundled as {ref['bundled']}" if "bundled" in ref else
                                   f"{ref['local']} (not bundled: it must exist at that path; --with-model copies it)")
        lines.append(f"{ref['field']}: {where}")
    lines.append(f"on the other machine: python -m trainer run {out.stem if out.suffix == '.tar' else out.name}"
                 "/job.json (it checks every file first)")
    return lines

