"""The fault path (arch/x86/kvm/mmu/mmu.c, mmu_internal.h): struct kvm_page_fault, kvm_mmu_page_fault ->
kvm_mmu_do_page_fault -> kvm_tdp_mmu_page_fault, fast_page_fault, kvm_mmu_faultin_pfn, the invalidation
sequence checks (is_page_fault_stale) and kvm_mmu_hugepage_adjust."""

from __future__ import annotations

import errno
from typing import Any

import attrs

from tdxdbg.engine.gmem import Memslot
from tdxdbg.engine.kvm import Gen, RetPf
from tdxdbg.engine.spte import (
    KVM_MAX_HUGEPAGE_LEVEL,
    PG_LEVEL_4K,
    PT_WRITABLE_MASK,
    PgLevel,
    is_last_spte,
    is_mmu_writable_spte,
    is_shadow_present_pte,
    kvm_pages_per_hpage,
    shadow_dirty_mask,
)
from tdxdbg.engine.steps import EngineStep, FaultInfo, FaultinInfo, RetPfInfo, SpteWrite
from tdxdbg.engine.tdp_mmu import TdpMmuOps
from tdxdbg.runtime.step import Step

# Page-fault error code bits (asm/kvm_host.h).
PFERR_PRESENT_MASK = 1 << 0
PFERR_WRITE_MASK = 1 << 1
PFERR_USER_MASK = 1 << 2
PFERR_RSVD_MASK = 1 << 3
PFERR_FETCH_MASK = 1 << 4
PFERR_GUEST_FINAL_MASK = 1 << 32
PFERR_GUEST_PAGE_MASK = 1 << 33
PFERR_PRIVATE_ACCESS = 1 << 49

EFAULT = -errno.EFAULT
EIO = -errno.EIO
EAGAIN = -errno.EAGAIN
EINTR = -errno.EINTR
# KVM_PFN_ERR_FAULT / KVM_PFN_NOSLOT stand-ins: never valid host pfns.
KVM_PFN_ERR_FAULT = -1
KVM_PFN_NOSLOT = -2


@attrs.define(slots=True)
class KvmPageFault:
    """struct kvm_page_fault (mmu_internal.h). Inputs first, then what the fault path computes."""

    addr: int
    error_code: int
    prefetch: bool = False
    exec: bool = False
    write: bool = False
    present: bool = False
    rsvd: bool = False
    user: bool = False
    is_tdp: bool = True
    is_private: bool = False
    nx_huge_page_workaround_enabled: bool = False
    huge_page_disallowed: bool = False
    max_level: int = KVM_MAX_HUGEPAGE_LEVEL
    req_level: int = PG_LEVEL_4K
    goal_level: int = PG_LEVEL_4K
    gfn: int = 0
    slot: Memslot | None = None
    mmu_seq: int = 0
    pfn: int = KVM_PFN_ERR_FAULT
    map_writable: bool = False
    wrprot: bool = False

    # Show this struct's fields in the debugger's locals pane (it is mutable, so as of now).
    __tdxdbg_live_repr__ = True

    def __repr__(self) -> str:
        slot = self.slot.id if self.slot is not None else None
        return (f"kvm_page_fault(addr={self.addr:#x}, error_code={self.error_code:#x}, gfn={self.gfn:#x}, "
                f"private={self.is_private}, write={self.write}, prefetch={self.prefetch}, "
                f"goal_level={self.goal_level}, slot={slot}, pfn={self.pfn:#x})")


class MmuOps(TdpMmuOps):
    """mmu.c's TDP fault path as methods."""

    # Override points a patch typically changes: kvm_mmu_page_fault and kvm_tdp_mmu_page_fault (retry and
    # staleness), kvm_mmu_faultin_pfn / kvm_mmu_faultin_pfn_private (where the pfn comes from and the
    # private/shared mismatch exit), is_page_fault_stale, kvm_mmu_hugepage_adjust and private_max_mapping_level
    # (the mapping level), fast_page_fault.

    def kvm_mmu_page_fault(self, vcpu: Any, gpa: int, error_code: int) -> Gen:
        """Entry from the EPT-violation handler. Returns a RetPf (resume the guest), 0 (exit to userspace)
        or a negative errno."""
        yield Step(EngineStep.FAULT, FaultInfo(vcpu=vcpu.index, gpa=gpa, error_code=error_code,
                                      private=bool(error_code & PFERR_PRIVATE_ACCESS)))
        # The kernel first tries handle_mmio_page_fault for PFERR_RSVD faults (EPT misconfig); a TD never takes
        # one (its MMIO is a #VE), so the fault always goes to kvm_mmu_do_page_fault.
        r: Any = yield from self.kvm_mmu_do_page_fault(vcpu, gpa, error_code, prefetch=False)
        if (yield from self.kvm_bug_on(r is RetPf.RET_PF_INVALID, "RET_PF_INVALID from the fault path")):
            return EIO
        if isinstance(r, int):
            return r
        if r is RetPf.RET_PF_WRITE_PROTECTED:
            # A TD's instructions cannot be emulated, and nothing write-tracks a TD's gfns.
            yield from self.kvm_bug_on(True, f"{r.name} for a TD: emulation is impossible")
            return EIO
        # RET_PF_EMULATE (an MMIO SPTE was just installed): x86_emulate_instruction asks the vendor first, and
        # vt_check_emulate_instruction answers X86EMUL_RETRY_INSTR for a TD, so the guest simply re-executes,
        # now hitting the MMIO SPTE (SUPPRESS_VE clear) as a #VE, and asks for MMIO through TDVMCALL.
        return r

    def kvm_mmu_do_page_fault(self, vcpu: Any, gpa: int, err: int, prefetch: bool,
                              level: list[int] | None = None) -> Gen:
        """Build struct kvm_page_fault; gfn has the direct (shared) bits stripped: memslots don't know them.
        `level` (the kernel's `u8 *level`) receives fault.goal_level."""
        fault = KvmPageFault(
            addr=gpa, error_code=err, prefetch=prefetch,
            exec=bool(err & PFERR_FETCH_MASK), write=bool(err & PFERR_WRITE_MASK),
            present=bool(err & PFERR_PRESENT_MASK), rsvd=bool(err & PFERR_RSVD_MASK),
            user=bool(err & PFERR_USER_MASK), is_private=bool(err & PFERR_PRIVATE_ACCESS),
            nx_huge_page_workaround_enabled=self.spec.nx_huge_page_workaround,
        )
        fault.gfn = (gpa >> 12) & ~self.gfn_direct_bits
        fault.slot = self.kvm_vcpu_gfn_to_memslot(fault.gfn)
        r = yield from self.kvm_tdp_page_fault(vcpu, fault)
        if level is not None:
            level[:] = [fault.goal_level]
        ret = yield from self.record_ret_pf(vcpu, fault, r)
        return ret

    def record_ret_pf(self, vcpu: Any, fault: KvmPageFault, r: Any) -> Gen:
        if isinstance(r, RetPf):
            yield Step(EngineStep.RET_PF, RetPfInfo(vcpu=vcpu.index, ret=r.name, value=self.ret_pf_value(r),
                                           gfn=fault.gfn, gpa=fault.addr, private=fault.is_private))
        return r

    def kvm_tdp_page_fault(self, vcpu: Any, fault: KvmPageFault) -> Gen:
        r = yield from self.kvm_tdp_mmu_page_fault(vcpu, fault)
        return r

    def kvm_tdp_mmu_page_fault(self, vcpu: Any, fault: KvmPageFault) -> Gen:
        r = yield from self.fast_page_fault(vcpu, fault)
        if r is not RetPf.RET_PF_INVALID:
            return r
        r = yield from self.kvm_mmu_faultin_pfn(vcpu, fault)
        if r is not RetPf.RET_PF_CONTINUE:
            return r
        r = RetPf.RET_PF_RETRY
        yield from self.read_lock()
        if not (yield from self.is_page_fault_stale(vcpu, fault)):
            r = yield from self.kvm_tdp_mmu_map(vcpu, fault)
        self.kvm_mmu_finish_page_fault(vcpu, fault, r)
        yield from self.read_unlock()
        return r

    def kvm_mmu_finish_page_fault(self, vcpu: Any, fault: KvmPageFault, r: Any) -> None:
        """kvm_release_faultin_page: guest_memfd pages need no reference here; nothing to undo."""

    # -- fast path ---------------------------------------------------------------------------------------------
    def page_fault_can_be_fast(self, fault: KvmPageFault) -> bool:
        if fault.rsvd:
            return False
        # Private faults (and any fault whose privateness disagrees with the attributes) take the slow path:
        # fast page faults walk the direct root only.
        if fault.is_private or self.faultin_attributes_mismatch(fault):
            return False
        return fault.write and fault.present

    def fast_page_fault(self, vcpu: Any, fault: KvmPageFault) -> Gen:
        """Lockless fix of a write to a write-protected (dirty-logged) direct-root leaf: set W and D in place."""
        if not self.page_fault_can_be_fast(fault):
            return RetPf.RET_PF_INVALID
        self.rcu_read_lock()
        it = self.iter_for(vcpu.direct_root, PG_LEVEL_4K, fault.gfn)
        end = self.kvm_gfn_for_root(vcpu.direct_root, fault.gfn) + 1
        yield from it.start()
        last = None
        while it.valid and it.gfn < end:
            last = (it.table, it.index, it.level, it.gfn, it.old_spte)
            if not is_shadow_present_pte(it.old_spte) or is_last_spte(it.old_spte, it.level):
                break
            yield from it.next()
        ret = RetPf.RET_PF_INVALID
        if last is not None:
            table, index, level, gfn, spte = last
            if is_shadow_present_pte(spte) and is_last_spte(spte, level):
                if spte & PT_WRITABLE_MASK:
                    ret = RetPf.RET_PF_SPURIOUS
                elif is_mmu_writable_spte(spte):
                    new = spte | PT_WRITABLE_MASK | shadow_dirty_mask
                    ok, _cur = yield from self.try_cmpxchg64(table, index, spte, new, level, gfn,
                                                             SpteWrite.FAST_PF)
                    if ok:
                        self.mark_page_dirty_in_slot(fault.slot, fault.gfn)
                        ret = RetPf.RET_PF_FIXED
        self.rcu_read_unlock()
        return ret

    # -- faultin -------------------------------------------------------------------------------------------
    def kvm_mmu_faultin_pfn(self, vcpu: Any, fault: KvmPageFault) -> Gen:
        """Snapshot mmu_invalidate_seq, then find the pfn: guest_memfd for private, the memslot for shared.
        A private/shared mismatch with the attributes is a KVM_EXIT_MEMORY_FAULT to userspace."""
        fault.mmu_seq = self.mmu_invalidate_seq()
        slot = fault.slot
        if self.faultin_attributes_mismatch(fault):
            yield from self.kvm_mmu_prepare_memory_fault_exit(vcpu, fault)
            return EFAULT
        if slot is None:
            # kvm_handle_noslot_fault
            if fault.is_private:
                yield from self.kvm_mmu_prepare_memory_fault_exit(vcpu, fault)
                return EFAULT
            fault.pfn = KVM_PFN_NOSLOT
            yield Step(EngineStep.FAULTIN, FaultinInfo(gfn=fault.gfn, result="no memslot: MMIO"))
            return RetPf.RET_PF_CONTINUE
        # A memslot being deleted or moved: retry until its SPTEs are zapped (checked after the no-slot case).
        if slot.invalid:
            yield Step(EngineStep.FAULTIN, FaultinInfo(gfn=fault.gfn, result="memslot being deleted"))
            return self.kvm_faultin_invalid_slot(fault)
        if self.mmu_invalidate_retry_gfn_unsafe(fault.mmu_seq, fault.gfn):
            yield Step(EngineStep.FAULTIN, FaultinInfo(gfn=fault.gfn, result="invalidation in progress"))
            return RetPf.RET_PF_RETRY
        if fault.is_private:
            r = yield from self.kvm_mmu_faultin_pfn_private(vcpu, fault)
            if r is not RetPf.RET_PF_CONTINUE:
                return r
        else:
            fault.pfn, host_level = self.hva_to_pfn(slot, fault.gfn)
            fault.map_writable = not slot.readonly
            fault.max_level = min(fault.max_level, host_level)
            if slot.dirty_log:
                fault.max_level = PG_LEVEL_4K
        yield Step(EngineStep.FAULTIN, FaultinInfo(gfn=fault.gfn, pfn=fault.pfn, private=fault.is_private,
                                        max_level=fault.max_level, result="pfn"))
        if self.mmu_invalidate_retry_gfn_unsafe(fault.mmu_seq, fault.gfn):
            return RetPf.RET_PF_RETRY
        return RetPf.RET_PF_CONTINUE

    def kvm_faultin_invalid_slot(self, fault: KvmPageFault) -> Any:
        """kvm_mmu_faultin_pfn on a KVM_MEMSLOT_INVALID slot: retry, but "Punt the error to userspace if this
        is a prefault, as KVM's prefaulting ABI doesn't need provide the same forward progress guarantees as
        KVM_RUN" (-EAGAIN, v6.18)."""
        return EAGAIN if fault.prefetch else RetPf.RET_PF_RETRY

    def faultin_attributes_mismatch(self, fault: KvmPageFault) -> bool:
        """The access's privateness disagrees with the gfn's memory attributes: userspace must convert."""
        return fault.is_private != self.kvm_mem_is_private(fault.gfn)

    def kvm_mmu_faultin_pfn_private(self, vcpu: Any, fault: KvmPageFault) -> Gen:
        slot = fault.slot
        assert slot is not None
        if not slot.guest_memfd:
            yield from self.kvm_mmu_prepare_memory_fault_exit(vcpu, fault)
            return EFAULT
        pfn = self.kvm_gmem_get_pfn(slot, fault.gfn)
        if pfn is None:
            yield from self.kvm_mmu_prepare_memory_fault_exit(vcpu, fault)
            return EFAULT
        fault.pfn = pfn
        fault.map_writable = not slot.readonly
        fault.max_level = min(fault.max_level, self.private_max_mapping_level(fault.gfn))
        return RetPf.RET_PF_CONTINUE

    def private_max_mapping_level(self, gfn: int) -> int:
        """tdx_gmem_private_max_mapping_level: 4K only."""
        return PG_LEVEL_4K

    def kvm_mmu_prepare_memory_fault_exit(self, vcpu: Any, fault: KvmPageFault) -> Gen:
        """KVM_EXIT_MEMORY_FAULT: userspace decides (an implicit conversion request)."""
        vcpu.memory_fault = (fault.gfn << 12, 1 << 12, fault.is_private)
        yield Step(EngineStep.USER_EXIT, {"vcpu": vcpu.index, "reason": "KVM_EXIT_MEMORY_FAULT",
                                          "gpa": fault.gfn << 12, "private": fault.is_private})

    def is_page_fault_stale(self, vcpu: Any, fault: KvmPageFault) -> Gen:
        """Under mmu_lock: the direct root went obsolete, or an invalidation covers the gfn / bumped the seq."""
        root_sp = self.sptep_to_sp(vcpu.direct_root)
        stale = root_sp is None or root_sp.role.invalid
        if not stale and fault.slot is not None:
            stale = self.mmu_invalidate_retry_gfn(fault.mmu_seq, fault.gfn)
        if stale:
            yield Step(EngineStep.FAULTIN, FaultinInfo(gfn=fault.gfn, result="stale: retry"))
        return stale

    # -- huge pages ------------------------------------------------------------------------------------------
    def kvm_mmu_hugepage_adjust(self, vcpu: Any, fault: KvmPageFault) -> None:
        """kvm_mmu_hugepage_adjust (mmu.c): req_level is the largest level the host mapping, the slot, the
        attributes and max_level allow; goal_level follows it unless the NX workaround forbids a huge page.
        A huge goal level aligns fault->pfn down to the huge page (`fault->pfn &= ~mask`): the leaf maps the
        whole huge page from its first 4K page, whichever gfn inside it faulted."""
        fault.huge_page_disallowed = fault.exec and fault.nx_huge_page_workaround_enabled
        if fault.max_level == PG_LEVEL_4K:
            return
        # is_error_noslot_pfn: no memslot (MMIO) or no page.
        if fault.slot is None or fault.pfn < 0:
            return
        # kvm_slot_dirty_track_enabled: dirty logging works at 4K.
        if fault.slot.dirty_log:
            return
        level = PG_LEVEL_4K
        for candidate in (PgLevel.PG_LEVEL_1G, PgLevel.PG_LEVEL_2M):
            if candidate > fault.max_level:
                continue
            if self.kvm_mmu_max_mapping_level_ok(fault.slot, fault.gfn, candidate, fault.is_private):
                level = candidate
                break
        fault.req_level = level
        if fault.req_level == PG_LEVEL_4K or fault.huge_page_disallowed:
            return
        fault.goal_level = fault.req_level
        # VM_BUG_ON((gfn & mask) != (pfn & mask)) cannot fire here: the shared backing is allocated 2M-aligned
        # (hva_to_pfn), so a gfn's offset in its huge page equals its pfn's.
        mask = kvm_pages_per_hpage(fault.goal_level) - 1
        fault.pfn &= ~mask

    def kvm_mmu_max_mapping_level_ok(self, slot: Memslot, gfn: int, level: int, private: bool) -> bool:
        """The whole huge range must lie in the slot, be backed by one host huge page (shared), and carry
        uniform memory attributes (KVM_LPAGE_MIXED_FLAG clear)."""
        pages = kvm_pages_per_hpage(level)
        base = gfn & -pages
        if base < slot.base_gfn or base + pages > slot.base_gfn + slot.npages:
            return False
        if not self.range_has_uniform_attributes(base, base + pages):
            return False
        if private:
            return False
        return self.host_mapping_level(slot, gfn) >= level

    # -- KVM_TDX_INIT_MEM_REGION -------------------------------------------------------------------------------
    def kvm_tdp_mmu_map_private_pfn(self, vcpu: Any, gfn: int, pfn: int) -> Gen:
        """Map a guest_memfd pfn the caller already has (no faultin: kvm_gmem_populate holds the pfn) into the
        mirror tree at 4K, retrying RET_PF_RETRY under mmu_lock for read. 0, or -EIO unless RET_PF_FIXED."""
        fault = KvmPageFault(addr=gfn << 12, error_code=PFERR_GUEST_FINAL_MASK | PFERR_PRIVATE_ACCESS, prefetch=True,
                             is_private=True, nx_huge_page_workaround_enabled=self.spec.nx_huge_page_workaround,
                             max_level=PG_LEVEL_4K, req_level=PG_LEVEL_4K, goal_level=PG_LEVEL_4K, gfn=gfn,
                             slot=self.kvm_vcpu_gfn_to_memslot(gfn), pfn=pfn, map_writable=True)
        vcpu.fault = fault
        yield from self.kvm_mmu_load(vcpu)
        while True:
            # kvm_test_request(KVM_REQ_VM_DEAD): a dead VM maps nothing more.
            if self.vm_dead:
                return EIO
            yield from self.read_lock()
            r = yield from self.kvm_tdp_mmu_map(vcpu, fault)
            yield from self.read_unlock()
            if r is not RetPf.RET_PF_RETRY:
                break
        yield from self.record_ret_pf(vcpu, fault, r)
        return 0 if r is RetPf.RET_PF_FIXED else EIO

    def kvm_mmu_load(self, vcpu: Any) -> Gen:
        raise NotImplementedError

