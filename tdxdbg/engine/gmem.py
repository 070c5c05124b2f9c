"""Memslots, per-gfn memory attributes, guest_memfd and the shared (userspace) backing, and the mmu_invalidate
sequence that makes faults racing an invalidation retry (virt/kvm/kvm_main.c:
kvm_mmu_invalidate_begin/_end, mmu_invalidate_retry_gfn; virt/kvm/guest_memfd.c: kvm_gmem_get_pfn)."""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Any, NamedTuple

from tdxdbg.engine.kvm import KvmBase
from tdxdbg.engine.spte import PG_LEVEL_4K, PgLevel, kvm_pages_per_hpage
from tdxdbg.engine.steps import EngineStep
from tdxdbg.runtime.step import Step

K_MEMSLOTS = ("kvm.memslots",)
# kvm_memslots->generation: +1 per kvm_swap_active_memslots (kvm_arch_nr_memslot_as_ids is 1 for a VM with
# private memory), so +1 per memslot created and +2 per memslot deleted (invalidate, then delete).
K_MEMSLOTS_GEN = ("kvm.memslots_generation",)
K_ATTRS = ("kvm.private_ranges",)
K_INVALIDATE = ("kvm.mmu_invalidate",)
HUGE_2M = kvm_pages_per_hpage(PgLevel.PG_LEVEL_2M)


GMEM_PFN = "gmem.pfn"   # the tag of gmem_pfn_key


def dirty_bitmap_key(slot_id: int) -> tuple[str, int]:
    """The gfns of a dirty-logged slot written since logging was enabled (memslot->dirty_bitmap)."""
    return ("kvm.dirty_bitmap", slot_id)


def gmem_pfn_key(slot_id: int, gfn: int) -> tuple:
    """The guest_memfd page backing `gfn` of a slot."""
    return (GMEM_PFN, slot_id, gfn)


def hva_chunk_key(slot_id: int, chunk: int) -> tuple:
    """The first pfn of a slot's 2 MiB chunk of userspace backing (chunk = gfn // HUGE_2M)."""
    return ("hva.chunk", slot_id, chunk)


def hva_page_key(slot_id: int, gfn: int) -> tuple:
    """The 4K page backing `gfn` of a slot in a 2 MiB chunk whose THP was split by a partial discard."""
    return ("hva.page", slot_id, gfn)


def hva_split_key(slot_id: int, chunk: int) -> tuple:
    """Set while a chunk of a slot's userspace backing is mapped with 4K pages (a partial MADV_DONTNEED split
    its THP)."""
    return ("hva.split", slot_id, chunk)


# Which 2 MiB chunks (gfn // HUGE_2M) of a slot hold pages, as a sorted tuple: the index that lets truncation
# and discards visit what is populated instead of every page of the range. The kernel's page cache is an
# xarray that truncate_inode_pages_range() walks entry by entry, skipping holes, and the mm walks only the
# populated page tables of a VMA: a terabyte memslot with one page costs one page of work, not 2^28.
def gmem_chunks_key(slot_id: int) -> tuple:
    """The chunks of a slot's guest_memfd that may hold pages."""
    return ("gmem.chunks", slot_id)


def hva_chunks_key(slot_id: int) -> tuple:
    """The chunks of a slot's userspace backing that are populated."""
    return ("hva.chunks", slot_id)


class Memslot(NamedTuple):
    """struct kvm_memory_slot: gfns [base_gfn, base_gfn + npages)."""

    id: int
    base_gfn: int
    npages: int
    guest_memfd: bool = False
    readonly: bool = False
    dirty_log: bool = False
    invalid: bool = False

    def contains(self, gfn: int) -> bool:
        return self.base_gfn <= gfn < self.base_gfn + self.npages


class MmuInvalidate(NamedTuple):
    """kvm->mmu_invalidate_seq, _in_progress and the range being invalidated."""

    seq: int = 0
    in_progress: int = 0
    start: int = 0
    end: int = 0


class GmemOps(KvmBase):
    """Memory the guest sees: where a gfn's page comes from and how userspace changes that."""

    # Override points a patch typically changes: kvm_gmem_get_pfn (guest_memfd), hva_to_pfn and
    # host_mapping_level (the shared side), kvm_mem_is_private (memory attributes), the mmu_invalidate
    # sequence (kvm_mmu_invalidate_begin/_end, mmu_invalidate_retry_gfn).

    # -- memslots ----------------------------------------------------------------------------------------------
    def memslots(self) -> tuple[Memslot, ...]:
        return self.world.get(K_MEMSLOTS, ())

    def add_memslot(self, slot: Memslot) -> None:
        """KVM_SET_USER_MEMORY_REGION2 (create), at set-up."""
        self.world.set(K_MEMSLOTS, tuple(sorted((*self.memslots(), slot), key=lambda s: s.base_gfn)))
        self.world.set(K_MEMSLOTS_GEN, self.kvm_memslots_generation() + 1)

    def kvm_memslots_generation(self) -> int:
        """kvm_vcpu_memslots(vcpu)->generation, as make_mmio_spte reads it."""
        return self.world.get(K_MEMSLOTS_GEN, 0)

    def kvm_vcpu_gfn_to_memslot(self, gfn: int) -> Memslot | None:
        for slot in self.world.get(K_MEMSLOTS, ()):
            if slot.contains(gfn):
                return slot
        return None

    def _replace_slot(self, slot_id: int, **changes: Any) -> Memslot:
        slots = list(self.memslots())
        for i, s in enumerate(slots):
            if s.id == slot_id:
                slots[i] = s._replace(**changes)
                self.world.set(K_MEMSLOTS, tuple(slots))
                return slots[i]
        raise KeyError(slot_id)

    # -- memory attributes ------------------------------------------------------------------------------------
    def private_ranges(self) -> tuple[tuple[int, int], ...]:
        return self.world.get(K_ATTRS, ())

    def kvm_mem_is_private(self, gfn: int) -> bool:
        ranges = self.world.get(K_ATTRS, ())
        i = bisect.bisect_right(ranges, (gfn, 1 << 64)) - 1
        return i >= 0 and ranges[i][0] <= gfn < ranges[i][1]

    def range_has_uniform_attributes(self, start: int, end: int) -> bool:
        """No private/shared boundary inside [start, end) (the KVM_LPAGE_MIXED_FLAG test)."""
        first = self.kvm_mem_is_private(start)
        for a, b in self.world.get(K_ATTRS, ()):
            if start < a < end or start < b < end:
                return False
        return first == self.kvm_mem_is_private(end - 1)

    def kvm_range_has_memory_attributes(self, start: int, end: int, private: bool) -> bool:
        """kvm_range_has_memory_attributes(kvm, start, end, ~0, attrs): every gfn of [start, end) is private
        (private=True) or none is (private=False)."""
        for a, b in self.world.get(K_ATTRS, ()):
            if a < end and b > start:
                if not private:
                    return False
                if a > start:
                    return False
                start = b
                if start >= end:
                    return True
        return not private or start >= end

    def set_private_ranges(self, start: int, end: int, private: bool) -> None:
        """Store the attribute for [start, end): the xarray update of kvm_vm_set_mem_attributes."""
        out: list[tuple[int, int]] = []
        for a, b in self.private_ranges():
            if b <= start or a >= end:
                out.append((a, b))
                continue
            if a < start:
                out.append((a, start))
            if b > end:
                out.append((end, b))
        if private:
            out.append((start, end))
        out.sort()
        merged: list[tuple[int, int]] = []
        for a, b in out:
            if merged and merged[-1][1] >= a:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        self.world.set(K_ATTRS, tuple(merged))

    # -- which chunks are populated -------------------------------------------------------------------------
    def populated_chunk(self, index_key: tuple, chunk: int) -> None:
        """Note that `chunk` holds pages (kept sorted)."""
        chunks = self.world.get(index_key, ())
        i = bisect.bisect_left(chunks, chunk)
        if i == len(chunks) or chunks[i] != chunk:
            self.world.set(index_key, (*chunks[:i], chunk, *chunks[i:]))

    def populated_chunks_in(self, index_key: tuple, lo: int, hi: int) -> tuple[int, ...]:
        """The populated chunks that overlap gfns [lo, hi)."""
        if lo >= hi:
            return ()
        chunks = self.world.get(index_key, ())
        return chunks[bisect.bisect_left(chunks, lo // HUGE_2M):bisect.bisect_right(chunks, (hi - 1) // HUGE_2M)]

    def forget_chunks(self, index_key: tuple, gone: tuple[int, ...]) -> None:
        if gone:
            self.world.set(index_key, tuple(c for c in self.world.get(index_key, ()) if c not in set(gone)))

    def gmem_gfns_in(self, slot: Memslot, lo: int, hi: int) -> Iterator[int]:
        """The gfns of [lo, hi) that may have a guest_memfd page: those of the populated chunks only."""
        for chunk in self.populated_chunks_in(gmem_chunks_key(slot.id), lo, hi):
            yield from range(max(lo, chunk * HUGE_2M), min(hi, (chunk + 1) * HUGE_2M))

    # -- backing memory --------------------------------------------------------------------------------------
    def kvm_gmem_get_pfn(self, slot: Memslot, gfn: int) -> int:
        """guest_memfd: the file's page for this gfn, allocated (zeroed) on first use."""
        key = gmem_pfn_key(slot.id, gfn)
        pfn = self.world.get(key)
        if pfn is None:
            pfn = self.memory.alloc("gmem")
            self.world.set(key, pfn)
            self.populated_chunk(gmem_chunks_key(slot.id), gfn // HUGE_2M)
        return pfn

    def hva_to_pfn(self, slot: Memslot, gfn: int) -> tuple[int, int]:
        """The shared backing (userspace memory): 2 MiB transparent huge pages, allocated on first touch; 4K
        pages in a chunk whose THP a partial discard split. Returns (pfn, host mapping level)."""
        w = self.world
        chunk = gfn // HUGE_2M
        key = hva_chunk_key(slot.id, chunk)
        base = w.get(key)
        if base is None and w.get(hva_split_key(slot.id, chunk)):
            page = hva_page_key(slot.id, gfn)
            pfn = w.get(page)
            if pfn is None:
                pfn = self.memory.alloc("hva")
                w.set(page, pfn)
                self.populated_chunk(hva_chunks_key(slot.id), chunk)
            return pfn, PG_LEVEL_4K
        if base is None:
            base = self.memory.alloc_contiguous(HUGE_2M, "hva", align=HUGE_2M)
            w.set(key, base)
            self.populated_chunk(hva_chunks_key(slot.id), chunk)
        return base + gfn % HUGE_2M, self.host_mapping_level(slot, gfn)

    def host_mapping_level(self, slot: Memslot, gfn: int) -> int:
        """The backing is a 2M THP when the whole 2M range lies inside the slot and no partial discard split it
        (host_pfn_mapping_level reads the host page tables: a split THP is mapped by 4K PTEs)."""
        base = gfn - gfn % HUGE_2M
        if slot.guest_memfd or slot.dirty_log:
            return PG_LEVEL_4K
        if self.world.get(hva_split_key(slot.id, gfn // HUGE_2M)):
            return PG_LEVEL_4K
        if base >= slot.base_gfn and base + HUGE_2M <= slot.base_gfn + slot.npages:
            return PgLevel.PG_LEVEL_2M
        return PG_LEVEL_4K

    def mark_page_dirty_in_slot(self, slot: Memslot | None, gfn: int) -> None:
        if slot is None or not slot.dirty_log:
            return
        key = dirty_bitmap_key(slot.id)
        bitmap = self.world.get(key, frozenset())
        if gfn not in bitmap:
            self.world.set(key, bitmap | {gfn})

    # -- mmu_invalidate ------------------------------------------------------------------------------------
    def mmu_invalidate_seq(self) -> int:
        return self.world.get(K_INVALIDATE, MmuInvalidate()).seq

    def kvm_mmu_invalidate_begin(self, start: int, end: int) -> None:
        inv: MmuInvalidate = self.world.get(K_INVALIDATE, MmuInvalidate())
        if inv.in_progress:
            start, end = min(start, inv.start), max(end, inv.end)
        self.world.set(K_INVALIDATE, MmuInvalidate(inv.seq, inv.in_progress + 1, start, end))

    def kvm_mmu_invalidate_range_add(self, start: int, end: int) -> None:
        """kvm_mmu_invalidate_range_add: widen the range of the invalidation in progress to cover [start, end)."""
        inv: MmuInvalidate = self.world.get(K_INVALIDATE, MmuInvalidate())
        self.world.set(K_INVALIDATE, inv._replace(start=min(start, inv.start), end=max(end, inv.end)))

    def kvm_mmu_invalidate_end(self) -> None:
        inv: MmuInvalidate = self.world.get(K_INVALIDATE, MmuInvalidate())
        left = inv.in_progress - 1
        self.world.set(K_INVALIDATE, MmuInvalidate(inv.seq + 1, left, inv.start if left else 0,
                                                   inv.end if left else 0))

    def mmu_invalidate_retry_gfn(self, mmu_seq: int, gfn: int) -> bool:
        inv: MmuInvalidate = self.world.get(K_INVALIDATE, MmuInvalidate())
        if inv.in_progress and inv.start <= gfn < inv.end:
            return True
        return inv.seq != mmu_seq

    def mmu_invalidate_retry_gfn_unsafe(self, mmu_seq: int, gfn: int) -> bool:
        """The lockless pre-check: same test, read without mmu_lock."""
        return self.mmu_invalidate_retry_gfn(mmu_seq, gfn)

    def invalidate_step(self, what: str, start: int, end: int) -> Step:
        inv = self.world.get(K_INVALIDATE, MmuInvalidate())
        return Step(EngineStep.INVALIDATE, {"what": what, "start": start, "end": end, "seq": inv.seq,
                                            "in_progress": inv.in_progress})
