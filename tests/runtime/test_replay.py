"""Replaying a task from a quiescent point (runtime/replay.py): it reproduces the recorded steps and effects
over an overlay World that never writes the live one, and a planted difference is reported as a replay
mismatch naming the frame."""

from __future__ import annotations

import enum

import pytest

from tdxdbg.runtime import Runtime, Step, Task, World
from tdxdbg.runtime.replay import OverlayWorld, ReplayMismatch, TaskReplay
from tdxdbg.runtime.scheduler import Policy, ScheduleSpec


class K(enum.Enum):
    READ = "read"
    WRITE = "write"


def adder(world: World, name: str, rounds: int):
    """Adds its round number to a shared total, two steps a round; at rest at each round's head, where the next
    round is read from the World (nothing else crosses it)."""
    while (i := world.get((name, "round"), 0)) < rounds:
        world.quiescent()
        total = world.get(("total",), 0)
        yield Step(K.READ, {"total": total, "round": i})
        world.set(("total",), world.get(("total",), 0) + i)
        world.set((name, "round"), i + 1)
        yield Step(K.WRITE, {"total": world.get(("total",))})


def recorded(rounds: int = 6) -> Runtime:
    world = World()
    rt = Runtime(world, [Task("a", adder(world, "a", rounds)), Task("b", adder(world, "b", rounds))],
                 ScheduleSpec(Policy.RANDOM, 11))
    rt.run()
    return rt


def frames_of(rt: Runtime, task: str) -> list[int]:
    fs = rt.timeline.frames
    return [i for i in range(len(fs)) if fs.task_of(i) == task]


def test_the_recorder_marks_the_frames_a_task_began_at_rest():
    rt = recorded()
    fs = rt.timeline.frames
    for task in ("a", "b"):
        own = frames_of(rt, task)
        # The first frame (its entry never ran) and each round's READ frame (it passed World.quiescent before
        # any write); never a WRITE frame, nor the TASK_DONE frame after the last round's write.
        assert list(fs.rest_frames[fs._task_ids[task]]) == [i for i in own if fs.kind_of(i) is K.READ]


@pytest.mark.parametrize("task", ["a", "b"])
def test_replay_from_each_quiescent_frame_reproduces_the_recorded_steps_and_effects(task):
    rt = recorded()
    fs = rt.timeline.frames
    live = rt.world.snapshot()
    own = frames_of(rt, task)
    for start in fs.rest_frames[fs._task_ids[task]]:
        r = TaskReplay(rt.timeline, task, start, own, lambda w: adder(w, task, 6))
        r.advance_to(own[-1])            # checks every frame's step and writes; raises on a difference
        assert r.finished and r.frame == own[-1]
    assert rt.world.snapshot() == live  # the live World was never written


def test_overlay_world_is_the_state_at_its_position_and_follows_the_cursor():
    rt = recorded()
    tl = rt.timeline
    n = len(tl)
    tl.state_at(n)
    for position in (0, 3, n // 2, n):
        overlay = OverlayWorld(tl, position)
        truth = dict(tl.state_at(position))     # moves the cursor: the overlay pins what it changes
        tl.state_at(n // 3)
        overlay.rebase()
        assert overlay.snapshot() == truth


def test_a_planted_step_difference_is_reported_as_a_replay_mismatch():
    rt = recorded()
    fs = rt.timeline.frames
    own = frames_of(rt, "a")
    k = own[5]
    fs.payloads[k] = {**fs.payloads[k], "total": -1}
    r = TaskReplay(rt.timeline, "a", own[0], own, lambda w: adder(w, "a", 6))
    with pytest.raises(ReplayMismatch, match=f"replay mismatch at frame {k}: a re-executed"):
        r.advance_to(own[-1])


def test_a_planted_effect_difference_is_reported_as_a_replay_mismatch():
    rt = recorded()
    fs = rt.timeline.frames
    own = frames_of(rt, "b")
    k = next(i for i in own if fs.kind_of(i) is K.WRITE and fs.effects_of(i))
    fs.eff_new[fs.eff_off[k]] = 12345
    r = TaskReplay(rt.timeline, "b", own[0], own, lambda w: adder(w, "b", 6))
    with pytest.raises(ReplayMismatch, match=f"replay mismatch at frame {k}: b wrote .*12345"):
        r.advance_to(own[-1])
