"""Guest software: what the TD's Linux kernel does around the instructions the vCPU executes.

Each function is a generator of guest instructions (see hw/insn.py) that receives their results, so a guest
program composes them with `yield from`. Behaviour follows the Linux guest (arch/x86/coco/tdx/):
`tdx_accept_memory` / `try_accept_one` and `tdx_map_gpa`.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from tdxdbg.hw.ept import Level, level_size
from tdxdbg.hw.insn import Insn, TdcallInsn, VirtualizationException, fetch, read, write
from tdxdbg.hw.tdx.guest_calls import TdcallResult
from tdxdbg.hw.tdx.leaves import Tdcall, Tdvmcall, TdvmcallStatus
from tdxdbg.hw.tdx.status import TdxStatus, status_base

GuestGen = Generator[Insn, Any, Any]
# tdx_map_gpa gives up after this many RETRY answers without progress.
MAP_GPA_MAX_RETRIES = 3


class GuestPanic(Exception):
    """The guest kernel would panic (e.g. an unexpected #VE on private memory)."""


def accept_memory(gpa: int, size: int, level: Level = Level.PT) -> GuestGen:
    """Accept [gpa, gpa + size): try `level` where aligned, fall back to 4K on PAGE_SIZE_MISMATCH; retry BUSY;
    ALREADY_ACCEPTED counts as done. An EPT-violation exit is KVM's business: the TDCALL simply runs again."""
    end = gpa + size
    while gpa < end:
        lvl = level
        while lvl > Level.PT and (gpa % level_size(lvl) or gpa + level_size(lvl) > end):
            lvl = Level(lvl - 1)
        while True:
            res: TdcallResult = yield TdcallInsn(Tdcall.TDG_MEM_PAGE_ACCEPT, rcx=gpa | lvl)
            base = status_base(res.rax)
            if base in (TdxStatus.TDX_SUCCESS, TdxStatus.TDX_PAGE_ALREADY_ACCEPTED):
                break
            if base in (TdxStatus.TDX_OPERAND_BUSY, TdxStatus.TDX_OPERAND_BUSY_HOST_PRIORITY):
                continue
            if base == TdxStatus.TDX_PAGE_SIZE_MISMATCH and lvl > Level.PT:
                lvl = Level(lvl - 1)
                continue
            raise GuestPanic(f"TDG.MEM.PAGE.ACCEPT({gpa:#x}, level {int(lvl)}) failed: {res}")
        gpa += level_size(lvl)


def map_gpa(gpa: int, size: int) -> GuestGen:
    """TDG.VP.VMCALL<MapGPA>: the shared bit in `gpa` says which way. RETRY resumes from R11."""
    end = gpa + size
    retries = 0
    while True:
        res: TdcallResult = yield TdcallInsn(Tdcall.TDG_VP_VMCALL, r11=Tdvmcall.MAP_GPA, r12=gpa, r13=end - gpa)
        if res.r10 == TdvmcallStatus.SUCCESS:
            return
        if res.r10 != TdvmcallStatus.RETRY:
            raise GuestPanic(f"MapGPA({gpa:#x}, {end - gpa:#x}) failed: R10={res.r10:#x}")
        if res.r11 == gpa:
            retries += 1
            if retries > MAP_GPA_MAX_RETRIES:
                raise GuestPanic(f"MapGPA({gpa:#x}) made no progress")
        else:
            retries = 0
        gpa = res.r11


# arch/x86/coco/tdx/tdx.c: the direction in R13 of TDG.VP.VMCALL<#VE.RequestMMIO>.
EPT_READ = 0
EPT_WRITE = 1
MMIO_SIZE = 8          # the model's MMIO instructions are 8-byte MOVs


def _mmio_hypercall(gpa: int, write: bool, value: int = 0) -> GuestGen:
    """mmio_read / mmio_write (arch/x86/coco/tdx/tdx.c): TDG.VP.VMCALL with R11 = EXIT_REASON_EPT_VIOLATION,
    R12 = size, R13 = EPT_READ/EPT_WRITE, R14 = the GPA (the #VE's, shared bit included), R15 = the value to
    write. A status other than SUCCESS makes handle_mmio fail, and an unhandled #VE panics the guest."""
    res: TdcallResult = yield TdcallInsn(Tdcall.TDG_VP_VMCALL, r11=Tdvmcall.EPT_VIOLATION, r12=MMIO_SIZE,
                                         r13=EPT_WRITE if write else EPT_READ, r14=gpa, r15=value)
    if res.r10 != TdvmcallStatus.SUCCESS:
        raise GuestPanic(f"MMIO {'write' if write else 'read'} at {gpa:#x} failed: R10={res.r10:#x}")
    return res.r11


def mmio_read(gpa: int) -> GuestGen:
    """An 8-byte MOV load from an MMIO GPA. The access takes a #VE (the MMIO SPTE has SUPPRESS_VE clear); the #VE
    handler (virt_exception_kernel -> handle_mmio) decodes the MOV and asks the VMM with TDVMCALL<MMIO>, then
    skips the instruction. A first access without an MMIO SPTE exits to KVM, which installs one; the
    instruction then runs again and takes the #VE."""
    value = yield read(gpa)
    if not isinstance(value, VirtualizationException):
        return value                # not MMIO after all: plain memory
    _check_mmio_ve(value)
    return (yield from _mmio_hypercall(value.gpa, False))


def mmio_write(gpa: int, value: int) -> GuestGen:
    """An 8-byte MOV store to an MMIO GPA: as mmio_read, with EPT_WRITE and the value in R15."""
    res = yield write(gpa, value)
    if isinstance(res, VirtualizationException):
        _check_mmio_ve(res)
        yield from _mmio_hypercall(res.gpa, True, value)


def _check_mmio_ve(ve: VirtualizationException) -> None:
    """handle_mmio serves only shared GPAs: a #VE on private memory (a PENDING page) is a guest panic."""
    if ve.pending:
        raise GuestPanic(f"Unexpected EPT-violation #VE on private memory at gpa {ve.gpa:#x}")


def read_value(gpa: int) -> GuestGen:
    value = yield read(gpa)
    if isinstance(value, VirtualizationException):
        raise GuestPanic(f"Unexpected #VE on {'pending private' if value.pending else 'shared'} gpa {gpa:#x}")
    return value


def write_value(gpa: int, value: int) -> GuestGen:
    res = yield write(gpa, value)
    if isinstance(res, VirtualizationException):
        raise GuestPanic(f"Unexpected #VE on {'pending private' if res.pending else 'shared'} gpa {gpa:#x}")


def fetch_value(gpa: int) -> GuestGen:
    value = yield fetch(gpa)
    if isinstance(value, VirtualizationException):
        raise GuestPanic(f"Unexpected #VE on instruction fetch at gpa {gpa:#x}")
    return value
