"""KVM's TDX glue (arch/x86/kvm/vmx/tdx.c): the external-SPT hooks that turn mirror-SPTE changes into SEAMCALLs,
TLB tracking, the no-vCPUs-enter retry for zaps (tdh_do_no_vcpus), the EPT-violation handler with its local retry
loop, MapGPA, build-time memory (KVM_TDX_INIT_MEM_REGION: TDH.MEM.PAGE.ADD from the map path, finalize) and HKID
release, as in the newest kvm-x86 tree (see variants/upstream.py for the commit; variants/v6_16.py for the
v6.16 shape of the same functions).
"""

from __future__ import annotations

import errno
from typing import Any

from tdxdbg.engine.kvm import (
    K_HKID,
    K_PAGE_ADD_SRC,
    K_PRE_FAULT_ALLOWED,
    K_TD_STATE,
    K_WAIT_FOR_SEPT_ZAP,
    Gen,
    RetPf,
    TdState,
    signal_key,
)
from tdxdbg.engine.mmu import (
    EINTR,
    EIO,
    PFERR_FETCH_MASK,
    PFERR_GUEST_FINAL_MASK,
    PFERR_GUEST_PAGE_MASK,
    PFERR_PRESENT_MASK,
    PFERR_PRIVATE_ACCESS,
    PFERR_USER_MASK,
    PFERR_WRITE_MASK,
    MmuOps,
)
from tdxdbg.engine.mmu_page import sp_key
from tdxdbg.engine.spte import PG_LEVEL_4K, VMX_EPT_RWX_MASK, is_last_spte, is_shadow_present_pte, spte_to_pfn
from tdxdbg.engine.steps import EngineStep, ExitInfo, HookCall
from tdxdbg.hw.ept import ExitQual
from tdxdbg.hw.tdx.guest_calls import ExtExitQualType
from tdxdbg.hw.tdx.leaves import Seamcall
from tdxdbg.hw.tdx.seamcall import SeamcallResult
from tdxdbg.hw.tdx.status import TdxStatus, is_error, status_base
from tdxdbg.runtime.step import Step
from tdxdbg.runtime.waits import waits_for

EBUSY = -errno.EBUSY
EINVAL = -errno.EINVAL
EOPNOTSUPP = -errno.EOPNOTSUPP
ENOENT = -errno.ENOENT
# EPT_VIOLATION_* exit-qualification bits KVM tests (vmx.h).
EPT_VIOLATION_ACC_READ = int(ExitQual.READ)
EPT_VIOLATION_ACC_WRITE = int(ExitQual.WRITE)
EPT_VIOLATION_ACC_INSTR = int(ExitQual.FETCH)
EPT_VIOLATION_PROT_MASK = int(ExitQual.GPA_READABLE | ExitQual.GPA_WRITABLE | ExitQual.GPA_EXECUTABLE)
EPT_VIOLATION_EXEC_FOR_RING3_LIN = int(ExitQual.GPA_EXEC_USER)
EPT_VIOLATION_GVA_IS_VALID = int(ExitQual.GLA_VALID)
EPT_VIOLATION_GVA_TRANSLATED = int(ExitQual.GLA_TRANSLATED)
EPT_VIOLATION_GVA_USER = int(ExitQual.USER)
TDX_EXT_EXIT_QUAL_TYPE_MASK = 0xF
# TDX_EXTENDMR_CHUNKSIZE: TDH.MR.EXTEND measures 256 bytes at a time.
TDX_EXTENDMR_CHUNKSIZE = 256


def pg_level_to_tdx_sept_level(level: int) -> int:
    return level - 1


def tdx_operand_busy(err: int) -> bool:
    return status_base(err) == TdxStatus.TDX_OPERAND_BUSY


class TdxOps(MmuOps):
    """The TDX side of kvm_x86_ops and the TDX exit handlers."""

    # Whether KVM_TDX_INIT_MEM_REGION premaps mirror leaves before their TDH.MEM.PAGE.ADD (kvm_tdx->nr_premapped,
    # v6.16); the invariant checks allow a FREE S-EPT leaf under a present mirror SPTE before finalize only then.
    tdx_premaps_init_mem_region = False
    # Whether tdx_handle_ept_violation's local retry ends when the faulting gfn's memslot is being deleted
    # (kvm-x86; v6.16 retries until the deletion is done, which deadlocks against synchronize_srcu).
    tdx_local_retry_bails_on_invalid_slot = True

    # Override points a patch typically changes: the external-SPT hooks (set_external_spte ->
    # tdx_sept_set_private_spte -> tdx_sept_map_nonleaf_spte / tdx_sept_map_leaf_spte (tdx_mem_page_aug,
    # tdx_mem_page_add) / tdx_sept_remove_leaf_spte (BLOCK, tdx_track, REMOVE, WBINVD), free_external_spt),
    # the BUSY retry (tdh_do_no_vcpus), TLB tracking
    # (tdx_track, tdx_flush_remote_tlbs), tdx_handle_ept_violation (the local retry loop), build-time memory
    # (tdx_gmem_post_populate, tdx_td_finalize), teardown (tdx_mmu_release_hkid).

    @property
    def tdr_pa(self) -> int:
        return self.tdr << 12

    def td_state(self) -> TdState:
        return self.world.get(K_TD_STATE)

    def is_hkid_assigned(self) -> bool:
        return bool(self.world.get(K_HKID))

    def seamcall(self, leaf: Seamcall, rcx: int = 0, rdx: int | None = None, r8: int = 0, r9: int = 0) -> Gen:
        result: SeamcallResult = yield from self.tdx_module.seamcall(
            leaf, rcx, self.tdr_pa if rdx is None else rdx, r8, r9)
        return result

    def _hook(self, name: str, gfn: int, level: int, pfn: int = 0) -> Step:
        return Step(EngineStep.HOOK, HookCall(name, gfn, level, pfn))

    def _hook_ret(self, name: str, gfn: int, level: int, ret: int) -> Step:
        return Step(EngineStep.HOOK_RETURN, HookCall(name, gfn, level, 0, ret))

    def tdx_bug_on(self, err: int, leaf: str, r: SeamcallResult) -> Gen:
        """TDX_BUG_ON: a SEAMCALL error marks the VM bugged, with a warning only the first time
        (WARN_ON_ONCE(err && !kvm->vm_bugged) in __TDX_BUG_ON, as KVM_BUG_ON), and prints
        "SEAMCALL <leaf> failed: <status>". Returns whether `err` is an error."""
        ret = yield from self.kvm_bug_on(bool(err), f"SEAMCALL {leaf} failed: {r}")
        return ret

    # -- kvm_x86_ops.set_external_spte: one hook for every mirror change ------------------------------------------
    def set_external_spte(self, gfn: int, old: int, new: int, level: int) -> Gen:
        """kvm_x86_ops.set_external_spte(kvm, gfn, old_spte, new_spte, level): the TDP MMU tells TDX about a
        mirror SPTE change - a table or leaf made present (mirror SPTE frozen, mmu_lock held for read) or a leaf
        zapped (mmu_lock held for write). The HOOK step's page is the table, the new page or the removed page."""
        if is_shadow_present_pte(old):
            page = spte_to_pfn(old)
        elif is_shadow_present_pte(new) and not is_last_spte(new, level):
            page = self.get_external_spt(gfn, new, level)
        else:
            page = spte_to_pfn(new)
        yield self._hook("set_external_spte", gfn, level, page)
        ret = yield from self.tdx_sept_set_private_spte(gfn, old, new, level)
        yield self._hook_ret("set_external_spte", gfn, level, ret)
        return ret

    def tdx_sept_set_private_spte(self, gfn: int, old: int, new: int, level: int) -> Gen:
        """A present old SPTE is a leaf being removed; otherwise map a table or a leaf."""
        if is_shadow_present_pte(old):
            ret = yield from self.tdx_sept_remove_leaf_spte(gfn, level, old)
            return ret
        if (yield from self.kvm_bug_on(not is_shadow_present_pte(new), "set_external_spte to a non-present SPTE")):
            return EIO
        if not is_last_spte(new, level):
            ret = yield from self.tdx_sept_map_nonleaf_spte(gfn, level, new)
            return ret
        ret = yield from self.tdx_sept_map_leaf_spte(gfn, level, new)
        return ret

    def tdx_spte_to_sept_pt(self, gfn: int, new: int, level: int) -> Gen:
        """The S-EPT page of the mirror table `new` points to: KVM_BUG_ON unless it has one, one level down,
        for this gfn. 0 on a bug."""
        child = self.world.get(sp_key(spte_to_pfn(new)))
        if ((yield from self.kvm_bug_on(child is None or not child.external_spt, "mirror table without external_spt"))
                or (yield from self.kvm_bug_on(child.role.level + 1 != level, "external_spt at the wrong level"))
                or (yield from self.kvm_bug_on(child.gfn != gfn, "external_spt for another gfn"))):
            return 0
        return child.external_spt

    def tdx_sept_map_nonleaf_spte(self, gfn: int, level: int, new: int) -> Gen:
        """TDH.MEM.SEPT.ADD of the table's S-EPT page: BUSY is -EBUSY for the fault path to retry; any other
        error bugs the VM (TDX_BUG_ON_2)."""
        sept_pt = yield from self.tdx_spte_to_sept_pt(gfn, new, level)
        if not sept_pt:
            return EIO
        r = yield from self.seamcall(Seamcall.TDH_MEM_SEPT_ADD, (gfn << 12) | pg_level_to_tdx_sept_level(level),
                                     None, sept_pt << 12)
        if tdx_operand_busy(r.rax):
            return EBUSY
        if (yield from self.tdx_bug_on(is_error(r.rax), "TDH_MEM_SEPT_ADD", r)):
            return EIO
        return 0

    def tdx_sept_map_leaf_spte(self, gfn: int, level: int, new: int) -> Gen:
        """A runnable TD gets TDH.MEM.PAGE.AUG; while userspace builds the initial image (KVM_TDX_INIT_MEM_REGION,
        TD not yet runnable) the page is TDH.MEM.PAGE.ADDed from page_add_src."""
        pfn = spte_to_pfn(new)
        if (yield from self.kvm_bug_on(level != PG_LEVEL_4K, "TODO: handle large pages")):
            return EIO
        yield from self.warn_on_once((new & VMX_EPT_RWX_MASK) != VMX_EPT_RWX_MASK, "private leaf not RWX")
        if self.td_state() is not TdState.TD_STATE_RUNNABLE:
            ret = yield from self.tdx_mem_page_add(gfn, level, pfn)
            return ret
        ret = yield from self.tdx_mem_page_aug(gfn, level, pfn)
        return ret

    def tdx_mem_page_aug(self, gfn: int, level: int, pfn: int) -> Gen:
        r = yield from self.seamcall(Seamcall.TDH_MEM_PAGE_AUG, (gfn << 12) | pg_level_to_tdx_sept_level(level),
                                     None, pfn << 12)
        if tdx_operand_busy(r.rax):
            return EBUSY
        if (yield from self.tdx_bug_on(is_error(r.rax), "TDH_MEM_PAGE_AUG", r)):
            return EIO
        return 0

    def tdx_mem_page_add(self, gfn: int, level: int, pfn: int) -> Gen:
        """TDH.MEM.PAGE.ADD of the source page tdx_gmem_post_populate left in kvm_tdx->page_add_src. Only
        KVM_TDX_INIT_MEM_REGION gets here: any other path (a pre-fault, a fault) bugs the VM."""
        src = self.world.get(K_PAGE_ADD_SRC, 0)
        if ((yield from self.kvm_bug_on(bool(self.world.get(K_PRE_FAULT_ALLOWED)),
                                        "PAGE.ADD after pre-faults were allowed"))
                or (yield from self.kvm_bug_on(not src, "PAGE.ADD without kvm_tdx->page_add_src"))):
            return EIO
        r = yield from self.seamcall(Seamcall.TDH_MEM_PAGE_ADD, gfn << 12, None, pfn << 12, src << 12)
        if tdx_operand_busy(r.rax):
            return EBUSY
        if (yield from self.tdx_bug_on(is_error(r.rax), "TDH_MEM_PAGE_ADD", r)):
            return EIO
        return 0

    def tdx_sept_remove_leaf_spte(self, gfn: int, level: int, old: int) -> Gen:
        """RANGE.BLOCK, TRACK (+ kick), PAGE.REMOVE (both with the no-vCPUs retry), PHYMEM.PAGE.WBINVD, then clear
        the page. No premapped special case: since PAGE.ADD happens in the map path, every present mirror leaf is
        in the S-EPT."""
        pfn = spte_to_pfn(old)
        rcx = (gfn << 12) | pg_level_to_tdx_sept_level(level)
        if (yield from self.kvm_bug_on(not self.is_hkid_assigned(),
                                       "removing a private page after the HKID was released")):
            return EIO
        if (yield from self.kvm_bug_on(level != PG_LEVEL_4K, "TODO: handle large pages")):
            return EIO
        r = yield from self.tdh_do_no_vcpus(Seamcall.TDH_MEM_RANGE_BLOCK, rcx)
        if (yield from self.tdx_bug_on(is_error(r.rax), "TDH_MEM_RANGE_BLOCK", r)):
            return EIO
        # TDX requires TLB tracking before dropping a private page.
        yield from self.tdx_track()
        r = yield from self.tdh_do_no_vcpus(Seamcall.TDH_MEM_PAGE_REMOVE, rcx)
        if (yield from self.tdx_bug_on(is_error(r.rax), "TDH_MEM_PAGE_REMOVE", r)):
            return EIO
        keyed = (pfn << 12) | (self.tdx_module.config(self.tdr).hkid << 46)
        r = yield from self.seamcall(Seamcall.TDH_PHYMEM_PAGE_WBINVD, keyed, 0)
        if (yield from self.tdx_bug_on(is_error(r.rax), "TDH_PHYMEM_PAGE_WBINVD", r)):
            return EIO
        # tdx_quirk_reset_paddr: clear the page before the host reuses it.
        self.memory.zero_page(pfn)
        return 0

    def tdh_do_no_vcpus(self, leaf: Seamcall, rcx: int, rdx: int | None = None) -> Gen:
        """Try once; on BUSY keep every vCPU out of the TD (wait_for_sept_zap + kick) and try once more.
        Only flows that hold mmu_lock for write use it (lockdep_assert_held_write)."""
        yield from self.warn_on_once(not self.holds_mmu_lock_write(),
                                     f"lockdep: {leaf.dotted} (tdh_do_no_vcpus) without the mmu_lock write lock")
        r = yield from self.seamcall(leaf, rcx, rdx)
        if tdx_operand_busy(r.rax):
            yield from self.tdx_no_vcpus_enter_start()
            r = yield from self.seamcall(leaf, rcx, rdx)
            yield from self.tdx_no_vcpus_enter_stop()
        return r

    def tdx_track(self) -> Gen:
        """TDH.MEM.TRACK, then kick every vCPU so none still runs in the old epoch. Write lock held."""
        if self.td_state() is not TdState.TD_STATE_RUNNABLE:
            return
        yield from self.warn_on_once(not self.holds_mmu_lock_write(), "tdx_track without the mmu_lock write lock")
        r = yield from self.tdh_do_no_vcpus(Seamcall.TDH_MEM_TRACK, self.tdr_pa, 0)
        yield from self.tdx_bug_on(is_error(r.rax), "TDH_MEM_TRACK", r)
        yield from self.kvm_make_all_cpus_request_outside_guest_mode()

    def tdx_flush_remote_tlbs(self) -> Gen:
        """kvm_flush_remote_tlbs for a TD: no flush_remote_tlbs hook, so KVM_REQ_TLB_FLUSH to every vCPU
        (kicking those in guest mode); each then runs tdx_flush_tlb_all = ept_sync_global for the shared EPT.
        No TDH.MEM.TRACK: "TDX has called tdx_track() in tdx_sept_remove_private_spte() ... No need to call
        tdx_track() here again"."""
        yield from self.kvm_make_all_cpus_request_outside_guest_mode()

    def tdx_no_vcpus_enter_start(self) -> Gen:
        self.world.set(K_WAIT_FOR_SEPT_ZAP, True)
        yield from self.kvm_make_all_cpus_request_outside_guest_mode()

    def tdx_no_vcpus_enter_stop(self) -> Gen:
        self.world.set(K_WAIT_FOR_SEPT_ZAP, False)
        yield Step(EngineStep.KICK, {"what": "wait_for_sept_zap cleared"})

    def kvm_make_all_cpus_request_outside_guest_mode(self) -> Gen:
        """KVM_REQ_OUTSIDE_GUEST_MODE: IPI every vCPU in guest mode and wait for each to leave it."""
        kicked = []
        for vcpu in self.vcpus:
            if vcpu.hw.in_guest:
                vcpu.hw.kick()
                kicked.append(vcpu.hw.kick_key)
        keys = tuple(kicked)
        names = {v.hw.kick_key: v.name for v in self.vcpus}
        in_guest = waits_for("the kicked vCPUs to leave guest mode",
                             lambda w: tuple(names[k] for k in keys if w.peek(k)))
        yield Step(EngineStep.KICK, {"what": "KVM_REQ_OUTSIDE_GUEST_MODE", "vcpus": len(keys)},
                   in_guest(lambda w: not any(w.peek(k) for k in keys)) if keys else None)

    # -- kvm_x86_ops.free_external_spt ------------------------------------------------------------------------
    def free_external_spt(self, gfn: int, level: int, external_spt: int) -> Gen:
        yield self._hook("free_external_spt", gfn, level, external_spt)
        ret = yield from self.tdx_sept_free_private_spt(gfn, level, external_spt)
        yield self._hook_ret("free_external_spt", gfn, level, ret)
        return ret

    def tdx_sept_free_private_spt(self, gfn: int, level: int, external_spt: int) -> Gen:
        """Only after the HKID is released: KVM never zaps mirror page tables while the TD is alive."""
        if (yield from self.kvm_bug_on(self.is_hkid_assigned(),
                                       "freeing an S-EPT page while the HKID is assigned")):
            return EIO
        ret = yield from self.tdx_reclaim_page(external_spt)
        return ret

    def tdx_reclaim_page(self, pfn: int) -> Gen:
        r = yield from self.seamcall(Seamcall.TDH_PHYMEM_PAGE_RECLAIM, pfn << 12, 0)
        if is_error(r.rax):
            yield from self.warn_on_once(True, f"TDH.PHYMEM.PAGE.RECLAIM failed: {r}")
            return EIO
        self.memory.zero_page(pfn)
        return 0

    # -- EPT violations ------------------------------------------------------------------------------------------
    def tdx_is_private_gpa(self, gpa: int) -> bool:
        return not (gpa >> 12) & self.gfn_direct_bits

    def tdx_is_sept_violation_unexpected_pending(self, exit: Any) -> bool:
        """A PENDING-page EPT violation with no permission bits in the exit qualification: the guest touched a
        page it never accepted. (v6.16 tests PROT_MASK and EXEC_FOR_RING3_LIN; newer trees renamed bit 6
        EPT_VIOLATION_PROT_USER_EXEC and folded it into EPT_VIOLATION_PROT_MASK: the same bits.)"""
        eeq_type = exit.ext_qual & TDX_EXT_EXIT_QUAL_TYPE_MASK
        if eeq_type != ExtExitQualType.PENDING_EPT_VIOLATION:
            return False
        return not exit.exit_qual & (EPT_VIOLATION_PROT_MASK | EPT_VIOLATION_EXEC_FOR_RING3_LIN)

    def tdx_handle_ept_violation(self, vcpu: Any, exit: Any) -> Gen:
        """Private violations are always writes and retried locally, so the guest is not re-entered (which
        would feed zero-step mitigation) while the fault can still be fixed here."""
        gpa = exit.gpa
        local_retry = False
        if self.tdx_is_private_gpa(gpa):
            if self.tdx_is_sept_violation_unexpected_pending(exit):
                yield from self.kvm_vm_dead(f"Guest access before accepting {gpa:#x} on vCPU {vcpu.index}")
                return EIO
            exit_qual = EPT_VIOLATION_ACC_WRITE
            local_retry = True
        else:
            exit_qual = exit.exit_qual
            if (yield from self.kvm_bug_on(bool(exit_qual & EPT_VIOLATION_ACC_INSTR),
                                           "instruction fetch from shared memory")):
                return EIO
        ret: Any = RetPf.RET_PF_RETRY
        retries = 0
        while True:
            ret = yield from self.vmx_handle_ept_violation(vcpu, gpa, exit_qual)
            if ret is not RetPf.RET_PF_RETRY or not local_retry:
                break
            if self.kvm_vcpu_has_events(vcpu) or self.signal_pending():
                break
            if self.vm_dead:
                ret = EIO
                break
            if self.tdx_local_retry_bails_on_invalid_slot:
                slot = self.kvm_vcpu_gfn_to_memslot((gpa >> 12) & ~self.gfn_direct_bits)
                if slot is not None and slot.invalid:
                    break
            retries += 1
            yield Step(EngineStep.EXIT, ExitInfo(vcpu=vcpu.index, what="local retry", gpa=gpa, retry=retries))
        vcpu.fault_retries = retries
        return ret

    def vmx_handle_ept_violation(self, vcpu: Any, gpa: int, exit_qual: int) -> Gen:
        """__vmx_handle_ept_violation (vmx/common.h, kvm-x86): exit qualification to page-fault error code. No
        bit for a read; PRESENT when the GPA had any of R/W/X (user-exec only counts with MBEC, which a TD
        lacks); GUEST_FINAL (+ USER for a user-mode linear address) or GUEST_PAGE only when the GVA is valid.
        TDX passes EPT_VIOLATION_ACC_WRITE alone for private GPAs, so those carry WRITE and PRIVATE only."""
        error_code = PFERR_WRITE_MASK if exit_qual & EPT_VIOLATION_ACC_WRITE else 0
        if exit_qual & EPT_VIOLATION_ACC_INSTR:
            error_code |= PFERR_FETCH_MASK
        if exit_qual & EPT_VIOLATION_PROT_MASK:
            error_code |= PFERR_PRESENT_MASK
        if exit_qual & EPT_VIOLATION_GVA_IS_VALID:
            if exit_qual & EPT_VIOLATION_GVA_TRANSLATED:
                error_code |= PFERR_GUEST_FINAL_MASK
                if exit_qual & EPT_VIOLATION_GVA_USER:
                    error_code |= PFERR_USER_MASK
            else:
                error_code |= PFERR_GUEST_PAGE_MASK
        if self.tdx_is_private_gpa(gpa):
            error_code |= PFERR_PRIVATE_ACCESS
        ret = yield from self.kvm_mmu_page_fault(vcpu, gpa, error_code)
        return ret

    def kvm_vcpu_has_events(self, vcpu: Any) -> bool:
        """kvm_vcpu_has_events (x86.c) for a TD. A TD's APIC is protected (guest_apic_protected), so
        kvm_cpu_has_interrupt asks tdx_protected_apic_has_interrupt, which is true when the posted-interrupt
        descriptor holds one (pi_has_pending_interrupt), and tdx_interrupt_allowed is true outside HLT. The
        other sources (NMI, SMI, INIT/SIPI, pv_unhalted, async page faults, RVI at a HLT exit) are not modelled.
        A KVM request (a kick: KVM_REQ_OUTSIDE_GUEST_MODE) is not an event: it does not end the local retry."""
        return self.pi_has_pending_interrupt(vcpu)

    def pi_has_pending_interrupt(self, vcpu: Any) -> bool:
        """pi_has_pending_interrupt (posted_intr.c): PID.ON, or a PIR bit set (the model sets both together)."""
        return bool(self.world.get(vcpu.hw.pi_key))

    def signal_pending(self) -> bool:
        """signal_pending(current): the thread running this code (the task of this step) has a signal it has
        not handled yet (a VMM's SIG_IPI, a SIGINT, ...)."""
        return bool(self.world.get(signal_key(self.world.task)))

    def tdx_deliver_interrupt(self, vcpu: Any, vector: int) -> Gen:
        """tdx_deliver_interrupt -> __vmx_deliver_posted_interrupt: set the vector in the PIR and PID.ON, then
        kvm_vcpu_trigger_posted_interrupt: a vCPU in guest mode gets the notification IPI and takes the
        interrupt without a TD exit; one outside guest mode is woken (kvm_vcpu_wake_up) and takes it at its
        next TD entry. Meanwhile kvm_vcpu_has_events is true for it, which ends a local retry loop."""
        vcpu.hw.post_interrupt(vector)
        yield Step(EngineStep.KICK, {"what": f"posted interrupt vector {vector:#x} to vCPU {vcpu.index}",
                                     "vcpu": vcpu.index, "vector": vector,
                                     "in_guest": bool(vcpu.hw.in_guest)})
        return 0

    def send_signal(self, task: str, vcpu: Any | None) -> Gen:
        """A signal to another thread (tgkill): it is pending for that thread (signal_pending), and
        signal_wake_up -> kick_process IPIs its CPU, so a vCPU thread in guest mode takes a TD exit
        (EXTERNAL_INTERRUPT) and sees the signal in vcpu_run."""
        self.world.set(signal_key(task), True)
        if vcpu is not None and vcpu.hw.in_guest:
            vcpu.hw.kick()
        yield Step(EngineStep.KICK, {"what": f"signal to {task}", "task": task})
        return 0

    def kvm_handle_signal_exit(self, vcpu: Any) -> Gen:
        """kvm_handle_signal_exit (kvm_xfer_to_guest_mode_handle_work, from vcpu_run): KVM_RUN returns -EINTR
        with run->exit_reason = KVM_EXIT_INTR, so the thread handles its signal in userspace."""
        vcpu.exit_intr = True
        yield Step(EngineStep.USER_EXIT, {"vcpu": vcpu.index, "reason": "KVM_EXIT_INTR"})
        return EINTR

    # -- build time ----------------------------------------------------------------------------------------
    def tdx_gmem_post_populate(self, vcpu: Any, gfn: int, pfn: int, src_pfn: int, measure: bool) -> Gen:
        """KVM_TDX_INIT_MEM_REGION for one page: kvm_tdp_mmu_map_private_pfn maps it in the mirror tree, and the
        leaf hook TDH.MEM.PAGE.ADDs it from page_add_src while the mirror SPTE is frozen; then TDH.MR.EXTEND
        measures it. An MR.EXTEND error bugs the VM (nothing can remove the mapping in between)."""
        gpa = gfn << 12
        if (yield from self.kvm_bug_on(bool(self.world.get(K_PAGE_ADD_SRC)), "page_add_src already set")):
            return EIO
        self.world.set(K_PAGE_ADD_SRC, src_pfn)
        ret = yield from self.kvm_tdp_mmu_map_private_pfn(vcpu, gfn, pfn)
        self.world.set(K_PAGE_ADD_SRC, 0)
        if ret or not measure:
            return ret
        for off in range(0, 4096, TDX_EXTENDMR_CHUNKSIZE):
            r = yield from self.seamcall(Seamcall.TDH_MR_EXTEND, gpa + off)
            if (yield from self.tdx_bug_on(is_error(r.rax), "TDH_MR_EXTEND", r)):
                return EIO
        return 0

    def kvm_tdp_map_page(self, vcpu: Any, gpa: int, error_code: int, level: list[int] | None = None) -> Gen:
        """kvm_tdp_map_page / kvm_tdp_prefault_page (mmu.c): a prefetch fault (Accessed clear in the leaf),
        retried while RET_PF_RETRY unless a signal is pending (-EINTR) or the VM is dead (KVM_REQ_VM_DEAD: -EIO),
        both checked before each attempt. Returns 0 when mapped (FIXED,
        SPURIOUS, WRITE_PROTECTED), -ENOENT for an MMIO gfn (RET_PF_EMULATE), else a negative errno (-EIO for a
        RET_PF value that cannot be: "could not fix page fault during prefault")."""
        while True:
            if self.signal_pending():
                return EINTR
            if self.vm_dead:
                return EIO
            r = yield from self.kvm_mmu_do_page_fault(vcpu, gpa, error_code, prefetch=True, level=level)
            if r is not RetPf.RET_PF_RETRY:
                break
        if isinstance(r, int):
            return r
        if r in (RetPf.RET_PF_FIXED, RetPf.RET_PF_SPURIOUS, RetPf.RET_PF_WRITE_PROTECTED):
            return 0
        if r is RetPf.RET_PF_EMULATE:
            return ENOENT
        yield from self.warn_on_once(True, "could not fix page fault during prefault")
        return EIO

    def tdx_td_finalize(self) -> Gen:
        """KVM_TDX_FINALIZE_VM: TDH.MR.FINALIZE; BUSY is -EBUSY, any other error bugs the VM (TDX_BUG_ON)."""
        if not self.is_hkid_assigned() or self.td_state() is TdState.TD_STATE_RUNNABLE:
            yield Step(EngineStep.WARN, {"message": "KVM_TDX_FINALIZE_VM on a finalized TD: -EINVAL"})
            return EINVAL
        r = yield from self.seamcall(Seamcall.TDH_MR_FINALIZE, self.tdr_pa, 0)
        if tdx_operand_busy(r.rax):
            return EBUSY
        if (yield from self.tdx_bug_on(is_error(r.rax), "TDH_MR_FINALIZE", r)):
            return EIO
        self.world.set(K_TD_STATE, TdState.TD_STATE_RUNNABLE)
        self.world.set(K_PRE_FAULT_ALLOWED, True)
        return 0

    # -- teardown ----------------------------------------------------------------------------------------------
    def tdx_mmu_release_hkid(self) -> Gen:
        """vm_pre_destroy: flush every vCPU, VPFLUSHDONE, CACHE.WB, KEY.FREEID. Failure leaks the HKID."""
        for vcpu in self.vcpus:
            r = yield from self.seamcall(Seamcall.TDH_VP_FLUSH, vcpu.hw.tdvpr << 12, 0)
            if is_error(r.rax) and status_base(r.rax) != TdxStatus.TDX_VCPU_NOT_ASSOCIATED:
                yield Step(EngineStep.WARN, {"message": f"TDH.VP.FLUSH failed: {r}"})
                return EIO
        r = yield from self.seamcall(Seamcall.TDH_MNG_VPFLUSHDONE, self.tdr_pa, 0)
        if is_error(r.rax):
            yield Step(EngineStep.WARN, {"message": f"TDH.MNG.VPFLUSHDONE failed, leaking HKID: {r}"})
            return EIO
        while True:
            r = yield from self.seamcall(Seamcall.TDH_PHYMEM_CACHE_WB, 0, 0)
            if status_base(r.rax) != TdxStatus.TDX_INTERRUPTED_RESUMABLE:
                break
        if is_error(r.rax):
            yield Step(EngineStep.WARN, {"message": f"TDH.PHYMEM.CACHE.WB failed, leaking HKID: {r}"})
            return EIO
        r = yield from self.seamcall(Seamcall.TDH_MNG_KEY_FREEID, self.tdr_pa, 0)
        if is_error(r.rax):
            yield Step(EngineStep.WARN, {"message": f"TDH.MNG.KEY.FREEID failed, leaking HKID: {r}"})
            return EIO
        self.world.set(K_HKID, False)
        return 0

    def tdx_reclaim_td_control_pages(self) -> Gen:
        """tdx_vm_destroy: vCPU pages, then the TDCS pages, then the TDR (which needs CHLDCNT == 0)."""
        cfg = self.tdx_module.config(self.tdr)
        for vcpu in self.vcpus:
            yield from self.tdx_reclaim_page(vcpu.hw.tdvpr)
        for page in cfg.tdcs:
            yield from self.tdx_reclaim_page(page)
        ret = yield from self.tdx_reclaim_page(self.tdr)
        if not ret:
            r = yield from self.seamcall(Seamcall.TDH_PHYMEM_PAGE_WBINVD, self.tdr_pa, 0)
            yield from self.warn_on_once(is_error(r.rax), f"TDH.PHYMEM.PAGE.WBINVD of the TDR failed: {r}")
        self.world.set(K_TD_STATE, TdState.TD_STATE_UNINITIALIZED)
