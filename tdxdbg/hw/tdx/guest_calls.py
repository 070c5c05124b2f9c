"""What the TDX module does for the guest: TDG.MEM.PAGE.ACCEPT, the private-GPA translation a TD access goes
through, EPT-violation TD exits with their extended exit qualification, and zero-step logging.

TDX module source: tdg_mem_page_accept.c, td_ept_violation.c, td_exit_stepping.c.
"""

from __future__ import annotations

import enum
from collections.abc import Generator
from typing import TYPE_CHECKING

import attrs

from tdxdbg.hw.ept import PAGE_SHIFT, PT_ENTRIES, ExitQual, Level
from tdxdbg.hw.tdx.leaves import Tdcall
from tdxdbg.hw.tdx.locks import GuestLockResult, entry_lock_key, guest_acquire_entry, release_entry
from tdxdbg.hw.tdx.module import check_private_gpa, walk_sept
from tdxdbg.hw.tdx.seamcall import TdcallEntry, TdcallReturn, TdxStep
from tdxdbg.hw.tdx.sept import SeptEntry, SeptState, sept_key
from tdxdbg.hw.tdx.status import OperandId, TdxStatus, describe
from tdxdbg.hw.tdx.td import EPF_GPA_LIST_SIZE, STEPPING_EPF_THRESHOLD, TdConfig, VcpuState, td_key, vcpu_key
from tdxdbg.runtime.step import Step

if TYPE_CHECKING:
    from tdxdbg.hw.tdx.module import TdxModule


class ExtExitQualType(enum.IntEnum):
    """TD-exit extended exit qualification type, RDX bits 3:0 (KVM `TDX_EXT_EXIT_QUAL_TYPE_*`)."""

    NONE = 0
    ACCEPT = 1
    PENDING_EPT_VIOLATION = 6


# The extended exit qualification carries type-specific information in bits 63:32.
EXT_EXIT_QUAL_INFO_SHIFT = 32


def accept_info(requested: int, stopped: int, state: SeptState, is_leaf: bool) -> int:
    """ACCEPT failure details for the EEQ info field. The field's bit layout is not public (UNVERIFIED):
    requested level in bits 2:0, level where the walk stopped in 5:3, public state in 15:8, is-leaf in bit 16."""
    return requested | (stopped << 3) | (state.public << 8) | (int(is_leaf) << 16)


@attrs.frozen(slots=True)
class TdcallResult:
    """Registers a TDCALL returns to the guest."""

    rax: int
    rcx: int = 0
    rdx: int = 0
    r10: int = 0
    r11: int = 0

    def __str__(self) -> str:
        return describe(self.rax)


@attrs.frozen(slots=True)
class EptViolation:
    """An EPT violation the module reports to the host as a TD exit (VP.ENTER returns reason 48)."""

    gpa: int
    exit_qual: int
    ext_qual: int = 0


def tdg_mem_page_accept(m: TdxModule, tdvpr: int, rcx: int) -> Generator[Step, None, TdcallResult | EptViolation]:
    """TDG.MEM.PAGE.ACCEPT: PENDING -> MAPPED with the page zeroed, or a status, or an async EPT-violation exit.

    Two steps: the walk and the guest's entry lock, then (holding the lock) the state check and the zeroing.
    """
    w = m.world
    st: VcpuState = w.get(vcpu_key(tdvpr))
    cfg: TdConfig = w.get(td_key(st.tdr))
    outcome: TdcallResult | EptViolation | None = None
    lock_key = None
    entry_key = sept_key(0, 0)
    gpa = level = 0
    parsed = check_private_gpa(cfg, rcx, Level.PD)
    if parsed is None:
        outcome = TdcallResult(TdxStatus.TDX_OPERAND_INVALID | OperandId.RCX)
    else:
        gpa, level = parsed
        stopped, table, idx, e = walk_sept(w.get, cfg, gpa, level)
        if stopped != level:
            if e.state.guest_accessible:
                outcome = TdcallResult(TdxStatus.TDX_PAGE_ALREADY_ACCEPTED | stopped)
            else:
                outcome = _accept_exit(gpa, level, stopped, e)
        else:
            lock_key, entry_key = entry_lock_key(table, idx), sept_key(table, idx)
            got = guest_acquire_entry(w, lock_key, w.task)
            if got is GuestLockResult.BUSY:
                outcome, lock_key = TdcallResult(TdxStatus.TDX_OPERAND_BUSY | OperandId.RCX), None
            elif got is GuestLockResult.HOST_PRIORITY:
                outcome, lock_key = TdcallResult(TdxStatus.TDX_OPERAND_BUSY_HOST_PRIORITY | OperandId.RCX), None
    yield Step(TdxStep.TDCALL, TdcallEntry(Tdcall.TDG_MEM_PAGE_ACCEPT, rcx, gpa, level, lock_key is not None))
    if outcome is None:
        assert lock_key is not None
        e = w.get(entry_key, SeptEntry())
        if e.state is SeptState.PENDING:
            # Zero first, then make the entry MAPPED (`init_sept_4k_page` before the state write).
            for i in range(PT_ENTRIES ** level):
                m.memory.zero_page(e.pfn + i)
            w.set(entry_key, SeptEntry(SeptState.MAPPED, e.pfn))
            outcome = TdcallResult(TdxStatus.TDX_SUCCESS)
        elif e.state.guest_accessible:
            outcome = TdcallResult(TdxStatus.TDX_PAGE_ALREADY_ACCEPTED | level)
        elif e.state is not SeptState.FREE and not e.state.is_leaf:
            outcome = TdcallResult(TdxStatus.TDX_PAGE_SIZE_MISMATCH | level)
        else:
            outcome = _accept_exit(gpa, level, level, e)
        release_entry(w, lock_key, w.task)
    if isinstance(outcome, TdcallResult):
        ret = TdcallReturn(Tdcall.TDG_MEM_PAGE_ACCEPT, gpa, level, outcome.rax, describe(outcome.rax), False)
    else:
        ret = TdcallReturn(Tdcall.TDG_MEM_PAGE_ACCEPT, gpa, level, None, "EPT violation TD exit (ACCEPT)", True)
    yield Step(TdxStep.TDCALL_RETURN, ret)
    return outcome


def _accept_exit(gpa: int, requested: int, stopped: int, e: SeptEntry) -> EptViolation:
    """`async_tdexit_ept_violation` for ACCEPT: a write fault whose allowed bits are the entry's R/W/X."""
    rwx = (e.arch_value() & 0x7) << 3
    eeq = ExtExitQualType.ACCEPT | (accept_info(requested, stopped, e.state, e.state.is_leaf)
                                    << EXT_EXIT_QUAL_INFO_SHIFT)
    return EptViolation(gpa, ExitQual.WRITE | rwx, eeq)


@attrs.frozen(slots=True)
class PrivateTranslation:
    """The outcome of a private-GPA access: the host pfn, a TD exit, or a #VE the module injects."""

    pfn: int | None = None
    violation: EptViolation | None = None
    ve: bool = False


def translate_private(m: TdxModule, cfg: TdConfig, gpa: int, access: ExitQual) -> PrivateTranslation:
    """A TD access to a private GPA through the S-EPT (`td_ept_violation_exit` for the failing cases).

    Every S-EPT entry has SVE set, so a violation is never converted to #VE by hardware: the module decides.
    """
    level, _table, _idx, e = walk_sept(m.world.get, cfg, gpa, Level.PT)
    if e.state is SeptState.MAPPED:
        offset_pages = (gpa >> PAGE_SHIFT) & (PT_ENTRIES ** level - 1)
        return PrivateTranslation(pfn=e.pfn + offset_pages)
    if e.state is SeptState.PENDING:
        if cfg.pending_ve_disable:
            # No "allowed" bits: KVM's check for an access before ACCEPT.
            return PrivateTranslation(violation=EptViolation(gpa, int(access),
                                                             ExtExitQualType.PENDING_EPT_VIOLATION))
        return PrivateTranslation(ve=True)
    # The module reports the full faulting GPA (the VMCS guest-physical address) in R8, as it logs it for the
    # zero-step filter.
    return PrivateTranslation(violation=EptViolation(gpa, int(access)))


def log_epf(m: TdxModule, tdvpr: int, gpa: int, rip: int) -> VcpuState:
    """`td_exit_epf_stepping_log` at a private EPT-violation TD exit: count exits without progress at one RIP and,
    from the 7th, record the GPA for the next TD entry's stepping filter."""
    key = vcpu_key(tdvpr)
    st: VcpuState = m.world.get(key)
    new = st
    if rip != st.entry_rip:
        # Forward progress: reset, then count this exit too (the module falls through to the count).
        new = attrs.evolve(st, epf_count=0, epf_gpas=())
    if new.epf_count < STEPPING_EPF_THRESHOLD:
        new = attrs.evolve(new, epf_count=new.epf_count + 1)
    elif gpa not in new.epf_gpas and len(new.epf_gpas) < EPF_GPA_LIST_SIZE:
        new = attrs.evolve(new, epf_gpas=(*new.epf_gpas, gpa))
    m.world.set(key, new)
    return new


def would_fault(m: TdxModule, cfg: TdConfig, gpa: int) -> bool:
    """`is_epf_expected`: a full RWX private translation of `gpa` would still take a non-convertible EPT
    violation. A PENDING page of a TD with pending #VE enabled would become a #VE, so it does not count."""
    _level, _t, _i, e = walk_sept(m.world.get, cfg, gpa, Level.PT)
    if e.state is SeptState.PENDING:
        return cfg.pending_ve_disable
    return e.state is not SeptState.MAPPED

