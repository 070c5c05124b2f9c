"""A guest program made of operations (hw/insn.py OpProgram): it starts at any operation and says which one it
is in, so a vCPU's position is (operation, results since it began) and rebuilding it replays one operation."""

from __future__ import annotations

import pytest

from tdxdbg.hw.insn import OpProgramFactory


def _two(a, b):
    first = yield a
    second = yield b
    return first, second


def _none():
    return
    yield  # pragma: no cover - makes this a generator that yields nothing


def _one(c):
    yield c


FACTORY = OpProgramFactory([lambda: _two("a", "b"), _none, lambda: _one("c")])


def test_operations_run_in_order_and_the_program_says_which_one_it_is_in():
    prog = FACTORY()
    assert (next(prog), prog.op) == ("a", 0)
    assert (prog.send(1), prog.op) == ("b", 0)
    # The first operation ends with this result; the empty one is skipped; the third starts.
    assert (prog.send(2), prog.op) == ("c", 2)
    with pytest.raises(StopIteration):
        prog.send(3)
    assert prog.op == 3


def test_a_program_started_at_an_operation_begins_with_its_first_instruction():
    prog = FACTORY(2)
    assert (next(prog), prog.op) == ("c", 2)
    prog = FACTORY(1)  # an empty operation: straight on to the next
    assert (next(prog), prog.op) == ("c", 2)


def _chain(retired):
    n = 0
    while retired is not None:
        n, retired = n + 1, retired[1]
    return n


def test_a_vcpu_records_its_position_from_the_start_of_the_operation_it_is_in():
    from tdxdbg.scenario.builder import build_setup
    from tdxdbg.scenario.loader import loads
    from tdxdbg.session import Session

    text = """
title = "op positions"
[td]
gpaw = 48
[[memslot]]
gpa = 0x0
size = "2M"
guest_memfd = true
[attributes]
private = [[0x0, "2M"]]
[[vcpu]]
program = ["accept 0x1000", "write 0x1000 0x5", "accept 0x2000", "read 0x1000"]
"""
    session = Session.open(build_setup(loads(text, "ops.toml")))
    session.run_to_end()
    seen = []
    for pos in range(len(session) + 1):
        guest = next(v for k, v in session.state_at(pos).items() if isinstance(k, tuple) and k[0] == "vcpu.guest")
        seen.append((guest.op, _chain(guest.retired)))
    # Each operation retires one instruction here (an ACCEPT that succeeds, a write, a read): the position never
    # holds more than the one result of the operation in progress, whatever ran before it.
    assert sorted(set(seen)) == [(0, 0), (1, 0), (2, 0), (3, 0), (3, 1)]
