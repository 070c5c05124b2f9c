"""Bit-by-bit readings of an SPTE and of an S-EPT entry, as plain frozen values."""

from __future__ import annotations

import attrs

from tdxdbg.engine.spte import (
    EPT_SPTE_HOST_WRITABLE,
    EPT_SPTE_MMU_WRITABLE,
    FROZEN_SPTE,
    PT_PAGE_SIZE_MASK,
    SHADOW_NONPRESENT_VALUE,
    VMX_EPT_ACCESS_BIT,
    VMX_EPT_DIRTY_BIT,
    VMX_EPT_EXECUTABLE_MASK,
    VMX_EPT_IPAT_BIT,
    VMX_EPT_READABLE_MASK,
    VMX_EPT_SUPPRESS_VE_BIT,
    VMX_EPT_WRITABLE_MASK,
    describe_spte,
    is_mmio_spte,
    is_shadow_present_pte,
    spte_to_pfn,
)
from tdxdbg.hw.ept import MEMTYPE_MASK, MEMTYPE_SHIFT
from tdxdbg.hw.tdx.sept import SeptEntry, SeptState


@attrs.frozen(slots=True)
class SpteBit:
    """One named bit (or field) of an SPTE: its name, bit position(s), value and meaning."""

    name: str
    bits: str
    value: int
    meaning: str


@attrs.frozen(slots=True)
class SpteBits:
    """An SPTE decoded: every bit KVM and the CPU look at, plus what they make of it."""

    value: int
    r: bool
    w: bool
    x: bool
    memtype: int
    ipat: bool
    ps: bool
    a: bool
    d: bool
    mmu_present: bool
    host_writable: bool
    mmu_writable: bool
    suppress_ve: bool
    pfn: int
    frozen: bool
    mmio: bool
    summary: str

    @property
    def fields(self) -> tuple[SpteBit, ...]:
        """The bits in display order (low to high), for a bit-by-bit pane."""
        def b(flag: bool) -> int:
            return int(flag)
        return (
            SpteBit("R", "0", b(self.r), "readable"),
            SpteBit("W", "1", b(self.w), "writable"),
            SpteBit("X", "2", b(self.x), "executable"),
            SpteBit("memtype", "5:3", self.memtype, {6: "WB", 0: "UC"}.get(self.memtype, str(self.memtype))),
            SpteBit("IPAT", "6", b(self.ipat), "ignore guest PAT"),
            SpteBit("PS", "7", b(self.ps), "page size: maps a huge page"),
            SpteBit("A", "8", b(self.a), "accessed"),
            SpteBit("D", "9", b(self.d), "dirty"),
            SpteBit("MMU-present", "11", b(self.mmu_present), "KVM: shadow-present SPTE"),
            SpteBit("pfn", "51:12", self.pfn, f"{self.pfn:#x}"),
            SpteBit("host-writable", "57", b(self.host_writable), "KVM: host mapping is writable"),
            SpteBit("MMU-writable", "58", b(self.mmu_writable), "KVM: may be made writable"),
            SpteBit("suppress-#VE", "63", b(self.suppress_ve), "EPT violations never become #VE"),
        )


def decode_spte(value: int) -> SpteBits:
    return SpteBits(
        value=value,
        r=bool(value & VMX_EPT_READABLE_MASK),
        w=bool(value & VMX_EPT_WRITABLE_MASK),
        x=bool(value & VMX_EPT_EXECUTABLE_MASK),
        memtype=(value & MEMTYPE_MASK) >> MEMTYPE_SHIFT,
        ipat=bool(value & VMX_EPT_IPAT_BIT),
        ps=bool(value & PT_PAGE_SIZE_MASK),
        a=bool(value & VMX_EPT_ACCESS_BIT),
        d=bool(value & VMX_EPT_DIRTY_BIT),
        mmu_present=is_shadow_present_pte(value),
        host_writable=bool(value & EPT_SPTE_HOST_WRITABLE),
        mmu_writable=bool(value & EPT_SPTE_MMU_WRITABLE),
        suppress_ve=bool(value & VMX_EPT_SUPPRESS_VE_BIT),
        pfn=spte_to_pfn(value),
        frozen=value == FROZEN_SPTE,
        mmio=is_mmio_spte(value) and value != SHADOW_NONPRESENT_VALUE,
        summary=describe_spte(value),
    )


@attrs.frozen(slots=True)
class SeptEntryView:
    """An S-EPT entry as the TDX module holds it. `level` is the TDX level (0 = 4K)."""

    gpa: int
    level: int
    state: SeptState
    pfn: int
    table: int = 0
    index: int = 0

    @property
    def arch_value(self) -> int:
        """The entry as TDH.MEM.SEPT.RD would report it in RCX (computed on demand)."""
        return SeptEntry(self.state, self.pfn).arch_value()

    @property
    def is_leaf(self) -> bool:
        return self.state.is_leaf


def decode_sept(entry: SeptEntry, gpa: int, level: int, table: int = 0, index: int = 0) -> SeptEntryView:
    return SeptEntryView(gpa, level, entry.state, entry.pfn if entry.state is not SeptState.FREE else 0,
                         table, index)
