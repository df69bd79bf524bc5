"""What an import did with each field of another trainer's config: mapped exactly, approximately, or not at all.

Every format module (kohya.py, sd_scripts.py, onetrainer.py, simpletuner.py, ai_toolkit.py) writes into one
`Importer` through its tables and the rule makers here; the Importer builds the sparse job and the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..job import JobError

EXACT, APPROX, NONE = "mapped exactly", "mapped approximately", "no equivalent"
# The formats, by the names the report gives them; a format module looks up another's file under its name.
KOHYA, SD_SCRIPTS = "kohya_ss GUI config", "sd-scripts dataset TOML"
ONETRAINER, ONETRAINER_CONCEPTS = "OneTrainer config", "OneTrainer concepts"
SIMPLETUNER, SIMPLETUNER_DATA = "SimpleTuner config", "SimpleTuner multidatabackend"
AI_TOOLKIT = "ai-toolkit job"


@dataclass
class Entry:
    source: str  # "FILE: key" (a nested key dotted, list items by index)
    part: str  # EXACT, APPROX or NONE
    target: str = ""  # our field(s), what they were set to
    note: str = ""  # how it was mapped, or why not


@dataclass
class Importer:
    """The sparse job being built and one report entry per source key; a later file's value wins over an earlier
    one's, and the earlier entry then says so."""
    job: dict = field(default_factory=dict)
    entries: list[Entry] = field(default_factory=list)
    owner: dict[str, Entry] = field(default_factory=dict)  # our dotted field -> the entry that set it
    formats: dict[str, Any] = field(default_factory=dict)  # format name -> its parsed file, for every file given

    def exact(self, source: str, target: str, value: Any, note: str = "", also: dict | None = None) -> None:
        """`also`: fields that follow from this one (epochs set: max_steps 0)."""
        values = {target: value, **(also or {})}
        entry = self._entry(source, EXACT, values, note)
        for field_name, item in values.items():
            self.put(field_name, item, entry)

    def approx(self, source: str, values: dict[str, Any], note: str) -> None:
        entry = self._entry(source, APPROX, values, note)
        for target, value in values.items():
            self.put(target, value, entry)

    def none(self, source: str, value: Any, note: str = "") -> None:
        self.entries.append(Entry(source, NONE, "", note or f"= {_short(value)}"))

    def record(self, source: str, part: str, target: str, note: str) -> Entry:
        """An entry whose fields the caller sets with `put` (one source key feeding several fields)."""
        entry = Entry(source, part, target, note)
        self.entries.append(entry)
        return entry

    def put(self, target: str, value: Any, entry: Entry) -> None:
        """Set a dotted field of the job (`dataset.folders.0.path` indexes a list)."""
        previous = self.owner.get(target)
        if previous is not None and previous is not entry and _get(self.job, target) != value:
            previous.part = APPROX
            previous.note = (previous.note + "; " if previous.note else "") + f"overridden by {entry.source}"
        self.owner[target] = entry
        _set(self.job, target, value)

    def source_of(self, loc: str) -> str:
        """The source key behind our field `loc` (or the nearest section that holds it), for error messages."""
        parts = loc.split(".")
        for end in range(len(parts), 0, -1):
            entry = self.owner.get(".".join(parts[:end]))
            if entry is not None:
                return entry.source
        return ""

    def _entry(self, source: str, part: str, values: dict[str, Any], note: str) -> Entry:
        return self.record(source, part, ", ".join(f"{k} = {_short(v)}" for k, v in values.items()), note)


def apply_tables(imp: Importer, path: Path, flat: dict, exact: dict, rules: dict, prefix: str = "",
                 context: dict | None = None) -> None:
    """Each field of a (flattened) config through a format's tables: `exact` (field -> (our field, parser)),
    `rules` (field -> function(imp, source, value, context, path); context: the fields a rule may read, by
    default `flat`), else no equivalent. `prefix`: where `flat` sits in the file, for the report."""
    for key, value in flat.items():
        source = f"{path.name}: {prefix}{key}"
        if key in exact:
            target, parse = exact[key]
            if is_unset(value) and parse is not as_str:
                imp.none(source, value, "unset: our default kept")
            else:
                imp.exact(source, target, parse(value, source))
        elif key in rules:
            rules[key](imp, source, value, flat if context is None else context, path)
        else:
            imp.none(source, value)


def choice_rule(table: dict, nearest: dict, target: str, what: str):
    """A rule for a field holding a name: exact where `table` has it, the nearest we have where `nearest` does,
    else no equivalent."""
    def rule(imp: Importer, source: str, value: Any, flat: dict, path: Path) -> None:
        name = as_str(value, source)
        if name in table:
            imp.exact(source, target, table[name])
        elif name in nearest:
            imp.approx(source, {target: nearest[name]}, f"we have no {name}: the nearest {what}")
        else:
            imp.none(source, value, f"= {name!r}: a {what} we do not have")
    return rule


def folder_rule(field_name: str, parse):
    """A rule for a dataset entry's field that is a field of the dataset folder it becomes (`target`)."""
    def rule(imp: Importer, source: str, value: Any, flat: dict, target: str) -> None:
        imp.exact(source, f"{target}.{field_name}", parse(value, source))
    return rule


def shared_rule(target: str, parse):
    """A rule for a dataset entry's field that is one value for the whole job in ours (the last entry's wins)."""
    def rule(imp: Importer, source: str, value: Any, flat: dict, folder: str) -> None:
        imp.exact(source, target, parse(value, source))
    return rule


def render(entries: list[Entry]) -> list[str]:
    """The three-part report, every source key once."""
    lines = []
    for part in (EXACT, APPROX, NONE):
        chosen = [e for e in entries if e.part == part]
        lines.append(f"{part} ({len(chosen)}):")
        for e in chosen:
            arrow = f" -> {e.target}" if e.target else ""
            note = f" {e.note}" if e.note.startswith("= ") and not e.target else f" ({e.note})" if e.note else ""
            lines.append(f"  {e.source}{arrow}{note}")
    return lines


def as_int(value: Any, where: str) -> int:
    number = as_float(value, where)
    if number != int(number):
        raise JobError(f"{where}: expected a whole number, got {value!r}")
    return int(number)


def as_float(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise JobError(f"{where}: expected a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise JobError(f"{where}: expected a number, got {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise JobError(f"{where}: expected a finite number, got {value!r}")
    return number


def as_bool(value: Any, where: str) -> bool:
    # kohya's GUI writes real booleans; its older files and hand-written TOML sometimes hold "true"/"false"
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise JobError(f"{where}: expected true or false, got {value!r}")


def as_str(value: Any, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise JobError(f"{where}: expected text, got {value!r}")
    return value


def is_unset(value: Any) -> bool:
    """kohya and its GUI write "" or null for a field left empty."""
    return value is None or value == ""


def flat_keys(value: Any) -> list[str]:
    """Every leaf key of a nested config, dotted, list items by index: what the report must account for."""
    return list(flatten(value))


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as {dotted key: leaf value}; tables and lists of tables are opened, other lists are leaves."""
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in flatten(item, f"{prefix}{key}.").items()}
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return {k: v for i, item in enumerate(value) for k, v in flatten(item, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): value}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _set(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node: Any = data
    for part, following in zip(parts[:-1], parts[1:]):
        child_default: Any = [] if following.isdigit() else {}
        if part.isdigit():
            index = int(part)
            while len(node) <= index:
                node.append({})
            node = node[index]
        else:
            node = node.setdefault(part, child_default)
    last = parts[-1]
    if last.isdigit():
        while len(node) <= int(last):
            node.append({})
        node[int(last)] = value
    else:
        node[last] = value


def _get(data: dict, dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        try:
            node = node[int(part)] if part.isdigit() else node[part]
        except (KeyError, IndexError, TypeError):
            return None
    return node
