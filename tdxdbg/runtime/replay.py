"""Locals rebuilt by replay, not recorded.

A task's locals at frame N are read from its generator chain as it is after frame N. The timeline does not keep
them: every piece of state a task carries across a quiescent point is in the World (World.quiescent), so the
task's entry generator, started on the World as it was at the task's last frame Q <= N that began at rest,
re-executes frames Q..N of that task exactly as recorded, provided it sees the other tasks' recorded effects
at their frames. This is rr's idea at the granularity of one task. Every re-executed frame is checked against
the record (step and effects); a difference is a bug in the engine's determinism or in a quiescent point, and
is raised as ReplayMismatch, never shown as data.

The World the replay runs on is an overlay over the timeline's cursor state: only the keys whose value differs
from the cursor's are held, so creating a replay costs the writes between Q and the cursor, not a copy of the
World, and the live World is never written.
"""

from __future__ import annotations

import bisect
import traceback
from collections.abc import Callable, Generator, Hashable, Iterator, Sequence
from types import GeneratorType
from typing import Any

from tdxdbg.runtime.step import Step, StepKind
from tdxdbg.runtime.timeline import Timeline
from tdxdbg.runtime.world import MISSING, World

# Makes the generator a task runs from its entry, over the given World.
TaskFactory = Callable[[World], Generator[Step, None, Any]]

_ABSENT: Any = object()


class ReplayMismatch(Exception):
    """A re-executed frame did not produce the recorded step or effects."""


class OverlayWorld(World):
    """The World at some position of a timeline, held as the keys whose value differs from the timeline's
    cursor state (MISSING: absent there). It follows the cursor: `rebase` pins, before the overlay is used
    again, the keys the cursor's move changed."""

    __slots__ = ("_base", "_own", "_timeline")

    def __init__(self, timeline: Timeline, position: int) -> None:
        super().__init__()
        self._timeline = timeline
        self._base = timeline.cursor_position
        self._own: dict[Hashable, Any] = timeline.values_at(position, self._base)

    def rebase(self) -> None:
        """Keep this overlay's state when the timeline's cursor has moved since it was last used."""
        tl = self._timeline
        now = tl.cursor_position
        if now == self._base:
            return
        own = self._own
        for k, v in tl.values_at(self._base, now).items():
            if k not in own:
                own[k] = v
        self._base = now

    def _value(self, key: Hashable, default: Any) -> Any:
        v = self._own.get(key, _ABSENT)
        if v is _ABSENT:
            return self._timeline.cursor_state.get(key, default)
        return default if v is MISSING else v

    def get(self, key: Hashable, default: Any = None) -> Any:
        self._reads.append(key)
        return self._value(key, default)

    def peek(self, key: Hashable, default: Any = None) -> Any:
        return self._value(key, default)

    def __contains__(self, key: Hashable) -> bool:
        return self._value(key, MISSING) is not MISSING

    def set(self, key: Hashable, value: Any) -> None:
        old = self._value(key, MISSING)
        if old is value or (old.__class__ is value.__class__ and old == value):
            return
        self._writes.extend((key, old, value))
        self._own[key] = value

    def delete(self, key: Hashable) -> None:
        if key in self:
            self.set(key, MISSING)

    def apply(self, keys: Sequence[Hashable], news: Sequence[Any]) -> None:
        """Other tasks' recorded writes, in order."""
        own = self._own
        for k, v in zip(keys, news, strict=True):
            own[k] = v

    def items(self) -> Iterator[tuple[Hashable, Any]]:
        own = self._own
        for k, v in self._timeline.cursor_state.items():
            if k not in own:
                yield k, v
        for k, v in own.items():
            if v is not MISSING:
                yield k, v

    def keys(self) -> Iterator[Hashable]:
        return (k for k, _v in self.items())

    def snapshot(self) -> dict[Hashable, Any]:
        return dict(self.items())

    def __len__(self) -> int:
        return sum(1 for _ in self.items())


def chain_locals(gen: Any) -> list[dict[str, Any]]:
    """The live local variables of each activation of a suspended generator chain, outermost first."""
    out = []
    g = gen
    while type(g) is GeneratorType:
        f = g.gi_frame
        if f is None:
            break
        out.append(f.f_locals)
        g = g.gi_yieldfrom
    return out


class TaskReplay:
    """Task `task` re-executed from its frame `start` (one where it passed a quiescent point) over an overlay
    World.
    `frame` is the task's last re-executed frame (None before the first)."""

    def __init__(self, timeline: Timeline, task: str, start: int, task_frames: Sequence[int],
                 factory: TaskFactory) -> None:
        self.timeline = timeline
        self.task = task
        self.start = start
        self._task_frames = task_frames
        self.world = OverlayWorld(timeline, start)
        self.world.task = task
        # The writes of frame `start` made before its quiescent point: the entry starts after them.
        skip = timeline.frames.rest_offsets.get(start, 0)
        if skip:
            flat = timeline.frames.flat_effects_of(start)
            self.world.apply(flat[0:skip:3], flat[2:skip:3])
        self._skip = skip
        self.gen = factory(self.world)
        self.position = start      # the overlay holds the state at this position (plus those writes)
        self.frame: int | None = None
        self.finished = False

    def advance_to(self, index: int) -> None:
        """Re-execute the task's frames up to frame `index` (one of its own), applying the other tasks' effects
        in between; raises ReplayMismatch where a frame differs from the record."""
        if self.frame is not None and index < self.frame:
            raise ValueError(f"replay of {self.task} is past frame {index}")
        world = self.world
        world.rebase()
        frames = self.timeline.frames
        keys = frames._key_ids.keys
        off = frames.eff_off
        eff_keys, eff_new = frames.eff_keys, frames.eff_new
        tf = self._task_frames
        k = bisect.bisect_left(tf, self.position)
        while k < len(tf) and tf[k] <= index:
            f = tf[k]
            k += 1
            a, b = off[self.position], off[f]
            if a != b:
                world.apply([keys[i] for i in eff_keys[a:b]], eff_new[a:b])
            self._step(f)
            self.position = f + 1
            self.frame = f

    def _step(self, index: int) -> None:
        if self.finished:
            raise ReplayMismatch(f"replay mismatch at frame {index}: {self.task} had already finished")
        world = self.world
        world._writes.clear()
        world._reads.clear()
        try:
            step = self.gen.send(None)
            payload: Any = step.payload
        except StopIteration as stop:
            self.finished = True
            step = Step(StepKind.TASK_DONE)
            payload = {"result": stop.value}
        except Exception as exc:
            self.finished = True
            step = Step(StepKind.TASK_ERROR)
            payload = {"error": f"{type(exc).__name__}: {exc}", "exception": "".join(traceback.format_exception(exc))}
        frames = self.timeline.frames
        kind = frames.kind_of(index)
        recorded = frames.payloads[index]
        if step.kind is StepKind.TASK_ERROR and kind is StepKind.TASK_ERROR:
            same = payload["error"] == recorded.get("error")
        else:
            same = step.kind is kind and payload == recorded
        if not same:
            raise ReplayMismatch(f"replay mismatch at frame {index}: {self.task} re-executed "
                                 f"{_describe(step.kind, payload)}, recorded {_describe(kind, recorded)}")
        writes = tuple(world._writes)
        recorded_writes = frames.flat_effects_of(index)
        if self._skip:
            recorded_writes = recorded_writes[self._skip:]
            self._skip = 0
        if writes != recorded_writes:
            raise ReplayMismatch(f"replay mismatch at frame {index}: {self.task} wrote {_describe_writes(writes)}, "
                                 f"recorded {_describe_writes(recorded_writes)}")
        world._writes.clear()
        world._reads.clear()

    def locals(self) -> list[dict[str, Any]]:
        """The task's live locals per activation (outermost first) after frame `frame`: read them, then drop
        them (the next advance changes them)."""
        return [] if self.finished else chain_locals(self.gen)


def _describe(kind: Any, payload: Any) -> str:
    return f"{getattr(kind, 'name', kind)} {payload!r}"[:300]


def _describe_writes(flat: Sequence[Any]) -> str:
    parts = [f"{flat[i]!r}: {flat[i + 1]!r} -> {flat[i + 2]!r}" for i in range(0, len(flat), 3)]
    return ("{" + ", ".join(parts) + "}")[:400]
