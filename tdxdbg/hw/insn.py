"""Guest instructions a TD vCPU executes, and what each one returns to the guest.

A guest program is a generator that yields instructions and receives their results; the vCPU runs it one
instruction per step while in guest mode. An instruction that causes a TD exit is re-executed after the host
handles the exit (RIP does not move), except a TDG.VP.VMCALL, which the host completes.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import Any

import attrs

from tdxdbg.hw.ept import Access
from tdxdbg.hw.tdx.leaves import Tdcall


@attrs.frozen(slots=True)
class MemAccess:
    """A read, write or instruction fetch of 8 bytes at an 8-byte-aligned GPA (shared bit included)."""

    access: Access
    gpa: int
    value: int = 0


@attrs.frozen(slots=True)
class TdcallInsn:
    """TDCALL with its input registers (R10-R13 for TDG.VP.VMCALL)."""

    leaf: Tdcall
    rcx: int = 0
    rdx: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0


Insn = MemAccess | TdcallInsn


@attrs.frozen(slots=True)
class VirtualizationException:
    """A #VE delivered to the guest: an EPT violation the CPU or the TDX module converted."""

    gpa: int
    exit_qual: int
    pending: bool = False


def read(gpa: int) -> MemAccess:
    return MemAccess(Access.READ, gpa)


def write(gpa: int, value: int) -> MemAccess:
    return MemAccess(Access.WRITE, gpa, value)


def fetch(gpa: int) -> MemAccess:
    return MemAccess(Access.FETCH, gpa)


GuestProgram = Generator[Insn, Any, None]
# Makes the guest program from its start: a vCPU makes it again to rebuild the program at a position the
# World records (the results it was sent), so the same factory must make the same program every time.
GuestProgramFactory = Callable[[], GuestProgram]


class OpProgram:
    """A guest program that is a sequence of operations, each a generator of instructions.

    It can start at any operation and says which one it is in (`op`), so a vCPU records its position as (the
    operation, the results since that operation began) and rebuilds it by replaying one operation, not every
    result since the program started. Speaks the generator protocol the vCPU uses (`next`, `send`)."""

    __slots__ = ("_gen", "_ops", "op")

    def __init__(self, ops: Sequence[Callable[[], Generator[Insn, Any, Any]]], start: int = 0) -> None:
        self._ops = ops
        self.op = start
        self._gen: Generator[Insn, Any, Any] | None = None

    def __iter__(self) -> OpProgram:
        return self

    def __next__(self) -> Insn:
        return self.send(None)

    def send(self, result: Any) -> Insn:
        while True:
            gen = self._gen
            if gen is None:
                if self.op >= len(self._ops):
                    raise StopIteration
                gen = self._gen = self._ops[self.op]()
                result = None
            try:
                return gen.send(result)
            except StopIteration:
                # The operation ended with this result: the next one starts with its first instruction.
                self._gen = None
                self.op += 1


class OpProgramFactory:
    """Makes an OpProgram from its start, or from operation `start` (a vCPU rebuilding its position)."""

    __slots__ = ("ops",)

    def __init__(self, ops: Sequence[Callable[[], Generator[Insn, Any, Any]]]) -> None:
        self.ops = tuple(ops)

    def __call__(self, start: int = 0) -> OpProgram:
        return OpProgram(self.ops, start)
