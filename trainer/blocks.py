"""The block notation of `layers.train_blocks` / `freeze_blocks`: 'down_blocks.1', 'transformer_blocks[-8:]',
'single_transformer_blocks.12-23', globs. Part of the job contract, so torch-free: the trainer selects layers by it
and the window's block picker shows what an entry selects, without importing the trainer.
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase

_SLICED = re.compile(r"^(?P<base>[^\[\]]+)\[(?P<spec>[^\[\]]*)\]$")  # transformer_blocks[-8:]
_RANGE = re.compile(r"^(\d+)-(\d+)$")  # 12-23, inclusive


class BlockEntryError(ValueError):
    """A block entry that selects nothing (`reached`: the deepest prefix it did match) or is malformed."""

    def __init__(self, message: str, reached: tuple[str, ...] = ()):
        super().__init__(message)
        self.reached = reached


def block_children(names: list[str]) -> dict[tuple[str, ...], list[str]]:
    """For each dotted prefix of the module names (as a tuple), its child segments, numbered ones in number
    order (2 before 10)."""
    out: dict[tuple[str, ...], list[str]] = {}
    for name in names:
        segments = tuple(name.split("."))
        for depth in range(len(segments)):
            kids = out.setdefault(segments[:depth], [])
            if segments[depth] not in kids:
                kids.append(segments[depth])
    for kids in out.values():
        kids.sort(key=lambda s: (0, int(s), "") if s.isdigit() else (1, 0, s))
    return out


def resolve_block(entry: str, children: dict[tuple[str, ...], list[str]]) -> list[str]:
    """The dotted prefixes an entry stands for, segment by segment: a glob, an inclusive index range ('12-23'),
    or a name with a Python slice or index over its numbered children ('transformer_blocks[-8:]')."""
    prefixes: list[tuple[str, ...]] = [()]
    for segment in entry.strip().split("."):
        sliced = _SLICED.match(segment)
        step: list[tuple[str, ...]] = []
        for prefix in prefixes:
            if sliced:
                for base in _matching_segments(children.get(prefix, []), sliced["base"]):
                    numbered = [c for c in children.get(prefix + (base,), []) if c.isdigit()]
                    step += [prefix + (base, c) for c in _slice_of(numbered, sliced["spec"], entry)]
            else:
                step += [prefix + (c,) for c in _matching_segments(children.get(prefix, []), segment)]
        if not step:
            where = f" under {'.'.join(prefixes[0])}" if prefixes[0] else ""
            raise BlockEntryError(f"{entry!r} matches no module{where}", prefixes[0])
        prefixes = step
    return [".".join(p) for p in prefixes]


def _matching_segments(candidates: list[str], pattern: str) -> list[str]:
    bounds = _RANGE.match(pattern)
    if bounds:
        low, high = int(bounds[1]), int(bounds[2])
        return [c for c in candidates if c.isdigit() and low <= int(c) <= high]
    return [c for c in candidates if fnmatchcase(c, pattern)]


def _slice_of(items: list[str], spec: str, entry: str) -> list[str]:
    try:
        numbers = [int(p) if p.strip() else None for p in spec.split(":")]
    except ValueError:
        numbers = []
    if not 1 <= len(numbers) <= 3 or numbers == [None] or (len(numbers) == 3 and numbers[2] == 0):
        raise BlockEntryError(f"{entry!r}: [{spec}] is not an index or a slice such as [-8:] or [12:24]")
    if len(numbers) == 1:
        index = numbers[0]
        return [items[index]] if -len(items) <= index < len(items) else []
    return items[slice(*numbers)]
