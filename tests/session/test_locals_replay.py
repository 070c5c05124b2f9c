"""Locals are rebuilt by replay (runtime/replay.py, Session.task_locals), not recorded, and are the values at the
frame shown: for every frame of every shipped scenario under three schedules, and for random frames of a long
4-vCPU run, the rebuilt locals equal a structural copy of the live generator chain's locals taken at that frame
during a run made for the test (attributes of objects included). A planted difference is reported as a replay
mismatch, never shown as data."""

from __future__ import annotations

import enum
import random
from pathlib import Path
from types import BuiltinFunctionType, FunctionType, GeneratorType, MethodType
from typing import Any

import attrs
import pytest

from tdxdbg.engine.gmem import Memslot
from tdxdbg.engine.kvm import KvmBase
from tdxdbg.engine.vcpu import KvmVcpu
from tdxdbg.engine.vm import VmSetup, build_vm
from tdxdbg.hw import guest
from tdxdbg.hw.cpu import TdVcpu
from tdxdbg.hw.machine import Machine
from tdxdbg.hw.memory import HostMemory
from tdxdbg.hw.tdx.module import TdxModule
from tdxdbg.runtime import Runtime, World
from tdxdbg.runtime.replay import chain_locals
from tdxdbg.runtime.scheduler import Policy, ScheduleSpec
from tdxdbg.scenario.builder import build_setup
from tdxdbg.scenario.loader import load, shipped
from tdxdbg.session import Session

# Objects that hold configuration only (their state is in the World): the same in a replay's copy of the VM.
CONFIG_TYPES = (World, KvmBase, KvmVcpu, TdVcpu, Machine, HostMemory, TdxModule)
SCHEDULES = {"sequential": ScheduleSpec(Policy.SEQUENTIAL), "round_robin": ScheduleSpec(Policy.ROUND_ROBIN),
             "random": ScheduleSpec(Policy.RANDOM, 7)}


PLAIN, CONFIG, CALLABLE, SEQUENCE, MAPPING, OBJECT = range(6)
_KINDS: dict[type, int] = {}


def _frozen(t: type) -> bool:
    return attrs.has(t) and getattr(t.__setattr__, "__name__", "") == "_frozen_setattrs"


def _kind(t: type) -> int:
    kind = _KINDS.get(t)
    if kind is None:
        if t in (int, str, bool, float, bytes, type(None)) or issubclass(t, enum.Enum) or _frozen(t):
            kind = PLAIN              # immutable: equal now and later
        elif issubclass(t, CONFIG_TYPES):
            kind = CONFIG
        elif issubclass(t, GeneratorType | FunctionType | MethodType | BuiltinFunctionType | type):
            kind = CALLABLE
        elif issubclass(t, tuple | list):
            kind = SEQUENCE
        elif issubclass(t, dict):
            kind = MAPPING
        else:
            kind = OBJECT
        _KINDS[t] = kind
    return kind


def structure(value: Any, seen: frozenset[int] = frozenset()) -> Any:
    """A structural copy of `value` as it is now: immutable values as they are, containers and objects (their
    attributes, recursively) as nested tuples of plain data."""
    t = type(value)
    kind = _KINDS.get(t)
    if kind is None:
        kind = _kind(t)
    if kind == PLAIN:
        return value
    if kind == CONFIG:
        return f"<{'World' if isinstance(value, World) else t.__name__}>"
    if kind == CALLABLE:
        return f"<{t.__name__}>"
    if id(value) in seen:
        return "<cycle>"
    seen = seen | {id(value)}
    if kind == SEQUENCE:
        return (t.__name__, tuple([structure(v, seen) for v in value]))
    if kind == MAPPING:
        return (t.__name__, tuple([(structure(k, seen), structure(v, seen)) for k, v in value.items()]))
    fields: dict[str, Any] = dict(getattr(value, "__dict__", {}))
    for klass in t.__mro__:
        for name in getattr(klass, "__slots__", ()):
            if hasattr(value, name):
                fields[name] = getattr(value, name)
    kinds = _KINDS
    return (t.__name__, tuple([(k, v if kinds.get(type(v)) == PLAIN else structure(v, seen))
                               for k, v in sorted(fields.items())]))


def structure_scope(scope: dict[str, Any]) -> Any:
    return tuple([(name, structure(v)) for name, v in scope.items()])


def recorded_run(setup: VmSetup, schedule: ScheduleSpec, keep: set[int] | None = None,
                 max_frames: int = 50_000) -> dict[int, tuple[str, Any]]:
    """Run the setup for the test and keep, after each frame (or those in `keep`), the stepping task's locals
    as a structural copy of its live generator chain."""
    built = build_vm(setup)
    rt = Runtime(built.machine.world, built.tasks, schedule)
    tasks = {t.name: t for t in built.tasks}
    out = {}
    i = 0
    while i < max_frames:
        frame = rt.step()
        if frame is None:
            break
        if keep is None or i in keep:
            t = tasks[frame.task]
            out[i] = (frame.task, tuple(structure_scope(s) for s in chain_locals(t.gen)) if not t.finished else ())
        i += 1
    return out


def four_vcpus_accepting(pages: int) -> VmSetup:
    """The fault benchmark's TD (bench/engine.py): four vCPUs each accepting fresh private 4K pages."""
    per = pages // 4

    def program(first: int):
        def accept():
            for i in range(per):
                yield from guest.accept_memory((first + i) << 12, 0x1000)
        return accept
    return VmSetup(memslots=(Memslot(0, 0, 1 << 14, guest_memfd=True),), private_ranges=((0, 1 << 14),),
                   vcpu_programs=tuple(program(16 + k * per) for k in range(4)))


def check_every_frame(setup: VmSetup, schedule: ScheduleSpec) -> int:
    expected = recorded_run(setup, schedule)
    s = Session.open(setup, schedule)
    s.run_to_end(len(expected))
    assert len(s) == len(expected)
    for i, (task, scopes) in expected.items():
        s.goto(i + 1)                     # the cursor at the frame shown, as the UI has it
        got = s.task_locals(task, i, render=structure_scope)
        assert got.error == "", got.error
        assert got.scopes == scopes, f"frame {i} of {task}"
    return len(expected)


def _cases() -> list[Any]:
    """Every shipped scenario under each schedule; a scenario with a single task runs the same frames under
    all of them, so it is checked once."""
    out = []
    for path in shipped():
        scenario = load(path)
        single = len(scenario.vcpus) + len(scenario.hosts) == 1
        for name in SCHEDULES:
            if not single or name == "sequential":
                out.append(pytest.param(path, name, id=f"{path.stem}-{name}"))
    return out


@pytest.mark.parametrize(("path", "schedule"), _cases())
def test_rebuilt_locals_equal_the_live_ones_at_every_frame(path: Path, schedule: str) -> None:
    scenario = load(path)
    assert check_every_frame(build_setup(scenario), SCHEDULES[schedule]) > 0


def test_rebuilt_locals_at_random_frames_of_a_long_four_vcpu_run() -> None:
    """Cold rebuilds (no live replay to continue) at random frames of a 4-vCPU run of the fault benchmark."""
    setup = four_vcpus_accepting(2000)
    schedule = ScheduleSpec(Policy.RANDOM, 3)
    n = 40_000
    rng = random.Random(5)
    keep = set(rng.sample(range(n), 150))
    expected = recorded_run(setup, schedule, keep, n)
    s = Session.open(setup, schedule)
    s.run_to_end(n)
    assert len(s) == n
    for i in sorted(keep, key=lambda _: rng.random()):
        task, scopes = expected[i]
        s.goto(i + 1)
        got = s.task_locals(task, i, render=structure_scope)
        assert got.error == "", got.error
        assert got.scopes == scopes, f"frame {i} of {task}"


def test_a_planted_difference_is_reported_not_shown() -> None:
    """A recorded step the re-execution does not reproduce: the locals are not shown, the error names the frame
    (and the task view carries it for the locals pane)."""
    scenario = load(next(p for p in shipped() if p.stem == "two_vcpus_same_gfn"))
    s = Session.open(build_setup(scenario), SCHEDULES["round_robin"])
    s.run_to_end()
    frames = s.frames
    own = [i for i in range(len(s)) if frames.task_of(i) == "vcpu1"]
    target = own[-3]
    start = s._rt.timeline.frames.rest_before("vcpu1", target)
    planted = next(i for i in own if start < i <= target and isinstance(frames.payload_of(i), tuple))
    payloads = s._rt.timeline.frames.payloads
    payloads[planted] = payloads[planted]._replace(vcpu=9) if hasattr(payloads[planted], "vcpu") else ()
    s.goto(target + 1)
    got = s.task_locals("vcpu1")
    assert got.scopes == ()
    assert got.error.startswith(f"replay mismatch at frame {planted}: vcpu1 re-executed ")
    view = s.task_view("vcpu1")
    assert view.locals_error == got.error and all(a.locals == () for a in view.stack)
