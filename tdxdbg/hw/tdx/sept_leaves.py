"""The TDH.MEM leaves that change the Secure EPT: SEPT.ADD, PAGE.AUG, PAGE.ADD, RANGE.BLOCK, RANGE.UNBLOCK,
PAGE.REMOVE, SEPT.REMOVE, PAGE.PROMOTE, PAGE.DEMOTE, SEPT.RD and MR.EXTEND.

Each follows the module's order: operand checks, TDR and OP_STATE, the tree lock, the walk, the entry lock,
then (after the preemption point) the state check against the allowed-state matrix and the transition
(TDX module src/vmm_dispatcher/api_calls/tdh_mem_*.c, sept_state_lookup.c).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import attrs

from tdxdbg.hw.ept import PAGE_SHIFT, PAGE_SIZE, PT_ENTRIES, Level
from tdxdbg.hw.tdx import epoch
from tdxdbg.hw.tdx.leaves import Seamcall
from tdxdbg.hw.tdx.locks import LockMode, entry_lock_key, host_acquire_entry, pamt_lock_key
from tdxdbg.hw.tdx.pamt import PageType, Pamt, get_pamt, set_pamt
from tdxdbg.hw.tdx.seamcall import (
    NEW_PAGE_R8,
    PAGE_INFO_RCX,
    PAGE_RANGE_RCX,
    TDR_RDX,
    Arg,
    Call,
    Operand,
    Output,
    Reg,
    SeamcallResult,
    handler,
    success,
)
from tdxdbg.hw.tdx.sept import (
    ALLOWED_STATES,
    BLOCKED_FORM,
    FREE_ENTRY,
    UNBLOCKED_FORM,
    SeptEntry,
    SeptState,
    sept_entry,
    sept_key,
)
from tdxdbg.hw.tdx.status import OperandId, TdxStatus
from tdxdbg.hw.tdx.td import KEYID_MASK, OpState, add_chldcnt, get_config

if TYPE_CHECKING:
    from tdxdbg.hw.tdx.module import TdxModule

S = TdxStatus
# OP_STATEs in which a leaf may run (`seamcall_state_lookup`).
_O = OpState
MEM_OP_STATES = frozenset({_O.INITIALIZED, _O.RUNNABLE, _O.LIVE_EXPORT, _O.LIVE_IMPORT})
SEPT_ADD_OP_STATES = frozenset({_O.INITIALIZED, _O.RUNNABLE, _O.LIVE_EXPORT, _O.MEMORY_IMPORT, _O.STATE_IMPORT,
                                _O.POST_IMPORT, _O.LIVE_IMPORT})
BLOCK_OP_STATES = frozenset({_O.INITIALIZED, _O.RUNNABLE, _O.LIVE_EXPORT, _O.PAUSED_EXPORT, _O.POST_EXPORT,
                             _O.POST_IMPORT, _O.LIVE_IMPORT})
REMOVE_OP_STATES = BLOCK_OP_STATES | {_O.FAILED_IMPORT}
ANY_INIT_OP_STATES = frozenset(OpState) - {_O.UNINITIALIZED}
BUILD_OP_STATES = frozenset({OpState.INITIALIZED})
# TDH.MR.EXTEND measures 256-byte chunks (KVM `TDX_EXTENDMR_CHUNKSIZE`).
MR_EXTEND_CHUNK = 256


def pages_at(level: int) -> int:
    """4K pages covered by one entry at `level`: 512^level."""
    return PT_ENTRIES ** level


def _begin(m: TdxModule, c: Call, min_level: int, max_level: int | None, tree: LockMode | None,
           allowed: frozenset[OpState] = MEM_OP_STATES, tdr_mode: LockMode = LockMode.SHARED,
           entry_lock: bool = True) -> SeamcallResult | None:
    """The common prefix of a GPA|level leaf: RCX checks, the TDR in RDX, tree lock, walk and entry lock."""
    tdr = c.rdx >> PAGE_SHIFT
    cfg = get_config(m.world, tdr)
    if cfg is None:
        return m.fail(c, S.TDX_OPERAND_INVALID, OperandId.RDX)
    top = int(cfg.root_level) if max_level is None else max_level
    err = (m.check_td(c, c.rdx, OperandId.RDX, allowed, tdr_mode)
           or m.check_gpa(c, cfg, c.rcx, min_level, top))
    if err:
        return err
    if tree is not None and (err := m.lock_tree(c, tree)):
        return err
    if err := m.walk(c):
        return err
    if entry_lock:
        return m.lock_entry(c)
    return None


def _state_incorrect(m: TdxModule, c: Call) -> SeamcallResult | None:
    if c.entry.state not in ALLOWED_STATES[c.leaf]:
        return m.fail(c, S.TDX_EPT_ENTRY_STATE_INCORRECT, OperandId.RCX, details=True)
    return None


def _block_and_track(m: TdxModule, c: Call, bepoch_pfn: int,
                     tracking_operand: OperandId = OperandId.RCX) -> SeamcallResult | None:
    """Removal rule of a running TD: the entry must be blocked and the block TLB-tracked."""
    assert c.cfg is not None
    if not m.tracking_required(c):
        return None
    if not c.entry.state.is_blocked:
        return m.fail(c, S.TDX_GPA_RANGE_NOT_BLOCKED, OperandId.RCX, details=True)
    if not m.is_tracked(c.cfg.tdr, bepoch_pfn):
        return m.fail(c, S.TDX_TLB_TRACKING_NOT_DONE, tracking_operand)
    return None


@handler(Seamcall.TDH_MEM_SEPT_ADD, (PAGE_INFO_RCX, TDR_RDX, NEW_PAGE_R8))
class SeptAdd:
    """Link a new S-EPT page under the entry at c.level (transition T1)."""

    @staticmethod
    def prepare(m: TdxModule, c: Call) -> SeamcallResult | None:
        return _begin(m, c, 1, None, LockMode.SHARED, SEPT_ADD_OP_STATES)

    @staticmethod
    def execute(m: TdxModule, c: Call) -> SeamcallResult:
        assert c.cfg is not None
        e = m.reread(c)
        # NL_MAPPED passes the matrix, but `process_l1_page` rejects it when a page is supplied and
        # `allow_existing` (RDX bit 0, not modelled) is clear.
        if e.state is not SeptState.FREE:
            return m.fail(c, S.TDX_EPT_ENTRY_STATE_INCORRECT, OperandId.RCX, details=True)
        if err := m.check_new_pages(c, c.r8, 1, OperandId.R8):
            return err
        set_pamt(m.world, c.page, Pamt(PageType.PT_EPT, owner=c.cfg.tdr))
        m.write_entry(c, SeptEntry(SeptState.NL_MAPPED, c.page))
        add_chldcnt(m.world, c.cfg.tdr, 1)
        return success(c)


@handler(Seamcall.TDH_MEM_PAGE_AUG,
         (PAGE_RANGE_RCX, TDR_RDX, Operand("hpa", Reg.R8, Arg.NEW_PAGE_AT_LEVEL, shown=False)))
class PageAug:
    """Add a PENDING page at 4K or 2M for the guest to accept (transition T2)."""

    @staticmethod
    def prepare(m: TdxModule, c: Call) -> SeamcallResult | None:
        return _begin(m, c, Level.PT, Level.PD, LockMode.SHARED)

    @staticmethod
    def execute(m: TdxModule, c: Call) -> SeamcallResult:
        assert c.cfg is not None
        m.reread(c)
        if err := _state_incorrect(m, c) or m.check_new_pages(c, c.r8, pages_at(c.level), OperandId.R8):
            return err
        n = pages_at(c.level)
        for i in range(n):
            set_pamt(m.world, c.page + i, Pamt(PageType.PT_REG, owner=c.cfg.tdr, level=c.level if i == 0 else 0))
        m.write_entry(c, SeptEntry(SeptState.PENDING, c.page))
        add_chldcnt(m.world, c.cfg.tdr, n)
        return success(c)


@handler(Seamcall.TDH_MEM_PAGE_ADD,
         (PAGE_RANGE_RCX, TDR_RDX, NEW_PAGE_R8, Operand("source", Reg.R9, Arg.SOURCE_PAGE, shown=False)))
class PageAdd:
    """Build time: copy a source page into a new private page, MAPPED, and measure it (transition T3)."""

    @staticmethod
    def prepare(m: TdxModule, c: Call) -> SeamcallResult | None:
        # The TDR is taken exclusively, which also serialises against every S-EPT user; no tree lock.
        return _begin(m, c, Level.PT, Level.PT, None, BUILD_OP_STATES, LockMode.EXCLUSIVE, entry_lock=False)

    @staticmethod
    def execute(m: TdxModule, c: Call) -> SeamcallResult:
        assert c.cfg is not None
        m.reread(c)
        if err := _state_incorrect(m, c):
            return err
        # The source must be a shared (unkeyed) 4K-aligned address; checked before the target page.
        if c.r9 & KEYID_MASK or c.r9 & (PAGE_SIZE - 1):
            return m.fail(c, S.TDX_OPERAND_INVALID, OperandId.R9)
        if err := m.check_new_pages(c, c.r8, 1, OperandId.R8):
            return err
        m.memory.copy_page(c.r9 >> PAGE_SHIFT, c.page)
        set_pamt(m.world, c.page, Pamt(PageType.PT_REG, owner=c.cfg.tdr))
        m.write_entry(c, SeptEntry(SeptState.MAPPED, c.page))
        add_chldcnt(m.world, c.cfg.tdr, 1)
        extend_mrtd(m, c.cfg.tdr, b"MEM.PAGE.ADD" + c.gpa.to_bytes(8, "little"))
        return success(c)


def mrtd_key(tdr: int) -> tuple[str, int]:
    """The TD's MRTD measurement (SHA-384), extended by PAGE.ADD and MR.EXTEND."""
    return ("tdx.mrtd", tdr)


def extend_mrtd(m: TdxModule, tdr: int, data: bytes) -> None:
    key = mrtd_key(tdr)
    old: bytes = m.world.get(key, bytes(48))
    m.world.set(key, hashlib.sha384(old + data).digest())


@handler(Seamcall.TDH_MR_EXTEND, (Operand("gpa", Reg.RCX, Arg.GPA), TDR_RDX))
class MrExtend:
    """Build time: extend MRTD with a 256-byte chunk of a MAPPED page."""

    @staticmethod
    def prepare(m: TdxModule, c: Call) -> SeamcallResult | None:
        tdr = c.rdx >> PAGE_SHIFT
        cfg = get_config(m.world, tdr)
        if cfg is None or c.rcx % MR_EXTEND_CHUNK or c.rcx & cfg.shared_bit:
            return m.fail(c, S.TDX_OPERAND_INVALID, OperandId.RCX)
        c.gpa, c.level = c.rcx & ~0xFFF, Level.PT
        err = m.check_td(c, c.rdx, OperandId.RDX, BUILD_OP_STATES) or m.lock_tree(c, LockMode.SHARED)
        if err:
            return err
        if m.walk(c) or c.entry.state is not SeptState.MAPPED:
            return m.fail(c, S.TDX_EPT_ENTRY_NOT_PRESENT, OperandId.RCX)
        return None

    @staticmethod
    def execute(m: TdxModule, c: Call) -> SeamcallResult:
        assert c.cfg is not None
        page = m.memory.page_data(c.entry.pfn)
        off = c.rcx & 0xFFF
        chunk = b"".join(page.get(o, 0).to_bytes(8, "little") for o in range(off, off + MR_EXTEND_CHUNK, 8))
        extend_mrtd(m, c.cfg.tdr, b"MR.EXTEND" + c.rcx.to_bytes(8, "little") + chunk)
        return success(c)


@handler(Seamcall.TDH_MEM_RANGE_BLOCK, (PAGE_RANGE_RCX, TDR_RDX))
class RangeBlock:
    """Clear RWX of a leaf or non-leaf entry and stamp BEPOCH (transitions T5-T7)."""

    @staticmethod
    def prepare(m: TdxModule, c: Call) -> SeamcallResult | None:
        return _begin(m, c, Level.PT, None, LockMode.EXCLUSIVE, BLOCK_OP_STATES)

    @staticmethod
    def execute(m: TdxModule, c: Call) -> SeamcallResult:
        assert c.cfg is not None
        e = m.reread(c)
        if e.state.is_blocked:
            return m.fail(c, S.TDX_GPA_RANGE_ALREADY_BLOCKED, OperandId.RCX, details=True)
        if err := _state_incorrect(m, c):
            return err
        m.write_entry(c, SeptEntry(BLOCKED_FORM[e.state], e.pfn))
        # BEPOCH is sampled after blocking, on the mapped page or the child S-EPT page.
        td_epoch = epoch.get_epoch(m.world, c.cfg.tdr).td_epoch
        old = get_pamt(m.world, e.pfn)
        set_pamt(m.world, e.pfn, attrs.evolve(old, bepoch=td_epoch))
        return success(c)


@handler(Seamcall.TDH_MEM_RANGE_UNBLOCK, (PAGE_RANGE_RCX, TDR_RDX))
class RangeUnblock:
    """Restore a blocked entry once its block is TLB-tracked (transition T8)."""

    @staticmethod
    def prepare(m: TdxModule, c: Call) -> SeamcallResult | None:
        return _begin(m, c, Level.PT, None, LockMode.EXCLUSIVE, BLOCK_OP_STATES)

    @staticmethod
    def execute(m: TdxModule, c: Call) -> SeamcallResult:
        assert c.cfg is not None
        e = m.reread(c)
        if err := _state_incorrect(m, c):
            return err
        if m.tracking_required(c) and not m.is_tracked(c.cfg.tdr, e.pfn):
            return m.fail(c, S.TDX_TLB_TRACKING_NOT_DONE, OperandId.SEPT_TREE)
        m.write_entry(c, SeptEntry(UNBLOCKED_FORM[e.state], e.pfn))
        return success(c)


@handler(Seamcall.TDH_MEM_PAGE_REMOVE, (PAGE_RANGE_RCX, TDR_RDX), returns=(Output("hpa", Reg.RCX),))
class PageRemove:
    """Remove a leaf and hand its page back to the host (transition T9); RCX returns the page's HPA."""

    @staticmethod
    def prepare(m: TdxModule, c: Call) -> SeamcallResult | None:
        err = _begin(m, c, Level.PT, Level.PDPT, LockMode.SHARED, REMOVE_OP_STATES)
        if err:
            return err
        if c.entry.state.is_leaf and not m.lock(c, "pamt", pamt_lock_key(c.entry.pfn), LockMode.EXCLUSIVE):
            return m.fail(c, S.TDX_OPERAND_BUSY, OperandId.RCX)
        return None

    @staticmethod
    def execute(m: TdxModule, c: Call) -> SeamcallResult:
        assert c.cfg is not None
        e = m.reread(c)
        if err := _state_incorrect(m, c) or _block_and_track(m, c, e.pfn):
            return err
        n = pages_at(c.level)
        for i in range(n):
            set_pamt(m.world, e.pfn + i, Pamt())
        m.write_entry(c, FREE_ENTRY)
        add_chldcnt(m.world, c.cfg.tdr, -n)
        return success(c, rcx=e.pfn << PAGE_SHIFT)


def _children(m: TdxModule, table: int) -> list[SeptEntry]:
    get = m.world.get
    return [sept_entry(get, table, i) for i in range(PT_ENTRIES)]


@handler(Seamcall.TDH_MEM_SEPT_REMOVE, (PAGE_INFO_RCX, TDR_RDX), returns=(Output("hpa", Reg.RCX),))
class SeptRemove:
    """Unlink an empty S-EPT page (transition T10); RCX returns the page's HPA. Upstream KVM never calls it."""

    @staticmethod
    def prepare(m: TdxModule, c: Call) -> SeamcallResult | None:
        return _begin(m, c, 1, None, LockMode.EXCLUSIVE, ANY_INIT_OP_STATES)

    @staticmethod
    def execute(m: TdxModule, c: Call) -> SeamcallResult:
        assert c.cfg is not None
        e = m.reread(c)
        if err := _state_incorrect(m, c) or _block_and_track(m, c, e.pfn):
            return err
        if any(child.state is not SeptState.FREE for child in _children(m, e.pfn)):
            return m.fail(c, S.TDX_EPT_PAGE_NOT_FREE, OperandId.RCX, details=True)
        set_pamt(m.world, e.pfn, Pamt())
        m.write_entry(c, FREE_ENTRY)
        add_chldcnt(m.world, c.cfg.tdr, -1)
        return success(c, rcx=e.pfn << PAGE_SHIFT)


@handler(Seamcall.TDH_MEM_PAGE_PROMOTE, (PAGE_RANGE_RCX, TDR_RDX), returns=(Output("hpa", Reg.RCX),))
class PagePromote:
    """Merge 512 same-state, contiguous leaves into one larger leaf (transition T12)."""

    @staticmethod
    def prepare(m: TdxModule, c: Call) -> SeamcallResult | None:
        if err := _begin(m, c, Level.PD, Level.PDPT, LockMode.SHARED, BLOCK_OP_STATES):
            return err
        if c.entry.state in (SeptState.NL_MAPPED, SeptState.NL_BLOCKED):
            for i in range(PT_ENTRIES):
                key = entry_lock_key(c.entry.pfn, i)
                if not host_acquire_entry(m.world, key, c.caller):
                    return m.fail(c, S.TDX_OPERAND_BUSY, OperandId.RCX, details=True)
                c.locks.append(("sept_entry", key, LockMode.EXCLUSIVE))
        return None

    @staticmethod
    def execute(m: TdxModule, c: Call) -> SeamcallResult:
        assert c.cfg is not None
        e = m.reread(c)
        if err := _state_incorrect(m, c) or _block_and_track(m, c, e.pfn):
            return err
        children = _children(m, e.pfn)
        first = children[0]
        step = pages_at(c.level - 1)
        if (first.state not in (SeptState.MAPPED, SeptState.PENDING) or first.pfn % pages_at(c.level)
                or any(ch.state is not first.state or ch.pfn != first.pfn + i * step
                       for i, ch in enumerate(children))):
            return m.fail(c, S.TDX_EPT_INVALID_PROMOTE_CONDITIONS, OperandId.RCX, details=True)
        for i in range(PT_ENTRIES):
            m.world.delete(sept_key(e.pfn, i))
        set_pamt(m.world, e.pfn, Pamt())
        head = get_pamt(m.world, first.pfn)
        set_pamt(m.world, first.pfn, attrs.evolve(head, level=c.level))
        m.write_entry(c, SeptEntry(first.state, first.pfn))
        add_chldcnt(m.world, c.cfg.tdr, -1)
        return success(c, rcx=e.pfn << PAGE_SHIFT)


@handler(Seamcall.TDH_MEM_PAGE_DEMOTE, (PAGE_RANGE_RCX, TDR_RDX, NEW_PAGE_R8))
class PageDemote:
    """Split a leaf into a new S-EPT page of 512 smaller leaves of the unblocked state (transition T11)."""

    @staticmethod
    def prepare(m: TdxModule, c: Call) -> SeamcallResult | None:
        return _begin(m, c, Level.PD, Level.PDPT, LockMode.SHARED, BLOCK_OP_STATES)

    @staticmethod
    def execute(m: TdxModule, c: Call) -> SeamcallResult:
        assert c.cfg is not None
        e = m.reread(c)
        if (err := _state_incorrect(m, c) or _block_and_track(m, c, e.pfn)
                or m.check_new_pages(c, c.r8, 1, OperandId.R8)):
            return err
        state = UNBLOCKED_FORM.get(e.state, e.state)
        step = pages_at(c.level - 1)
        for i in range(PT_ENTRIES):
            m.world.set(sept_key(c.page, i), SeptEntry(state, e.pfn + i * step))
            if c.level > 1:
                old = get_pamt(m.world, e.pfn + i * step)
                set_pamt(m.world, e.pfn + i * step, attrs.evolve(old, level=c.level - 1))
        if c.level == 1:
            old = get_pamt(m.world, e.pfn)
            set_pamt(m.world, e.pfn, attrs.evolve(old, level=0))
        set_pamt(m.world, c.page, Pamt(PageType.PT_EPT, owner=c.cfg.tdr))
        m.write_entry(c, SeptEntry(SeptState.NL_MAPPED, c.page))
        add_chldcnt(m.world, c.cfg.tdr, 1)
        return success(c)


@handler(Seamcall.TDH_MEM_SEPT_RD, (PAGE_INFO_RCX, TDR_RDX),
         returns=(Output("entry", Reg.RCX), Output("info", Reg.RDX)))
class SeptRd:
    """Read an S-EPT entry: RCX = architectural entry, RDX = level and state."""

    @staticmethod
    def prepare(m: TdxModule, c: Call) -> SeamcallResult | None:
        return _begin(m, c, Level.PT, None, LockMode.SHARED, ANY_INIT_OP_STATES)

    @staticmethod
    def execute(m: TdxModule, c: Call) -> SeamcallResult:
        e = m.reread(c)
        return success(c, rcx=e.arch_value(), rdx=c.walk_level | (e.state.public << 8))
