"""Shared fixtures and helpers for the emulated TDX module tests.

Everything goes through the module's public surface: raw SEAMCALLs via `drive(m.tdx.seamcall(...))`, guest
instructions through a `TdVcpu`, and interleavings through the step `Runtime`. Expected values are written out
as literals (status codes, RCX/RDX layouts) so that a wrong constant in the model makes a test fail.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable
from typing import Any

import pytest

from tdxdbg.hw import insn
from tdxdbg.hw.cpu import TdExit, TdVcpu
from tdxdbg.hw.ept import Gpaw
from tdxdbg.hw.machine import Machine, drive
from tdxdbg.hw.tdx.guest_calls import TdcallResult
from tdxdbg.hw.tdx.leaves import Seamcall, Tdcall
from tdxdbg.hw.tdx.pamt import PageType, get_pamt
from tdxdbg.hw.tdx.seamcall import SeamcallResult
from tdxdbg.hw.tdx.sept import SeptState
from tdxdbg.hw.tdx.td import OpState, TdAttr, op_state_key, vcpu_key

SC = Seamcall
# Literal status values (TDX module tdx_error_codes_defs.h). Kept as literals on purpose.
SUCCESS = 0x0000000000000000
OPERAND_INVALID_RCX = 0xC000010000000001
EPT_WALK_FAILED_RCX = 0xC0000B0000000001
EPT_ENTRY_STATE_INCORRECT_RCX = 0xC0000B0D00000001
GPA_RANGE_NOT_BLOCKED_RCX = 0xC0000B0600000001
GPA_RANGE_ALREADY_BLOCKED_RCX = 0x00000B0700000001
TLB_TRACKING_NOT_DONE_RCX = 0xC0000B0800000001
TLB_TRACKING_NOT_DONE_SEPT_TREE = 0xC0000B0800000092
EPT_PAGE_NOT_FREE_RCX = 0xC0000B0E00000001
EPT_INVALID_PROMOTE_CONDITIONS_RCX = 0xC0000B0900000001
PAGE_ALREADY_ACCEPTED = 0x00000B0A00000000
PAGE_SIZE_MISMATCH = 0xC0000B0B00000000
PREVIOUS_TLB_EPOCH_BUSY = 0x8000020100000000
BUSY_SEPT_TREE = 0x8000020000000092
BUSY_RCX = 0x8000020000000001
BUSY_TD_EPOCH = 0x80000200000000A9
BUSY_HOST_PRIORITY_RCX = 0x8000020400000001
PAGE_METADATA_INCORRECT_R8 = 0xC000030000000008
TD_KEYS_NOT_CONFIGURED = 0x8000081000000000
LIFECYCLE_STATE_INCORRECT = 0xC000060700000000
TD_ASSOCIATED_PAGES_EXIST = 0xC000040000000000
OP_STATE_INCORRECT = 0xC000060800000000

# Architectural S-EPT entry values as reported in RCX (the TDX module spec's architectural S-EPT entry): SVE = bit
# 63, PS = bit 7, IPAT = bit 6,
# memory type WB = 6 in bits 5:3, R/W/Xs = bits 2:0, Xu = bit 10.
SVE = 1 << 63
ARCH_FREE = SVE
ARCH_NL_MAPPED = 0x407          # R|W|Xs|Xu, no HPA, PS clear
ARCH_NL_BLOCKED = 0x0
LEAF_BITS_NO_RWX = 0xF0         # PS | IPAT | WB
LEAF_BITS_RWX = 0x4F7           # PS | IPAT | WB | R|W|Xs | Xu

PUBLIC = {
    SeptState.FREE: 0, SeptState.NL_MAPPED: 0x84, SeptState.NL_BLOCKED: 0x81, SeptState.MAPPED: 4,
    SeptState.BLOCKED: 1, SeptState.PENDING: 2, SeptState.PENDING_BLOCKED: 3,
}


def arch_entry(state: SeptState, hpa: int = 0) -> int:
    """The expected RCX for an entry in `state` mapping `hpa` (leaf) — written from the architectural layout, not
    from the model."""
    if state is SeptState.FREE:
        return ARCH_FREE
    if state is SeptState.NL_MAPPED:
        return ARCH_NL_MAPPED
    if state is SeptState.NL_BLOCKED:
        return ARCH_NL_BLOCKED
    if state is SeptState.MAPPED:
        return SVE | hpa | LEAF_BITS_RWX
    return SVE | hpa | LEAF_BITS_NO_RWX


def arch_info(level: int, state: SeptState) -> int:
    return level | (PUBLIC[state] << 8)


def program(insns: Iterable[insn.Insn], results: list[Any]) -> Generator[insn.Insn, Any, None]:
    """A guest program that executes `insns` in order and records what each returned."""
    for i in insns:
        results.append((yield i))


def accept(gpa: int, level: int = 0) -> insn.TdcallInsn:
    return insn.TdcallInsn(Tdcall.TDG_MEM_PAGE_ACCEPT, rcx=gpa | level)


class Env:
    """One machine with one TD, plus convenience wrappers that keep the raw registers visible."""

    def __init__(self, op_state: OpState = OpState.RUNNABLE, gpaw: Gpaw = Gpaw.GPAW_48,
                 attributes: TdAttr = TdAttr.SEPT_VE_DISABLE) -> None:
        self.m = Machine()
        self.world = self.m.world
        self.tdx = self.m.tdx
        self.tdr = self.tdx.create_td(gpaw=gpaw, attributes=attributes, op_state=op_state)
        self.tdr_pa = self.tdr << 12
        self._vcpus = 0

    # -- raw calls ---------------------------------------------------------------------------------------
    def call(self, leaf: Seamcall, rcx: int = 0, rdx: int | None = None, r8: int = 0, r9: int = 0,
             task: str = "host") -> SeamcallResult:
        rdx = self.tdr_pa if rdx is None else rdx
        return drive(self.tdx.seamcall(leaf, rcx=rcx, rdx=rdx, r8=r8, r9=r9), self.world, task)

    def page(self) -> int:
        """A fresh 4K host page (HPA)."""
        return self.m.memory.alloc("kvm") << 12

    def range_2m(self) -> int:
        """A fresh 2M-aligned 2M host range (HPA)."""
        return self.m.memory.alloc_contiguous(512, "kvm", align=512) << 12

    # -- successful building blocks (each asserts success) -------------------------------------------------
    def ok(self, leaf: Seamcall, rcx: int, r8: int = 0, r9: int = 0) -> SeamcallResult:
        r = self.call(leaf, rcx, r8=r8, r9=r9)
        assert r.rax == SUCCESS, f"{leaf.dotted}({rcx:#x}) = {r.rax:#018x}"
        return r

    def sept_add(self, gpa: int, level: int) -> int:
        hpa = self.page()
        self.ok(SC.TDH_MEM_SEPT_ADD, gpa | level, r8=hpa)
        return hpa

    def tables_for(self, gpa: int, level: int) -> None:
        """SEPT.ADD every missing table above `level` so that a walk to `level` reaches its entry."""
        for lvl in range(3, level, -1):
            reached, e = self.tdx.sept_entry(self.tdr, gpa, lvl)
            if reached == lvl and e.state is SeptState.FREE:
                self.sept_add(gpa & ~((1 << (12 + 9 * lvl)) - 1), lvl)

    def aug(self, gpa: int, level: int = 0) -> int:
        hpa = self.page() if level == 0 else self.range_2m()
        self.ok(SC.TDH_MEM_PAGE_AUG, gpa | level, r8=hpa)
        return hpa

    def block(self, gpa: int, level: int = 0) -> SeamcallResult:
        return self.ok(SC.TDH_MEM_RANGE_BLOCK, gpa | level)

    def track(self) -> SeamcallResult:
        return self.ok(SC.TDH_MEM_TRACK, self.tdr_pa)

    def set_op_state(self, op: OpState) -> None:
        """Test harness only: put the TD in `op` (there is no SEAMCALL that goes back from RUNNABLE)."""
        self.world.set(op_state_key(self.tdr), op)

    # -- inspection --------------------------------------------------------------------------------------
    def entry(self, gpa: int, level: int) -> tuple[int, SeptState, int]:
        """(level reached, state, HPA) of the entry a walk to `level` reaches."""
        reached, e = self.tdx.sept_entry(self.tdr, gpa, level)
        return reached, e.state, e.pfn << 12

    def state(self, gpa: int, level: int) -> SeptState:
        reached, st, _ = self.entry(gpa, level)
        assert reached == level, f"walk to {level} stopped at {reached}"
        return st

    def pamt(self, hpa: int):
        return get_pamt(self.world, hpa >> 12)

    def chldcnt(self) -> int:
        return self.tdx.chldcnt(self.tdr)

    def epoch(self) -> int:
        from tdxdbg.hw.tdx.epoch import get_epoch
        return get_epoch(self.world, self.tdr).td_epoch

    def refcount(self) -> tuple[int, int]:
        from tdxdbg.hw.tdx.epoch import get_epoch
        return get_epoch(self.world, self.tdr).refcount

    # -- guest ---------------------------------------------------------------------------------------------
    def vcpu(self, insns: Iterable[insn.Insn], results: list[Any] | None = None) -> tuple[TdVcpu, list[Any]]:
        results = [] if results is None else results
        insns = list(insns)
        v = TdVcpu(self.tdx, self.m.memory, self.tdr, self._vcpus, lambda: program(insns, results))
        self._vcpus += 1
        return v, results

    def enter(self, v: TdVcpu, task: str = "vcpu") -> TdExit:
        return drive(v.enter(), self.world, task)

    def run_guest(self, insns: Iterable[insn.Insn]) -> tuple[list[Any], TdExit]:
        """A fresh vCPU runs `insns` until its first TD exit."""
        v, results = self.vcpu(insns)
        return results, self.enter(v)

    def guest_accept(self, gpa: int, level: int = 0) -> Any:
        """One ACCEPT by a fresh vCPU: the TdcallResult, or the TdExit if it exited to the host."""
        results, ex = self.run_guest([accept(gpa, level)])
        return results[0] if results else ex

    def epf_gpas(self, v: TdVcpu) -> tuple[int, ...]:
        return self.world.peek(vcpu_key(v.tdvpr)).epf_gpas


@pytest.fixture
def env() -> Env:
    return Env()


@pytest.fixture
def env_init() -> Env:
    return Env(op_state=OpState.INITIALIZED)


__all__ = [
    "PUBLIC",
    "Env",
    "PageType",
    "SeamcallResult",
    "SeptState",
    "TdcallResult",
    "accept",
    "arch_entry",
    "arch_info",
    "program",
]


def regs(frame: Any) -> tuple[int, int, int]:
    """(RAX, RCX, RDX) from a SEAMCALL_RETURN frame of the runtime (the result is visible in the very step that
    returned it; the calling generator only sees it at its next step)."""
    step = frame.step
    assert step.kind.value == "seamcall_return", step
    return step.get("rax"), step.get("rcx"), step.get("rdx")


def tdcall_rax(frame: Any) -> int | None:
    """RAX a TDCALL returned to the guest, from its TDCALL_RETURN frame (None for an exit to the host)."""
    assert frame.step.kind.value == "tdcall_return", frame.step
    return frame.step.get("rax")
