"""Deliberately broken patches: each shows what the checks and the TDX module catch.

- `no-freeze`: the mirror SPTE is published before the TDX module agreed (no FROZEN window).
- `zap-without-track`: a private page is removed with RANGE.BLOCK then PAGE.REMOVE, skipping TDH.MEM.TRACK.
- `atomic-mirror-zap`: private leaves are zapped under the mmu_lock *read* lock with a cmpxchg.
"""

from __future__ import annotations

from tdxdbg.engine.kvm import Gen
from tdxdbg.engine.mmu import EIO
from tdxdbg.engine.mmu_page import AttrFilter
from tdxdbg.engine.spte import (
    PG_LEVEL_4K,
    SHADOW_NONPRESENT_VALUE,
    is_last_spte,
    is_shadow_present_pte,
    spte_to_pfn,
)
from tdxdbg.engine.steps import EngineStep, SpteWrite
from tdxdbg.engine.tdx import pg_level_to_tdx_sept_level
from tdxdbg.engine.variants.upstream import Upstream
from tdxdbg.hw.tdx.leaves import Seamcall
from tdxdbg.hw.tdx.status import is_error
from tdxdbg.runtime.step import Step


class NoFreeze(Upstream):
    """set_external_spte_present without the freeze: cmpxchg straight to the new value, then the SEAMCALL.
    Another vCPU can see a present mirror SPTE whose S-EPT entry does not exist yet."""

    name = "no-freeze"
    description = "Mirror SPTE published before the SEAMCALL (no FROZEN_SPTE window)."

    def set_external_spte_present_freeze(self, table: int, index: int, gfn: int, old: int, new: int,
                                         level: int) -> Gen:
        """The freeze step publishes `new` at once; the hook then runs with the SPTE already present (and a
        failed hook's publish step writes `old` back over `new`)."""
        ok, _cur = yield from self.try_cmpxchg64(table, index, old, new, level, gfn, SpteWrite.PUBLISH_UNFROZEN)
        return new if ok else None


class ZapWithoutTrack(Upstream):
    """tdx_sept_remove_leaf_spte without tdx_track(): the TDX module refuses PAGE.REMOVE with
    TDX_TLB_TRACKING_NOT_DONE, which KVM treats as a bug."""

    name = "zap-without-track"
    description = "RANGE.BLOCK then PAGE.REMOVE without TDH.MEM.TRACK in between."

    def tdx_sept_remove_leaf_spte(self, gfn: int, level: int, old: int) -> Gen:
        rcx = (gfn << 12) | pg_level_to_tdx_sept_level(level)
        r = yield from self.tdh_do_no_vcpus(Seamcall.TDH_MEM_RANGE_BLOCK, rcx)
        if (yield from self.tdx_bug_on(is_error(r.rax), "TDH_MEM_RANGE_BLOCK", r)):
            return EIO
        r = yield from self.tdh_do_no_vcpus(Seamcall.TDH_MEM_PAGE_REMOVE, rcx)
        if (yield from self.tdx_bug_on(is_error(r.rax), "TDH_MEM_PAGE_REMOVE", r)):
            return EIO
        pfn = spte_to_pfn(old)
        keyed = (pfn << 12) | (self.tdx_module.config(self.tdr).hkid << 46)
        r = yield from self.seamcall(Seamcall.TDH_PHYMEM_PAGE_WBINVD, keyed, 0)
        if (yield from self.tdx_bug_on(is_error(r.rax), "TDH_PHYMEM_PAGE_WBINVD", r)):
            return EIO
        self.memory.zero_page(pfn)
        return 0


class AtomicMirrorZap(Upstream):
    """Converting memory zaps private leaves under the read lock, with a cmpxchg per SPTE, as if mirror SPTEs
    could be zapped like direct ones. The S-EPT removal then runs without the write lock."""

    name = "atomic-mirror-zap"
    description = "A mirror leaf zapped under mmu_lock held for read (atomic zap)."

    def kvm_vm_set_mem_attributes(self, start: int, end: int, private: bool) -> Gen:
        if private:
            ret = yield from super().kvm_vm_set_mem_attributes(start, end, private)
            return ret
        yield Step(EngineStep.HOST_OP, {"op": "KVM_SET_MEMORY_ATTRIBUTES", "start": start, "end": end,
                                        "private": private})
        yield from self.read_lock()
        self.kvm_mmu_invalidate_begin(start, end)
        yield self.invalidate_step("begin", start, end)
        for root in self.roots():
            if self.tdp_mmu_root_match(root, self.kvm_gfn_range_filter_to_root_types(AttrFilter.KVM_FILTER_PRIVATE)):
                yield from self.tdp_mmu_zap_leafs_atomic(root, start, end)
        self.set_private_ranges(start, end, private)
        self.kvm_mmu_invalidate_end()
        yield self.invalidate_step("end", start, end)
        yield from self.read_unlock()
        return 0

    def tdp_mmu_zap_leafs_atomic(self, root: int, start: int, end: int) -> Gen:
        self.rcu_read_lock()
        it = self.iter_for(root, PG_LEVEL_4K, start)
        yield from it.start()
        while it.valid and it.gfn < end:
            old = it.old_spte
            if is_shadow_present_pte(old) and is_last_spte(old, it.level):
                ok, cur = yield from self.try_cmpxchg64(it.table, it.index, old, SHADOW_NONPRESENT_VALUE,
                                                        it.level, it.gfn, SpteWrite.ATOMIC_ZAP)
                if not ok:
                    it.old_spte = cur
                    continue
                yield from self.handle_changed_spte(0, it.gfn, old, SHADOW_NONPRESENT_VALUE, it.level, True)
                yield from self.remove_external_spte(it.gfn, old, it.level)
            yield from it.next()
        self.rcu_read_unlock()
