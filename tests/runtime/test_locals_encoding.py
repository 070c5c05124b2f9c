"""Recorded stacks and locals decode to exactly what the generator chain held at each frame.

`frame.capture` reuses the unchanged outer part of a task's call stack and stores a frame's locals as a delta
of the task's previous frame (kept scopes, then the scopes that ran, a full entry every LOCALS_FULL_EVERY
captures). These tests take a plain copy of every activation's function, line and bound locals at each frame,
beside the real capture, and compare it with the recorded stack and `decode_locals` of the recorded entry.
"""

from __future__ import annotations

import enum
from typing import Any

import pytest

import tdxdbg.runtime.runtime as runtime_mod
from tdxdbg.engine.gmem import Memslot
from tdxdbg.engine.vm import VmSetup, build_vm
from tdxdbg.hw import guest
from tdxdbg.runtime import Runtime, Step, Task, World
from tdxdbg.runtime.frame import LOCALS_FULL_EVERY, Scope
from tdxdbg.runtime.scheduler import Policy, ScheduleSpec


class K(enum.Enum):
    MARK = "mark"


def _plain_copy(gen: Any) -> list[tuple[str, int, dict[str, Any]]]:
    """Every activation's function, line and bound locals but a method's self, outermost first, read straight
    from the frames."""
    out = []
    g = gen
    while g is not None and g.gi_frame is not None:
        f = g.gi_frame
        loc = dict(f.f_locals)
        if next(iter(loc), None) == "self":
            del loc["self"]  # a method's self is not recorded (never shown)
        out.append((f.f_code.co_qualname, f.f_lineno, loc))
        sub = g.gi_yieldfrom
        g = sub if hasattr(sub, "gi_frame") else None
    return out


@pytest.fixture
def expected(monkeypatch: pytest.MonkeyPatch) -> list[list[tuple[str, int, dict[str, Any]]]]:
    seen: list[list[tuple[str, int, dict[str, Any]]]] = []
    real = runtime_mod.capture

    def spy(gen: Any, cache: Any, want_locals: bool = True) -> Any:
        seen.append(_plain_copy(gen))
        return real(gen, cache, want_locals)

    monkeypatch.setattr(runtime_mod, "capture", spy)
    return seen


def _assert_same(rt: Runtime, expected: list[list[tuple[str, int, dict[str, Any]]]]) -> None:
    frames = rt.timeline.frames
    live = [i for i in range(len(frames)) if frames.stack_of(i)]
    assert len(live) == len(expected)
    for i, want in zip(live, expected, strict=True):
        assert [(e.function, e.line) for e in frames.stack_of(i)] == [(fn, line) for fn, line, _ in want], i
        got = frames.locals_of(i)
        assert len(got) == len(want), i
        for depth, (scope, (_fn, _line, plain)) in enumerate(zip(got, want, strict=True)):
            assert isinstance(scope, Scope)
            items = dict(scope.items())
            assert items.keys() == plain.keys(), (i, depth)
            assert all(items[name] is value for name, value in plain.items()), (i, depth)


def leaf(world: World, n: int):
    total = 0
    for i in range(n):
        late = i * 2          # bound only from the first iteration on
        total += late
        yield Step(K.MARK, {"i": i})
    return total


def middle(world: World, rounds: int):
    acc = 0
    for r in range(rounds):
        acc += yield from leaf(world, r % 4)  # a new activation of the same function at the same depth
        yield Step(K.MARK, {"acc": acc})
    return acc


def top(world: World, rounds: int):
    first = yield from middle(world, rounds)
    second = yield from middle(world, rounds // 2)
    return first + second


def test_decoded_locals_equal_the_chain_at_every_frame(expected: list) -> None:
    """New activations, reused ones with changed and newly bound locals, a new activation of a function at the
    depth where another just returned, two tasks interleaved, and more than
    LOCALS_FULL_EVERY frames per task: every frame decodes to the bound locals the frames held."""
    world = World()
    tasks = [Task("a", top(world, 40)), Task("b", top(world, 25))]
    rt = Runtime(world, tasks, ScheduleSpec(Policy.RANDOM, seed=3))
    rt.run()
    assert len(rt.timeline) > 2 * LOCALS_FULL_EVERY
    _assert_same(rt, expected)


def test_engine_fault_locals_decode_exactly(expected: list) -> None:
    """The same over real engine stacks (kvm_mmu_page_fault down to the TDX module), two vCPUs interleaved."""
    def program(first: int):
        def run():
            for i in range(12):
                yield from guest.accept_memory((first + i) << 12, 0x1000)
        return run

    setup = VmSetup(memslots=(Memslot(0, 0, 1024, guest_memfd=True),), private_ranges=((0, 1024),),
                    vcpu_programs=(program(16), program(64)))
    built = build_vm(setup)
    rt = Runtime(built.machine.world, built.tasks, ScheduleSpec(Policy.ROUND_ROBIN))
    rt.run()
    assert all(t.error is None for t in built.tasks)
    _assert_same(rt, expected)
