"""Frame: what one step produced, and the call stacks read from generator chains."""

from __future__ import annotations

import enum
from collections.abc import Generator, Hashable
from types import CodeType, FrameType, GeneratorType
from typing import Any, NamedTuple

import attrs

from tdxdbg.runtime.step import Step
from tdxdbg.runtime.world import Effect, World


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


class Frame(NamedTuple):
    """One step of one task, with its effects (writes) and footprint (distinct keys read). Locals are not
    recorded: they are rebuilt by replay (runtime/replay.py). A NamedTuple because a timeline keeps millions of
    these.
    """

    index: int
    task: str
    step: Step
    stack: tuple[StackEntry, ...]
    effects: tuple[Effect, ...]
    reads: tuple[Hashable, ...]
    violations: tuple[Violation, ...] = ()

    @property
    def kind(self) -> enum.Enum:
        return self.step.kind

    def wrote(self, key: Hashable) -> bool:
        return any(k == key for k, _old, _new in self.effects)

    def touched(self, key: Hashable) -> bool:
        return key in self.reads or self.wrote(key)


# Interned stack entries, per code object then instruction offset, so a million frames share a few hundred
# objects and the line number (slow to compute) is looked up once per offset. Keyed by id(code): hashing a code
# object hashes its constants every time. _CODES keeps every code seen alive, so an id is never reused.
_ENTRIES: dict[int, dict[int, StackEntry]] = {}
_CODES: list[CodeType] = []
# Interned stacks, as a trie: (id(stack of the outer activations), id(entry)) -> that stack plus the entry.
# Building a stack costs a dict look-up per activation that ran instead of hashing the whole tuple. Every stack
# and entry is kept alive here (or in _ENTRIES), so the ids stay unique.
_STACKS: dict[tuple[int, int], tuple[StackEntry, ...]] = {}


def _entry(code: CodeType, lasti: int, f: FrameType) -> StackEntry:
    by_lasti = _ENTRIES.get(id(code))
    if by_lasti is None:
        by_lasti = _ENTRIES[id(code)] = {}
        _CODES.append(code)
    entry = by_lasti[lasti] = StackEntry(code.co_qualname, code.co_filename, f.f_lineno)
    return entry


def _push(stack: tuple[StackEntry, ...], entry: StackEntry) -> tuple[StackEntry, ...]:
    out = _STACKS[(id(stack), id(entry))] = (*stack, entry)
    return out

# Types whose values are kept as they are (immutable); anything else is rendered when the locals are read.
_KEEP: dict[type, bool] = {int: True, str: True, bool: True, float: True, type(None): True, bytes: True}
_OPAQUE: dict[type, Any] = {}


@attrs.frozen(slots=True)
class Rendered:
    """A mutable object as it was when its locals were read: its repr then (or its type's name)."""

    text: str

    def __repr__(self) -> str:
        return self.text


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
    # A mutable object that says its repr is worth showing (struct kvm_page_fault, tdp_iter): its repr now,
    # which is as it was at the frame the locals were rebuilt for.
    if getattr(t, "__tdxdbg_live_repr__", False):
        return Rendered(repr(value))
    if isinstance(value, World):  # the live World or the overlay a replay runs on: the same thing to a reader
        return _WORLD
    opaque = _OPAQUE.get(t)
    if opaque is None:
        opaque = _OPAQUE[t] = Rendered(f"<{t.__name__}>")
    return opaque


_WORLD = Rendered("<World>")


def plain_locals(values: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """Live locals for display, rendered now: immutable values as they are, objects that show their state by
    their repr, anything else by its type name; `self` left out."""
    return tuple((name, _plain(v)) for name, v in values.items() if name != "self")


class StackCache:
    """Per task: the activations seen at the previous capture, outermost first, as
    (generator, sub-iterator it is suspended in, stack down to it)."""

    __slots__ = ("chain",)

    def __init__(self) -> None:
        self.chain: list[tuple[Any, Any, tuple[StackEntry, ...]]] = []


def capture_stack(gen: Generator[Any, Any, Any], cache: StackCache) -> tuple[StackEntry, ...]:
    """The call stack of a suspended generator chain (outermost first); locals are not recorded (they are
    rebuilt by replay, runtime/replay.py).

    The unchanged outer part of the stack is reused: a generator still suspended in `yield from` on the same
    sub-iterator as at the previous call has not run since, nor has anything above it (one leaves its
    `yield from` only when the sub-generator is exhausted), so only the activations that ran cost anything.
    """
    chain = cache.chain
    depth = 0
    g: Any = gen
    if chain and chain[0][0] is gen:
        k = len(chain) - 1
        while k >= 0:
            prev = chain[k]
            sub = prev[1]
            if sub is not None and prev[0].gi_yieldfrom is sub:
                depth = k + 1
                g = sub if type(sub) is GeneratorType else None
                break
            k -= 1
    del chain[depth:]
    stack: tuple[StackEntry, ...] = chain[-1][2] if chain else ()
    entries = _ENTRIES
    stacks = _STACKS
    append = chain.append
    while g is not None:
        f = g.gi_frame
        if f is None:
            break
        code = f.f_code
        lasti = f.f_lasti
        by_lasti = entries.get(id(code))
        entry = by_lasti.get(lasti) if by_lasti is not None else None
        if entry is None:
            entry = _entry(code, lasti, f)
        stack = stacks.get((id(stack), id(entry))) or _push(stack, entry)
        sub = g.gi_yieldfrom
        append((g, sub, stack))
        g = sub if type(sub) is GeneratorType else None
    return stack
