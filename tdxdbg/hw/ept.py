"""EPT formats as the hardware defines them: entry bits, levels, indices, GPAW and exit qualifications.

Sources: Intel SDM vol. 3 ch. 29 (EPT), tdx-module `ept_level_t` and `vmx_exit_qualification_t`.
"""

from __future__ import annotations

import enum

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
# Every EPT table page holds 512 eight-byte entries: 9 address bits per level.
PT_INDEX_BITS = 9
PT_ENTRIES = 1 << PT_INDEX_BITS
ENTRY_BYTES = 8

# The emulated platform's physical-address width (CPUID.80000008H:EAX[7:0]).
MAX_PA = 52
PFN_MASK = ((1 << MAX_PA) - 1) & ~(PAGE_SIZE - 1)   # entry bits 51:12


class EptBit(enum.IntFlag):
    """EPT paging-structure entry bits (SDM "EPT translation mechanism")."""

    READ = 1 << 0
    WRITE = 1 << 1
    EXEC = 1 << 2            # supervisor-mode execute ("Xs") with mode-based execute control
    IPAT = 1 << 6            # ignore PAT; the TDX module calls this bit TDMEM in S-EPT leaves
    PAGE_SIZE = 1 << 7       # "PS": this entry maps a page rather than a table
    ACCESSED = 1 << 8
    DIRTY = 1 << 9
    EXEC_USER = 1 << 10      # user-mode execute ("Xu")
    SUPPRESS_VE = 1 << 63    # SVE: an EPT violation through this entry is never converted to #VE


EPT_RWX = EptBit.READ | EptBit.WRITE | EptBit.EXEC
MEMTYPE_SHIFT = 3
MEMTYPE_MASK = 0x7 << MEMTYPE_SHIFT


class MemType(enum.IntEnum):
    UC = 0
    WB = 6


class Level(enum.IntEnum):
    """EPT levels in the TDX module's numbering (`ept_level_t`): 0 is the 4K leaf level."""

    PT = 0
    PD = 1
    PDPT = 2
    PML4 = 3
    PML5 = 4


LEVEL_LABELS = {Level.PT: "4K", Level.PD: "2M", Level.PDPT: "1G", Level.PML4: "512G", Level.PML5: "256T"}


def level_shift(level: int) -> int:
    return PAGE_SHIFT + PT_INDEX_BITS * level


def level_size(level: int) -> int:
    return 1 << level_shift(level)


def pt_index(gpa: int, level: int) -> int:
    """Index of `gpa` in the table at `level` (SDM: bits 12+9L+8 .. 12+9L)."""
    return (gpa >> level_shift(level)) & (PT_ENTRIES - 1)


def entry_pfn(entry: int) -> int:
    return (entry & PFN_MASK) >> PAGE_SHIFT


def is_present(entry: int) -> bool:
    """Hardware presence: any of R, W, X (SDM: an entry with all three clear is not present)."""
    return entry & EPT_RWX != 0


# Memory types an EPT leaf may not hold (SDM "EPT Misconfigurations": 2, 3 and 7 are reserved).
RESERVED_MEMTYPES = frozenset({2, 3, 7})


def leaf_reserved_address_mask(level: int) -> int:
    """Bits 12 .. 12+9*level-1 of a huge leaf (20:12 in a 2M PDE, 29:12 in a 1G PDPTE): reserved, since the
    page it maps is aligned to its size. Zero for a 4K leaf."""
    return (level_size(level) - 1) & ~(PAGE_SIZE - 1)


def is_misconfigured(entry: int, level: int, leaf: bool) -> bool:
    """SDM "EPT Misconfigurations" for a present entry the walk uses: write without read, a reserved address
    bit inside a huge leaf's page, or a leaf with a reserved memory type. (Bits 51:MAXPHYADDR are reserved
    too; with the emulated MAXPHYADDR of 52 there are none.) The CPU reports such an access as an
    EPT-misconfiguration VM exit, not an EPT violation."""
    if entry & EptBit.WRITE and not entry & EptBit.READ:
        return True
    if leaf and entry & leaf_reserved_address_mask(level):
        return True
    return leaf and (entry & MEMTYPE_MASK) >> MEMTYPE_SHIFT in RESERVED_MEMTYPES


class Gpaw(enum.IntEnum):
    """Guest physical-address width of a TD; the shared bit is its top bit."""

    GPAW_48 = 48
    GPAW_52 = 52

    @property
    def shared_bit(self) -> int:
        return 1 << (self.value - 1)

    @property
    def root_level(self) -> Level:
        """Top EPT level walked: 4-level EPT for GPAW 48 (PML4), 5-level for GPAW 52 (PML5)."""
        return Level.PML4 if self is Gpaw.GPAW_48 else Level.PML5


class ExitQual(enum.IntFlag):
    """EPT-violation exit qualification bits (SDM table "Exit Qualification for EPT Violations")."""

    READ = 1 << 0
    WRITE = 1 << 1
    FETCH = 1 << 2
    GPA_READABLE = 1 << 3
    GPA_WRITABLE = 1 << 4
    GPA_EXECUTABLE = 1 << 5
    GPA_EXEC_USER = 1 << 6
    GLA_VALID = 1 << 7
    GLA_TRANSLATED = 1 << 8   # access to the final translation; `page_walk_fault` in the TDX module
    USER = 1 << 9
    WRITABLE_LA = 1 << 10
    NX_LA = 1 << 11
    NMI_UNBLOCKING = 1 << 12
    SHADOW_STACK = 1 << 13


# Exit qualification "GPA readable/writable/executable" bits mirror the entry's R/W/X bits shifted by 3.
EXIT_QUAL_RWX_SHIFT = 3


class ExitReason(enum.IntEnum):
    """VMX basic exit reasons used by TD exits."""

    EXTERNAL_INTERRUPT = 1
    HLT = 12
    EPT_VIOLATION = 48
    EPT_MISCONFIG = 49
    TDCALL = 77


class Access(enum.Enum):
    """A guest memory access kind."""

    READ = "read"
    WRITE = "write"
    FETCH = "fetch"

    @property
    def exit_qual(self) -> ExitQual:
        return ACCESS_EXIT_QUAL[self]


# The exit-qualification bit each access kind sets.
ACCESS_EXIT_QUAL = {Access.READ: ExitQual.READ, Access.WRITE: ExitQual.WRITE, Access.FETCH: ExitQual.FETCH}
