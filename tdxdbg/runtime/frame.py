"""Frame: what one step produced, and the call stacks read from generator chains."""

from __future__ import annotations

import enum
from collections.abc import Generator, Hashable
from operator import is_
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


# Names of locals as recorded, interned: every frame of the same shape shares one tuple. A method's `self` is
# left out (never shown, and a slot per scope per frame): the key is the names as the frame has them, the value
# the names recorded.
_NAMES: dict[tuple[str, ...], tuple[str, ...]] = {}


def _recorded_names(names: tuple[str, ...]) -> tuple[str, ...]:
    shown = _NAMES[names] = names[1:] if names and names[0] == "self" else names
    return shown


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


# A locals entry is delta-encoded against the same task's previous frame, whose activations mostly did not run:
#     (previous entry, keep, names_a, *values_a, names_b, *values_b, ...)
# means "the first `keep` scopes of the previous entry, then Scope(names_a, values_a), Scope(names_b, ...)".
# A Scope tuple per activation per frame cost ~60% of a frame's memory; an entry costs only the activations
# whose locals changed, with no tuple per scope. Every LOCALS_FULL_EVERY captures of a task an entry is full
# (keep = 0, previous None), so decoding walks back at most that many entries. An entry holds its predecessor
# by reference, so dropping old frames' entries (the locals window) never breaks a newer one.
LOCALS_FULL_EVERY = 64


def decode_locals(entry: tuple[Any, ...]) -> tuple[Scope, ...]:
    """The Scopes (outermost first) of a locals entry made by `capture`.

    Walks back newest first and decodes only the scopes still missing (depths below the previous entry's
    `keep`), so the cost follows the stack depth, not the length of the delta chain."""
    if not entry:
        return ()
    parts: list[list[Scope]] = []
    limit = -1  # depths >= limit are known already (-1: none yet)
    e = entry
    while True:
        keep = e[1]
        if limit < 0 or keep < limit:
            scopes = []
            i, n, depth = 2, len(e), keep
            while i < n and (limit < 0 or depth < limit):
                names = e[i]
                j = i + 1 + len(names)
                scopes.append(Scope(names, e[i + 1:j]))
                i = j
                depth += 1
            parts.append(scopes)
            limit = keep
        if not keep:
            break
        e = e[0]
    out: list[Scope] = []
    for scopes in reversed(parts):
        out.extend(scopes)
    return tuple(out)


class StackCache:
    """Per task: the activations seen at the previous capture, outermost first, as
    (generator, sub-iterator it is suspended in, entry, local names, local values, stack down to it), and the
    locals entry recorded then (with how many captures since the last full one)."""

    __slots__ = ("chain", "entry", "since_full")

    def __init__(self) -> None:
        self.chain: list[tuple[Any, Any, StackEntry, Any, Any, tuple[StackEntry, ...]]] = []
        self.entry: tuple[Any, ...] = ()
        self.since_full = 0


def capture_stack(gen: Generator[Any, Any, Any], cache: StackCache) -> tuple[StackEntry, ...]:
    """The call stack of a suspended generator chain (outermost first), without locals: what `capture` returns
    first, for runs that record no locals (its cache keeps (generator, sub-iterator, stack down to it) per
    activation, so a StackCache serves either this function or `capture`, never both).

    The unchanged outer part of the stack is found bottom up as in `capture`: a generator still suspended in
    `yield from` on the same sub-iterator as at the previous call has not run since, nor has anything above it.
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


def capture(gen: Generator[Any, Any, Any], cache: StackCache, want_locals: bool = True
            ) -> tuple[tuple[StackEntry, ...], tuple[Any, ...]]:
    """The call stack of a suspended generator chain (outermost first) and a locals entry (see above; decode it
    with `decode_locals`), () when locals are not wanted.

    An activation suspended in the same `yield from` on the same sub-generator as at the previous capture has
    not run since: its entry and locals are reused, so only the activations that ran cost anything.
    """
    chain = cache.chain
    depth = 0
    n_prev = len(chain)
    g: Any = gen
    # Reuse the unchanged outer part of the chain. A generator still suspended in `yield from` on the same
    # sub-iterator as at the previous capture has not run since, and neither has any activation above it: each
    # of them is still inside its `yield from` (one ends only when the sub-generator is exhausted, and an
    # exhausted generator is suspended in nothing). So the deepest such activation bounds the part that ran,
    # found bottom up in a step or two instead of walking the whole stack. Only the task's own generator needs
    # its identity checked.
    if n_prev and chain[0][0] is gen:
        k = n_prev - 1
        while k >= 0:
            prev = chain[k]
            sub = prev[1]
            if sub is not None and prev[0].gi_yieldfrom is sub:
                depth = k + 1
                g = sub if type(sub) is GeneratorType else None
                break
            k -= 1
    same_prefix = depth
    old_tail = chain[depth:]
    del chain[depth:]
    stack = chain[-1][5] if chain else ()
    entries = _ENTRIES
    stacks = _STACKS
    names_of = _NAMES
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
        if want_locals:
            loc = f.f_locals
            names = tuple(loc)
            shown = names_of.get(names) or _recorded_names(names)
            values = tuple(loc.values())
            append((g, sub, entry, shown, values if len(values) == len(shown) else values[1:], stack))
        else:
            append((g, sub, entry, None, None, stack))
        g = sub if type(sub) is GeneratorType else None
    n = len(chain)
    if not want_locals:
        return stack, ()
    prev_entry = cache.entry
    if prev_entry and cache.since_full < LOCALS_FULL_EVERY:
        keep = same_prefix
        # Activations that ran but whose locals are the very same objects as before are shared too.
        for old in old_tail:
            if keep == n:
                break
            new = chain[keep]
            if old[3] is not new[3] or not all(map(is_, old[4], new[4])):
                break
            keep += 1
        cache.since_full += 1
    else:
        prev_entry = None
        keep = 0
        cache.since_full = 0
    out: list[Any] = [prev_entry if keep else None, keep]
    for c in chain[keep:] if keep else chain:
        out.append(c[3])
        out.extend(c[4])
    cache.entry = entry_out = tuple(out) if n else ()
    return stack, entry_out
