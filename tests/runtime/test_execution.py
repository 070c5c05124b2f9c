"""Execution (tdxdbg/runtime/execution.py), the unrecorded run an interleaving explorer repeats: under the same
schedule it takes the same steps as a recorded Runtime, with the same keys read and written and the same
violations, on every shipped scenario."""

from __future__ import annotations

from pathlib import Path

import pytest

from tdxdbg.engine.checks import make_checks
from tdxdbg.engine.vm import build_vm
from tdxdbg.runtime import Runtime, Step, StepKind, Task, World
from tdxdbg.runtime.execution import Execution
from tdxdbg.runtime.runtime import StopReason
from tdxdbg.scenario.builder import build_setup
from tdxdbg.scenario.loader import load, shipped
from tdxdbg.scenario.run import schedule_of


def _distinct_keys(flat: tuple) -> tuple:
    return tuple(dict.fromkeys(flat[0::3]))


@pytest.mark.parametrize("path", shipped(), ids=lambda p: p.stem)
def test_an_execution_takes_the_recorded_steps(path: Path) -> None:
    scenario = load(path)
    setup = build_setup(scenario, path.parent)
    for schedule in (None, "random:3"):
        spec = schedule_of(scenario, schedule)
        built = build_vm(setup)
        rt = Runtime(built.machine.world, built.tasks, spec, checks=make_checks(built.kvm))
        stop = rt.run(max_frames=200_000)
        frames = rt.timeline.frames
        built = build_vm(setup)
        ex = Execution(built.machine.world, built.tasks, spec, checks=make_checks(built.kvm))
        assert ex.run(max_steps=200_000) is stop
        assert [ex.task_of(i) for i in range(len(ex))] == [frames.task_of(i) for i in range(len(frames))]
        assert ex.reads == [frames.reads_of(i) for i in range(len(frames))]
        assert ex.writes == [_distinct_keys(frames.flat_effects_of(i)) for i in range(len(frames))]
        assert ex.violations == frames.violations


def test_an_execution_stops_at_max_steps_and_reports_stuck_tasks() -> None:
    def waiter(world: World):
        yield Step(StepKind.WAIT, wait=lambda w: w.peek(("go",)) is not None)

    def counter(world: World):
        for i in range(5):
            world.set(("n",), i)
            yield Step(StepKind.WAIT)

    world = World()
    ex = Execution(world, [Task("w", waiter(world)), Task("c", counter(world))])
    assert ex.run(max_steps=3) is StopReason.MAX_FRAMES and len(ex) == 3
    assert ex.run() is StopReason.STUCK
    assert [ex.task_of(i) for i in range(len(ex))] == ["w", "c", "c", "c", "c", "c", "c"]
    assert ex.writes[1:] == [(("n",),)] * 5 + [()]   # five writes, then the TASK_DONE step


def test_an_execution_reads_a_call_stack_only_when_a_check_asks() -> None:
    """Checks get `world.call_stack()`: under an Execution it is read on demand, once per step, and is the
    stack a Runtime records for that step."""
    def inner(world: World):
        world.set(("x",), 1)
        yield Step(StepKind.WAIT)

    def outer(world: World):
        yield from inner(world)
        world.set(("x",), 2)
        yield Step(StepKind.WAIT)

    asked = []

    def check(world: World, step: Step, effects: tuple) -> tuple:
        if effects and effects[2] == 1:
            asked.append(tuple(e.function for e in world.call_stack()))
            asked.append(world.call_stack() is world.call_stack())
        return ()

    world = World()
    ex = Execution(world, [Task("t", outer(world))], checks=[check])
    ex.run()
    assert asked == [("test_an_execution_reads_a_call_stack_only_when_a_check_asks.<locals>.outer",
                      "test_an_execution_reads_a_call_stack_only_when_a_check_asks.<locals>.inner"), True]


@pytest.mark.parametrize("name", ["demo", "three_vcpus_neighbours", "raw_seamcall_playground"])
def test_an_executions_stacks_are_the_recorded_stacks(name: str) -> None:
    """An Execution's on-demand stack is the stack a Runtime records at every frame (a SEAMCALL's issuer decides
    unexpected-tdx-status)."""
    path = next(p for p in shipped() if p.stem == name)
    scenario = load(path)
    setup = build_setup(scenario, path.parent)
    spec = schedule_of(scenario, "random:3")
    built = build_vm(setup)
    rt = Runtime(built.machine.world, built.tasks, spec)
    rt.run(max_frames=200_000)
    frames = rt.timeline.frames
    stacks = [[frames.stack_of(i) for i in range(len(frames))]]
    assert max(map(len, stacks[0])) >= 3
    built = build_vm(setup)
    seen: dict[int, tuple] = {}

    def every_stack(world: World, step: Step, effects: tuple) -> tuple:
        seen[len(seen)] = world.call_stack()
        return ()

    ex = Execution(built.machine.world, built.tasks, spec, checks=[every_stack])
    ex.run(max_steps=200_000)
    assert [seen[i] for i in range(len(ex))] == stacks[0]
