"""SPTE encoding: KVM's software bits over the EPT format, as `kvm_mmu_set_ept_masks` configures them for TDX.

Values from arch/x86/kvm/mmu/spte.h and spte.c (make_spte, make_nonleaf_spte, kvm_mmu_set_ept_masks). Levels here
are KVM's (PG_LEVEL_4K = 1 ... 5), unlike the TDX module's (0 = 4K).
"""

from __future__ import annotations

import enum

from tdxdbg.hw.ept import MEMTYPE_SHIFT, EptBit, MemType


class PgLevel(enum.IntEnum):
    """KVM's page levels (`enum pg_level`)."""

    PG_LEVEL_4K = 1
    PG_LEVEL_2M = 2
    PG_LEVEL_1G = 3
    PG_LEVEL_512G = 4
    PG_LEVEL_256T = 5

    @property
    def label(self) -> str:
        return {1: "4K", 2: "2M", 3: "1G", 4: "512G", 5: "256T"}[self.value]


PG_LEVEL_4K = PgLevel.PG_LEVEL_4K
PT64_ROOT_MAX_LEVEL = 5
KVM_MAX_HUGEPAGE_LEVEL = PgLevel.PG_LEVEL_1G
SPTE_LEVEL_BITS = 9
SPTE_ENT_PER_PAGE = 1 << SPTE_LEVEL_BITS
PAGE_SHIFT = 12

# EPT bits as KVM names them (vmx.h) and the shadow masks `kvm_mmu_set_ept_masks` derives from them.
VMX_EPT_READABLE_MASK = int(EptBit.READ)
VMX_EPT_WRITABLE_MASK = int(EptBit.WRITE)
VMX_EPT_EXECUTABLE_MASK = int(EptBit.EXEC)
VMX_EPT_RWX_MASK = VMX_EPT_READABLE_MASK | VMX_EPT_WRITABLE_MASK | VMX_EPT_EXECUTABLE_MASK
VMX_EPT_IPAT_BIT = int(EptBit.IPAT)
VMX_EPT_ACCESS_BIT = int(EptBit.ACCESSED)
VMX_EPT_DIRTY_BIT = int(EptBit.DIRTY)
VMX_EPT_SUPPRESS_VE_BIT = int(EptBit.SUPPRESS_VE)
PT_WRITABLE_MASK = VMX_EPT_WRITABLE_MASK
PT_PAGE_SIZE_MASK = int(EptBit.PAGE_SIZE)

shadow_user_mask = VMX_EPT_READABLE_MASK     # ACC_USER means "readable" for EPT
shadow_x_mask = VMX_EPT_EXECUTABLE_MASK
shadow_nx_mask = 0
shadow_accessed_mask = VMX_EPT_ACCESS_BIT
shadow_dirty_mask = VMX_EPT_DIRTY_BIT
# Exec-only EPT is supported, so only SUPPRESS_VE is in the present mask.
shadow_present_mask = VMX_EPT_SUPPRESS_VE_BIT
shadow_me_value = 0
shadow_acc_track_mask = VMX_EPT_RWX_MASK

SPTE_MMU_PRESENT_MASK = 1 << 11
SPTE_BASE_ADDR_MASK = 0x000F_FFFF_FFFF_F000
SPTE_TDP_AD_SHIFT = 52
SPTE_TDP_AD_MASK = 3 << SPTE_TDP_AD_SHIFT
SPTE_TDP_AD_ENABLED = 0
SPTE_TDP_AD_DISABLED = 1 << SPTE_TDP_AD_SHIFT
SPTE_TDP_AD_WRPROT_ONLY = 2 << SPTE_TDP_AD_SHIFT
EPT_SPTE_HOST_WRITABLE = 1 << 57
EPT_SPTE_MMU_WRITABLE = 1 << 58
shadow_host_writable_mask = EPT_SPTE_HOST_WRITABLE
shadow_mmu_writable_mask = EPT_SPTE_MMU_WRITABLE

# "needs to set bit 63 for TDX, in order to suppress #VE and get EPT violations on non-present PTEs".
SHADOW_NONPRESENT_VALUE = VMX_EPT_SUPPRESS_VE_BIT
# The value a TDP MMU walker writes to freeze an SPTE; not present, no pfn bits.
FROZEN_SPTE = SHADOW_NONPRESENT_VALUE | 0x5A0
# Pre-6.10 name and value of the frozen marker (v7 era): 0x5a0 ORed into the TDX init value.
REMOVED_SPTE = 0x5A0

# Memory type of a TDX shared-EPT leaf: WB without IPAT (TDX disables KVM_X86_QUIRK_IGNORE_GUEST_PAT).
TDX_SHARED_MEMTYPE = MemType.WB << MEMTYPE_SHIFT

# ACC_* access bits of make_spte.
ACC_EXEC_MASK = 1
ACC_WRITE_MASK = PT_WRITABLE_MASK
ACC_USER_MASK = 4
ACC_ALL = ACC_EXEC_MASK | ACC_WRITE_MASK | ACC_USER_MASK

# The TDP MMU's "MMIO" SPTE for a TD: `tdx_vm_init` sets the per-VM MMIO value to 0, so a gfn with no memslot
# maps to an entry with RWX = 0 and SUPPRESS_VE clear, which the TD takes as #VE.
TDX_MMIO_SPTE_VALUE = 0
# MMIO SPTEs carry the memslot generation they were made in (spte.h): generation bits 0-7 in SPTE bits 3-10,
# bits 8-18 in SPTE bits 52-62 (bit 11 is SPTE_MMU_PRESENT_MASK, bit 63 SUPPRESS_VE).
MMIO_SPTE_GEN_LOW_START = 3
MMIO_SPTE_GEN_LOW_END = 10
MMIO_SPTE_GEN_HIGH_START = 52
MMIO_SPTE_GEN_HIGH_END = 62
MMIO_SPTE_GEN_LOW_MASK = ((1 << (MMIO_SPTE_GEN_LOW_END + 1)) - 1) & ~((1 << MMIO_SPTE_GEN_LOW_START) - 1)
MMIO_SPTE_GEN_HIGH_MASK = ((1 << (MMIO_SPTE_GEN_HIGH_END + 1)) - 1) & ~((1 << MMIO_SPTE_GEN_HIGH_START) - 1)
MMIO_SPTE_GEN_LOW_BITS = MMIO_SPTE_GEN_LOW_END - MMIO_SPTE_GEN_LOW_START + 1
MMIO_SPTE_GEN_HIGH_BITS = MMIO_SPTE_GEN_HIGH_END - MMIO_SPTE_GEN_HIGH_START + 1
MMIO_SPTE_GEN_LOW_SHIFT = MMIO_SPTE_GEN_LOW_START
MMIO_SPTE_GEN_HIGH_SHIFT = MMIO_SPTE_GEN_HIGH_START - MMIO_SPTE_GEN_LOW_BITS
MMIO_SPTE_GEN_MASK = (1 << (MMIO_SPTE_GEN_LOW_BITS + MMIO_SPTE_GEN_HIGH_BITS)) - 1
# shadow_mmio_access_mask is 0 with EPT (kvm_mmu_set_ept_masks); shadow_nonpresent_or_rsvd_mask is 0 on CPUs
# without L1TF, which every TDX-capable CPU is.
shadow_mmio_access_mask = 0


def generation_mmio_spte_mask(gen: int) -> int:
    """generation_mmio_spte_mask (spte.h): the memslot generation spread over the two MMIO generation fields."""
    gen &= MMIO_SPTE_GEN_MASK
    return ((gen << MMIO_SPTE_GEN_LOW_SHIFT) & MMIO_SPTE_GEN_LOW_MASK) | (
        (gen << MMIO_SPTE_GEN_HIGH_SHIFT) & MMIO_SPTE_GEN_HIGH_MASK)


def make_mmio_spte(gfn: int, generation: int, mmio_value: int = TDX_MMIO_SPTE_VALUE, access: int = ACC_ALL) -> int:
    """make_mmio_spte (spte.c): generation bits | the VM's shadow_mmio_value | access & shadow_mmio_access_mask |
    the gpa. For a TD mmio_value is 0, so RWX and SUPPRESS_VE are clear: the CPU raises #VE on access."""
    return generation_mmio_spte_mask(generation) | mmio_value | (access & shadow_mmio_access_mask) | (gfn << PAGE_SHIFT)


def get_mmio_spte_generation(spte: int) -> int:
    """get_mmio_spte_generation (spte.h)."""
    return ((spte & MMIO_SPTE_GEN_LOW_MASK) >> MMIO_SPTE_GEN_LOW_SHIFT) | (
        (spte & MMIO_SPTE_GEN_HIGH_MASK) >> MMIO_SPTE_GEN_HIGH_SHIFT)


def is_shadow_present_pte(spte: int) -> bool:
    return bool(spte & SPTE_MMU_PRESENT_MASK)


def is_large_pte(spte: int) -> bool:
    return bool(spte & PT_PAGE_SIZE_MASK)


def is_last_spte(spte: int, level: int) -> bool:
    return level == PG_LEVEL_4K or is_large_pte(spte)


def is_frozen_spte(spte: int) -> bool:
    return spte == FROZEN_SPTE


def spte_to_pfn(spte: int) -> int:
    return (spte & SPTE_BASE_ADDR_MASK) >> PAGE_SHIFT


def is_writable_pte(spte: int) -> bool:
    return bool(spte & PT_WRITABLE_MASK)


def is_mmu_writable_spte(spte: int) -> bool:
    return bool(spte & shadow_mmu_writable_mask)


def is_accessed_spte(spte: int) -> bool:
    return bool(spte & shadow_accessed_mask)


def is_dirty_spte(spte: int) -> bool:
    return bool(spte & shadow_dirty_mask)


def is_mmio_spte(spte: int) -> bool:
    """TDX MMIO SPTEs are the per-VM value 0 under the MMIO mask (RWX | SUPPRESS_VE)."""
    mmio_mask = VMX_EPT_RWX_MASK | VMX_EPT_SUPPRESS_VE_BIT
    return spte & mmio_mask == TDX_MMIO_SPTE_VALUE and not spte & SPTE_MMU_PRESENT_MASK


def is_ept_ve_possible(spte: int) -> bool:
    """An SPTE the CPU would turn into #VE: no SUPPRESS_VE while the present mask has it, and not W|X misconfig."""
    return not spte & VMX_EPT_SUPPRESS_VE_BIT and spte & VMX_EPT_RWX_MASK != (VMX_EPT_WRITABLE_MASK
                                                                                 | VMX_EPT_EXECUTABLE_MASK)


def leaf_spte_change_needs_tlb_flush(old: int, new: int) -> bool:
    return is_mmu_writable_spte(old) and not is_mmu_writable_spte(new)


def kvm_pages_per_hpage(level: int) -> int:
    """KVM_PAGES_PER_HPAGE: 4K pages mapped by one SPTE at `level`."""
    return 1 << (SPTE_LEVEL_BITS * (level - 1))


def gfn_round_for_level(gfn: int, level: int) -> int:
    return gfn & -kvm_pages_per_hpage(level)


def spte_index(addr: int, level: int) -> int:
    """SPTE_INDEX(addr, level)."""
    return (addr >> (PAGE_SHIFT + SPTE_LEVEL_BITS * (level - 1))) & (SPTE_ENT_PER_PAGE - 1)


def make_nonleaf_spte(child_pfn: int, ad_disabled: bool = False) -> int:
    """`make_nonleaf_spte`: a present, RWX, accessed pointer to a child table."""
    spte = SPTE_MMU_PRESENT_MASK | (child_pfn << PAGE_SHIFT) | shadow_present_mask | PT_WRITABLE_MASK
    spte |= shadow_user_mask | shadow_x_mask | shadow_me_value
    spte |= SPTE_TDP_AD_DISABLED if ad_disabled else shadow_accessed_mask
    return spte


def make_spte(level: int, pfn: int, access: int = ACC_ALL, prefetch: bool = False, host_writable: bool = True,
              memtype: int = TDX_SHARED_MEMTYPE, nx_huge_page_workaround: bool = False,
              wrprot: bool = False) -> int:
    """`make_spte` for a TDP leaf, in the kernel's order. Returns the new SPTE.

    `wrprot` stands for `mmu_try_to_unsync_pages` asking to write-protect (never for TDP without shadowed
    guest page tables) or a dirty-logging slot being write-protected.
    """
    spte = SPTE_MMU_PRESENT_MASK | SPTE_TDP_AD_ENABLED | shadow_present_mask
    if not prefetch:
        spte |= shadow_accessed_mask
    if level > PG_LEVEL_4K and access & ACC_EXEC_MASK and nx_huge_page_workaround:
        access &= ~ACC_EXEC_MASK
    spte |= shadow_x_mask if access & ACC_EXEC_MASK else shadow_nx_mask
    if access & ACC_USER_MASK:
        spte |= shadow_user_mask
    if level > PG_LEVEL_4K:
        spte |= PT_PAGE_SIZE_MASK
    spte |= memtype
    if host_writable:
        spte |= shadow_host_writable_mask
    else:
        access &= ~ACC_WRITE_MASK
    spte |= shadow_me_value | (pfn << PAGE_SHIFT)
    if access & ACC_WRITE_MASK:
        spte |= shadow_mmu_writable_mask
        if not wrprot:
            spte |= PT_WRITABLE_MASK | shadow_dirty_mask
    if prefetch:
        spte &= ~shadow_accessed_mask  # mark_spte_for_access_track with A/D enabled
    return spte


class SpteFlag(enum.Enum):
    """Names of SPTE bits for decoding views."""

    R = VMX_EPT_READABLE_MASK
    W = VMX_EPT_WRITABLE_MASK
    X = VMX_EPT_EXECUTABLE_MASK
    IPAT = VMX_EPT_IPAT_BIT
    PS = PT_PAGE_SIZE_MASK
    A = VMX_EPT_ACCESS_BIT
    D = VMX_EPT_DIRTY_BIT
    MMU_PRESENT = SPTE_MMU_PRESENT_MASK
    HOST_WRITABLE = EPT_SPTE_HOST_WRITABLE
    MMU_WRITABLE = EPT_SPTE_MMU_WRITABLE
    SUPPRESS_VE = VMX_EPT_SUPPRESS_VE_BIT


def describe_spte(spte: int) -> str:
    """A short human reading of an SPTE: FROZEN, non-present, or its flags and pfn."""
    if spte == FROZEN_SPTE:
        return "FROZEN"
    if spte == SHADOW_NONPRESENT_VALUE:
        return "non-present"
    if not is_shadow_present_pte(spte):
        return "MMIO" if is_mmio_spte(spte) else f"non-present {spte:#x}"
    flags = [f.name for f in SpteFlag if spte & f.value and f is not SpteFlag.SUPPRESS_VE
             and f is not SpteFlag.MMU_PRESENT]
    mt = (spte >> MEMTYPE_SHIFT) & 7
    return f"pfn={spte_to_pfn(spte):#x} {' '.join(flags)} mt={mt}"
