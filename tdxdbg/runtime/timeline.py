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
from tdxdbg.runtime.world import MISSING, Effect, World

# Do not copy tiny states on every frame: a keyframe is due only after this many writes at least.
KEYFRAME_MIN_WRITES = 4096
# A keyframe is due when the writes since the last one reach this many times the size of the state: keyframes
# then cost at most half the memory of the effects they summarise, and rebuilding a position applies at most
# about two states' worth of effects.
KEYFRAME_STATE_FACTOR = 2
# Recorded frames live as long as the timeline and hold no reference cycles, yet the cyclic garbage collector
# would walk all of them again and again as the timeline grows (it halves recording speed at 100,000 frames).
# Every this many frames the objects alive so far are moved out of the collector's reach (`gc.freeze`); plain
# reference counting still frees whatever is later dropped.
GC_FREEZE_EVERY = 16384
# A young generation this large keeps the collector from running every 700 allocations while recording.
GC_THRESHOLDS = (50_000, 20, 100)


class _KeyIds(dict):
    """World key -> small int id, assigning the next id to a key seen for the first time. A dict subclass so
    that `map(ids.__getitem__, keys)` stays in C for known keys (only `__missing__` runs Python)."""

    __slots__ = ("keys",)

    def __init__(self) -> None:
        super().__init__()
        self.keys: list[Hashable] = []

    def __missing__(self, key: Hashable) -> int:
        i = self[key] = len(self.keys)
        self.keys.append(key)
        return i


class _Column(Sequence[Any]):
    """A read-only per-frame view over one of FrameStore's packed columns (`effects`, `reads`)."""

    __slots__ = ("_get", "_len")

    def __init__(self, get: Any, length: Any) -> None:
        self._get = get
        self._len = length

    def __len__(self) -> int:
        return self._len()

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self._get(j) for j in range(*i.indices(self._len()))]
        n = self._len()
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        return self._get(i)


class FrameStore(Sequence[Frame]):
    """The recorded frames, kept column by column so a million of them stay small. Indexing builds the Frame
    value on demand.

    - task, step kind and stack: indexes into interned tables (arrays of small ints);
    - payload: a reference;
    - effects: packed over all frames, frame i owning entries eff_off[i]:eff_off[i + 1] of three parallel
      columns (key id, old value, new value): no tuple per frame, and each World key object is kept once;
    - footprint: packed the same way as key ids (read_off, read_ids);
    - the frames each task began at rest (rest_frames), where replays that rebuild its locals start.
    """

    def __init__(self) -> None:
        self._task_names: list[str] = []
        self._task_ids: dict[str, int] = {}
        # Step kinds and stacks are looked up by identity: an enum member hashes in Python (slow) and a stack
        # tuple re-hashes all its entries, while the runtime hands in the same interned objects over and over.
        # The tables keep those objects alive, so their ids stay unique.
        self._kinds: list[Any] = []
        self._kind_ids: dict[int, int] = {}
        self._stacks: list[tuple[StackEntry, ...]] = []
        self._stack_ids: dict[int, int] = {}
        self._stack_eq: dict[tuple[StackEntry, ...], int] = {}
        self._stack_refs: list[tuple[StackEntry, ...]] = []
        self.task_col = array("H")
        self.kind_col = array("H")
        self.stack_col = array("I")
        self.payloads: list[Any] = []
        self._key_ids = _KeyIds()
        self._kid = self._key_ids.__getitem__
        # Effects, packed: eff_off[i] = number of writes in frames[0:i] (the timeline's cumulative counts too).
        self.eff_off = array("q", [0])
        self.eff_keys = array("I")
        self.eff_old: list[Any] = []
        self.eff_new: list[Any] = []
        # Footprints, packed: frame i read the keys read_ids[read_off[i]:read_off[i + 1]].
        self.read_off = array("I", [0])
        self.read_ids = array("I")
        # Per task id: the frames in which it passed a quiescent point (World.quiescent), in order; and for those
        # where it wrote before that point, how many flat write entries came first.
        self.rest_frames: list[array] = []
        self.rest_offsets: dict[int, int] = {}
        self.violations: dict[int, tuple[Violation, ...]] = {}
        # Per-frame views of the packed columns, for readers that index them (the session, tests).
        self.effects: Sequence[tuple[Any, ...]] = _Column(self.flat_effects_of, self.__len__)
        self.reads: Sequence[tuple[Hashable, ...]] = _Column(self.reads_of, self.__len__)

    def _intern_stack(self, stack: tuple[StackEntry, ...]) -> int:
        i = self._stack_eq.get(stack)
        if i is None:
            i = self._stack_eq[stack] = len(self._stacks)
            self._stacks.append(stack)
        self._stack_ids[id(stack)] = i
        self._stack_refs.append(stack)  # keeps id(stack) from being reused
        return i

    def _intern_kind(self, kind: Any) -> int:
        i = self._kind_ids[id(kind)] = len(self._kinds)
        self._kinds.append(kind)
        return i

    def _intern_task(self, task: str) -> int:
        i = self._task_ids[task] = len(self._task_names)
        self._task_names.append(task)
        self.rest_frames.append(array("q"))
        return i

    def rest_before(self, task: str, index: int) -> int | None:
        """The last frame <= `index` of `task` whose step began with the task at rest, or None."""
        t = self._task_ids.get(task)
        if t is None:
            return None
        rest = self.rest_frames[t]
        k = bisect.bisect_right(rest, index) - 1
        return rest[k] if k >= 0 else None

    def __len__(self) -> int:
        return len(self.payloads)

    # Per-frame columns, unpacked.
    def effects_of(self, i: int) -> tuple[Effect, ...]:
        a, b = self.eff_off[i], self.eff_off[i + 1]
        if a == b:
            return ()
        keys = self._key_ids.keys
        return tuple(zip([keys[k] for k in self.eff_keys[a:b]], self.eff_old[a:b], self.eff_new[a:b], strict=True))

    def flat_effects_of(self, i: int) -> tuple[Any, ...]:
        """Frame i's writes, flat: key, old, new, key, old, new, ..."""
        a, b = self.eff_off[i], self.eff_off[i + 1]
        if a == b:
            return ()
        keys = self._key_ids.keys
        flat: list[Any] = [None] * (3 * (b - a))
        flat[0::3] = [keys[k] for k in self.eff_keys[a:b]]
        flat[1::3] = self.eff_old[a:b]
        flat[2::3] = self.eff_new[a:b]
        return tuple(flat)

    def reads_of(self, i: int) -> tuple[Hashable, ...]:
        a, b = self.read_off[i], self.read_off[i + 1]
        if a == b:
            return ()
        keys = self._key_ids.keys
        return tuple([keys[k] for k in self.read_ids[a:b]])

    def _frame(self, i: int) -> Frame:
        return Frame(i, self._task_names[self.task_col[i]], Step(self._kinds[self.kind_col[i]], self.payloads[i]),
                     self._stacks[self.stack_col[i]], self.effects_of(i), self.reads_of(i),
                     self.violations.get(i, ()))

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
        k = self._key_ids.get(key)  # dict.get: no id is assigned to a key never seen
        return k is not None and k in self.eff_keys[self.eff_off[i]:self.eff_off[i + 1]]

    def key_id(self, key: Hashable) -> int | None:
        """The id of a World key in the packed columns, or None if no frame read or wrote it."""
        return self._key_ids.get(key)


class Timeline:
    """Frames in order, keyframes, and a cursor state for cheap neighbouring positions."""

    def __init__(self, initial: dict[Hashable, Any]) -> None:
        if gc.get_threshold()[0] < GC_THRESHOLDS[0]:
            gc.set_threshold(*GC_THRESHOLDS)
        self.frames = FrameStore()
        self._key_positions: list[int] = [0]
        self._key_states: list[dict[Hashable, Any]] = [dict(initial)]
        # Cumulative write counts: _cum[p] = number of writes in frames[0:p] (the frame store's effect offsets).
        self._cum = self.frames.eff_off
        self._cursor_pos = 0
        self._cursor_state: dict[Hashable, Any] = dict(initial)
        # key id -> frames that wrote it, in order; filled up to _write_indexed on demand (last_write).
        self._write_index: dict[int, array] = {}
        self._write_indexed = 0

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int) -> Frame:
        return self.frames[index]

    def __iter__(self) -> Iterator[Frame]:
        return iter(self.frames)

    def recorder(self) -> Any:
        """The function that records one frame: flat effects (key, old, new, ...), the distinct keys read, and
        where in it the task was at rest (-1: nowhere). It appends to every FrameStore column and takes a keyframe
        when one is due. A closure over the columns' bound methods: it runs once per frame, and closure variables
        are much cheaper than attribute look-ups on self."""
        fs = self.frames
        task_ids, kind_ids, stack_ids = fs._task_ids, fs._kind_ids, fs._stack_ids
        intern_task, intern_kind, intern_stack = fs._intern_task, fs._intern_kind, fs._intern_stack
        task_col, kind_col, stack_col = fs.task_col.append, fs.kind_col.append, fs.stack_col.append
        payloads = fs.payloads
        add_payload = payloads.append
        kid = fs._kid
        eff_off = fs.eff_off
        add_off = eff_off.append
        add_keys, add_old, add_new = fs.eff_keys.extend, fs.eff_old.extend, fs.eff_new.extend
        read_ids = fs.read_ids
        add_reads = read_ids.extend
        add_read_off = fs.read_off.append
        all_violations = fs.violations
        rest_frames = fs.rest_frames
        rest_offsets = fs.rest_offsets
        key_positions = self._key_positions
        key_states = self._key_states
        freeze = gc.freeze
        since_key = 0  # writes since the last keyframe

        def record(task: str, step: Step, stack: tuple[StackEntry, ...], flat_effects: Sequence[Any],
                   reads: Sequence[Hashable], violations: tuple[Violation, ...], world: World,
                   at_rest: int = -1) -> None:
            nonlocal since_key
            i = task_ids.get(task)
            if i is None:
                i = intern_task(task)
            task_col(i)
            if at_rest >= 0:
                rest_frames[i].append(len(payloads))
                if at_rest:
                    rest_offsets[len(payloads)] = at_rest
            kind = step.kind
            i = kind_ids.get(id(kind))
            kind_col(intern_kind(kind) if i is None else i)
            i = stack_ids.get(id(stack))
            stack_col(intern_stack(stack) if i is None else i)
            add_payload(step.payload)
            if reads:
                add_reads(map(kid, reads))
            add_read_off(len(read_ids))
            n = len(payloads)
            if violations:
                all_violations[n - 1] = violations
            if not n % GC_FREEZE_EVERY:
                freeze()
            if not flat_effects:
                add_off(eff_off[-1])
                return
            written = len(flat_effects) // 3
            add_keys(map(kid, flat_effects[0::3]))
            add_old(flat_effects[1::3])
            add_new(flat_effects[2::3])
            add_off(eff_off[-1] + written)
            since_key += written
            if since_key >= KEYFRAME_MIN_WRITES and since_key >= KEYFRAME_STATE_FACTOR * len(world):
                key_positions.append(n)
                key_states.append(world.snapshot())
                since_key = 0

        return record

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

    @property
    def cursor_position(self) -> int:
        """The position the cursor state is at (moved by `state_at`)."""
        return self._cursor_pos

    @property
    def cursor_state(self) -> dict[Hashable, Any]:
        """The state at `cursor_position`. Owned by the timeline: do not mutate it."""
        return self._cursor_state

    def values_at(self, position: int, other: int) -> dict[Hashable, Any]:
        """For every key written between positions `position` and `other`, its value at `position` (MISSING:
        absent): what turns the state at `other` into the state at `position`. Costs those writes only."""
        frames = self.frames
        keys = frames._key_ids.keys
        off = frames.eff_off
        if position < other:
            a, b = off[position], off[other]
            # The value before the first write in [position, other): iterate backwards so the first one wins.
            ids = frames.eff_keys[a:b]
            ids.reverse()
            olds = frames.eff_old[a:b]
            olds.reverse()
            return dict(zip(map(keys.__getitem__, ids), olds, strict=True))
        a, b = off[other], off[position]
        return dict(zip(map(keys.__getitem__, frames.eff_keys[a:b]), frames.eff_new[a:b], strict=True))

    def _move_cursor(self, position: int) -> None:
        """Walk the cursor state to `position`. The writes of frames pos..position are contiguous in the packed
        effect columns, so this is one loop over them, not one per frame."""
        pos = self._cursor_pos
        if pos == position:
            return
        state = self._cursor_state
        frames = self.frames
        keys = frames._key_ids.keys
        off = frames.eff_off
        pop = state.pop
        if pos < position:
            a, b = off[pos], off[position]
            for k, new in zip(map(keys.__getitem__, frames.eff_keys[a:b]), frames.eff_new[a:b], strict=True):
                if new is MISSING:
                    pop(k, None)
                else:
                    state[k] = new
        else:
            a, b = off[position], off[pos]
            keys_back = map(keys.__getitem__, reversed(frames.eff_keys[a:b]))
            for k, old in zip(keys_back, reversed(frames.eff_old[a:b]), strict=True):
                if old is MISSING:
                    pop(k, None)
                else:
                    state[k] = old
        self._cursor_pos = position

    def last_write(self, key: Hashable, before: int) -> int | None:
        """Index of the last frame before position `before` that wrote `key`, or None.

        Backed by an index of writes per key, built on the first query and extended with the frames recorded
        since on each later one, so asking costs nothing while recording and little afterwards."""
        index = self._write_index
        frames = self.frames
        n = len(frames)
        off = frames.eff_off
        eff_keys = frames.eff_keys
        for i in range(self._write_indexed, n):
            for j in range(off[i], off[i + 1]):
                k = eff_keys[j]
                hits = index.get(k)
                if hits is None:
                    index[k] = array("q", (i,))
                elif hits[-1] != i:
                    hits.append(i)
        self._write_indexed = n
        kid = frames.key_id(key)
        hits = index.get(kid) if kid is not None else None
        if not hits:
            return None
        k = bisect.bisect_left(hits, min(before, n)) - 1
        return hits[k] if k >= 0 else None
