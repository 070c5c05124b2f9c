"""The TDP MMU (arch/x86/kvm/mmu/tdp_mmu.c): roots, the map path, atomic SPTE updates with the freeze protocol,
handle_changed_spte, removal of page tables, zapping and the direct-root-only operations.

Mirror SPTEs never become present before the TDX module accepted the change: set_external_spte_present freezes
the SPTE, runs the hook (a SEAMCALL), and only then writes the new value; see docs/architecture.md "The freeze
protocol".
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from tdxdbg.engine.gmem import GmemOps
from tdxdbg.engine.kvm import Gen, RetPf
from tdxdbg.engine.mmu_page import (
    K_ROOTS,
    AttrFilter,
    KvmMmuPage,
    MmuRole,
    RootTypes,
    root_ref_key,
    root_zap_key,
    sp_key,
)
from tdxdbg.engine.spte import (
    ACC_ALL,
    EPT_SPTE_HOST_WRITABLE,
    FROZEN_SPTE,
    PG_LEVEL_4K,
    PT_WRITABLE_MASK,
    SHADOW_NONPRESENT_VALUE,
    SPTE_ENT_PER_PAGE,
    TDX_SHARED_MEMTYPE,
    PgLevel,
    is_frozen_spte,
    is_large_pte,
    is_last_spte,
    is_mmio_spte,
    is_shadow_present_pte,
    kvm_pages_per_hpage,
    leaf_spte_change_needs_tlb_flush,
    make_mmio_spte,
    make_nonleaf_spte,
    make_spte,
    shadow_accessed_mask,
    shadow_dirty_mask,
    shadow_user_mask,
    shadow_x_mask,
    spte_to_pfn,
)
from tdxdbg.engine.steps import EngineStep, HandleChangedInfo, SpteChange, SpteWrite
from tdxdbg.engine.tdp_iter import TdpIter
from tdxdbg.runtime.step import Step

if TYPE_CHECKING:
    from tdxdbg.engine.mmu import KvmPageFault

EBUSY = -errno.EBUSY
EIO = -errno.EIO

K_RCU_READERS = ("kvm.rcu_readers",)
K_RCU_PENDING = ("kvm.rcu_pending",)


def root_kind(is_mirror: bool) -> str:
    return "mirror" if is_mirror else "direct"


class TdpMmuOps(GmemOps):
    """tdp_mmu.c as methods, so a variant overrides exactly the functions its patch changes."""

    # Override points a patch typically changes: kvm_tdp_mmu_map and tdp_mmu_map_handle_target_level (the
    # fault's walk and leaf), tdp_mmu_set_spte_atomic / _tdp_mmu_set_spte_atomic (cmpxchg or the mirror path),
    # set_external_spte_present's three steps (set_external_spte_present_freeze, _hook, _publish: the freeze
    # protocol), tdp_mmu_set_spte and remove_external_spte (non-atomic zap), handle_changed_spte and
    # handle_removed_pt (removed tables), tdp_mmu_zap_leafs / tdp_mmu_zap_root, kvm_tdp_mmu_alloc_root /
    # kvm_tdp_mmu_put_root (roots; root_alloc_write_locked, root_initial_refcount), call_rcu_free_sp.

    # -- struct kvm_mmu_page bookkeeping -------------------------------------------------------------------
    def sptep_to_sp(self, table: int) -> KvmMmuPage:
        return self.world.get(sp_key(table))

    def is_mirror_sptep(self, table: int) -> bool:
        sp = self.world.get(sp_key(table))
        return sp is not None and sp.role.is_mirror

    def kvm_gfn_for_root(self, root: int, gfn: int) -> int:
        """The gfn an iterator over `root` reports for `gfn`: upstream gfns never carry the shared bit."""
        return gfn

    def kvm_gfn_root_bits(self, root: int) -> int:
        """0 for mirror roots (private memory at its natural gfn), the shared bit for direct roots."""
        return 0 if self.sptep_to_sp(root).role.is_mirror else self.gfn_direct_bits

    def tdp_mmu_alloc_sp(self) -> int:
        """A zeroed-to-SHADOW_NONPRESENT_VALUE page-table page from the vCPU's cache."""
        return self.memory.alloc_table("kvm:spt", SHADOW_NONPRESENT_VALUE)

    def tdp_mmu_init_sp(self, table: int, gfn: int, role: MmuRole) -> None:
        self.world.set(sp_key(table), KvmMmuPage(role, gfn))

    def tdp_mmu_init_child_sp(self, table: int, it: TdpIter) -> None:
        parent = self.sptep_to_sp(it.table)
        self.tdp_mmu_init_sp(table, it.gfn, parent.role.child())

    def kvm_mmu_alloc_external_spt(self, table: int) -> None:
        """Mirror SPs get a second page: the one handed to the TDX module for the S-EPT table."""
        sp = self.sptep_to_sp(table)
        ext = self.memory.alloc("kvm:external_spt")
        self.world.set(sp_key(table), sp._replace(external_spt=ext))

    def tdp_mmu_free_sp(self, table: int) -> None:
        sp = self.world.get(sp_key(table))
        if sp is not None and sp.external_spt:
            self.memory.free(sp.external_spt)
        self.world.delete(sp_key(table))
        self.memory.free(table)

    # -- RCU (enough of it to keep freed tables readable by lockless walkers until they leave) ------------------
    def rcu_read_lock(self) -> None:
        readers = self.world.get(K_RCU_READERS, ())
        self.world.set(K_RCU_READERS, (*readers, self.world.task))

    def rcu_read_unlock(self) -> None:
        w = self.world
        readers = list(w.get(K_RCU_READERS, ()))
        readers.remove(w.task)
        w.set(K_RCU_READERS, tuple(readers))
        self._rcu_process()

    def call_rcu_free_sp(self, table: int) -> None:
        """call_rcu(tdp_mmu_free_sp_rcu_callback): freed once every current RCU reader has left."""
        w = self.world
        waiters = tuple(t for t in w.get(K_RCU_READERS, ()) if t != w.task)
        if not waiters:
            self.tdp_mmu_free_sp(table)
            return
        w.set(K_RCU_PENDING, (*w.get(K_RCU_PENDING, ()), (table, waiters)))

    def _rcu_process(self) -> None:
        w = self.world
        pending = w.get(K_RCU_PENDING, ())
        if not pending:
            return
        readers = set(w.get(K_RCU_READERS, ()))
        keep = []
        for table, waiters in pending:
            left = tuple(t for t in waiters if t in readers)
            if left:
                keep.append((table, left))
            else:
                self.tdp_mmu_free_sp(table)
        w.set(K_RCU_PENDING, tuple(keep))

    # -- SPTE writes --------------------------------------------------------------------------------------------
    def _change(self, table: int, index: int, level: int, gfn: int, old: int, new: int, ok: bool,
                what: SpteWrite) -> SpteChange:
        return SpteChange(root_kind(self.is_mirror_sptep(table)), level, gfn, table, index, old, new, ok, what)

    def try_cmpxchg64(self, table: int, index: int, old: int, new: int, level: int, gfn: int,
                      what: SpteWrite = SpteWrite.SET) -> Gen:
        """try_cmpxchg64 on an SPTE: one atomic step. Returns (ok, value found)."""
        cur = self.memory.read_entry(table, index)
        ok = cur == old
        if ok:
            self.memory.write_entry(table, index, new)
        yield Step(EngineStep.SPTE_CMPXCHG, self._change(table, index, level, gfn, cur, new, ok, what))
        return ok, cur

    def kvm_tdp_mmu_write_spte(self, table: int, index: int, old: int, new: int, level: int, gfn: int,
                               what: SpteWrite = SpteWrite.SET) -> Gen:
        """__kvm_tdp_mmu_write_spte / kvm_tdp_mmu_write_spte: WRITE_ONCE, or xchg when hardware may set A/D."""
        cur = self.memory.read_entry(table, index)
        self.memory.write_entry(table, index, new)
        yield Step(EngineStep.SPTE_WRITE, self._change(table, index, level, gfn, cur, new, True, what))
        return cur

    # -- roots ----------------------------------------------------------------------------------------------
    def roots(self) -> tuple[int, ...]:
        return self.world.get(K_ROOTS, ())

    def tdp_mmu_root_match(self, root: int, types: RootTypes) -> bool:
        sp = self.sptep_to_sp(root)
        if sp.role.invalid and not types & RootTypes.KVM_INVALID_ROOTS:
            return False
        if sp.role.is_mirror:
            return bool(types & RootTypes.KVM_MIRROR_ROOTS)
        return bool(types & RootTypes.KVM_DIRECT_ROOTS)

    # kvm_tdp_mmu_alloc_root runs under mmu_lock for read and gives a new root two references: the vCPU's and
    # the TDP MMU's own (dropped when the root is zapped). Older series (kvm_tdp_mmu_get_vcpu_root_hpa) held
    # the lock for write and gave one; a variant says so by overriding these.
    root_alloc_write_locked = False
    root_initial_refcount = 2

    def kvm_tdp_mmu_alloc_root(self, mirror: bool) -> Gen:
        """Reuse a valid root with the same role.word (taking a reference) or make one."""
        role = MmuRole(self.root_level, mirror)
        if self.root_alloc_write_locked:
            lock, unlock = self.write_lock, self.write_unlock
        else:
            lock, unlock = self.read_lock, self.read_unlock
        yield from lock()
        for root in self.roots():
            sp = self.sptep_to_sp(root)
            if sp.role == role and self.world.get(root_ref_key(root), 0) > 0:
                self.world.set(root_ref_key(root), self.world.get(root_ref_key(root)) + 1)
                yield from unlock()
                return root
        table = self.tdp_mmu_alloc_sp()
        self.tdp_mmu_init_sp(table, 0, role)
        refcount = self.root_initial_refcount
        self.world.set(root_ref_key(table), refcount)
        self.world.set(K_ROOTS, (*self.roots(), table))
        yield Step(EngineStep.ROOT, {"action": "alloc", "root": table, "kind": root_kind(mirror),
                                     "role_word": role.word, "refcount": refcount})
        yield from unlock()
        return table

    def kvm_tdp_mmu_put_root(self, root: int) -> Gen:
        w = self.world
        ref = w.get(root_ref_key(root), 0) - 1
        w.set(root_ref_key(root), ref)
        if ref > 0:
            return
        sp = self.sptep_to_sp(root)
        if (yield from self.kvm_bug_on(not sp.role.invalid, "last reference put on a valid root")):
            return
        w.set(K_ROOTS, tuple(r for r in self.roots() if r != root))
        w.delete(root_ref_key(root))
        yield Step(EngineStep.ROOT, {"action": "free", "root": root, "kind": sp.kind})
        self.call_rcu_free_sp(root)

    def kvm_tdp_mmu_invalidate_roots(self, types: RootTypes) -> Gen:
        """Mark matching valid roots invalid and schedule them for zapping (write lock held)."""
        types &= ~RootTypes.KVM_INVALID_ROOTS
        for root in self.roots():
            sp = self.sptep_to_sp(root)
            if sp.role.invalid or not self.tdp_mmu_root_match(root, types):
                continue
            self.world.set(root_zap_key(root), True)
            self.world.set(sp_key(root), sp._replace(role=sp.role._replace(invalid=True)))
            yield Step(EngineStep.ROOT, {"action": "invalidate", "root": root, "kind": sp.kind})

    def kvm_tdp_mmu_zap_invalidated_roots(self, shared: bool) -> Gen:
        if shared:
            yield from self.read_lock()
        else:
            yield from self.write_lock()
        for root in self.roots():
            if not self.world.get(root_zap_key(root)):
                continue
            self.world.delete(root_zap_key(root))
            if (yield from self.kvm_bug_on(not self.sptep_to_sp(root).role.invalid, "zapping a valid root")):
                break
            yield from self.tdp_mmu_zap_root(root, shared)
            yield from self.kvm_tdp_mmu_put_root(root)
        if shared:
            yield from self.read_unlock()
        else:
            yield from self.write_unlock()

    def tdp_mmu_get_root_for_fault(self, vcpu: Any, fault: KvmPageFault) -> int:
        """The mirror root unless the GPA has the direct (shared) bits."""
        if not self.kvm_is_addr_direct(fault.addr):
            return vcpu.mirror_root
        return vcpu.direct_root

    def kvm_is_addr_direct(self, gpa: int) -> bool:
        return not self.gfn_direct_bits or bool((gpa >> 12) & self.gfn_direct_bits)

    def iter_for(self, root: int, min_level: int, gfn: int) -> TdpIter:
        sp = self.sptep_to_sp(root)
        return TdpIter(self.memory, root, sp.role.level, sp.kind, min_level, self.kvm_gfn_for_root(root, gfn),
                       self.kvm_gfn_root_bits(root))

    # -- the map path ---------------------------------------------------------------------------------------
    def kvm_tdp_mmu_map(self, vcpu: Any, fault: KvmPageFault) -> Gen:
        """Walk to the goal level, linking new tables on the way, then install the leaf. mmu_lock held for read."""
        root = self.tdp_mmu_get_root_for_fault(vcpu, fault)
        self.kvm_mmu_hugepage_adjust(vcpu, fault)
        ret = RetPf.RET_PF_RETRY
        self.rcu_read_lock()
        it = self.iter_for(root, PG_LEVEL_4K, fault.gfn)
        end = self.kvm_gfn_for_root(root, fault.gfn) + 1
        yield from it.start()
        while it.valid and it.gfn < end:
            if fault.nx_huge_page_workaround_enabled:
                self.disallowed_hugepage_adjust(fault, it.old_spte, it.level)
            # A frozen SPTE means another task is mid-update: retry rather than allocate and free a table.
            if is_frozen_spte(it.old_spte):
                break
            if it.level == fault.goal_level:
                ret = yield from self.tdp_mmu_map_handle_target_level(vcpu, fault, it)
                break
            if is_shadow_present_pte(it.old_spte) and not is_large_pte(it.old_spte):
                yield from it.next()
                continue
            sp = self.tdp_mmu_alloc_sp()
            self.tdp_mmu_init_child_sp(sp, it)
            if self.sptep_to_sp(sp).role.is_mirror:
                self.kvm_mmu_alloc_external_spt(sp)
            if fault.huge_page_disallowed:
                # sp->nx_huge_page_disallowed = fault->huge_page_disallowed (kvm_tdp_mmu_map)
                self.world.set(sp_key(sp), self.sptep_to_sp(sp)._replace(nx_huge_page_disallowed=True))
            yield Step(EngineStep.SP_ALLOC, {"table": sp, "level": it.level - 1, "gfn": it.gfn,
                                             "kind": it.root_kind,
                                             "external_spt": self.sptep_to_sp(sp).external_spt})
            if is_shadow_present_pte(it.old_spte):
                if (yield from self.kvm_bug_on(self.is_mirror_sptep(it.table),
                                               "Don't support large page for mirrored roots (TDX)")):
                    r = EBUSY
                else:
                    r = yield from self.tdp_mmu_split_huge_page(it, sp, shared=True)
            else:
                r = yield from self.tdp_mmu_link_sp(it, sp, shared=True)
            if r:
                self.tdp_mmu_free_sp(sp)
                yield Step(EngineStep.SP_FREE, {"table": sp, "why": "link failed"})
                break
            yield from it.next()
        self.rcu_read_unlock()
        return ret

    def disallowed_hugepage_adjust(self, fault: KvmPageFault, spte: int, level: int) -> None:
        """disallowed_hugepage_adjust (mmu.c): a table already sits where the huge page would go and it was
        made for an NX-disallowed huge page: go one level down, patching the next 9 bits of the gfn back into
        the pfn that kvm_mmu_hugepage_adjust aligned down."""
        if (level > PG_LEVEL_4K and level == fault.goal_level and is_shadow_present_pte(spte)
                and not is_large_pte(spte) and self.sptep_to_sp(spte_to_pfn(spte)).nx_huge_page_disallowed):
            page_mask = kvm_pages_per_hpage(level) - kvm_pages_per_hpage(level - 1)
            fault.pfn |= fault.gfn & page_mask
            fault.goal_level = level - 1

    def is_access_allowed(self, fault: KvmPageFault, spte: int) -> bool:
        if fault.exec:
            return bool(spte & shadow_x_mask)
        if fault.write:
            return bool(spte & PT_WRITABLE_MASK)
        return bool(spte & shadow_user_mask)

    def tdp_mmu_map_handle_target_level(self, vcpu: Any, fault: KvmPageFault, it: TdpIter) -> Gen:
        """Install the leaf at the goal level and decide the RET_PF value."""
        sp = self.sptep_to_sp(it.table)
        if (yield from self.warn_on_once(sp.role.level != fault.goal_level, "sp level != goal level")):
            return RetPf.RET_PF_RETRY
        old = it.old_spte
        if fault.prefetch and is_shadow_present_pte(old):
            return RetPf.RET_PF_SPURIOUS
        if is_shadow_present_pte(old) and self.is_access_allowed(fault, old) and is_last_spte(old, it.level):
            return RetPf.RET_PF_SPURIOUS
        wrprot = False
        if fault.slot is None:
            new = make_mmio_spte(it.gfn, self.kvm_memslots_generation())
        else:
            wrprot = fault.wrprot
            new = make_spte(it.level, fault.pfn, ACC_ALL, fault.prefetch, fault.map_writable,
                            TDX_SHARED_MEMTYPE, fault.nx_huge_page_workaround_enabled, wrprot)
            if new & PT_WRITABLE_MASK and fault.slot.dirty_log:
                # make_spte: a writable SPTE in a dirty-tracked slot marks the page dirty as it is made (4K
                # only: kvm_mmu_hugepage_adjust keeps such slots at 4K).
                self.mark_page_dirty_in_slot(fault.slot, fault.gfn)
        if new == old:
            return RetPf.RET_PF_SPURIOUS
        if (yield from self.tdp_mmu_set_spte_atomic(it, new)):
            return RetPf.RET_PF_RETRY
        if is_shadow_present_pte(old) and (not is_last_spte(old, it.level)
                                           or leaf_spte_change_needs_tlb_flush(old, new)):
            yield from self.kvm_flush_remote_tlbs_gfn(it.gfn, it.level)
        if wrprot and fault.write:
            return RetPf.RET_PF_WRITE_PROTECTED
        if is_mmio_spte(new) and fault.slot is None:
            return RetPf.RET_PF_EMULATE
        return RetPf.RET_PF_FIXED

    def tdp_mmu_link_sp(self, it: TdpIter, sp: int, shared: bool) -> Gen:
        """Point the iterator's SPTE at a new table: atomically under the read lock."""
        spte = make_nonleaf_spte(sp)
        if shared:
            ret = yield from self.tdp_mmu_set_spte_atomic(it, spte)
            if ret:
                return ret
        else:
            yield from self.tdp_mmu_iter_set_spte(it, spte)
        return 0

    def tdp_mmu_split_huge_page(self, it: TdpIter, sp: int, shared: bool) -> Gen:
        """Fill a new table with 512 smaller leaves of the huge SPTE, then link it in its place."""
        huge = it.old_spte
        level = it.level - 1
        step = kvm_pages_per_hpage(level)
        base_pfn = spte_to_pfn(huge)
        for i in range(SPTE_ENT_PER_PAGE):
            child = make_spte(level, base_pfn + i * step, host_writable=bool(huge & EPT_SPTE_HOST_WRITABLE),
                              memtype=TDX_SHARED_MEMTYPE)
            child = (child & ~(shadow_accessed_mask | shadow_dirty_mask | PT_WRITABLE_MASK)) | (
                huge & (shadow_accessed_mask | shadow_dirty_mask | PT_WRITABLE_MASK))
            self.memory.write_entry(sp, i, child)
        yield Step(EngineStep.SP_ALLOC, {"table": sp, "level": level, "gfn": it.gfn, "kind": it.root_kind,
                                         "split_from": huge})
        ret = yield from self.tdp_mmu_link_sp(it, sp, shared)
        return ret

    # -- atomic updates and the freeze protocol ----------------------------------------------------------------
    def tdp_mmu_set_spte_atomic(self, it: TdpIter, new: int) -> Gen:
        """Set an SPTE under the read lock; on success run handle_changed_spte. 0 or -EBUSY."""
        ret = yield from self._tdp_mmu_set_spte_atomic(it, new)
        if ret:
            return ret
        yield from self.handle_changed_spte(it.as_id, it.gfn, it.old_spte, new, it.level, shared=True)
        return 0

    def _tdp_mmu_set_spte_atomic(self, it: TdpIter, new: int) -> Gen:
        """__tdp_mmu_set_spte_atomic: mirror SPTEs go through set_external_spte_present, others a cmpxchg."""
        yield from self.warn_on_once(it.yielded or is_frozen_spte(it.old_spte),
                                     "atomic update of a frozen SPTE or after yielding")
        if self.is_mirror_sptep(it.table) and not is_frozen_spte(new):
            # Users of atomic zapping don't operate on mirror roots.
            if (yield from self.kvm_bug_on(not is_shadow_present_pte(new),
                                           "atomic zap of a mirror SPTE")):
                return EBUSY
            ret = yield from self.set_external_spte_present(it.table, it.index, it.gfn, it.old_spte, new,
                                                            it.level)
            return ret
        ok, cur = yield from self.try_cmpxchg64(it.table, it.index, it.old_spte, new, it.level, it.gfn)
        if not ok:
            it.old_spte = cur
            return EBUSY
        return 0

    def set_external_spte_present(self, table: int, index: int, gfn: int, old: int, new: int,
                                  level: int) -> Gen:
        """Freeze the mirror SPTE, make the TDX module agree (SEAMCALL), then publish `new` (or restore `old`).

        The kernel does the three steps inline; the model splits them (set_external_spte_present_freeze,
        _hook, _publish) so a variant changes one step without copying the others."""
        if (yield from self.kvm_bug_on(is_shadow_present_pte(old), "set_external_spte_present over a present SPTE")):
            return EIO
        held = yield from self.set_external_spte_present_freeze(table, index, gfn, old, new, level)
        if held is None:
            return EBUSY
        ret = yield from self.set_external_spte_present_hook(gfn, old, new, level)
        yield from self.set_external_spte_present_publish(table, index, gfn, held, old if ret else new, level, ret)
        return ret

    def set_external_spte_present_freeze(self, table: int, index: int, gfn: int, old: int, new: int,
                                         level: int) -> Gen:
        """try_cmpxchg64(sptep, &old_spte, FROZEN_SPTE): lock out other updates of the SPTE until the external
        page table has been changed. Returns the value now held in the SPTE, or None if the cmpxchg failed."""
        ok, _cur = yield from self.try_cmpxchg64(table, index, old, FROZEN_SPTE, level, gfn, SpteWrite.FREEZE)
        return FROZEN_SPTE if ok else None

    def set_external_spte_present_hook(self, gfn: int, old: int, new: int, level: int) -> Gen:
        """kvm_x86_ops.set_external_spte(kvm, gfn, old_spte, new_spte, level), for a table or a leaf alike (the
        TDX side tells them apart). 0 or an error."""
        ret = yield from self.set_external_spte(gfn, old, new, level)
        return ret

    def set_external_spte_present_publish(self, table: int, index: int, gfn: int, held: int, value: int,
                                          level: int, ret: int) -> Gen:
        """__kvm_tdp_mmu_write_spte(sptep, ret ? old_spte : new_spte): replace what the freeze step left in the
        SPTE (`held`) with `value`, the new SPTE if the hook succeeded, else the old one."""
        if held == value:
            return
        yield from self.kvm_tdp_mmu_write_spte(table, index, held, value, level, gfn,
                                               SpteWrite.RESTORE if ret else SpteWrite.UNFREEZE)

    def get_external_spt(self, gfn: int, new: int, level: int) -> int:
        child = self.world.get(sp_key(spte_to_pfn(new)))
        if child is None or child.role.level + 1 != level or child.gfn != gfn:
            return 0
        return child.external_spt

    # -- non-atomic updates (write lock) --------------------------------------------------------------------
    def tdp_mmu_set_spte(self, as_id: int, table: int, index: int, old: int, new: int, gfn: int,
                         level: int) -> Gen:
        """Set an SPTE under the write lock, handle the change, and for a mirror leaf remove it from the S-EPT."""
        yield from self.warn_on_once(is_frozen_spte(old) or is_frozen_spte(new), "non-atomic write of FROZEN_SPTE")
        old = yield from self.kvm_tdp_mmu_write_spte(table, index, old, new, level, gfn,
                                                     SpteWrite.ZAP if not is_shadow_present_pte(new)
                                                     else SpteWrite.SET)
        yield from self.handle_changed_spte(as_id, gfn, old, new, level, shared=False)
        if self.is_mirror_sptep(table):
            if (yield from self.kvm_bug_on(is_shadow_present_pte(new),
                                           "non-atomic setting of a present mirror SPTE")):
                return old
            yield from self.remove_external_spte(gfn, old, level, new)
        return old

    def tdp_mmu_iter_set_spte(self, it: TdpIter, new: int) -> Gen:
        it.old_spte = yield from self.tdp_mmu_set_spte(it.as_id, it.table, it.index, it.old_spte, new, it.gfn,
                                                       it.level)

    def remove_external_spte(self, gfn: int, old: int, level: int, new: int = SHADOW_NONPRESENT_VALUE) -> Gen:
        """Leaves only: remove the page from the S-EPT through kvm_x86_ops.set_external_spte(old, new). Needs the
        write lock; must succeed. (The newest tree makes this call from handle_changed_spte; the engine keeps it
        at the callers of handle_changed_spte that zap mirror leaves.)"""
        if not is_shadow_present_pte(old) or not is_last_spte(old, level):
            return
        yield from self.warn_on_once(not self.holds_mmu_lock_write(),
                                     "lockdep: zapping a leaf spte without the mmu_lock write lock")
        ret = yield from self.set_external_spte(gfn, old, new, level)
        yield from self.kvm_bug_on(bool(ret), "set_external_spte failed zapping a leaf with the write lock held")

    # -- handle_changed_spte and removed tables ----------------------------------------------------------------
    def handle_changed_spte(self, as_id: int, gfn: int, old: int, new: int, level: int, shared: bool) -> Gen:
        was_present = is_shadow_present_pte(old)
        is_present = is_shadow_present_pte(new)
        was_leaf = was_present and is_last_spte(old, level)
        is_leaf = is_present and is_last_spte(new, level)
        pfn_changed = spte_to_pfn(old) != spte_to_pfn(new)
        if old == new:
            return
        yield Step(EngineStep.HANDLE_CHANGED, HandleChangedInfo(gfn=gfn, level=level, old=old, new=new,
                                               shared=shared))
        if was_leaf and is_leaf and pfn_changed:
            yield from self.kvm_bug_on(True, "BUG: present leaf SPTE replaced by another pfn")
            return
        if not was_present and not is_present:
            yield from self.warn_on_once(not (is_mmio_spte(old) or is_mmio_spte(new) or is_frozen_spte(new)),
                                         "non-present to non-present SPTE change")
            return
        if was_present and not was_leaf and (is_leaf or not is_present or pfn_changed):
            yield from self.handle_removed_pt(spte_to_pfn(old), shared)

    def handle_removed_pt(self, pt: int, shared: bool) -> Gen:
        """A table was unlinked: freeze and handle every child (recursively), tell TDX, free it after RCU."""
        sp = self.sptep_to_sp(pt)
        level = sp.role.level
        base_gfn = sp.gfn
        mirror = sp.role.is_mirror
        mem = self.memory
        for i in range(SPTE_ENT_PER_PAGE):
            gfn = base_gfn + i * kvm_pages_per_hpage(level)
            if shared:
                # Spin until the SPTE we displace is not FROZEN: another task may be mid-update on it.
                while True:
                    cur = mem.read_entry(pt, i)
                    if not is_shadow_present_pte(cur) and not is_frozen_spte(cur):
                        mem.write_entry(pt, i, FROZEN_SPTE)  # non-present children: frozen silently
                        old = cur
                        break
                    if is_frozen_spte(cur):
                        yield Step(EngineStep.SPTE_CMPXCHG, self._change(pt, i, level, gfn, cur, FROZEN_SPTE, False,
                                                                         SpteWrite.FREEZE_SPIN))
                        continue
                    old = yield from self.kvm_tdp_mmu_write_spte(pt, i, cur, FROZEN_SPTE, level, gfn,
                                                                 SpteWrite.FREEZE)
                    break
            else:
                old = mem.read_entry(pt, i)
                if not is_shadow_present_pte(old):
                    continue
                yield from self.kvm_tdp_mmu_write_spte(pt, i, old, FROZEN_SPTE, level, gfn, SpteWrite.FREEZE)
            if not is_shadow_present_pte(old):
                continue
            yield from self.handle_changed_spte(0, gfn, old, FROZEN_SPTE, level, shared)
            if mirror:
                if (yield from self.kvm_bug_on(shared, "handle_removed_pt of a mirror SP under the read lock")):
                    return
                yield from self.remove_external_spte(gfn, old, level, FROZEN_SPTE)
        if mirror and sp.external_spt:
            ret = yield from self.free_external_spt(base_gfn, level, sp.external_spt)
            if ret:
                yield from self.warn_on_once(True, "free_external_spt failed: leaking the S-EPT page")
                self.world.set(sp_key(pt), sp._replace(external_spt=0))
        yield Step(EngineStep.SP_FREE, {"table": pt, "level": level, "gfn": base_gfn, "kind": sp.kind})
        self.call_rcu_free_sp(pt)

    # -- zapping ------------------------------------------------------------------------------------------------
    def tdp_mmu_zap_leafs(self, root: int, start: int, end: int, can_yield: bool, flush: bool) -> Gen:
        """Zap every present leaf in [start, end) of one root, non-atomically (write lock)."""
        yield from self.warn_on_once(not self.holds_mmu_lock_write(), "tdp_mmu_zap_leafs without the write lock")
        self.rcu_read_lock()
        it = self.iter_for(root, PG_LEVEL_4K, start)
        end = self.kvm_gfn_for_root(root, end)
        yield from it.start()
        while it.valid and it.gfn < end:
            if not is_shadow_present_pte(it.old_spte) or not is_last_spte(it.old_spte, it.level):
                yield from it.next()
                continue
            yield from self.tdp_mmu_iter_set_spte(it, SHADOW_NONPRESENT_VALUE)
            flush = not self.sptep_to_sp(root).role.invalid or flush
            yield from it.next()
        self.rcu_read_unlock()
        return flush

    def kvm_gfn_range_filter_to_root_types(self, attr_filter: AttrFilter) -> RootTypes:
        types = RootTypes(0)
        if attr_filter & AttrFilter.KVM_FILTER_PRIVATE:
            types |= RootTypes.KVM_MIRROR_ROOTS
        if attr_filter & AttrFilter.KVM_FILTER_SHARED:
            types |= RootTypes.KVM_DIRECT_ROOTS
        return types

    def kvm_tdp_mmu_unmap_gfn_range(self, start: int, end: int, attr_filter: AttrFilter, may_block: bool,
                                    flush: bool) -> Gen:
        """Zap leaves of the roots the filter selects (plus invalid roots) in [start, end)."""
        types = self.kvm_gfn_range_filter_to_root_types(attr_filter) | RootTypes.KVM_INVALID_ROOTS
        for root in self.roots():
            if self.tdp_mmu_root_match(root, types):
                flush = (yield from self.tdp_mmu_zap_leafs(root, start, end, may_block, flush)) or flush
        return flush

    def tdp_mmu_max_gfn_exclusive(self) -> int:
        return 1 << (self.spec.host_maxphyaddr - 12)

    def tdp_mmu_zap_root(self, root: int, shared: bool) -> Gen:
        """tdp_mmu_zap_root: zap everything under a root "in multiple passes of decreasing granularity, i.e. zap
        at 4KiB=>2MiB=>1GiB=>root": leaves first, then each level of now-empty tables (freed by
        handle_removed_pt, which for a mirror SP reclaims its S-EPT page), bottom-up."""
        self.rcu_read_lock()
        root_level = self.sptep_to_sp(root).role.level
        for zap_level in (PgLevel.PG_LEVEL_4K, PgLevel.PG_LEVEL_2M, PgLevel.PG_LEVEL_1G, root_level):
            yield from self._tdp_mmu_zap_root(root, shared, zap_level)
        self.rcu_read_unlock()

    def _tdp_mmu_zap_root(self, root: int, shared: bool, zap_level: int) -> Gen:
        """__tdp_mmu_zap_root, one pass: for_each_tdp_pte_min_level_all(iter, root, zap_level), zapping present
        SPTEs at zap_level (those above it are skipped; the iterator does not go below it)."""
        sp = self.sptep_to_sp(root)
        it = TdpIter(self.memory, root, sp.role.level, sp.kind, zap_level, 0, 0)
        yield from it.start()
        end = self.tdp_mmu_max_gfn_exclusive()
        while it.valid and it.gfn < end:
            if not is_shadow_present_pte(it.old_spte) or it.level > zap_level:
                yield from it.next()
                continue
            if not shared:
                yield from self.tdp_mmu_iter_set_spte(it, SHADOW_NONPRESENT_VALUE)
            elif (yield from self.tdp_mmu_set_spte_atomic(it, SHADOW_NONPRESENT_VALUE)):
                continue   # goto retry: the failed cmpxchg refreshed it.old_spte
            yield from it.next()

    def kvm_tdp_mmu_zap_all(self) -> Gen:
        """Direct and invalid roots only: mirror roots don't answer the mmu notifier."""
        yield from self.write_lock()
        for root in self.roots():
            if self.tdp_mmu_root_match(root, RootTypes.KVM_DIRECT_ROOTS | RootTypes.KVM_INVALID_ROOTS):
                yield from self.tdp_mmu_zap_root(root, False)
        yield from self.write_unlock()

    def kvm_flush_remote_tlbs_gfn(self, gfn: int, level: int) -> Gen:
        """Remote TLB flush for a gfn range; for a TD this is TDH.MEM.TRACK plus kicking every vCPU."""
        yield from self.tdx_flush_remote_tlbs()

    # -- direct-root-only operations -------------------------------------------------------------------------
    def _leafs(self, root: int, start: int, end: int) -> Gen:
        """Visit present leaves of a root in [start, end): yields steps, returns a list of (table, index, ...)."""
        found = []
        it = self.iter_for(root, PG_LEVEL_4K, start)
        end = self.kvm_gfn_for_root(root, end)
        yield from it.start()
        while it.valid and it.gfn < end:
            if is_shadow_present_pte(it.old_spte) and is_last_spte(it.old_spte, it.level):
                found.append((it.table, it.index, it.level, it.gfn, it.old_spte))
            yield from it.next()
        return found

    def wrprot_gfn_range(self, root: int, start: int, end: int, min_level: int = PG_LEVEL_4K) -> Gen:
        """Clear W on present leaves (dirty logging); direct roots only. Returns whether anything changed."""
        changed = False
        for table, index, level, gfn, old in (yield from self._leafs(root, start, end)):
            if level < min_level or not old & PT_WRITABLE_MASK:
                continue
            ok, _cur = yield from self.try_cmpxchg64(table, index, old, old & ~PT_WRITABLE_MASK, level, gfn,
                                                     SpteWrite.WRITE_PROTECT)
            changed |= ok
        return changed

    def clear_dirty_gfn_range(self, root: int, start: int, end: int) -> Gen:
        changed = False
        for table, index, level, gfn, old in (yield from self._leafs(root, start, end)):
            if not old & shadow_dirty_mask:
                continue
            ok, _cur = yield from self.try_cmpxchg64(table, index, old, old & ~shadow_dirty_mask, level, gfn,
                                                     SpteWrite.CLEAR_DIRTY)
            changed |= ok
        return changed

    def age_gfn_range(self, start: int, end: int, test_only: bool = False) -> Gen:
        """kvm_tdp_mmu_age_gfn_range: clear (or test) the A bit of valid direct-root leaves."""
        young = False
        for root in self.roots():
            if not self.tdp_mmu_root_match(root, RootTypes.KVM_DIRECT_ROOTS):
                continue
            for table, index, level, gfn, old in (yield from self._leafs(root, start, end)):
                if not old & shadow_accessed_mask:
                    continue
                young = True
                if not test_only:
                    yield from self.try_cmpxchg64(table, index, old, old & ~shadow_accessed_mask, level, gfn,
                                                  SpteWrite.AGE)
        return young

    def tdp_mmu_split_huge_pages_root(self, root: int, start: int, end: int, target_level: int) -> Gen:
        """Eager split for dirty logging: every huge leaf above `target_level` becomes a table of smaller ones."""
        yield from self.read_lock()
        self.rcu_read_lock()
        it = self.iter_for(root, target_level + 1, start)
        end = self.kvm_gfn_for_root(root, end)
        yield from it.start()
        while it.valid and it.gfn < end:
            if it.level > target_level and is_shadow_present_pte(it.old_spte) and is_large_pte(it.old_spte):
                sp = self.tdp_mmu_alloc_sp()
                self.tdp_mmu_init_child_sp(sp, it)
                if (yield from self.tdp_mmu_split_huge_page(it, sp, shared=True)):
                    self.tdp_mmu_free_sp(sp)
                    yield from it.restart()
                    continue
            yield from it.next()
        self.rcu_read_unlock()
        yield from self.read_unlock()

    # Hooks the TDX side implements (kvm_x86_ops); declared here so the TDP MMU reads on its own.
    def set_external_spte(self, gfn: int, old: int, new: int, level: int) -> Gen:
        raise NotImplementedError

    def free_external_spt(self, gfn: int, level: int, external_spt: int) -> Gen:
        raise NotImplementedError

    def tdx_flush_remote_tlbs(self) -> Gen:
        raise NotImplementedError

    def kvm_mmu_hugepage_adjust(self, vcpu: Any, fault: KvmPageFault) -> None:
        raise NotImplementedError
