"""KVM's side of the userspace ioctls that change guest memory: KVM_SET_MEMORY_ATTRIBUTES, guest_memfd hole
punching, mmu-notifier invalidation of the shared backing, memslot deletion, dirty logging, pre-faulting,
KVM_TDX_INIT_MEM_REGION / FINALIZE and VM destruction (virt/kvm/kvm_main.c, virt/kvm/guest_memfd.c,
arch/x86/kvm/mmu/mmu.c, arch/x86/kvm/vmx/tdx.c)."""

from __future__ import annotations

import errno
from typing import Any

from tdxdbg.engine.gmem import (
    HUGE_2M,
    K_INVALIDATE,
    K_MEMSLOTS,
    K_MEMSLOTS_GEN,
    Memslot,
    gmem_chunks_key,
    gmem_pfn_key,
    hva_chunk_key,
    hva_chunks_key,
    hva_page_key,
    hva_split_key,
)
from tdxdbg.engine.kvm import (
    K_DESTROYING,
    K_FILE_USERS,
    K_MN_ACTIVE_INVALIDATE_COUNT,
    K_PRE_FAULT_ALLOWED,
    K_VM_BUGGED,
    Gen,
)
from tdxdbg.engine.mmu import EINTR, EIO, PFERR_GUEST_FINAL_MASK, PFERR_PRIVATE_ACCESS
from tdxdbg.engine.mmu_page import AttrFilter, RootTypes
from tdxdbg.engine.spte import PAGE_SHIFT, PG_LEVEL_4K, PgLevel, gfn_round_for_level, kvm_pages_per_hpage
from tdxdbg.engine.steps import EngineStep
from tdxdbg.engine.tdx import EINVAL, EOPNOTSUPP, TdxOps
from tdxdbg.runtime.step import Step
from tdxdbg.runtime.waits import waits_for

# An ioctl or fallocate on a closed file descriptor: the VFS answers before KVM is reached.
EBADF = -errno.EBADF


class IoctlOps(TdxOps):
    """What KVM does when userspace changes memory."""

    # Override points a patch typically changes: kvm_vm_set_mem_attributes (conversion zaps),
    # kvm_gmem_punch_hole, the mmu notifier (kvm_mmu_notifier_invalidate_range_start/_end),
    # kvm_delete_memslot, kvm_set_dirty_logging, kvm_tdx_init_mem_region, kvm_destroy_vm, kvm_mmu_load (roots).

    # -- the ioctl entry points ---------------------------------------------------------------------------------
    def kvm_ioctls_refused(self) -> bool:
        """Whether kvm_vm_ioctl / kvm_vcpu_ioctl fail every ioctl with -EIO: once the VM is bugged
        (KVM_BUG_ON -> kvm_vm_bugged). A VM that is only dead (kvm_vm_dead) still takes ioctls; its vCPUs
        fail KVM_RUN through KVM_REQ_VM_DEAD."""
        return bool(self.world.get(K_VM_BUGGED))

    def kvm_vm_ioctl(self, ioctl: str, body: Gen) -> Gen:
        """kvm_vm_ioctl: refuse with -EIO (never running `body`) when ioctls are refused, else run it."""
        if self.kvm_ioctls_refused():
            body.close()
            yield Step(EngineStep.WARN, {"message": f"{ioctl} on a {self._refused_vm_state()} VM: -EIO"})
            return EIO
        ret = yield from body
        return ret

    def kvm_vcpu_ioctl(self, vcpu: Any, ioctl: str, body: Gen) -> Gen:
        """kvm_vcpu_ioctl: the same check as kvm_vm_ioctl, on the vCPU fd."""
        if self.kvm_ioctls_refused():
            body.close()
            yield Step(EngineStep.WARN, {"message": f"{ioctl} (vCPU {vcpu.index}) on a {self._refused_vm_state()} "
                                                    "VM: -EIO"})
            return EIO
        ret = yield from body
        return ret

    def vm_file_call(self, call: str, body: Gen) -> Gen:
        """A system call on one of the VM's files (VM fd, vCPU fd, guest_memfd), `body` being what the file's
        handler does. kvm_destroy_vm runs only at the last kvm_put_kvm, after userspace closed every such file
        (kvm_vm_release, kvm_vcpu_release and kvm_gmem_release each drop a reference); the `destroy` host
        operation models that. So a call issued once teardown began finds its descriptor closed: -EBADF from
        the VFS, before KVM is reached. A call already in progress holds a file reference (fdget) and so the VM:
        teardown waits for it to return (kvm_destroy_vm)."""
        w = self.world
        if w.get(K_DESTROYING):
            body.close()
            yield Step(EngineStep.WARN, {"message": f"{call} after destroy: the VM's file descriptors are closed "
                                                    "(kvm_destroy_vm runs at the last kvm_put_kvm): -EBADF"})
            return EBADF
        w.set(K_FILE_USERS, (*w.get(K_FILE_USERS, ()), w.task))
        try:
            ret = yield from body
        except Exception:
            # Not `finally`: a generator dropped unfinished (a replay, a fork) must not write the World.
            self._vm_file_call_done()
            raise
        self._vm_file_call_done()
        return ret

    def _vm_file_call_done(self) -> None:
        w = self.world
        users = list(w.get(K_FILE_USERS, ()))
        users.remove(w.task)
        w.set(K_FILE_USERS, tuple(users))

    def _refused_vm_state(self) -> str:
        return "bugged" if self.world.get(K_VM_BUGGED) else "dead"

    def kvm_unmap_gfn_range(self, start: int, end: int, attr_filter: AttrFilter, may_block: bool = True) -> Gen:
        flush = yield from self.kvm_tdp_mmu_unmap_gfn_range(start, end, attr_filter, may_block, False)
        if flush:
            yield from self.kvm_flush_remote_tlbs_range(start, end)
        return flush

    def kvm_flush_remote_tlbs_range(self, start: int, end: int) -> Gen:
        """Shared-EPT translations are flushed with the same TDH.MEM.TRACK + kick as private ones."""
        yield from self.tdx_flush_remote_tlbs()

    # -- KVM_SET_MEMORY_ATTRIBUTES -------------------------------------------------------------------------
    def kvm_vm_set_mem_attributes(self, start: int, end: int, private: bool) -> Gen:
        """kvm_vm_set_mem_attributes (kvm_main.c): nothing to do when the range already has the attributes (no
        invalidation, mmu_invalidate_seq unchanged). Otherwise, for the memslots the range touches
        (kvm_handle_gfn_range): begin an invalidation, kvm_arch_pre_set_memory_attributes (widen it to the head and
        tail hugepages, zap the alias that stops being valid), store the attribute, end the invalidation."""
        yield Step(EngineStep.HOST_OP, {"op": "KVM_SET_MEMORY_ATTRIBUTES", "start": start, "end": end,
                                        "private": private})
        if self.kvm_range_has_memory_attributes(start, end, private):
            yield Step(EngineStep.HOST_OP, {"op": "attributes already set: nothing to do", "start": start,
                                            "end": end})
            return 0
        slots = [s for s in self.memslots() if s.base_gfn < end and start < s.base_gfn + s.npages]
        if slots:
            yield from self.write_lock()
            # on_lock = kvm_mmu_invalidate_begin; kvm_pre_set_memory_attributes adds each slot's part of the range.
            self.kvm_mmu_invalidate_begin(max(start, slots[0].base_gfn),
                                          min(end, slots[0].base_gfn + slots[0].npages))
            for slot in slots:
                lo, hi = max(start, slot.base_gfn), min(end, slot.base_gfn + slot.npages)
                self.kvm_mmu_invalidate_range_add(lo, hi)
                self.kvm_arch_pre_set_memory_attributes_hugepages(slot, lo, hi)
            inv = self.world.get(K_INVALIDATE)
            yield self.invalidate_step("begin", inv.start, inv.end)
            # kvm_arch_pre_set_memory_attributes: going private zaps the shared alias, going shared the private one.
            attr_filter = AttrFilter.KVM_FILTER_SHARED if private else AttrFilter.KVM_FILTER_PRIVATE
            yield from self.kvm_unmap_gfn_range(start, end, attr_filter)
            yield from self.write_unlock()
        self.set_private_ranges(start, end, private)
        if slots:
            # post_set_range: on_lock = kvm_mmu_invalidate_end (the mixed flags are recomputed from the attributes
            # by range_has_uniform_attributes, so kvm_arch_post_set_memory_attributes has nothing to store).
            yield from self.write_lock()
            self.kvm_mmu_invalidate_end()
            yield self.invalidate_step("end", start, end)
            yield from self.write_unlock()
        return 0

    def kvm_arch_pre_set_memory_attributes_hugepages(self, slot: Memslot, start: int, end: int) -> None:
        """The head/tail part of kvm_arch_pre_set_memory_attributes (mmu.c, commit 9129633d568e "Prevent
        installing hugepages when mem attributes are changing", v6.15): a 2M or 1G page that the range only
        partly covers, inside the slot and not already mixed, joins the invalidation, so a fault for one of its
        gfns whose attribute is not changing cannot install a huge leaf across the change."""
        slot_end = slot.base_gfn + slot.npages
        for level in (PgLevel.PG_LEVEL_2M, PgLevel.PG_LEVEL_1G):
            nr_pages = kvm_pages_per_hpage(level)
            head = gfn_round_for_level(start, level)
            tail = gfn_round_for_level(end - 1, level)
            if ((head != start or head + nr_pages > end) and head >= slot.base_gfn
                    and head + nr_pages <= slot_end and self.range_has_uniform_attributes(head, head + nr_pages)):
                self.kvm_mmu_invalidate_range_add(head, head + nr_pages)
            if tail == head:
                continue
            if (tail + nr_pages > end and tail + nr_pages <= slot_end
                    and self.range_has_uniform_attributes(tail, tail + nr_pages)):
                self.kvm_mmu_invalidate_range_add(tail, tail + nr_pages)

    # -- guest_memfd -----------------------------------------------------------------------------------------
    def kvm_gmem_punch_hole(self, start: int, end: int) -> Gen:
        """fallocate(PUNCH_HOLE) on guest_memfd: zap private mappings of the range, then free its pages."""
        yield Step(EngineStep.HOST_OP, {"op": "guest_memfd PUNCH_HOLE", "start": start, "end": end})
        yield from self.write_lock()
        self.kvm_mmu_invalidate_begin(start, end)
        yield self.invalidate_step("begin", start, end)
        yield from self.kvm_unmap_gfn_range(start, end, AttrFilter.KVM_FILTER_PRIVATE)
        yield from self.write_unlock()
        self.truncate_gmem(start, end)
        yield from self.write_lock()
        self.kvm_mmu_invalidate_end()
        yield self.invalidate_step("end", start, end)
        yield from self.write_unlock()
        return 0

    def truncate_gmem(self, start: int, end: int) -> None:
        """Drop the guest_memfd pages of [start, end): their contents are gone, later faults get new pages."""
        w = self.world
        for slot in self.memslots():
            if not slot.guest_memfd:
                continue
            lo, hi = max(start, slot.base_gfn), min(end, slot.base_gfn + slot.npages)
            for gfn in self.gmem_gfns_in(slot, lo, hi):
                key = gmem_pfn_key(slot.id, gfn)
                pfn = w.get(key)
                if pfn is not None:
                    w.delete(key)
                    self.memory.free(pfn)
            # Chunks wholly inside the range are empty now; partly covered ones may still hold pages.
            self.forget_chunks(gmem_chunks_key(slot.id), tuple(
                c for c in self.populated_chunks_in(gmem_chunks_key(slot.id), lo, hi)
                if lo <= c * HUGE_2M and (c + 1) * HUGE_2M <= hi))

    # -- mmu notifier on the shared backing -----------------------------------------------------------------
    def kvm_mmu_notifier_invalidate_range_start(self, start: int, end: int) -> Gen:
        # mn_active_invalidate_count++ (under mn_invalidate_lock, before mmu_lock): memslot swaps wait for it.
        self.world.set(K_MN_ACTIVE_INVALIDATE_COUNT, self.world.get(K_MN_ACTIVE_INVALIDATE_COUNT, 0) + 1)
        yield from self.write_lock()
        self.kvm_mmu_invalidate_begin(start, end)
        yield self.invalidate_step("begin", start, end)
        # The notifier speaks for userspace memory: only shared mappings are affected.
        yield from self.kvm_unmap_gfn_range(start, end, AttrFilter.KVM_FILTER_SHARED)
        yield from self.write_unlock()

    def kvm_mmu_notifier_invalidate_range_end(self, start: int, end: int) -> Gen:
        yield from self.write_lock()
        self.kvm_mmu_invalidate_end()
        yield self.invalidate_step("end", start, end)
        yield from self.write_unlock()
        # mn_active_invalidate_count-- after the end callback; the last one wakes a waiting memslot swap.
        self.world.set(K_MN_ACTIVE_INVALIDATE_COUNT, self.world.get(K_MN_ACTIVE_INVALIDATE_COUNT) - 1)

    def mm_discard_shared_backing(self, start: int, end: int) -> Gen:
        """Userspace discards [start, end) of the shared backing (madvise / munmap): the mm calls KVM's mmu
        notifier around it. Once teardown began, kvm_destroy_vm's mmu_notifier_unregister (which waits for the
        callbacks in progress) has KVM hear nothing more: the memory is the process's own business."""
        w = self.world
        if w.get(K_DESTROYING):
            yield Step(EngineStep.HOST_OP, {"op": "no KVM mmu notifier registered (mmu_notifier_unregister in "
                                                  "kvm_destroy_vm): KVM is not called", "start": start, "end": end})
            return 0
        w.set(K_FILE_USERS, (*w.get(K_FILE_USERS, ()), w.task))
        yield from self.kvm_mmu_notifier_invalidate_range_start(start, end)
        self.discard_shared_backing(start, end)
        yield from self.kvm_mmu_notifier_invalidate_range_end(start, end)
        self._vm_file_call_done()
        return 0

    def discard_shared_backing(self, start: int, end: int) -> None:
        """MADV_DONTNEED of exactly [start, end) of the userspace backing (QEMU's kvm_convert_memory ->
        ram_block_discard_range): the discarded pages are freed and read back as fresh zeroed pages; a THP the
        range covers only in part is split (its other pages keep their data, mapped 4K from now on)."""
        w = self.world
        for slot in self.memslots():
            lo, hi = max(start, slot.base_gfn), min(end, slot.base_gfn + slot.npages)
            if lo >= hi:
                continue
            chunks = self.populated_chunks_in(hva_chunks_key(slot.id), lo, hi)
            for chunk in chunks:
                first = chunk * HUGE_2M
                c_lo, c_hi = max(lo, first), min(hi, first + HUGE_2M)
                whole = c_lo == first and c_hi == first + HUGE_2M
                key = hva_chunk_key(slot.id, chunk)
                base = w.get(key)
                if base is not None:
                    w.delete(key)
                    if not whole:
                        w.set(hva_split_key(slot.id, chunk), True)
                    for gfn in range(first, first + HUGE_2M):
                        if c_lo <= gfn < c_hi:
                            self._free_backing_page(base + gfn - first)
                        else:
                            w.set(hva_page_key(slot.id, gfn), base + gfn - first)
                    continue
                for gfn in range(c_lo, c_hi):
                    page = hva_page_key(slot.id, gfn)
                    pfn = w.get(page)
                    if pfn is not None:
                        w.delete(page)
                        self._free_backing_page(pfn)
                if whole:
                    # Nothing of the chunk is left: the next touch may get a THP again.
                    w.delete(hva_split_key(slot.id, chunk))
            # Chunks wholly inside the range hold nothing now; partly covered ones keep their other pages.
            self.forget_chunks(hva_chunks_key(slot.id), tuple(
                c for c in chunks if lo <= c * HUGE_2M and (c + 1) * HUGE_2M <= hi))

    def _free_backing_page(self, pfn: int) -> None:
        if self.page_pinned(pfn):
            # A pinned page outlives the mapping: it is freed when the last pin goes.
            self.world.set(("hva.orphan", pfn), True)
        else:
            self.memory.free(pfn)

    def page_pinned(self, pfn: int) -> bool:
        """Whether KVM holds a pin on a userspace page (only the v7 series pins private pages)."""
        return False

    # -- memslots -----------------------------------------------------------------------------------------------
    def kvm_delete_memslot(self, slot_id: int) -> Gen:
        """kvm_set_memslot(KVM_MR_DELETE): kvm_invalidate_memslot publishes the slot as KVM_MEMSLOT_INVALID and
        waits for every SRCU reader (faults holding the old slot) before kvm_arch_flush_shadow_memslot zaps its
        SPTEs; kvm_delete_memslot then publishes the array without it and waits for readers again."""
        slot = next(s for s in self.memslots() if s.id == slot_id)
        yield Step(EngineStep.HOST_OP, {"op": "KVM_SET_USER_MEMORY_REGION2 (delete)", "slot": slot_id})
        invalid = tuple(s._replace(invalid=True) if s.id == slot_id else s for s in self.memslots())
        yield from self.kvm_swap_active_memslots(invalid, "memslot marked KVM_MEMSLOT_INVALID", slot_id)
        yield from self.kvm_arch_flush_shadow_memslot(slot)
        remaining = tuple(s for s in self.memslots() if s.id != slot_id)
        yield from self.kvm_swap_active_memslots(remaining, "memslot removed", slot_id)
        return 0

    def kvm_swap_active_memslots(self, slots: tuple[Memslot, ...], what: str, slot_id: int) -> Gen:
        """kvm_swap_active_memslots (kvm_main.c): wait until no mmu-notifier invalidation is active
        (mn_active_invalidate_count), publish the new memslots, then synchronize_srcu_expedited so that no
        reader still uses the old ones."""
        if self.world.get(K_MN_ACTIVE_INVALIDATE_COUNT, 0):
            yield Step(EngineStep.HOST_OP, {"op": "waiting for mn_active_invalidate_count == 0", "slot": slot_id},
                       waits_for("mn_active_invalidate_count to drop to 0 (mmu-notifier invalidations to end)")(
                           lambda w: not w.peek(K_MN_ACTIVE_INVALIDATE_COUNT, 0)))
        self.world.set(K_MEMSLOTS, slots)
        yield Step(EngineStep.HOST_OP, {"op": what, "slot": slot_id})
        yield from self.synchronize_srcu_expedited()
        # The new generation (kvm_arch_memslots_updated); the model leaves out the in-progress bit 63 it carries
        # until here, which make_mmio_spte masks off anyway.
        self.world.set(K_MEMSLOTS_GEN, self.kvm_memslots_generation() + 1)

    def kvm_arch_flush_shadow_memslot(self, slot: Memslot) -> Gen:
        """kvm_arch_flush_shadow_memslot -> kvm_mmu_zap_memslot for a TD (no KVM_X86_QUIRK_SLOT_ZAP_ALL)."""
        yield from self.kvm_mmu_zap_memslot_leafs(slot)

    def kvm_mmu_zap_memslot_leafs(self, slot: Memslot) -> Gen:
        """TDX treats the SLOT_ZAP_ALL quirk as off: zap only this slot's leaves, private and shared."""
        yield from self.write_lock()
        yield from self.kvm_unmap_gfn_range(slot.base_gfn, slot.base_gfn + slot.npages,
                                            AttrFilter.KVM_FILTER_PRIVATE | AttrFilter.KVM_FILTER_SHARED)
        yield from self.write_unlock()

    def kvm_set_dirty_logging(self, slot_id: int, enable: bool) -> Gen:
        """KVM_SET_USER_MEMORY_REGION2 toggling KVM_MEM_LOG_DIRTY_PAGES (KVM_MR_FLAGS_ONLY): check_memory_region_flags
        refuses it on a guest_memfd slot ("Dirty logging private memory is not currently supported", -EINVAL);
        otherwise kvm_update_flags_memslot publishes the slot (kvm_swap_active_memslots), then
        kvm_mmu_slot_apply_flags splits huge pages and write-protects the slot's leaves."""
        slot = next(s for s in self.memslots() if s.id == slot_id)
        if enable and slot.guest_memfd:
            yield Step(EngineStep.WARN, {"message": f"KVM_MEM_LOG_DIRTY_PAGES on guest_memfd memslot {slot_id}: "
                                                    "-EINVAL (check_memory_region_flags)"})
            return EINVAL
        yield Step(EngineStep.HOST_OP, {"op": f"dirty logging {'on' if enable else 'off'}", "slot": slot_id})
        slots = tuple(s._replace(dirty_log=enable) if s.id == slot_id else s for s in self.memslots())
        yield from self.kvm_swap_active_memslots(slots, "memslot flags updated", slot_id)
        if not enable:
            return 0
        start, end = slot.base_gfn, slot.base_gfn + slot.npages
        for root in self.roots():
            if self.tdp_mmu_root_match(root, RootTypes.KVM_DIRECT_ROOTS):
                yield from self.tdp_mmu_split_huge_pages_root(root, start, end, PG_LEVEL_4K)
        yield from self.write_lock()
        changed = False
        for root in self.roots():
            if self.tdp_mmu_root_match(root, RootTypes.KVM_DIRECT_ROOTS):
                changed |= yield from self.wrprot_gfn_range(root, start, end)
        if changed:
            yield from self.tdx_flush_remote_tlbs()
        yield from self.write_unlock()
        return 0

    # -- pre-faulting and build time -----------------------------------------------------------------------
    def kvm_vcpu_pre_fault_memory(self, vcpu: Any, gpa: int, size: int) -> Gen:
        """KVM_PRE_FAULT_MEMORY (kvm_vcpu_pre_fault_memory, kvm_main.c): under kvm->srcu, map the range one
        mapping at a time, checking for a pending signal (-EINTR) before each. Returns 0 once at least one page
        was mapped, else the first error."""
        yield Step(EngineStep.HOST_OP, {"op": "KVM_PRE_FAULT_MEMORY", "gpa": gpa, "size": size})
        if not self.world.get(K_PRE_FAULT_ALLOWED):
            yield Step(EngineStep.WARN, {"message": "KVM_PRE_FAULT_MEMORY before finalize: -EOPNOTSUPP"})
            return EOPNOTSUPP
        self.srcu_read_lock()
        full_size = size
        r = 0
        while size:
            if self.signal_pending():
                r = EINTR
                break
            r = yield from self.kvm_arch_vcpu_pre_fault_memory(vcpu, gpa, size)
            if r < 0:
                break
            size -= r
            gpa += r
        self.srcu_read_unlock()
        return r if full_size == size else 0

    def kvm_arch_vcpu_pre_fault_memory(self, vcpu: Any, gpa: int, size: int) -> Gen:
        """kvm_arch_vcpu_pre_fault_memory (mmu.c): private or shared is decided by the memory attributes, not by
        the GPA (userspace passes GPAs without the shared bit; an alias is -EINVAL); the error code is
        PFERR_GUEST_FINAL (+ PRIVATE), never WRITE. Returns how many bytes the mapping made covers."""
        if (gpa >> PAGE_SHIFT) & self.gfn_direct_bits:
            # kvm_is_gfn_alias
            return EINVAL
        yield from self.kvm_mmu_load(vcpu)     # kvm_mmu_reload
        error_code = PFERR_GUEST_FINAL_MASK
        direct_bits = 0
        if self.kvm_mem_is_private(gpa >> PAGE_SHIFT):
            error_code |= PFERR_PRIVATE_ACCESS
        else:
            direct_bits = self.gfn_direct_bits << PAGE_SHIFT
        level = [PG_LEVEL_4K]
        r = yield from self.kvm_tdp_map_page(vcpu, gpa | direct_bits, error_code, level)
        if r < 0:
            return r
        # "If the mapping that covers range->gpa can use a huge page, it may start below it or end after
        # range->gpa + range->size."
        hpage = kvm_pages_per_hpage(level[0]) << PAGE_SHIFT
        end = (gpa & ~(hpage - 1)) + hpage
        return min(size, end - gpa)

    def kvm_tdx_init_mem_region(self, vcpu: Any, gpa: int, size: int, measure: bool = True) -> Gen:
        """KVM_TDX_INIT_MEM_REGION (tdx_vcpu_init_mem_region): populate private pages from a source buffer,
        before finalize, one kvm_gmem_populate -> tdx_gmem_post_populate per page."""
        yield Step(EngineStep.HOST_OP, {"op": "KVM_TDX_INIT_MEM_REGION", "gpa": gpa, "size": size})
        ret = yield from self.tdx_vcpu_init_mem_region_pages(vcpu, gpa, size, measure)
        return ret

    def tdx_vcpu_init_mem_region_pages(self, vcpu: Any, gpa: int, size: int, measure: bool) -> Gen:
        """The page loop of tdx_vcpu_init_mem_region (kvm_gmem_populate of one page at a time)."""
        for page in range(gpa, gpa + size, 4096):
            gfn = page >> 12
            slot = self.kvm_vcpu_gfn_to_memslot(gfn)
            if slot is None or not slot.guest_memfd or not self.kvm_mem_is_private(gfn):
                yield Step(EngineStep.WARN, {"message": f"INIT_MEM_REGION of a non-private gpa {page:#x}: -EINVAL"})
                return EINVAL
            src = self.memory.alloc("vmm:initial-image")
            # The initial image: each page starts with its own GPA, so a guest can check what it booted with.
            self.memory.write_word(src, 0, page)
            pfn = self.kvm_gmem_get_pfn(slot, gfn)
            ret = yield from self.tdx_gmem_post_populate(vcpu, gfn, pfn, src, measure)
            self.memory.free(src)
            if ret:
                return ret
        return 0

    # -- teardown --------------------------------------------------------------------------------------------
    def kvm_destroy_vm(self) -> Gen:
        """Userspace closes the VM's files; the last kvm_put_kvm runs kvm_destroy_vm once the system calls in
        progress on them returned: close guest_memfd (private leaves go while the HKID is assigned), release the
        HKID, zap the direct roots, tear down every root (mirror tables are reclaimed now), reclaim the TD's
        control pages. A second `destroy` finds the files closed already (-EBADF)."""
        w = self.world
        if w.get(K_DESTROYING):
            yield Step(EngineStep.WARN, {"message": "destroy after destroy: the VM's file descriptors are closed "
                                                    "already: -EBADF"})
            return EBADF
        yield Step(EngineStep.HOST_OP, {"op": "destroy VM"})
        w.set(K_DESTROYING, True)
        if w.get(K_FILE_USERS, ()):
            users = waits_for("the system calls in progress on the VM's files to return (each holds a reference "
                              "on the VM)", lambda world: world.peek(K_FILE_USERS, ()))
            yield Step(EngineStep.HOST_OP, {"op": "waiting for in-flight ioctls to drop their VM references"},
                       users(lambda world: not world.peek(K_FILE_USERS, ())))
        yield from self.kvm_make_all_cpus_request_outside_guest_mode()
        running = waits_for("the vCPU threads to stop",
                            lambda w: tuple(v.name for v in self.vcpus if not w.peek(v.stopped_key)))
        yield Step(EngineStep.HOST_OP, {"op": "waiting for vCPU threads to stop"},
                   running(lambda w: all(w.peek(v.stopped_key) for v in self.vcpus)))
        for slot in self.memslots():
            if slot.guest_memfd:
                yield from self.kvm_gmem_release(slot)
        ret = yield from self.tdx_mmu_release_hkid()
        if ret:
            return ret
        yield from self.kvm_tdp_mmu_zap_all()
        yield from self.kvm_mmu_uninit_tdp_mmu()
        yield from self.tdx_reclaim_td_control_pages()
        return 0

    def kvm_gmem_release(self, slot: Memslot) -> Gen:
        start, end = slot.base_gfn, slot.base_gfn + slot.npages
        yield Step(EngineStep.HOST_OP, {"op": "guest_memfd release", "slot": slot.id})
        yield from self.write_lock()
        self.kvm_mmu_invalidate_begin(start, end)
        yield from self.kvm_unmap_gfn_range(start, end, AttrFilter.KVM_FILTER_PRIVATE)
        self.kvm_mmu_invalidate_end()
        yield from self.write_unlock()
        self.truncate_gmem(start, end)

    def kvm_mmu_uninit_tdp_mmu(self) -> Gen:
        """Invalidate every root (mirror too, now that nothing runs) and zap them; page tables are freed."""
        yield from self.write_lock()
        yield from self.kvm_tdp_mmu_invalidate_roots(RootTypes.KVM_VALID_ROOTS)
        yield from self.write_unlock()
        # The vCPUs' own references go first (kvm_mmu_unload when each vCPU is destroyed: root.hpa becomes
        # INVALID_PAGE, so the vCPU names no freed root).
        for vcpu in self.vcpus:
            for kind in ("mirror", "direct"):
                root = vcpu.mirror_root if kind == "mirror" else vcpu.direct_root
                if root:
                    yield from self.kvm_tdp_mmu_put_root(root)
                    vcpu.set_root(kind, 0)
        yield from self.kvm_tdp_mmu_zap_invalidated_roots(shared=False)
        yield from self.warn_on_once(bool(self.roots()), "TDP MMU roots left after teardown")

    def kvm_mmu_load(self, vcpu: Any) -> Gen:
        """mmu_alloc_direct_roots: the mirror root (once) and the direct root, then load the direct root into
        the TD VMCS SHARED_EPT_POINTER (tdx_load_mmu_pgd)."""
        if vcpu.direct_root and not self.sptep_to_sp(vcpu.direct_root).role.invalid:
            return
        if not vcpu.mirror_root:
            root = yield from self.kvm_tdp_mmu_alloc_root(mirror=True)
            vcpu.set_root("mirror", root)
        if vcpu.direct_root:
            # kvm_mmu_free_obsolete_roots: drop the vCPU's reference on the invalid root.
            yield from self.kvm_tdp_mmu_put_root(vcpu.direct_root)
        root = yield from self.kvm_tdp_mmu_alloc_root(mirror=False)
        vcpu.set_root("direct", root)
        vcpu.hw.set_shared_eptp(root)

