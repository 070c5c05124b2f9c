"""The TDX MMU as in v7 of the KVM TDX series (July 2022, the seed review of patch 046/102).

Built on the v6.16 variant (the oldest merged shape: premapped KVM_TDX_INIT_MEM_REGION, KVM_BUG_ON, no memslot
bail in the local retry, ioctls refused once the VM is dead). What differs from it, function by function:
- every atomic update of a private SPTE freezes it (SHADOW_REMOVED_SPTE), runs handle_changed_spte - which
  calls the private hook - while frozen, and only then writes the new value;
- private pages are pinned from the memslot's userspace address (pin_user_pages_fast, RWX only), not taken
  from guest_memfd; whether an access is private is decided by the GPA's shared bit alone;
- gfns carry the shared bit on the shared side (kvm_gfn_for_root), instead of an iterator gfn_bits;
- the private root is never invalidated, and roots start with one reference;
- the EPT-violation handler has no local retry loop (RET_PF_RETRY re-enters the guest) and no detection of an
  unexpected pending-page violation (tdx_is_sept_violation_unexpected_pending came with the 2025 merge);
- RET_PF_* values of that era (RET_PF_FIXED = 4, RET_PF_SPURIOUS = 5).

A consequence the run path reports as a livelock, and rightly: a guest that touches a private page it never
accepted (`fetch 0x3ff000` with no `accept`; SEPT_VE_DISABLE set, so no #VE) takes an EPT violation on the
PENDING page; v7's tdx_handle_ept_violation goes straight to __vmx_handle_ept_violation, the mirror SPTE is
present, the fault is RET_PF_SPURIOUS and the guest is re-entered at the same instruction. After the TDX
module's zero-step threshold TDH.VP.ENTER's stepping filter refuses the entry with a synthesized EPT violation
for the same GPA, which is again spurious, and so on: only that vCPU runs, nothing changes, nothing can end it.
Upstream and v6.16 end it with kvm_vm_dead ("Guest access before accepting", tdx_is_sept_violation_unexpected_
pending). This is v7's behaviour, not a model artefact.
"""

from __future__ import annotations

from typing import Any

from tdxdbg.engine.kvm import K_DESTROYING, RET_PF_V516, Gen, RetPf
from tdxdbg.engine.mmu import KvmPageFault
from tdxdbg.engine.mmu_page import RootTypes, root_ref_key
from tdxdbg.engine.spte import (
    FROZEN_SPTE,
    PG_LEVEL_4K,
    is_last_spte,
    is_shadow_present_pte,
    spte_to_pfn,
)
from tdxdbg.engine.steps import EngineStep, SpteWrite
from tdxdbg.engine.tdp_iter import TdpIter
from tdxdbg.engine.tdp_mmu import EBUSY
from tdxdbg.engine.variants.v6_16 import V6_16
from tdxdbg.runtime.step import Step

# SHADOW_REMOVED_SPTE = shadow_init_value | REMOVED_SPTE; with TDX the init value is the suppress-#VE bit,
# which makes it numerically FROZEN_SPTE.
SHADOW_REMOVED_SPTE = FROZEN_SPTE


def pinned_key(pfn: int) -> tuple[str, int]:
    """A private page the v7 series pinned (pin_user_pages_fast) when it faulted it in."""
    return ("v7.pinned", pfn)


class V7(V6_16):
    name = "v7"
    description = "The 2022 v7 TDX series: freeze on every private update, pinned private pages."
    ret_pf_values = RET_PF_V516

    # -- gfns with the shared bit (kvm_gfn_for_root) ------------------------------------------------------------
    def kvm_gfn_for_root(self, root: int, gfn: int) -> int:
        return gfn if self.sptep_to_sp(root).role.is_mirror else gfn | self.gfn_direct_bits

    def kvm_gfn_root_bits(self, root: int) -> int:
        """No iterator gfn_bits: the gfn itself carries the shared bit."""
        return 0

    # -- roots -----------------------------------------------------------------------------------------------
    # kvm_tdp_mmu_get_vcpu_root_hpa: under the write lock, one reference; the private root is one per VM.
    root_alloc_write_locked = True
    root_initial_refcount = 1

    def kvm_tdp_mmu_invalidate_roots(self, types: RootTypes) -> Gen:
        """The private root is never invalidated while the VM lives (only at destruction)."""
        if not self.world.get(K_DESTROYING):
            types &= ~RootTypes.KVM_MIRROR_ROOTS
        yield from super().kvm_tdp_mmu_invalidate_roots(types)

    def kvm_mmu_uninit_tdp_mmu(self) -> Gen:
        # Roots start with one reference (the vCPU's), so there is no TDP MMU reference to drop after zapping.
        for root in self.roots():
            self.world.set(root_ref_key(root), self.world.get(root_ref_key(root), 0) + 1)
        yield from super().kvm_mmu_uninit_tdp_mmu()

    # -- faultin: private pages pinned from the HVA ----------------------------------------------------------
    def faultin_attributes_mismatch(self, fault: KvmPageFault) -> bool:
        """No memory attributes in v7: the GPA's shared bit alone says private or shared."""
        return False

    def kvm_mmu_faultin_pfn_private(self, vcpu: Any, fault: KvmPageFault) -> Gen:
        """v7 takes private pages from the memslot's userspace mapping, not from guest_memfd."""
        ret = yield from self.kvm_faultin_pfn_private_mapped(vcpu, fault)
        return ret

    def kvm_faultin_pfn_private_mapped(self, vcpu: Any, fault: KvmPageFault) -> Gen:
        """pin_user_pages_fast(hva, FOLL_WRITE): TDX allows only RWX, read-only isn't supported."""
        yield from self.warn_on_once(not fault.write, "private fault that is not a write")
        assert fault.slot is not None
        fault.pfn, _level = self.hva_to_pfn(fault.slot, fault.gfn)
        self.world.set(pinned_key(fault.pfn), True)
        fault.map_writable = True
        fault.max_level = PG_LEVEL_4K
        return RetPf.RET_PF_CONTINUE

    # -- freeze on every private atomic update ---------------------------------------------------------------
    def tdp_mmu_set_spte_atomic(self, it: TdpIter, new: int) -> Gen:
        if not self.is_mirror_sptep(it.table):
            ret = yield from super().tdp_mmu_set_spte_atomic(it, new)
            return ret
        # Freeze, handle the change (the private hook runs inside) while frozen, then publish.
        ok, cur = yield from self.try_cmpxchg64(it.table, it.index, it.old_spte, SHADOW_REMOVED_SPTE, it.level,
                                                it.gfn, SpteWrite.FREEZE)
        if not ok:
            it.old_spte = cur
            return EBUSY
        ret = yield from self.handle_changed_private_spte(it.gfn, it.old_spte, new, it.level)
        if ret:
            yield from self.kvm_tdp_mmu_write_spte(it.table, it.index, SHADOW_REMOVED_SPTE, it.old_spte, it.level,
                                                   it.gfn, SpteWrite.RESTORE)
            return ret
        yield from self.handle_changed_spte(it.as_id, it.gfn, it.old_spte, new, it.level, shared=True)
        yield from self.kvm_tdp_mmu_write_spte(it.table, it.index, SHADOW_REMOVED_SPTE, new, it.level, it.gfn,
                                               SpteWrite.UNFREEZE)
        return 0

    def handle_changed_private_spte(self, gfn: int, old: int, new: int, level: int) -> Gen:
        """kvm_x86_ops.handle_changed_private_spte: one hook for every private change."""
        yield Step(EngineStep.HOOK, {"name": "handle_changed_private_spte", "gfn": gfn, "level": level,
                                     "old": old, "new": new})
        was_present, is_present = is_shadow_present_pte(old), is_shadow_present_pte(new)
        if is_present and not was_present:
            if is_last_spte(new, level):
                ret = yield from self.tdx_sept_set_private_spte(gfn, level, spte_to_pfn(new))
            else:
                ret = yield from self.tdx_sept_link_private_spt(gfn, level,
                                                                self.get_external_spt(gfn, new, level))
            return ret
        if was_present and not is_present and is_last_spte(old, level):
            ret = yield from self.tdx_sept_remove_private_spte(gfn, level, spte_to_pfn(old))
            return ret
        return 0

    def tdx_handle_ept_violation(self, vcpu: Any, exit: Any) -> Gen:
        """No local retry: RET_PF_RETRY goes back to the guest, which faults again at the same RIP. A private
        violation is handled as a write whatever the TDX module reports (no pending-page check)."""
        gpa = exit.gpa
        exit_qual = 0x2 if self.tdx_is_private_gpa(gpa) else exit.exit_qual
        ret = yield from self.vmx_handle_ept_violation(vcpu, gpa, exit_qual)
        vcpu.fault_retries = 0
        return ret

    def tdx_sept_remove_private_spte(self, gfn: int, level: int, pfn: int) -> Gen:
        """v7 zapped private pages after the HKID was released too: the TD is dying and no vCPU runs, so no
        TLB shootdown; the page is simply reclaimed (tdx_sept_drop_private_spte with !is_hkid_assigned)."""
        if not self.is_hkid_assigned():
            ret = yield from self.tdx_reclaim_page(pfn)
            return ret
        ret = yield from super().tdx_sept_remove_private_spte(gfn, level, pfn)
        return ret

    def page_pinned(self, pfn: int) -> bool:
        return bool(self.world.get(pinned_key(pfn)))

    def tdx_sept_drop_private_spte(self, gfn: int, level: int, pfn: int) -> Gen:
        """After PAGE.REMOVE the pin taken at fault time is dropped (kvm_release_pfn); a page whose userspace
        mapping was discarded meanwhile is freed now."""
        ret = yield from super().tdx_sept_drop_private_spte(gfn, level, pfn)
        self._unpin(pfn)
        return ret

    def tdx_reclaim_page(self, pfn: int) -> Gen:
        ret = yield from super().tdx_reclaim_page(pfn)
        self._unpin(pfn)
        return ret

    def _unpin(self, pfn: int) -> None:
        w = self.world
        if w.get(pinned_key(pfn)):
            w.delete(pinned_key(pfn))
            if w.get(("hva.orphan", pfn)):
                w.delete(("hva.orphan", pfn))
                self.memory.free(pfn)
