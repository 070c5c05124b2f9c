"""World: every piece of mutable state, as a flat map of keys to immutable values.

All writes go through `set`/`delete`, which record (key, old, new); all reads through `get`, which record the key.
The runtime collects both per frame: the frame's effects and its footprint.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from typing import Any


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"

    def __reduce__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()

Effect = tuple[Hashable, Any, Any]


class World:
    """The flat state map. Values must be immutable (ints, strings, tuples, frozen attrs)."""

    __slots__ = ("_reads", "_state", "_writes", "at_rest", "stack", "stack_source", "task")

    def __init__(self, state: dict[Hashable, Any] | None = None) -> None:
        self._state: dict[Hashable, Any] = dict(state) if state else {}
        # Writes since the last frame, flat: key, old, new, key, old, new, ...
        self._writes: list[Any] = []
        self._reads: list[Hashable] = []
        # Name of the task whose step is running; not state, so not recorded.
        self.task: str = ""
        # Call stack (StackEntry tuple) of the step just run, for checks (read it with `call_stack`); not state
        # either. A runner that does not read every stack leaves None and a `stack_source` that reads it.
        self.stack: tuple | None = ()
        self.stack_source: Callable[[], tuple] | None = None
        # Set by `quiescent()` during a step to the number of flat write entries made before it (-1: not at rest),
        # reset by the runtime before each step; not state.
        self.at_rest: int = -1

    # -- recorded access -------------------------------------------------------------------------------
    def get(self, key: Hashable, default: Any = None) -> Any:
        self._reads.append(key)
        return self._state.get(key, default)

    def set(self, key: Hashable, value: Any) -> None:
        state = self._state
        old = state.get(key, MISSING)
        # Writing an equal value is no change: keeps "stop when X changes" honest.
        if old is value or (old.__class__ is value.__class__ and old == value):
            return
        self._writes.extend((key, old, value))
        if value is MISSING:
            del state[key]
        else:
            state[key] = value

    def delete(self, key: Hashable) -> None:
        if key in self._state:
            self.set(key, MISSING)

    def quiescent(self) -> None:
        """The running task is at a quiescent point: everything it carries from here on is in the World, so its
        entry generator, started afresh on the World as it is here, reaches this point with the same locals. The
        first such point of a step counts; the recorder marks the frame with how many of its writes came before
        it (the replay applies those, then starts the entry), and locals are rebuilt by replaying from there."""
        if self.at_rest < 0:
            self.at_rest = len(self._writes)

    def call_stack(self) -> tuple:
        """The call stack of the step just run (outermost first), for checks that ask who issued it."""
        stack = self.stack
        if stack is None:
            source = self.stack_source
            stack = self.stack = source() if source is not None else ()
        return stack

    # -- unrecorded access (checks, views, tests) --------------------------------------------------------
    def peek(self, key: Hashable, default: Any = None) -> Any:
        return self._state.get(key, default)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._state

    def keys(self) -> Iterator[Hashable]:
        return iter(self._state)

    def items(self) -> Iterator[tuple[Hashable, Any]]:
        return iter(self._state.items())

    def snapshot(self) -> dict[Hashable, Any]:
        return dict(self._state)

    def __len__(self) -> int:
        return len(self._state)

    # -- frame boundaries (used by the runtime) --------------------------------------------------------------
    def take_effects(self) -> tuple[tuple[Effect, ...], tuple[Hashable, ...]]:
        """Return and reset the writes and the distinct keys read since the last call."""
        w, r = self._writes, self._reads
        writes = chunk_effects(tuple(w)) if w else ()
        if not r:
            reads: tuple[Hashable, ...] = ()
        elif len(r) == 1:
            reads = (r[0],)
        else:
            reads = tuple(dict.fromkeys(r))
        w.clear()
        r.clear()
        return writes, reads


def chunk_effects(flat: tuple[Any, ...]) -> tuple[Effect, ...]:
    """(key, old, new) triples from the flat form the World and the timeline keep."""
    it = iter(flat)
    return tuple(zip(it, it, it, strict=True))
