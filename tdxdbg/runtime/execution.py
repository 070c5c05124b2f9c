"""Execution: one complete run of the tasks without a timeline, the unit an interleaving explorer repeats.

Per step it keeps what an explorer needs and nothing more: which task ran, the distinct World keys the step
read and the distinct keys it wrote (in first-touch order), and the violations the checks reported. The checks
run after every step exactly as under `Runtime` (same pre-filter, same `world.task` and `world.call_stack()`), so
a run here reports what the same schedule reports when recorded. No frames, payloads, effect values or
keyframes are kept; a call stack is read only when a check asks for it (who issued a SEAMCALL).
"""

from __future__ import annotations

import functools
import traceback
from array import array
from collections.abc import Hashable, Sequence
from typing import Any

from tdxdbg.runtime.frame import StackCache, Violation, capture_stack
from tdxdbg.runtime.runtime import Check, StopReason, checked_step_kinds, unique_tasks
from tdxdbg.runtime.scheduler import Policy, Scheduler, ScheduleSpec
from tdxdbg.runtime.step import Step, StepKind
from tdxdbg.runtime.task import Task, TaskState
from tdxdbg.runtime.world import World

_READY = TaskState.READY
_WAITING = TaskState.WAITING
_DONE = TaskState.DONE
_FAILED = TaskState.FAILED


class Execution:
    """Runs `tasks` over `world` under `schedule` to the end, keeping per step: `task_of(i)`, `reads[i]`,
    `writes[i]`, and `violations` (step index -> violations). Same world, tasks and schedule give the same steps
    as a `Runtime` would record."""

    def __init__(self, world: World, tasks: Sequence[Task], schedule: ScheduleSpec | None = None,
                 checks: Sequence[Check] = ()) -> None:
        self.tasks = unique_tasks(tasks)
        self.world = world
        self.scheduler = Scheduler(schedule or ScheduleSpec())
        self.checks = list(checks)
        self._check_kinds = checked_step_kinds(self.checks)
        # Per task: reads its current call stack (capture keeps its cache valid however many steps ran between
        # two reads: an activation still suspended in the same sub-generator has not run since).
        self._stack_of = [functools.partial(capture_stack, t.gen, StackCache()) for t in self.tasks]
        # Per step: index into `tasks` of the task that ran, distinct keys read, distinct keys written.
        self.task_col = array("H")
        self.reads: list[tuple[Hashable, ...]] = []
        self.writes: list[tuple[Hashable, ...]] = []
        self.violations: dict[int, tuple[Violation, ...]] = {}
        world._writes.clear()
        world._reads.clear()

    def __len__(self) -> int:
        return len(self.task_col)

    def task_of(self, i: int) -> str:
        return self.tasks[self.task_col[i]].name

    @property
    def finished(self) -> bool:
        return all(t.finished for t in self.tasks)

    def run(self, max_steps: int | None = None) -> StopReason:
        """Step until every task is done, nothing can run, or `max_steps` more steps ran."""
        world = self.world
        tasks = self.tasks
        n_tasks = len(tasks)
        scheduler = self.scheduler
        pick = scheduler.pick
        order_len = len(scheduler.spec.order)
        randbelow = scheduler._rng._randbelow if scheduler.spec.policy is Policy.RANDOM else None
        reads = world._reads
        writes = world._writes
        checks = self.checks
        check_kinds = self._check_kinds
        stack_of = self._stack_of
        task_col = self.task_col
        add_task = task_col.append
        add_reads = self.reads.append
        add_writes = self.writes.append
        all_violations = self.violations
        fromkeys = dict.fromkeys
        count = 0
        while True:
            if max_steps is not None and count >= max_steps:
                return StopReason.MAX_FRAMES
            runnable = []
            for i in range(n_tasks):
                t = tasks[i]
                state = t.state
                if state is _READY or (state is _WAITING and t.wait is not None and t.wait(world)):
                    runnable.append(i)
            if not runnable:
                return StopReason.DONE if self.finished else StopReason.STUCK
            index = len(task_col)
            if index < order_len:
                choice = pick(tasks, runnable, index)
            elif randbelow is not None:
                # Scheduler.pick's RANDOM draw (Random.randrange(n) is _randbelow(n) for n > 0): same stream.
                choice = runnable[randbelow(len(runnable))]
                scheduler._last = choice
            elif len(runnable) == 1:
                choice = runnable[0]
                scheduler._last = choice
            else:
                choice = pick(tasks, runnable, index)
            task = tasks[choice]
            world.task = task.name
            reads.clear()  # reads made by wait predicates belong to no step
            task.wait = None
            task.state = _READY
            task.started = True
            gen = task.gen
            try:
                step = gen.send(None)
            except StopIteration as stop:
                task.state = _DONE
                task.result = stop.value
                step = Step(StepKind.TASK_DONE, {"result": stop.value})
            except Exception as exc:  # an engine bug ends the task, as under Runtime
                task.state = _FAILED
                task.error = f"{type(exc).__name__}: {exc}"
                step = Step(StepKind.TASK_ERROR, {"error": task.error,
                                                  "traceback": "".join(traceback.format_exception(exc))})
            else:
                if step.wait is not None:
                    task.wait = step.wait
                    task.state = _WAITING
            add_task(choice)
            add_reads(tuple(fromkeys(reads)) if reads else ())
            if writes:
                flat: tuple[Any, ...] = tuple(writes)
                add_writes(tuple(fromkeys(flat[0::3])))
            else:
                flat = ()
                add_writes(())
            writes.clear()
            reads.clear()
            if checks and (flat or check_kinds is None or id(step.kind) in check_kinds):
                state = task.state
                if state is _DONE or state is _FAILED:
                    world.stack = ()
                else:
                    world.stack = None
                    world.stack_source = stack_of[choice]
                found: list[Violation] = []
                for check in checks:
                    v = check(world, step, flat)
                    if v:
                        found.extend(v)
                if found:
                    all_violations[index] = tuple(found)
                writes.clear()
                reads.clear()
            count += 1
