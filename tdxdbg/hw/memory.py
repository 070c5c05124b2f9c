"""Host physical memory: a deterministic page allocator, page contents and page-table words.

All of it lives in the World, so stepping backwards restores allocations and contents too.

Keys:
  ("mem.next",)            next never-used pfn
  ("mem.free",)            head of the free list (LIFO: the most recently freed page is reused first)
  free_next_key(pfn)   free-list link
  owner_key(pfn)       who allocated the page (a short label), absent when free
  data_key(pfn)        contents of a data page: a dict {byte offset: 64-bit value}, copied on write;
                           absent means all zeroes
  pte_key(pfn, index)      an 8-byte entry of a page used as a page table; absent means the table's fill value
  fill_key(pfn)        the value every entry of a page-table page was initialised to (absent: 0)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tdxdbg.hw.ept import ENTRY_BYTES, PAGE_SIZE, PT_ENTRIES
from tdxdbg.runtime.world import MISSING, World

# The first pfn handed out (256 MiB): low memory is the host kernel's, and small pfns would look like GPAs.
FIRST_PFN = 0x10000
WORD_MASK = (1 << 64) - 1

K_NEXT = ("mem.next",)
K_FREE = ("mem.free",)
PTE = "pte"             # the tag of pte_key: ("pte", table pfn, index)


def free_next_key(pfn: int) -> tuple[str, int]:
    return ("mem.free_next", pfn)


MEM_OWNER = "mem.owner"  # the tag of owner_key


def owner_key(pfn: int) -> tuple[str, int]:
    return (MEM_OWNER, pfn)


def data_key(pfn: int) -> tuple[str, int]:
    return ("mem.data", pfn)


def pte_key(table: int, index: int) -> tuple[str, int, int]:
    """An entry of a page-table page (an SPTE): absent means the table's fill value."""
    return (PTE, table, index)


def fill_key(table: int) -> tuple[str, int]:
    return ("mem.fill", table)


def entry_value(get: Callable[..., Any], table: int, index: int) -> int:
    """The entry at (table, index) read through `get` (World.get / peek, a state mapping's get): the stored
    value, or the table's fill value when none is stored."""
    v = get(pte_key(table, index))
    return get(fill_key(table), 0) if v is None else v


class OutOfMemory(Exception):
    pass


class HostMemory:
    """Pages, their contents and page-table entries, stored in the World."""

    def __init__(self, world: World, total_pages: int = 1 << 24) -> None:
        self.world = world
        self.limit = FIRST_PFN + total_pages
        # The indexes of each table page that have an entry in the World (pte_key present), so that freeing a
        # page deletes the entries it has instead of testing all 512 keys (and a data page tests none: freeing
        # the 512 shared pages of a conversion tested 262,144 keys). Not state: it mirrors the World's pte keys,
        # which only write_entry and _clear write, and the live World only moves forward (the timeline rebuilds
        # past states in copies), so it never has to be rewound.
        self._written: dict[int, set[int]] = {}
        for key, _value in world.items():
            if key.__class__ is tuple and key and key[0] == PTE:
                self._written.setdefault(key[1], set()).add(key[2])

    def init(self) -> None:
        self.world.set(K_NEXT, FIRST_PFN)
        self.world.set(K_FREE, None)

    # -- allocation ----------------------------------------------------------------------------------------
    def alloc(self, owner: str) -> int:
        """Allocate one 4K page; its contents read as zero."""
        w = self.world
        pfn = w.get(K_FREE)
        if pfn is not None:
            w.set(K_FREE, w.get(free_next_key(pfn)))
            w.delete(free_next_key(pfn))
        else:
            pfn = w.get(K_NEXT)
            if pfn >= self.limit:
                raise OutOfMemory(f"host memory exhausted at pfn {pfn:#x}")
            w.set(K_NEXT, pfn + 1)
        w.set(owner_key(pfn), owner)
        return pfn

    def alloc_contiguous(self, count: int, owner: str, align: int = 1) -> int:
        """Allocate `count` never-used contiguous pages starting at a multiple of `align` (huge pages)."""
        w = self.world
        start = w.get(K_NEXT)
        start = (start + align - 1) // align * align
        if start + count > self.limit:
            raise OutOfMemory(f"no {count} contiguous pages left")
        w.set(K_NEXT, start + count)
        for pfn in range(start, start + count):
            w.set(owner_key(pfn), owner)
        return start

    def free(self, pfn: int) -> None:
        w = self.world
        if w.get(owner_key(pfn)) is None:
            raise ValueError(f"double free of pfn {pfn:#x}")
        w.delete(owner_key(pfn))
        self._clear(pfn)
        w.set(free_next_key(pfn), w.get(K_FREE))
        w.set(K_FREE, pfn)

    # -- data pages --------------------------------------------------------------------------------------
    def read_word(self, pfn: int, offset: int) -> int:
        data = self.world.get(data_key(pfn))
        return 0 if data is None else data.get(offset & (PAGE_SIZE - 1) & ~(ENTRY_BYTES - 1), 0)

    def write_word(self, pfn: int, offset: int, value: int) -> None:
        key = data_key(pfn)
        data = dict(self.world.get(key) or {})
        offset = offset & (PAGE_SIZE - 1) & ~(ENTRY_BYTES - 1)
        value &= WORD_MASK
        if value:
            data[offset] = value
        else:
            data.pop(offset, None)
        self.world.set(key, data or None)

    def zero_page(self, pfn: int) -> None:
        self.world.delete(data_key(pfn))

    def copy_page(self, src: int, dst: int) -> None:
        self.world.set(data_key(dst), self.world.get(data_key(src)))

    def page_data(self, pfn: int) -> dict[int, int]:
        return dict(self.world.get(data_key(pfn)) or {})

    # -- page-table pages -------------------------------------------------------------------------------
    def alloc_table(self, owner: str, fill: int = 0) -> int:
        """Allocate a page-table page whose 512 entries all read as `fill` (KVM fills its tables with
        SHADOW_NONPRESENT_VALUE, so a TD never sees a #VE-able zero entry)."""
        pfn = self.alloc(owner)
        if fill:
            self.world.set(fill_key(pfn), fill)
        return pfn

    def read_entry(self, table_pfn: int, index: int) -> int:
        value = self.world.get(pte_key(table_pfn, index))
        if value is None:
            return self.world.peek(fill_key(table_pfn), 0)
        return value

    def write_entry(self, table_pfn: int, index: int, value: int) -> None:
        fill = self.world.peek(fill_key(table_pfn), 0)
        if value != fill:
            self.world.set(pte_key(table_pfn, index), value)
            written = self._written.get(table_pfn)
            if written is None:
                self._written[table_pfn] = {index}
            else:
                written.add(index)
        else:
            self.world.set(pte_key(table_pfn, index), MISSING)
            written = self._written.get(table_pfn)
            if written is not None:
                written.discard(index)

    def table_entries(self, table_pfn: int) -> dict[int, int]:
        """Entries of a table page that differ from its fill value, unrecorded (for views)."""
        peek = self.world.peek
        fill = peek(fill_key(table_pfn), 0)
        out = {}
        for i in range(PT_ENTRIES):
            v = peek(pte_key(table_pfn, i))
            if v is not None and v != fill:
                out[i] = v
        return out

    def _clear(self, pfn: int) -> None:
        w = self.world
        w.delete(data_key(pfn))
        w.delete(fill_key(pfn))
        written = self._written.pop(pfn, None)
        if written:
            for i in sorted(written):   # index order, as a scan of the 512 entries would delete them
                w.delete(pte_key(pfn, i))
