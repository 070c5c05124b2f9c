"""struct kvm_mmu_page and its role, for TDP MMU page-table pages, stored in the World by table pfn."""

from __future__ import annotations

import enum
from typing import NamedTuple

from tdxdbg.engine.spte import ACC_ALL


class RootTypes(enum.IntFlag):
    """enum kvm_tdp_mmu_root_types (tdp_mmu.h)."""

    KVM_INVALID_ROOTS = 1 << 0
    KVM_DIRECT_ROOTS = 1 << 1
    KVM_MIRROR_ROOTS = 1 << 2
    KVM_VALID_ROOTS = KVM_DIRECT_ROOTS | KVM_MIRROR_ROOTS
    KVM_ALL_ROOTS = KVM_VALID_ROOTS | KVM_INVALID_ROOTS


class AttrFilter(enum.IntFlag):
    """enum kvm_gfn_range_filter."""

    KVM_FILTER_SHARED = 1 << 0
    KVM_FILTER_PRIVATE = 1 << 1


# union kvm_mmu_page_role bit positions (role.word).
ROLE_LEVEL_MASK = 0xF
ROLE_DIRECT_BIT = 1 << 7
ROLE_ACCESS_SHIFT = 8
ROLE_INVALID_BIT = 1 << 11
ROLE_AD_DISABLED_BIT = 1 << 16
ROLE_IS_MIRROR_BIT = 1 << 19


class MmuRole(NamedTuple):
    """The role fields the TDP MMU distinguishes; everything else is fixed for a TD (direct, ACC_ALL)."""

    level: int
    is_mirror: bool = False
    invalid: bool = False

    @property
    def word(self) -> int:
        word = self.level | ROLE_DIRECT_BIT | (ACC_ALL << ROLE_ACCESS_SHIFT)
        if self.invalid:
            word |= ROLE_INVALID_BIT
        if self.is_mirror:
            word |= ROLE_IS_MIRROR_BIT
        return word

    def child(self) -> MmuRole:
        """tdp_mmu_init_child_sp: same role one level down, so is_mirror is inherited."""
        return MmuRole(self.level - 1, self.is_mirror, False)


class KvmMmuPage(NamedTuple):
    """struct kvm_mmu_page: the table page's role, the first gfn it maps, and (mirror SPs) the page KVM gives
    the TDX module for the matching S-EPT table."""

    role: MmuRole
    gfn: int
    external_spt: int = 0
    nx_huge_page_disallowed: bool = False

    @property
    def kind(self) -> str:
        return "mirror" if self.role.is_mirror else "direct"


KVM_SP = "kvm.sp"   # the tag of sp_key


def sp_key(pfn: int) -> tuple[str, int]:
    return (KVM_SP, pfn)


K_ROOTS = ("kvm.roots",)


def root_ref_key(pfn: int) -> tuple[str, int]:
    return ("kvm.root_ref", pfn)


def root_zap_key(pfn: int) -> tuple[str, int]:
    return ("kvm.root_to_zap", pfn)
