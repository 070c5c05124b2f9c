"""Runtime: advances tasks one step at a time, records frames and runs checks after each one."""

from __future__ import annotations

import enum
import traceback
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from tdxdbg.runtime.frame import Frame, StackCache, Violation, capture_stack
from tdxdbg.runtime.scheduler import Policy, Scheduler, ScheduleSpec
from tdxdbg.runtime.step import Step, StepKind
from tdxdbg.runtime.task import Task, TaskState
from tdxdbg.runtime.timeline import Timeline
from tdxdbg.runtime.world import World

_READY = TaskState.READY
_WAITING = TaskState.WAITING
_DONE = TaskState.DONE
_FAILED = TaskState.FAILED

# A check sees the World after a frame (read it with `peek`), the frame's step and its writes, flat: key, old,
# new, key, old, new, ... (`world.task` is the task that ran, `world.call_stack()` its call stack). A check may
# declare
# `step_kinds`, the step kinds it looks at: the runtime then skips it on frames that wrote nothing and whose
# kind is not among them. Without that attribute it sees every frame.
Check = Callable[[World, Step, tuple], Iterable[Violation]]


def unique_tasks(tasks: Sequence[Task]) -> list[Task]:
    """The tasks as a list, refusing two with one name (frames name their task)."""
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique: {names}")
    return list(tasks)


def checked_step_kinds(checks: Sequence[Check]) -> frozenset[int] | None:
    """Ids of the step kinds any check looks at (by identity: an enum member hashes in Python); None when some
    check looks at every frame."""
    kinds = [getattr(c, "step_kinds", None) for c in checks]
    return None if any(k is None for k in kinds) else frozenset(id(k) for ks in kinds for k in ks)


class StopReason(enum.Enum):
    DONE = "done"            # every task finished
    STUCK = "stuck"          # tasks remain but none is runnable
    MAX_FRAMES = "max_frames"
    BREAK = "break"          # the caller's stop predicate matched


class Runtime:
    """Owns the World, the tasks, the scheduler and the timeline.

    Same world, tasks and schedule give the same frames: nothing here reads a clock or unseeded randomness.
    """

    def __init__(self, world: World, tasks: Sequence[Task], schedule: ScheduleSpec | None = None,
                 checks: Sequence[Check] = ()) -> None:
        self.tasks = unique_tasks(tasks)
        self.world = world
        self.scheduler = Scheduler(schedule or ScheduleSpec())
        self.checks = list(checks)
        self._check_kinds = checked_step_kinds(self.checks)
        self.timeline = Timeline(world.snapshot())
        self._record = self.timeline.recorder()
        self._stack_cache: dict[str, StackCache] = {t.name: StackCache() for t in self.tasks}
        world.take_effects()

    # -- queries -----------------------------------------------------------------------------------------
    def task(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)

    def runnable(self) -> list[int]:
        world = self.world
        out = []
        for i, t in enumerate(self.tasks):
            state = t.state
            if state is TaskState.READY or (state is TaskState.WAITING and t.wait is not None and t.wait(world)):
                out.append(i)
        return out

    @property
    def finished(self) -> bool:
        return all(t.finished for t in self.tasks)

    # -- execution ---------------------------------------------------------------------------------------
    def step(self, forced: str | None = None) -> Frame | None:
        """Run one step of the scheduled (or forced) task; None when nothing can run."""
        index = self._advance(forced)
        return None if index is None else self.timeline.frames[index]

    def _advance(self, forced: str | None = None) -> int | None:
        """One step; returns the new frame's index (the Frame value is built only when asked for)."""
        world = self.world
        tasks = self.tasks
        runnable = []
        for i, t in enumerate(tasks):
            state = t.state
            if state is _READY or (state is _WAITING and t.wait is not None and t.wait(world)):
                runnable.append(i)
        if not runnable:
            return None
        frames = self.timeline.frames
        index = len(frames)
        if len(runnable) == 1 and forced is None and index >= len(self.scheduler.spec.order) \
                and self.scheduler.spec.policy is not Policy.RANDOM:
            choice = runnable[0]
            self.scheduler._last = choice
        else:
            choice = self.scheduler.pick(tasks, runnable, index, forced)
        task = tasks[choice]
        world.task = task.name
        reads = world._reads
        writes = world._writes
        reads.clear()  # reads made by wait predicates belong to no frame
        task.wait = None
        task.state = _READY
        gen = task.gen
        # A task is at rest when its step starts before it ran at all, or passes a quiescent point (World.quiescent)
        # before writing: its entry, started on the state before this frame, then replays this frame.
        first = not task.started
        task.started = True
        world.at_rest = -1
        try:
            step = gen.send(None)
        except StopIteration as stop:
            task.state = TaskState.DONE
            task.result = stop.value
            step = Step(StepKind.TASK_DONE, {"result": stop.value})
        except Exception as exc:  # an engine bug becomes a red frame, never a traceback
            task.state = TaskState.FAILED
            task.error = f"{type(exc).__name__}: {exc}"
            step = Step(StepKind.TASK_ERROR, {"error": task.error,
                                              "traceback": "".join(traceback.format_exception(exc))})
        else:
            if step.wait is not None:
                task.wait = step.wait
                task.state = _WAITING
        # The frame's effects (flat) and footprint: inlined World.take_effects, this is the hottest path. The
        # timeline packs both into its columns.
        flat = tuple(writes) if writes else ()
        n = len(reads)
        if not n:
            footprint: Any = ()
        elif n == 1:
            footprint = (reads[0],)
        else:
            footprint = dict.fromkeys(reads)  # distinct keys, in first-read order
        writes.clear()
        reads.clear()
        state = task.state
        if state is _DONE or state is _FAILED:
            stack: tuple = ()
        else:
            stack = capture_stack(gen, self._stack_cache[task.name])
        violations: tuple[Violation, ...] = ()
        checks = self.checks
        if checks and (flat or self._check_kinds is None or id(step.kind) in self._check_kinds):
            world.stack = stack  # checks may ask who issued the step (e.g. KVM or a raw host SEAMCALL)
            found: list[Violation] = []
            for check in checks:
                v = check(world, step, flat)
                if v:
                    found.extend(v)
            if found:
                violations = tuple(found)
            # Checks read through `peek`; drop anything they recorded anyway.
            writes.clear()
            reads.clear()
        self._record(task.name, step, stack, flat, footprint, violations, world, 0 if first else world.at_rest)
        return index

    def run(self, max_frames: int | None = None,
            stop: Callable[[Frame], bool] | None = None) -> StopReason:
        """Step until every task is done, nothing can run, `max_frames` more frames ran, or `stop` matches."""
        count = 0
        frames = self.timeline.frames
        while True:
            if max_frames is not None and count >= max_frames:
                return StopReason.MAX_FRAMES
            index = self._advance()
            if index is None:
                return StopReason.DONE if self.finished else StopReason.STUCK
            count += 1
            if stop is not None and stop(frames[index]):
                return StopReason.BREAK

    @property
    def schedule(self) -> list[str]:
        """The picks so far: replaying them as an `order` reproduces these frames."""
        frames = self.timeline.frames
        return [frames.task_of(i) for i in range(len(frames))]


def replay(build: Callable[[], tuple[World, Sequence[Task]]], schedule: ScheduleSpec,
           picks: Sequence[str], then: str | None = None, **kwargs: Any) -> Runtime:
    """Rebuild from scratch, replay `picks`, then optionally force `then`: a fork of the timeline."""
    world, tasks = build()
    rt = Runtime(world, tasks, schedule, **kwargs)
    for name in picks:
        if rt.step(forced=name) is None:
            raise ValueError(f"cannot replay pick {name!r}: nothing runnable")
    if then is not None:
        rt.step(forced=then)
    return rt
