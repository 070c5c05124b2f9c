"""KVM's TDX MMU as released in Linux v6.16 (tag v6.16), read at kvm-x86/linux 821655be0da7 (arch/x86/kvm/vmx/tdx.c
of the v6.16 shape); kvm_main.c's ioctl gate as before "KVM: Reject ioctls only if the VM is bugged, not simply
marked dead" (posted 2025-07-29, after v6.16).

What differs from upstream, function by function (each only where the kernel did):
- KVM_TDX_INIT_MEM_REGION premaps: tdx_gmem_post_populate maps the page through the fault path
  (kvm_tdp_map_page, error code GUEST_FINAL | PRIVATE), the leaf hook only counts it (nr_premapped), and then
  tdx_gmem_post_populate issues TDH.MEM.PAGE.ADD itself; a PAGE.ADD or MR.EXTEND error is returned (-EBUSY or
  -EIO) without bugging the VM;
- zapping a premapped page that never got PAGE.ADD finds TDX_EPT_ENTRY_STATE_INCORRECT and only drops the count
  (tdx_is_sept_zap_err_due_to_premap); finalize refuses while pages are premapped;
- one kvm_x86_ops hook per operation: set_external_spte(kvm, gfn, level, pfn) for a leaf, link_external_spt for a
  table (both from set_external_spte_present), remove_external_spte for a zapped leaf - each to its own TDX
  function (tdx_sept_set_private_spte, tdx_sept_link_private_spt, tdx_sept_remove_private_spte = zap, track,
  drop), where upstream has one set_external_spte(kvm, gfn, old_spte, new_spte, level);
- SEAMCALL errors bug the VM with KVM_BUG_ON + pr_tdx_error (no TDX_BUG_ON), and the no-vCPUs retry is open coded
  with tdx_no_vcpus_enter_start/stop in each caller (no tdh_do_no_vcpus);
- the EPT-violation local retry loop has no bail on an invalid (being deleted) memslot;
- every ioctl of a dead VM (kvm_vm_dead, not only a bugged one) fails with -EIO;
- __vmx_handle_ept_violation sets PFERR_USER for a read and tests GVA validity on the error code instead of the
  exit qualification, so it never sets GUEST_FINAL / GUEST_PAGE (fixed by "KVM: VMX: Fix check for valid GVA on
  an EPT violation", v6.18);
- a prefetch fault (KVM_PRE_FAULT_MEMORY) on a memslot being deleted retries instead of returning -EAGAIN
  ("Return -EAGAIN during prefault if userspace concurrently deletes/moves the relevant memslot", v6.18).

Not modelled: the page reference (get_page / tdx_unpin) v6.16 took on each private page it mapped; nothing in
the debugger frees a mapped guest_memfd page, so the reference changes no value shown.
"""

from __future__ import annotations

from typing import Any

from tdxdbg.engine.kvm import K_NR_PREMAPPED, K_PRE_FAULT_ALLOWED, K_TD_STATE, K_VM_DEAD, Gen, RetPf, TdState
from tdxdbg.engine.mmu import (
    EIO,
    PFERR_FETCH_MASK,
    PFERR_GUEST_FINAL_MASK,
    PFERR_GUEST_PAGE_MASK,
    PFERR_PRESENT_MASK,
    PFERR_PRIVATE_ACCESS,
    PFERR_USER_MASK,
    PFERR_WRITE_MASK,
    KvmPageFault,
)
from tdxdbg.engine.spte import (
    PG_LEVEL_4K,
    SHADOW_NONPRESENT_VALUE,
    is_last_spte,
    is_shadow_present_pte,
    spte_to_pfn,
)
from tdxdbg.engine.steps import EngineStep
from tdxdbg.engine.tdx import (
    EBUSY,
    EINVAL,
    EPT_VIOLATION_ACC_INSTR,
    EPT_VIOLATION_ACC_READ,
    EPT_VIOLATION_ACC_WRITE,
    EPT_VIOLATION_EXEC_FOR_RING3_LIN,
    EPT_VIOLATION_GVA_IS_VALID,
    EPT_VIOLATION_GVA_TRANSLATED,
    EPT_VIOLATION_PROT_MASK,
    TDX_EXTENDMR_CHUNKSIZE,
    pg_level_to_tdx_sept_level,
    tdx_operand_busy,
)
from tdxdbg.engine.variants.upstream import Upstream
from tdxdbg.hw.tdx.leaves import Seamcall
from tdxdbg.hw.tdx.status import OperandId, TdxStatus, is_error
from tdxdbg.runtime.step import Step


class V6_16(Upstream):
    name = "v6.16"
    description = "Linux v6.16: premapped KVM_TDX_INIT_MEM_REGION, KVM_BUG_ON, no memslot bail in the local retry."
    tdx_premaps_init_mem_region = True
    tdx_local_retry_bails_on_invalid_slot = False  # no memslot bail in the v6.16 local retry

    # -- kvm_main.c ------------------------------------------------------------------------------------------
    def kvm_ioctls_refused(self) -> bool:
        """kvm_vm_ioctl / kvm_vcpu_ioctl: `if (kvm->mm != current->mm || kvm->vm_dead) return -EIO;`."""
        return bool(self.world.get(K_VM_DEAD))

    # -- tdp_mmu.c: one kvm_x86_ops hook per operation --------------------------------------------------------
    def set_external_spte_present_hook(self, gfn: int, old: int, new: int, level: int) -> Gen:
        """set_external_spte_present calls kvm_x86_ops.set_external_spte(kvm, gfn, level, pfn) for a leaf and
        link_external_spt(kvm, gfn, level, external_spt) for a table."""
        if is_shadow_present_pte(new) and is_last_spte(new, level):
            ret = yield from self.set_external_spte(gfn, level, spte_to_pfn(new))
            return ret
        external_spt = self.get_external_spt(gfn, new, level)
        if (yield from self.kvm_bug_on(not external_spt, "no external_spt for a mirror child")):
            return EIO
        ret = yield from self.link_external_spt(gfn, level, external_spt)
        return ret

    def remove_external_spte(self, gfn: int, old: int, level: int, new: int = SHADOW_NONPRESENT_VALUE) -> Gen:
        """tdp_mmu.c remove_external_spte: kvm_x86_ops.remove_external_spte(kvm, gfn, level, old_pfn) for a zapped
        mirror leaf; write lock held; KVM_BUG_ON on failure."""
        if not is_shadow_present_pte(old) or not is_last_spte(old, level):
            return
        yield from self.warn_on_once(not self.holds_mmu_lock_write(),
                                     "lockdep: zapping a leaf spte without the mmu_lock write lock")
        ret = yield from self.remove_external_spte_hook(gfn, level, spte_to_pfn(old))
        yield from self.kvm_bug_on(bool(ret), "remove_external_spte failed with the write lock held")

    # kvm_x86_ops of v6.16 (the engine names kvm_x86_ops.remove_external_spte remove_external_spte_hook, as the
    # TDP MMU function of the same name calls it).
    def set_external_spte(self, gfn: int, level: int, pfn: int) -> Gen:  # type: ignore[override]
        yield self._hook("set_external_spte", gfn, level, pfn)
        ret = yield from self.tdx_sept_set_private_spte(gfn, level, pfn)
        yield self._hook_ret("set_external_spte", gfn, level, ret)
        return ret

    def link_external_spt(self, gfn: int, level: int, external_spt: int) -> Gen:
        yield self._hook("link_external_spt", gfn, level, external_spt)
        ret = yield from self.tdx_sept_link_private_spt(gfn, level, external_spt)
        yield self._hook_ret("link_external_spt", gfn, level, ret)
        return ret

    def remove_external_spte_hook(self, gfn: int, level: int, pfn: int) -> Gen:
        yield self._hook("remove_external_spte", gfn, level, pfn)
        ret = yield from self.tdx_sept_remove_private_spte(gfn, level, pfn)
        yield self._hook_ret("remove_external_spte", gfn, level, ret)
        return ret

    # -- the leaf hook: AUG, or count a premapped page ---------------------------------------------------------
    def tdx_sept_set_private_spte(self, gfn: int, level: int, pfn: int) -> Gen:  # type: ignore[override]
        """A runnable TD gets TDH.MEM.PAGE.AUG; before finalize the page is only counted (PAGE.ADD comes later,
        from tdx_gmem_post_populate)."""
        if (yield from self.kvm_bug_on(level != PG_LEVEL_4K, "TODO: handle large pages")):
            return EINVAL
        if self.td_state() is TdState.TD_STATE_RUNNABLE:
            ret = yield from self.tdx_mem_page_aug(gfn, level, pfn)
            return ret
        ret = yield from self.tdx_mem_page_record_premap_cnt(gfn, level, pfn)
        return ret

    def tdx_mem_page_aug(self, gfn: int, level: int, pfn: int) -> Gen:
        r = yield from self.seamcall(Seamcall.TDH_MEM_PAGE_AUG, (gfn << 12) | pg_level_to_tdx_sept_level(level),
                                     None, pfn << 12)
        if tdx_operand_busy(r.rax):
            return EBUSY
        if (yield from self.kvm_bug_on(is_error(r.rax), f"TDH.MEM.PAGE.AUG failed: {r}")):
            return EIO
        return 0

    def tdx_mem_page_record_premap_cnt(self, gfn: int, level: int, pfn: int) -> Gen:
        """nr_premapped counts mirror leaves that still wait for their TDH.MEM.PAGE.ADD."""
        if (yield from self.kvm_bug_on(bool(self.world.get(K_PRE_FAULT_ALLOWED)),
                                       "premapping a page after pre-faults were allowed")):
            return EINVAL
        self.world.set(K_NR_PREMAPPED, self.world.get(K_NR_PREMAPPED, 0) + 1)
        return 0

    def tdx_sept_link_private_spt(self, gfn: int, level: int, external_spt: int) -> Gen:
        r = yield from self.seamcall(Seamcall.TDH_MEM_SEPT_ADD, (gfn << 12) | pg_level_to_tdx_sept_level(level),
                                     None, external_spt << 12)
        if tdx_operand_busy(r.rax):
            return EBUSY
        if (yield from self.kvm_bug_on(is_error(r.rax), f"TDH.MEM.SEPT.ADD failed: {r}")):
            return EIO
        return 0

    # -- removal: open-coded no-vCPUs retry, premapped pages -------------------------------------------------
    def tdx_sept_remove_private_spte(self, gfn: int, level: int, pfn: int) -> Gen:
        if (yield from self.kvm_bug_on(not self.is_hkid_assigned(),
                                       "removing a private page after the HKID was released")):
            return EINVAL
        ret = yield from self.tdx_sept_zap_private_spte(gfn, level, pfn)
        if ret <= 0:
            return ret
        # TDX requires TLB tracking before dropping a private page.
        yield from self.tdx_track()
        ret = yield from self.tdx_sept_drop_private_spte(gfn, level, pfn)
        return ret

    def tdx_sept_zap_private_spte(self, gfn: int, level: int, pfn: int) -> Gen:
        """TDH.MEM.RANGE.BLOCK, once more with vCPUs kept out on BUSY. 1 to go on, 0 for a premapped page."""
        yield from self.warn_on_once(level != PG_LEVEL_4K, "large page")
        rcx = (gfn << 12) | pg_level_to_tdx_sept_level(level)
        r = yield from self.seamcall(Seamcall.TDH_MEM_RANGE_BLOCK, rcx)
        if tdx_operand_busy(r.rax):
            yield from self.tdx_no_vcpus_enter_start()
            r = yield from self.seamcall(Seamcall.TDH_MEM_RANGE_BLOCK, rcx)
            yield from self.tdx_no_vcpus_enter_stop()
        if self.tdx_is_sept_zap_err_due_to_premap(r.rax) and not (
                yield from self.kvm_bug_on(not self.world.get(K_NR_PREMAPPED, 0), "nr_premapped is 0")):
            self.world.set(K_NR_PREMAPPED, self.world.get(K_NR_PREMAPPED, 0) - 1)
            return 0
        if (yield from self.kvm_bug_on(is_error(r.rax), f"TDH.MEM.RANGE.BLOCK failed: {r}")):
            return EIO
        return 1

    def tdx_is_sept_zap_err_due_to_premap(self, err: int) -> bool:
        """Before finalize, an empty S-EPT leaf (TDX_EPT_ENTRY_STATE_INCORRECT on RCX) is a premapped page
        that never got TDH.MEM.PAGE.ADD. (The kernel also checks the returned entry is not an RWX leaf; a
        premapped page's entry is FREE, which the status already says here.)"""
        if not err or self.td_state() is TdState.TD_STATE_RUNNABLE:
            return False
        return err == TdxStatus.TDX_EPT_ENTRY_STATE_INCORRECT | OperandId.RCX

    def tdx_sept_drop_private_spte(self, gfn: int, level: int, pfn: int) -> Gen:
        if (yield from self.kvm_bug_on(level != PG_LEVEL_4K, "TODO: handle large pages")):
            return EINVAL
        if (yield from self.kvm_bug_on(not self.is_hkid_assigned(), "dropping a page without an HKID")):
            return EINVAL
        rcx = (gfn << 12) | pg_level_to_tdx_sept_level(level)
        r = yield from self.seamcall(Seamcall.TDH_MEM_PAGE_REMOVE, rcx)
        if tdx_operand_busy(r.rax):
            yield from self.tdx_no_vcpus_enter_start()
            r = yield from self.seamcall(Seamcall.TDH_MEM_PAGE_REMOVE, rcx)
            yield from self.tdx_no_vcpus_enter_stop()
        if (yield from self.kvm_bug_on(is_error(r.rax), f"TDH.MEM.PAGE.REMOVE failed: {r}")):
            return EIO
        keyed = (pfn << 12) | (self.tdx_module.config(self.tdr).hkid << 46)
        r = yield from self.seamcall(Seamcall.TDH_PHYMEM_PAGE_WBINVD, keyed, 0)
        if (yield from self.kvm_bug_on(is_error(r.rax), f"TDH.PHYMEM.PAGE.WBINVD failed: {r}")):
            return EIO
        # tdx_clear_page: clear the page before the host reuses it.
        self.memory.zero_page(pfn)
        return 0

    def tdx_track(self) -> Gen:
        if self.td_state() is not TdState.TD_STATE_RUNNABLE:
            return
        yield from self.warn_on_once(not self.holds_mmu_lock_write(), "tdx_track without the mmu_lock write lock")
        r = yield from self.seamcall(Seamcall.TDH_MEM_TRACK, self.tdr_pa, 0)
        if tdx_operand_busy(r.rax):
            yield from self.tdx_no_vcpus_enter_start()
            r = yield from self.seamcall(Seamcall.TDH_MEM_TRACK, self.tdr_pa, 0)
            yield from self.tdx_no_vcpus_enter_stop()
        yield from self.kvm_bug_on(is_error(r.rax), f"TDH.MEM.TRACK failed: {r}")
        yield from self.kvm_make_all_cpus_request_outside_guest_mode()

    # -- build time ----------------------------------------------------------------------------------------
    def tdx_vcpu_init_mem_region_pages(self, vcpu: Any, gpa: int, size: int, measure: bool) -> Gen:
        """tdx_vcpu_init_mem_region loads the MMU (kvm_mmu_reload) once, before the page loop."""
        yield from self.kvm_mmu_load(vcpu)
        ret = yield from super().tdx_vcpu_init_mem_region_pages(vcpu, gpa, size, measure)
        return ret

    def tdx_gmem_post_populate(self, vcpu: Any, gfn: int, pfn: int, src_pfn: int, measure: bool) -> Gen:
        """Premap the page through the fault path, then TDH.MEM.PAGE.ADD it from the source page and
        TDH.MR.EXTEND it. A PAGE.ADD or MR.EXTEND error is an ioctl error, not a bugged VM."""
        gpa = gfn << 12
        ret = yield from self.kvm_tdp_map_page(vcpu, gpa, PFERR_GUEST_FINAL_MASK | PFERR_PRIVATE_ACCESS)
        if ret < 0:
            return ret
        r = yield from self.seamcall(Seamcall.TDH_MEM_PAGE_ADD, gpa, None, pfn << 12, src_pfn << 12)
        if is_error(r.rax):
            return EBUSY if tdx_operand_busy(r.rax) else EIO
        if not (yield from self.kvm_bug_on(not self.world.get(K_NR_PREMAPPED, 0), "nr_premapped is 0")):
            self.world.set(K_NR_PREMAPPED, self.world.get(K_NR_PREMAPPED, 0) - 1)
        if measure:
            for off in range(0, 4096, TDX_EXTENDMR_CHUNKSIZE):
                r = yield from self.seamcall(Seamcall.TDH_MR_EXTEND, gpa + off)
                if is_error(r.rax):
                    return EIO
        return 0

    def tdx_td_finalize(self) -> Gen:
        """KVM_TDX_FINALIZE_VM refuses while pages are premapped (nr_premapped), then TDH.MR.FINALIZE."""
        if not self.is_hkid_assigned() or self.td_state() is TdState.TD_STATE_RUNNABLE:
            yield Step(EngineStep.WARN, {"message": "KVM_TDX_FINALIZE_VM on a finalized TD: -EINVAL"})
            return EINVAL
        if self.world.get(K_NR_PREMAPPED, 0):
            yield Step(EngineStep.WARN, {"message": "finalize with premapped pages left: -EINVAL"})
            return EINVAL
        r = yield from self.seamcall(Seamcall.TDH_MR_FINALIZE, self.tdr_pa, 0)
        if tdx_operand_busy(r.rax):
            return EBUSY
        if (yield from self.kvm_bug_on(is_error(r.rax), f"TDH.MR.FINALIZE failed: {r}")):
            return EIO
        self.world.set(K_TD_STATE, TdState.TD_STATE_RUNNABLE)
        self.world.set(K_PRE_FAULT_ALLOWED, True)
        return 0

    # -- EPT violations ------------------------------------------------------------------------------------
    def vmx_handle_ept_violation(self, vcpu: Any, gpa: int, exit_qual: int) -> Gen:
        """__vmx_handle_ept_violation of v6.16: READ -> PFERR_USER; PRESENT from any of bits 3-6; GUEST_FINAL /
        GUEST_PAGE only `if (error_code & EPT_VIOLATION_GVA_IS_VALID)`, a bit (7) the error code never has."""
        error_code = PFERR_USER_MASK if exit_qual & EPT_VIOLATION_ACC_READ else 0
        if exit_qual & EPT_VIOLATION_ACC_WRITE:
            error_code |= PFERR_WRITE_MASK
        if exit_qual & EPT_VIOLATION_ACC_INSTR:
            error_code |= PFERR_FETCH_MASK
        if exit_qual & (EPT_VIOLATION_PROT_MASK | EPT_VIOLATION_EXEC_FOR_RING3_LIN):
            error_code |= PFERR_PRESENT_MASK
        if error_code & EPT_VIOLATION_GVA_IS_VALID:
            error_code |= (PFERR_GUEST_FINAL_MASK if exit_qual & EPT_VIOLATION_GVA_TRANSLATED
                           else PFERR_GUEST_PAGE_MASK)
        if self.tdx_is_private_gpa(gpa):
            error_code |= PFERR_PRIVATE_ACCESS
        ret = yield from self.kvm_mmu_page_fault(vcpu, gpa, error_code)
        return ret

    def kvm_faultin_invalid_slot(self, fault: KvmPageFault) -> Any:
        """v6.16 kvm_mmu_faultin_pfn: RET_PF_RETRY on an invalid memslot, prefetch or not."""
        return RetPf.RET_PF_RETRY
