"""The newest KVM: kvm-x86/linux as read at commit 09c6f74ecb86 (arch/x86/kvm/vmx/tdx.c), with the TDX rework
that v6.19 brought.

Modelled from that tree: TDX_BUG_ON (a SEAMCALL error bugs the VM, warning only the first time); tdh_do_no_vcpus
(the one retry with vCPUs kept out, write lock held) for RANGE.BLOCK, PAGE.REMOVE and TRACK; KVM_TDX_INIT_MEM_REGION
through kvm_tdp_mmu_map_private_pfn, with TDH.MEM.PAGE.ADD issued by the leaf hook from kvm_tdx->page_add_src while
the mirror SPTE is frozen (no premapping, no nr_premapped); TDH.MR.EXTEND and TDH.MR.FINALIZE errors bug the VM;
the EPT-violation local retry ends on an invalid memslot; one kvm_x86_ops hook, set_external_spte(kvm, gfn,
old_spte, new_spte, level) -> tdx_sept_set_private_spte, maps tables and leaves and removes leaves; ioctls are
refused once the VM is bugged (kvm_vm_ioctl / kvm_vcpu_ioctl check vm_bugged, after "KVM: Reject ioctls only if
the VM is bugged, not simply marked dead", posted July 2025; the stored kvm_main.c could not confirm the merge).

Where the engine keeps an older shape: that tree's tdp_mmu.c (the callers of set_external_spte) could not be read
at that commit. The engine calls the hook from set_external_spte_present (freeze, hook, publish) and, for a zapped
mirror leaf, from remove_external_spte right after handle_changed_spte, as v6.16 did (read at 821655be0da7);
the mailing-list versions of the series that combined the hooks move the freeze into __tdp_mmu_set_spte_atomic
and the zap call into handle_changed_spte, which changes no SPTE value, SEAMCALL or order shown here, only
the names of the TDP MMU frames on the stack.
"""

from __future__ import annotations

from tdxdbg.engine.ioctls import IoctlOps
from tdxdbg.engine.vcpu import VcpuOps


class Upstream(VcpuOps, IoctlOps):
    """KVM as merged: mirror and direct roots, FROZEN_SPTE, external-SPT hooks, guest_memfd."""

    name = "upstream"
