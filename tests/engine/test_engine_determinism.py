"""Determinism and time travel: the same setup and schedule give identical frames (round-robin, random:SEED and
an explicit order), and the timeline rebuilds any position's World, backwards and forwards alike."""

from __future__ import annotations

import pytest
from engine_helpers import SHARED, setup

from tdxdbg.engine.vm import build_vm
from tdxdbg.hw import guest
from tdxdbg.runtime import Runtime, StopReason
from tdxdbg.runtime.scheduler import Policy, ScheduleSpec


def _prog(page: int, value: int):
    def prog():
        yield from guest.accept_memory(page, 4096)
        yield from guest.write_value(page, value)
        yield from guest.accept_memory(0x200000, 4096)        # both vCPUs race on this gfn
        yield from guest.map_gpa(page | SHARED, 4096)
        yield from guest.write_value(page | SHARED, value + 1)
        assert (yield from guest.read_value(page | SHARED)) == value + 1
    return prog


def _setup():
    return setup(_prog(0x300000, 10), _prog(0x400000, 20))


def _record(spec: ScheduleSpec):
    built = build_vm(_setup())
    initial = built.machine.world.snapshot()
    rt = Runtime(built.machine.world, built.tasks, spec)
    assert rt.run(max_frames=50_000) is StopReason.DONE
    assert [t.result for t in rt.tasks] == ["halted", "halted"]
    return rt, initial


def _signature(rt: Runtime) -> list[tuple]:
    return [(f.task, f.step.kind, f.step.payload, f.effects) for f in rt.timeline.frames]


@pytest.mark.parametrize("spec", [ScheduleSpec(Policy.ROUND_ROBIN), ScheduleSpec(Policy.RANDOM, seed=7),
                                  ScheduleSpec(Policy.RANDOM, seed=12345)], ids=["round_robin", "random7",
                                                                                 "random12345"])
def test_same_setup_and_schedule_give_identical_frames(spec):
    a, _ = _record(spec)
    b, _ = _record(spec)
    assert len(a.timeline) == len(b.timeline) > 100
    assert _signature(a) == _signature(b)


def test_recorded_picks_replay_as_an_explicit_order():
    a, _ = _record(ScheduleSpec(Policy.RANDOM, seed=3))
    b, _ = _record(ScheduleSpec(Policy.SEQUENTIAL, order=tuple(a.schedule)))
    assert _signature(a) == _signature(b)


def test_different_seeds_interleave_differently():
    a, _ = _record(ScheduleSpec(Policy.RANDOM, seed=1))
    b, _ = _record(ScheduleSpec(Policy.RANDOM, seed=2))
    assert a.schedule != b.schedule


def test_time_travel_reproduces_identical_state():
    rt, initial = _record(ScheduleSpec(Policy.RANDOM, seed=7))
    tl = rt.timeline
    n = len(tl)
    final = rt.world.snapshot()
    assert dict(tl.state_at(n)) == final
    assert dict(tl.state_at(0)) == initial
    assert dict(tl.state_at(n)) == final
    positions = list(range(0, n + 1, max(1, n // 97)))
    forward = {p: dict(tl.state_at(p)) for p in positions}
    backward = {p: dict(tl.state_at(p)) for p in reversed(positions)}
    assert forward == backward
    # Single steps back and forth around the middle agree with the jumps.
    mid = positions[len(positions) // 2]
    for p in (mid + 1, mid, mid - 1, mid):
        if p in forward:
            assert dict(tl.state_at(p)) == forward[p]
    # Each frame's effects take position i to i + 1.
    i = n // 3
    before, after = dict(tl.state_at(i)), dict(tl.state_at(i + 1))
    for key, old, new in tl[i].effects:
        assert before.get(key, old) == old
        if key in after:
            assert after[key] == new
