"""Frame: what one step produced, and the call stacks read from generator chains."""

from __future__ import annotations

import enum
from collections.abc import Generator, Hashable
from types import CodeType, FrameType, GeneratorType
from typing import Any, NamedTuple

import attrs

from tdxdbg.runtime.step import Step
from tdxdbg.runtime.world import Effect


@attrs.frozen(slots=True)
class StackEntry:
    """One activation in a task's call stack: function, file and current line."""

    function: str
    filename: str
    line: int


@attrs.frozen(slots=True)
class Violation:
    """An invariant that did not hold after a frame: the check's name and what it saw."""

    invariant: str
    message: str


class Frame(NamedTuple):
    """One step of one task, with its effects (writes) and footprint (distinct keys read).

    `locals` holds, per activation (outermost first), a copy of its local variables as they were; render them
    with `plain_locals`. A NamedTuple because a timeline keeps millions of these.
    """

    index: int
    task: str
    step: Step
    stack: tuple[StackEntry, ...]
    effects: tuple[Effect, ...]
    reads: tuple[Hashable, ...]
    locals: tuple[dict[str, Any], ...] = ()
    violations: tuple[Violation, ...] = ()

    @property
    def kind(self) -> enum.Enum:
        return self.step.kind

    def wrote(self, key: Hashable) -> bool:
        return any(k == key for k, _old, _new in self.effects)

    def touched(self, key: Hashable) -> bool:
        return key in self.reads or self.wrote(key)


# Interned stack entries, keyed by (code, instruction offset), so a million frames share a few hundred objects
# and the line number (slow to compute) is looked up once per offset.
_ENTRIES: dict[tuple[CodeType, int], StackEntry] = {}
_STACKS: dict[tuple[StackEntry, ...], tuple[StackEntry, ...]] = {}

# Types whose values are kept as they are (immutable); anything else is shown by its type name.
_KEEP: dict[type, bool] = {int: True, str: True, bool: True, float: True, type(None): True, bytes: True}
_OPAQUE: dict[type, Any] = {}

LocalsCache = dict[FrameType, tuple[int, Any, dict[str, Any]]]


@attrs.frozen(slots=True)
class _Opaque:
    type_name: str

    def __repr__(self) -> str:
        return f"<{self.type_name}>"


def _keep(t: type) -> bool:
    keep = _KEEP.get(t)
    if keep is None:
        keep = _KEEP[t] = issubclass(t, enum.Enum) or _is_frozen_attrs(t)
    return keep


def _is_frozen_attrs(t: type) -> bool:
    """Frozen attrs classes refuse assignment through attrs' own `_frozen_setattrs`."""
    if not attrs.has(t):
        return False
    setattr_ = getattr(t, "__setattr__", None)
    return setattr_ is not None and getattr(setattr_, "__name__", "") == "_frozen_setattrs"


def _plain(value: Any) -> Any:
    t = type(value)
    if _keep(t):
        return value
    if t is tuple and len(value) <= 8 and all(_keep(type(v)) for v in value):
        return value
    opaque = _OPAQUE.get(t)
    if opaque is None:
        opaque = _OPAQUE[t] = _Opaque(t.__name__)
    return opaque


def plain_locals(values: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """Locals for display: immutable values as they are, anything else by its type name, `self` left out."""
    return tuple((name, _plain(v)) for name, v in values.items() if name != "self")


def capture(gen: Generator[Any, Any, Any], cache: LocalsCache | None
            ) -> tuple[tuple[StackEntry, ...], tuple[dict[str, Any], ...]]:
    """The call stack of a suspended generator chain (outermost first) and, when `cache` is given, a copy of
    each activation's locals.

    An outer activation suspended in the same `yield from` on the same sub-generator as at the previous capture
    has not run since, so its locals are reused from `cache` instead of being copied again.
    """
    entries = []
    local_values = []
    seen: LocalsCache = {}
    g: Any = gen
    while g is not None:
        f = g.gi_frame
        if f is None:
            break
        code = f.f_code
        lasti = f.f_lasti
        entry = _ENTRIES.get((code, lasti))
        if entry is None:
            entry = _ENTRIES[(code, lasti)] = StackEntry(code.co_qualname, code.co_filename, f.f_lineno)
        entries.append(entry)
        sub = g.gi_yieldfrom
        if cache is not None:
            hit = cache.get(f)
            if hit is not None and sub is not None and hit[0] == lasti and hit[1] is sub:
                values = hit[2]
            else:
                values = dict(f.f_locals)
            seen[f] = (lasti, sub, values)
            local_values.append(values)
        g = sub if type(sub) is GeneratorType else None
    if cache is not None:
        cache.clear()
        cache.update(seen)
    stack = tuple(entries)
    return _STACKS.setdefault(stack, stack), tuple(local_values)
