"""Timeline: every recorded frame plus keyframes, so any frame's state is rebuilt without re-executing.

Position p means "the initial state with the effects of frames[0:p] applied"; the state after frame i is
position i + 1. A keyframe (a full copy of the state) is taken whenever the writes since the last one reach
the size of the state, so keyframes never cost more memory than the effects they summarise, and rebuilding
any position applies at most about one state's worth of effects.
"""

from __future__ import annotations

import bisect
import gc
from collections.abc import Hashable, Iterator
from typing import Any

from tdxdbg.runtime.frame import Frame
from tdxdbg.runtime.world import World, apply_effects, undo_effects

# Do not copy tiny states on every frame: a keyframe is due only after this many writes at least.
KEYFRAME_MIN_WRITES = 4096
# Recorded frames live as long as the timeline and hold no reference cycles, yet the cyclic garbage collector
# would walk all of them again and again as the timeline grows (it halves recording speed at 100,000 frames).
# Every this many frames the objects alive so far are moved out of the collector's reach (`gc.freeze`); plain
# reference counting still frees whatever is later dropped.
GC_FREEZE_EVERY = 16384
# A young generation this large keeps the collector from running every 700 allocations while recording.
GC_THRESHOLDS = (50_000, 20, 100)


class Timeline:
    """Frames in order, keyframes, and a cursor state for cheap neighbouring positions."""

    def __init__(self, initial: dict[Hashable, Any]) -> None:
        if gc.get_threshold()[0] < GC_THRESHOLDS[0]:
            gc.set_threshold(*GC_THRESHOLDS)
        self.frames: list[Frame] = []
        self._key_positions: list[int] = [0]
        self._key_states: list[dict[Hashable, Any]] = [dict(initial)]
        self._writes_since_key = 0
        # Cumulative write counts: _cum[p] = number of writes in frames[0:p].
        self._cum: list[int] = [0]
        self._cursor_pos = 0
        self._cursor_state: dict[Hashable, Any] = dict(initial)

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int) -> Frame:
        return self.frames[index]

    def __iter__(self) -> Iterator[Frame]:
        return iter(self.frames)

    def append(self, frame: Frame, world: World) -> None:
        frames = self.frames
        frames.append(frame)
        if not len(frames) % GC_FREEZE_EVERY:
            gc.freeze()
        n = len(frame.effects)
        cum = self._cum
        cum.append(cum[-1] + n)
        self._writes_since_key += n
        if self._writes_since_key >= KEYFRAME_MIN_WRITES and self._writes_since_key >= len(world):
            self._key_positions.append(len(self.frames))
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
        frames = self.frames
        pos = self._cursor_pos
        while pos < position:
            apply_effects(state, frames[pos].effects)
            pos += 1
        while pos > position:
            pos -= 1
            undo_effects(state, frames[pos].effects)
        self._cursor_pos = pos

    def last_write(self, key: Hashable, before: int) -> int | None:
        """Index of the last frame before position `before` that wrote `key`, or None."""
        for i in range(min(before, len(self.frames)) - 1, -1, -1):
            if self.frames[i].wrote(key):
                return i
        return None
