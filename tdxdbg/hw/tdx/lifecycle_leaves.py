"""Leaves that act on the TD as a whole: TDH.MEM.TRACK, TDH.MR.FINALIZE, and teardown (TDH.VP.FLUSH,
TDH.MNG.VPFLUSHDONE, TDH.PHYMEM.CACHE.WB, TDH.MNG.KEY.FREEID, TDH.PHYMEM.PAGE.RECLAIM, TDH.PHYMEM.PAGE.WBINVD).
TDX module source: tdh_mem_track.c, tdh_mr_finalize.c, tdh_vp_flush.c, tdh_mng_vpflushdone.c,
tdh_phymem_cache_wb.c, tdh_mng_key_freeid.c, tdh_phymem_page_reclaim.c, tdh_phymem_page_wbinvd.c.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tdxdbg.hw.ept import PAGE_SHIFT, PAGE_SIZE
from tdxdbg.hw.tdx import epoch
from tdxdbg.hw.tdx.leaves import Seamcall
from tdxdbg.hw.tdx.locks import LockMode, pamt_lock_key, tdr_lock_key
from tdxdbg.hw.tdx.pamt import PageType, Pamt, get_pamt, set_pamt
from tdxdbg.hw.tdx.seamcall import (
    TDR_RCX,
    Arg,
    Call,
    Operand,
    Output,
    Reg,
    SeamcallResult,
    handler,
    success,
)
from tdxdbg.hw.tdx.status import OperandId, TdxStatus
from tdxdbg.hw.tdx.td import (
    KEYID_MASK,
    Lifecycle,
    OpState,
    VcpuState,
    add_chldcnt,
    chldcnt_key,
    get_config,
    lifecycle_key,
    op_state_key,
    vcpu_key,
)

if TYPE_CHECKING:
    from tdxdbg.hw.tdx.module import TdxModule

S = TdxStatus
ANY_OP_STATE = frozenset(OpState)
TRACK_OP_STATES = frozenset(OpState) - {OpState.UNINITIALIZED, OpState.FAILED_IMPORT}
# Set once TDH.PHYMEM.CACHE.WB has written back the TD's cache lines; KEY.FREEID needs it.
WB_DONE = "tdx.wb_done"


def _tdr_of(m: TdxModule, c: Call, tdr_pa: int) -> int | None:
    tdr = tdr_pa >> PAGE_SHIFT
    if tdr_pa & (PAGE_SIZE - 1) or get_pamt(m.world, tdr).page_type is not PageType.PT_TDR:
        return None
    c.cfg = get_config(m.world, tdr)
    return tdr


@handler(Seamcall.TDH_MEM_TRACK, (TDR_RCX,))
class MemTrack:
    """Advance TD_EPOCH once nobody from the previous epoch is still in the guest."""

    @staticmethod
    def prepare(m: TdxModule, c: Call) -> SeamcallResult | None:
        if err := m.check_td(c, c.rcx, OperandId.RCX, TRACK_OP_STATES):
            return err
        assert c.cfg is not None
        if not m.lock(c, "epoch", epoch.epoch_lock_key(c.cfg.tdr), LockMode.EXCLUSIVE):
            return m.fail(c, S.TDX_OPERAND_BUSY, OperandId.TD_EPOCH)
        return None

    @staticmethod
    def execute(m: TdxModule, c: Call) -> SeamcallResult:
        assert c.cfg is not None
        if epoch.previous_epoch_busy(epoch.get_epoch(m.world, c.cfg.tdr)):
            return m.fail(c, S.TDX_PREVIOUS_TLB_EPOCH_BUSY)
        epoch.advance(m.world, c.cfg.tdr)
        return success(c)


@handler(Seamcall.TDH_MR_FINALIZE, (TDR_RCX,))
class MrFinalize:
    """End the build: the TD becomes RUNNABLE and PAGE.ADD is no longer allowed."""

    @staticmethod
    def prepare(m: TdxModule, c: Call) -> SeamcallResult | None:
        return m.check_td(c, c.rcx, OperandId.RCX, frozenset({OpState.INITIALIZED}), LockMode.EXCLUSIVE)

    @staticmethod
    def execute(m: TdxModule, c: Call) -> SeamcallResult:
        assert c.cfg is not None
        if not _vcpus_of(m, c.cfg.tdr):
            return m.fail(c, S.TDX_NO_VCPUS)
        m.world.set(op_state_key(c.cfg.tdr), OpState.RUNNABLE)
        return success(c)


@handler(Seamcall.TDH_VP_FLUSH, (Operand("tdvpr", Reg.RCX, Arg.TDVPR),))
class VpFlush:
    """Flush a vCPU's TLB and caches and dissociate it from its logical processor."""

    @staticmethod
    def prepare(m: TdxModule, c: Call) -> SeamcallResult | None:
        st: VcpuState | None = m.world.get(vcpu_key(c.rcx >> PAGE_SHIFT))
        if c.rcx & (PAGE_SIZE - 1) or st is None:
            return m.fail(c, S.TDX_OPERAND_INVALID, OperandId.RCX)
        c.page = c.rcx >> PAGE_SHIFT
        return None

    @staticmethod
    def execute(m: TdxModule, c: Call) -> SeamcallResult:
        key = vcpu_key(c.page)
        st: VcpuState = m.world.get(key)
        if m.world.get(lifecycle_key(st.tdr)) is not Lifecycle.TD_KEYS_CONFIGURED:
            return m.fail(c, S.TDX_TD_KEYS_NOT_CONFIGURED)
        if not st.associated:
            return m.fail(c, S.TDX_VCPU_NOT_ASSOCIATED)
        if st.in_guest:
            return m.fail(c, S.TDX_VCPU_ASSOCIATED)
        m.world.set(key, VcpuState(st.tdr, st.index, vcpu_epoch=st.vcpu_epoch))
        return success(c)


def _vcpus_of(m: TdxModule, tdr: int) -> list[VcpuState]:
    return [v for k, v in m.world.items() if isinstance(k, tuple) and k[0] == "tdx.vcpu" and v.tdr == tdr]


@handler(Seamcall.TDH_MNG_VPFLUSHDONE, (TDR_RCX,))
class VpFlushDone:
    """All vCPUs flushed: the TD moves to TD_BLOCKED and can never run again."""

    @staticmethod
    def prepare(m: TdxModule, c: Call) -> SeamcallResult | None:
        tdr = _tdr_of(m, c, c.rcx)
        if tdr is None:
            return m.fail(c, S.TDX_OPERAND_INVALID, OperandId.RCX)
        if not m.lock(c, "tdr", tdr_lock_key(tdr), LockMode.EXCLUSIVE):
            return m.fail(c, S.TDX_OPERAND_BUSY, OperandId.RCX)
        if m.world.get(lifecycle_key(tdr)) not in (Lifecycle.TD_KEYS_CONFIGURED, Lifecycle.TD_HKID_ASSIGNED):
            return m.fail(c, S.TDX_LIFECYCLE_STATE_INCORRECT)
        return None

    @staticmethod
    def execute(m: TdxModule, c: Call) -> SeamcallResult:
        assert c.cfg is not None
        # The vCPU list is scanned unrecorded: TDVPRs never appear or vanish while the TD lives.
        if any(v.associated for v in _vcpus_of(m, c.cfg.tdr)):
            return m.fail(c, S.TDX_FLUSHVP_NOT_DONE)
        m.world.set(lifecycle_key(c.cfg.tdr), Lifecycle.TD_BLOCKED)
        return success(c)


@handler(Seamcall.TDH_PHYMEM_CACHE_WB, (Operand("resume", Reg.RCX, Arg.VALUE),))
class CacheWb:
    """Write back the cache lines of every HKID being released (RCX: 0 = start, 1 = resume)."""

    @staticmethod
    def prepare(m: TdxModule, c: Call) -> SeamcallResult | None:
        if c.rcx not in (0, 1):
            return m.fail(c, S.TDX_OPERAND_INVALID, OperandId.RCX)
        return None

    @staticmethod
    def execute(m: TdxModule, c: Call) -> SeamcallResult:
        w = m.world
        pending = sorted(k[1] for k, v in w.items()
                         if isinstance(k, tuple) and k[0] == "tdx.lifecycle" and v is Lifecycle.TD_BLOCKED
                         and not w.peek((WB_DONE, k[1])))
        if not pending:
            return m.fail(c, S.TDX_NO_HKID_READY_TO_WBCACHE)
        for tdr in pending:
            w.set((WB_DONE, tdr), True)
        return success(c)


@handler(Seamcall.TDH_MNG_KEY_FREEID, (TDR_RCX,))
class KeyFreeId:
    """Release the TD's HKID after VPFLUSHDONE and CACHE.WB: the TD moves to TD_TEARDOWN."""

    @staticmethod
    def prepare(m: TdxModule, c: Call) -> SeamcallResult | None:
        tdr = _tdr_of(m, c, c.rcx)
        if tdr is None:
            return m.fail(c, S.TDX_OPERAND_INVALID, OperandId.RCX)
        if not m.lock(c, "tdr", tdr_lock_key(tdr), LockMode.EXCLUSIVE):
            return m.fail(c, S.TDX_OPERAND_BUSY, OperandId.RCX)
        if m.world.get(lifecycle_key(tdr)) is not Lifecycle.TD_BLOCKED:
            return m.fail(c, S.TDX_LIFECYCLE_STATE_INCORRECT)
        if not m.world.get((WB_DONE, tdr)):
            return m.fail(c, S.TDX_WBCACHE_NOT_COMPLETE)
        return None

    @staticmethod
    def execute(m: TdxModule, c: Call) -> SeamcallResult:
        assert c.cfg is not None
        m.world.set(lifecycle_key(c.cfg.tdr), Lifecycle.TD_TEARDOWN)
        return success(c)


@handler(Seamcall.TDH_PHYMEM_PAGE_RECLAIM, (Operand("hpa", Reg.RCX, Arg.PA),),
         returns=(Output("page_type", Reg.RCX), Output("owner", Reg.RDX), Output("size", Reg.R8)))
class PageReclaim:
    """Take a page back from a torn-down TD. RCX = page type, RDX = owner TDR PA, R8 = size level."""

    @staticmethod
    def prepare(m: TdxModule, c: Call) -> SeamcallResult | None:
        if c.rcx & KEYID_MASK or c.rcx & (PAGE_SIZE - 1):
            return m.fail(c, S.TDX_OPERAND_INVALID, OperandId.RCX)
        pfn = c.rcx >> PAGE_SHIFT
        if pfn >= m.memory.limit:
            return m.fail(c, S.TDX_OPERAND_ADDR_RANGE_ERROR, OperandId.RCX)
        c.page = pfn
        if not m.lock(c, "pamt", pamt_lock_key(pfn), LockMode.EXCLUSIVE):
            return m.fail(c, S.TDX_OPERAND_BUSY, OperandId.RCX)
        return None

    @staticmethod
    def execute(m: TdxModule, c: Call) -> SeamcallResult:
        w = m.world
        p = get_pamt(w, c.page)
        if p.page_type in (PageType.PT_NDA, PageType.PT_RSVD):
            return m.fail(c, S.TDX_PAGE_METADATA_INCORRECT, OperandId.RCX)
        # The outputs are written before the lifecycle checks, so a failure returns them too.
        out = (int(p.page_type), p.owner << PAGE_SHIFT, p.level)
        if w.get(lifecycle_key(p.owner)) is not Lifecycle.TD_TEARDOWN:
            return SeamcallResult(c.leaf, S.TDX_LIFECYCLE_STATE_INCORRECT, *out)
        if p.page_type is PageType.PT_TDR:
            if w.get(chldcnt_key(p.owner), 0) != 0:
                return SeamcallResult(c.leaf, S.TDX_TD_ASSOCIATED_PAGES_EXIST, *out)
            set_pamt(w, c.page, Pamt())
        else:
            count = 512 ** p.level
            for i in range(count):
                set_pamt(w, c.page + i, Pamt())
            add_chldcnt(w, p.owner, -count)
        return success(c, *out)


@handler(Seamcall.TDH_PHYMEM_PAGE_WBINVD, (Operand("hpa", Reg.RCX, Arg.PA),))
class PageWbinvd:
    """Write back and invalidate a removed page's cache lines under the TD's key (RCX = keyed HPA)."""

    @staticmethod
    def prepare(m: TdxModule, c: Call) -> SeamcallResult | None:
        c.page = (c.rcx & ~KEYID_MASK) >> PAGE_SHIFT
        if c.rcx & (PAGE_SIZE - 1):
            return m.fail(c, S.TDX_OPERAND_INVALID, OperandId.RCX)
        return None

    @staticmethod
    def execute(m: TdxModule, c: Call) -> SeamcallResult:
        if get_pamt(m.world, c.page).page_type is not PageType.PT_NDA:
            return m.fail(c, S.TDX_PAGE_METADATA_INCORRECT, OperandId.RCX)
        return success(c)
