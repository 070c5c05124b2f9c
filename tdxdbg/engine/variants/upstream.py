"""The newest KVM: kvm-x86/linux as read at commit 09c6f74ecb86 (arch/x86/kvm/vmx/tdx.c), with the TDX rework
that v6.19 brought.

Modelled from that tree: TDX_BUG_ON (a SEAMCALL error bugs the VM, warning only the first time); tdh_do_no_vcpus
(the one retry with vCPUs kept out, write lock held) for RANGE.BLOCK, PAGE.REMOVE and TRACK; KVM_TDX_INIT_MEM_REGION
through kvm_tdp_mmu_map_private_pfn, with TDH.MEM.PAGE.ADD issued by the leaf hook from kvm_tdx->page_add_src while
the mirror SPTE is frozen (no premapping, no nr_premapped); TDH.MR.EXTEND and TDH.MR.FINALIZE errors bug the VM;
the EPT-violation local retry ends on an invalid memslot; ioctls are refused once the VM is bugged (kvm_vm_ioctl /
kvm_vcpu_ioctl check vm_bugged, after "KVM: Reject ioctls only if the VM is bugged, not simply marked dead").

Where the engine keeps an older shape: that tree folds link/set/remove into one hook,
tdx_sept_set_private_spte(kvm, gfn, old_spte, new_spte, level) (read in tdx.c), but its caller in tdp_mmu.c was
not readable at that commit; the engine keeps the per-operation hooks (link_external_spt, set_external_spte,
remove_external_spte) that the TDP MMU calls from set_external_spte_present and remove_external_spte. The
SEAMCALLs, their operands, statuses and order are those of the combined hook.
"""

from __future__ import annotations

from tdxdbg.engine.ioctls import IoctlOps
from tdxdbg.engine.vcpu import VcpuOps


class Upstream(VcpuOps, IoctlOps):
    """KVM as merged: mirror and direct roots, FROZEN_SPTE, external-SPT hooks, guest_memfd."""

    name = "upstream"
