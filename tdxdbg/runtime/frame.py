"""Frame: what one step produced, and the call stacks read from generator chains."""

from __future__ import annotations

import enum
from collections.abc import Generator, Hashable
from types import CodeType, FrameType, GeneratorType
from typing import Any, NamedTuple

import attrs

from tdxdbg.runtime.step import Step
from tdxdbg.runtime.world import Effect


class StackEntry(NamedTuple):
    """One activation in a task's call stack: function (qualified name), file and current line.
    A NamedTuple so that hashing whole stacks stays in C."""

    function: str
    filename: str
    line: int


@attrs.frozen(slots=True)
class Violation:
    """An invariant that did not hold after a frame: the check's name and what it saw."""

    invariant: str
    message: str


class Scope(NamedTuple):
    """The local variables of one activation as they were at a frame: names (interned, shared by every
    frame of the same shape) and values. Behaves like a read-only mapping for display."""

    names: tuple[str, ...]
    values: tuple[Any, ...]

    def items(self) -> Any:
        return zip(self.names, self.values, strict=True)

    def get(self, name: str, default: Any = None) -> Any:
        try:
            return self.values[self.names.index(name)]
        except ValueError:
            return default

    def __contains__(self, name: object) -> bool:
        return name in self.names


_NAMES: dict[tuple[str, ...], tuple[str, ...]] = {}


def _scope(f: FrameType) -> Scope:
    loc = f.f_locals
    names = tuple(loc)
    return Scope(_NAMES.setdefault(names, names), tuple(loc.values()))


class Frame(NamedTuple):
    """One step of one task, with its effects (writes) and footprint (distinct keys read).

    `locals` holds, per activation (outermost first), a Scope of its local variables as they were; render
    them with `plain_locals`. A NamedTuple because a timeline keeps millions of these.
    """

    index: int
    task: str
    step: Step
    stack: tuple[StackEntry, ...]
    effects: tuple[Effect, ...]
    reads: tuple[Hashable, ...]
    locals: tuple[Scope, ...] = ()
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



@attrs.frozen(slots=True)
class _Opaque:
    type_name: str

    def __repr__(self) -> str:
        return self.type_name if self.type_name.endswith(")") else f"<{self.type_name}>"


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


def _plain_value(value: Any, depth: int = 0) -> bool:
    """Immutable all the way down (tuples nested at most three deep)."""
    if _keep(type(value)):
        return True
    return (isinstance(value, tuple) and depth < 3 and len(value) <= 16
            and all(_plain_value(v, depth + 1) for v in value))


def _plain(value: Any) -> Any:
    t = type(value)
    if _keep(t):
        return value
    # Tuples (NamedTuples included: MmuLock, IterPos) of immutable values are values too.
    if isinstance(value, tuple) and len(value) <= 16 and all(_plain_value(v) for v in value):
        return value
    # A mutable object that says its repr is worth showing (struct kvm_page_fault, tdp_iter): shown as it is
    # now, which for the newest frames is as it was, and marked so.
    if getattr(t, "__tdxdbg_live_repr__", False):
        return _Opaque(f"{value!r} (current value)")
    opaque = _OPAQUE.get(t)
    if opaque is None:
        opaque = _OPAQUE[t] = _Opaque(t.__name__)
    return opaque


def plain_locals(values: Scope | dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """Locals for display: immutable values as they are, anything else by its type name, `self` left out."""
    return tuple((name, _plain(v)) for name, v in values.items() if name != "self")


class StackCache:
    """Per task: the activations seen at the previous capture, outermost first, as
    (frame, instruction offset, sub-generator, entry, locals), plus the stack tuple built from them."""

    __slots__ = ("chain", "stack")

    def __init__(self) -> None:
        self.chain: list[tuple[FrameType, int, Any, StackEntry, Any]] = []
        self.stack: tuple[StackEntry, ...] = ()


def capture(gen: Generator[Any, Any, Any], cache: StackCache, want_locals: bool = True
            ) -> tuple[tuple[StackEntry, ...], tuple[Scope, ...]]:
    """The call stack of a suspended generator chain (outermost first) and each activation's locals.

    An activation suspended in the same `yield from` on the same sub-generator as at the previous capture has
    not run since: its entry and locals are reused, so only the activations that ran cost anything.
    """
    chain = cache.chain
    depth = 0
    n_prev = len(chain)
    g: Any = gen
    # Reuse the unchanged outer part of the chain.
    while depth < n_prev:
        f = g.gi_frame
        if f is None:
            break
        prev = chain[depth]
        sub = g.gi_yieldfrom
        if prev[0] is not f or sub is None or prev[2] is not sub or prev[1] != f.f_lasti:
            break
        depth += 1
        g = sub if type(sub) is GeneratorType else None
        if g is None:
            break
    same_prefix = depth
    del chain[depth:]
    while g is not None:
        f = g.gi_frame
        if f is None:
            break
        code = f.f_code
        lasti = f.f_lasti
        entry = _ENTRIES.get((code, lasti))
        if entry is None:
            entry = _ENTRIES[(code, lasti)] = StackEntry(code.co_qualname, code.co_filename, f.f_lineno)
        sub = g.gi_yieldfrom
        chain.append((f, lasti, sub, entry, _scope(f) if want_locals else None))
        g = sub if type(sub) is GeneratorType else None
    if same_prefix == len(chain) and len(cache.stack) == same_prefix:
        stack = cache.stack
    else:
        stack = tuple([c[3] for c in chain])
        stack = _STACKS.setdefault(stack, stack)
        cache.stack = stack
    return stack, (tuple([c[4] for c in chain]) if want_locals else ())
