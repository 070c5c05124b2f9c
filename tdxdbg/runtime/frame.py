"""Frame: what one step produced, and the call stacks read from generator chains."""

from __future__ import annotations

import enum
from collections.abc import Generator, Hashable
from types import CodeType, FrameType
from typing import Any

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


@attrs.frozen(slots=True)
class Frame:
    """One step of one task, with its effects (writes) and footprint (distinct keys read)."""

    index: int
    task: str
    step: Step
    stack: tuple[StackEntry, ...]
    effects: tuple[Effect, ...]
    reads: tuple[Hashable, ...]
    locals: tuple[tuple[tuple[str, Any], ...], ...] = ()
    violations: tuple[Violation, ...] = ()

    @property
    def kind(self) -> enum.Enum:
        return self.step.kind

    def wrote(self, key: Hashable) -> bool:
        return any(k == key for k, _old, _new in self.effects)

    def touched(self, key: Hashable) -> bool:
        return key in self.reads or self.wrote(key)


# Interned stack entries, so a million frames share a few hundred objects.
_ENTRIES: dict[tuple[CodeType, int], StackEntry] = {}
_STACKS: dict[tuple[StackEntry, ...], tuple[StackEntry, ...]] = {}

# Local values kept as they are when they are immutable; anything else is shown by its type name.
_PLAIN = (int, str, bool, float, type(None), bytes, enum.Enum)


def _entry(frame: FrameType) -> StackEntry:
    code = frame.f_code
    key = (code, frame.f_lineno)
    entry = _ENTRIES.get(key)
    if entry is None:
        entry = _ENTRIES[key] = StackEntry(code.co_qualname, code.co_filename, frame.f_lineno)
    return entry


def _plain(value: Any) -> Any:
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, tuple) and len(value) <= 8 and all(isinstance(v, _PLAIN) for v in value):
        return value
    if attrs.has(type(value)) and getattr(type(value), "__attrs_frozen__", False) is not False:
        return value
    return _Opaque(type(value).__name__)


@attrs.frozen(slots=True)
class _Opaque:
    type_name: str

    def __repr__(self) -> str:
        return f"<{self.type_name}>"


def _frames_of(gen: Generator[Any, Any, Any]) -> list[FrameType]:
    frames = []
    g: Any = gen
    while g is not None:
        f = getattr(g, "gi_frame", None)
        if f is None:
            break
        frames.append(f)
        g = getattr(g, "gi_yieldfrom", None)
    return frames


def capture_stack(gen: Generator[Any, Any, Any]) -> tuple[StackEntry, ...]:
    """The call stack of a suspended generator chain, outermost first."""
    stack = tuple(_entry(f) for f in _frames_of(gen))
    return _STACKS.setdefault(stack, stack)


def capture_locals(gen: Generator[Any, Any, Any]) -> tuple[tuple[tuple[str, Any], ...], ...]:
    """The locals of each activation, outermost first, keeping only immutable values."""
    out = []
    for f in _frames_of(gen):
        out.append(tuple((name, _plain(v)) for name, v in f.f_locals.items() if name != "self"))
    return tuple(out)
