"""Timeline: every recorded frame plus keyframes, so any frame's state is rebuilt without re-executing.

Position p means "the initial state with the effects of frames[0:p] applied"; the state after frame i is
position i + 1. A keyframe (a full copy of the state) is taken whenever the writes since the last one reach
twice the size of the state, so keyframes never cost more memory than half the effects they summarise, and
rebuilding any position applies at most about two states' worth of effects.
"""

from __future__ import annotations

import bisect
import gc
from array import array
from collections.abc import Hashable, Iterator, Sequence
from typing import Any, overload

from tdxdbg.runtime.frame import Frame, StackEntry, Violation
from tdxdbg.runtime.step import Step
from tdxdbg.runtime.world import World, apply_flat, chunk_effects, undo_flat

# Do not copy tiny states on every frame: a keyframe is due only after this many writes at least.
KEYFRAME_MIN_WRITES = 4096
# A keyframe is due when the writes since the last one reach this many times the size of the state: keyframes
# then cost at most half the memory of the effects they summarise, and rebuilding a position applies at most
# about two states' worth of effects.
KEYFRAME_STATE_FACTOR = 2
# Locals are kept for this many of the most recent frames; older frames keep their stack and show no locals
# (they cost about half of a frame's memory).
LOCALS_WINDOW = 100_000
# Recorded frames live as long as the timeline and hold no reference cycles, yet the cyclic garbage collector
# would walk all of them again and again as the timeline grows (it halves recording speed at 100,000 frames).
# Every this many frames the objects alive so far are moved out of the collector's reach (`gc.freeze`); plain
# reference counting still frees whatever is later dropped.
GC_FREEZE_EVERY = 16384
# A young generation this large keeps the collector from running every 700 allocations while recording.
GC_THRESHOLDS = (50_000, 20, 100)


class FrameStore(Sequence[Frame]):
    """The recorded frames, kept column by column so a million of them stay small: task, step kind and
    stack as indexes into interned tables, payload, flat effects, footprint and locals as references.
    Indexing builds the Frame value on demand."""

    def __init__(self) -> None:
        self._task_names: list[str] = []
        self._task_ids: dict[str, int] = {}
        self._kinds: list[Any] = []
        self._kind_ids: dict[Any, int] = {}
        self._stacks: list[tuple[StackEntry, ...]] = []
        self._stack_ids: dict[tuple[StackEntry, ...], int] = {}
        self.task_col = array("H")
        self.kind_col = array("H")
        self.stack_col = array("I")
        self.payloads: list[Any] = []
        self.effects: list[tuple[Any, ...]] = []     # flat: key, old, new, ...
        self.reads: list[tuple[Hashable, ...]] = []
        self.locals: list[tuple[Any, ...]] = []
        self.violations: dict[int, tuple[Violation, ...]] = {}

    def _intern(self, table: list, ids: dict, value: Any) -> int:
        i = ids.get(value)
        if i is None:
            i = ids[value] = len(table)
            table.append(value)
        return i

    def add(self, task: str, step: Step, stack: tuple[StackEntry, ...], flat_effects: tuple[Any, ...],
            reads: tuple[Hashable, ...], local_values: tuple[Any, ...],
            violations: tuple[Violation, ...]) -> None:
        self.task_col.append(self._intern(self._task_names, self._task_ids, task))
        self.kind_col.append(self._intern(self._kinds, self._kind_ids, step.kind))
        self.stack_col.append(self._intern(self._stacks, self._stack_ids, stack))
        self.payloads.append(step.payload)
        self.effects.append(flat_effects)
        self.reads.append(reads)
        self.locals.append(local_values)
        n = len(self.locals)
        if n > LOCALS_WINDOW:
            self.locals[n - LOCALS_WINDOW - 1] = ()
        if violations:
            self.violations[len(self.payloads) - 1] = violations

    def __len__(self) -> int:
        return len(self.payloads)

    def _frame(self, i: int) -> Frame:
        return Frame(i, self._task_names[self.task_col[i]], Step(self._kinds[self.kind_col[i]], self.payloads[i]),
                     self._stacks[self.stack_col[i]], chunk_effects(self.effects[i]), self.reads[i],
                     self.locals[i], self.violations.get(i, ()))

    @overload
    def __getitem__(self, index: int) -> Frame: ...

    @overload
    def __getitem__(self, index: slice) -> list[Frame]: ...

    def __getitem__(self, index: int | slice) -> Frame | list[Frame]:
        if isinstance(index, slice):
            return [self._frame(i) for i in range(*index.indices(len(self)))]
        n = len(self.payloads)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"frame {index} outside 0..{n - 1}")
        return self._frame(index)

    def __iter__(self) -> Iterator[Frame]:
        for i in range(len(self.payloads)):
            yield self._frame(i)

    # Column access without building Frames (hot loops: breakpoints, the timeline strip).
    def task_of(self, i: int) -> str:
        return self._task_names[self.task_col[i]]

    def kind_of(self, i: int) -> Any:
        return self._kinds[self.kind_col[i]]

    def stack_of(self, i: int) -> tuple[StackEntry, ...]:
        return self._stacks[self.stack_col[i]]

    def wrote(self, i: int, key: Hashable) -> bool:
        flat = self.effects[i]
        return any(flat[j] == key for j in range(0, len(flat), 3))


class Timeline:
    """Frames in order, keyframes, and a cursor state for cheap neighbouring positions."""

    def __init__(self, initial: dict[Hashable, Any]) -> None:
        if gc.get_threshold()[0] < GC_THRESHOLDS[0]:
            gc.set_threshold(*GC_THRESHOLDS)
        self.frames = FrameStore()
        self._key_positions: list[int] = [0]
        self._key_states: list[dict[Hashable, Any]] = [dict(initial)]
        self._writes_since_key = 0
        # Cumulative write counts: _cum[p] = number of writes in frames[0:p].
        self._cum = array("q", [0])
        self._cursor_pos = 0
        self._cursor_state: dict[Hashable, Any] = dict(initial)
        # key -> frames that wrote it, in order; filled up to _write_indexed on demand (last_write).
        self._write_index: dict[Hashable, array] = {}
        self._write_indexed = 0

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int) -> Frame:
        return self.frames[index]

    def __iter__(self) -> Iterator[Frame]:
        return iter(self.frames)

    def append(self, frame: Frame, world: World) -> None:
        """Record a Frame value (slow path: tests and replays); the runtime uses `record`."""
        flat = tuple(x for effect in frame.effects for x in effect)
        self.record(frame.task, frame.step, frame.stack, flat, frame.reads, frame.locals, frame.violations, world)

    def record(self, task: str, step: Step, stack: tuple[StackEntry, ...], flat_effects: tuple[Any, ...],
               reads: tuple[Hashable, ...], local_values: tuple[Any, ...], violations: tuple[Violation, ...],
               world: World) -> None:
        frames = self.frames
        frames.add(task, step, stack, flat_effects, reads, local_values, violations)
        n_frames = len(frames)
        if not n_frames % GC_FREEZE_EVERY:
            gc.freeze()
        n = len(flat_effects) // 3
        cum = self._cum
        cum.append(cum[-1] + n)
        self._writes_since_key += n
        if (self._writes_since_key >= KEYFRAME_MIN_WRITES
                and self._writes_since_key >= KEYFRAME_STATE_FACTOR * len(world)):
            self._key_positions.append(n_frames)
            self._key_states.append(world.snapshot())
            self._writes_since_key = 0

    @property
    def keyframe_count(self) -> int:
        return len(self._key_positions)

    def state_at(self, position: int) -> dict[Hashable, Any]:
        """The state at `position` (0 .. len). The returned dict is owned by the timeline: do not mutate it."""
        if not 0 <= position <= len(self.frames):
            raise IndexError(f"position {position} outside 0..{len(self.frames)}")
        cum = self._cum
        cost_cursor = abs(cum[position] - cum[self._cursor_pos])
        k = bisect.bisect_right(self._key_positions, position) - 1
        kpos = self._key_positions[k]
        cost_before = cum[position] - cum[kpos]
        best = ("cursor", cost_cursor)
        # Copying a keyframe costs about its size; only worth it when the walk from the cursor is longer.
        copy_cost = len(self._key_states[k])
        if cost_before + copy_cost < best[1]:
            best = ("before", cost_before + copy_cost)
        if k + 1 < len(self._key_positions):
            npos = self._key_positions[k + 1]
            cost_after = cum[npos] - cum[position] + len(self._key_states[k + 1])
            if cost_after < best[1]:
                best = ("after", cost_after)
        if best[0] == "before":
            self._cursor_state = dict(self._key_states[k])
            self._cursor_pos = kpos
        elif best[0] == "after":
            self._cursor_state = dict(self._key_states[k + 1])
            self._cursor_pos = self._key_positions[k + 1]
        self._move_cursor(position)
        return self._cursor_state

    def _move_cursor(self, position: int) -> None:
        state = self._cursor_state
        effects = self.frames.effects
        pos = self._cursor_pos
        while pos < position:
            apply_flat(state, effects[pos])
            pos += 1
        while pos > position:
            pos -= 1
            undo_flat(state, effects[pos])
        self._cursor_pos = pos

    def last_write(self, key: Hashable, before: int) -> int | None:
        """Index of the last frame before position `before` that wrote `key`, or None.

        Backed by an index of writes per key, built on the first query and extended with the frames recorded
        since on each later one, so asking costs nothing while recording and little afterwards."""
        index = self._write_index
        effects = self.frames.effects
        for i in range(self._write_indexed, len(effects)):
            flat = effects[i]
            for j in range(0, len(flat), 3):
                k = flat[j]
                hits = index.get(k)
                if hits is None:
                    index[k] = array("q", (i,))
                elif hits[-1] != i:
                    hits.append(i)
        self._write_indexed = len(effects)
        hits = index.get(key)
        if not hits:
            return None
        k = bisect.bisect_left(hits, min(before, len(effects))) - 1
        return hits[k] if k >= 0 else None
