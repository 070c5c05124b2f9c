"""Worked examples: index arithmetic of tdp_iter against real roots (GPAW 48 and 52), the SPTE values of make_spte /
make_nonleaf_spte, FROZEN_SPTE, the role.word of mirror and direct roots and the root-type filter."""

from __future__ import annotations

import pytest
from engine_helpers import NONPRESENT

from tdxdbg.engine import spte
from tdxdbg.engine.gmem import Memslot
from tdxdbg.engine.mmu import PFERR_PRIVATE_ACCESS, PFERR_WRITE_MASK
from tdxdbg.engine.mmu_page import AttrFilter, RootTypes
from tdxdbg.engine.vm import VmSetup, build_vm
from tdxdbg.hw.ept import Gpaw
from tdxdbg.hw.machine import drive


def _idle():
    yield from ()


def _vm(gpaw: Gpaw, slots: tuple, private: tuple):
    built = build_vm(VmSetup(gpaw=gpaw, memslots=slots, private_ranges=private, vcpu_programs=(_idle,)))
    kvm = built.kvm
    vcpu = kvm.vcpus[0]
    drive(kvm.kvm_mmu_load(vcpu), kvm.world, "vcpu0")
    return kvm, vcpu


def _map(kvm, vcpu, gpa: int, private: bool):
    err = PFERR_WRITE_MASK | (PFERR_PRIVATE_ACCESS if private else 0)
    return drive(kvm.kvm_tdp_map_page(vcpu, gpa, err), kvm.world, "vcpu0")


def _walk(kvm, root: int, gfn: int) -> list[tuple[int, int, int]]:
    """for_each_tdp_pte(iter, kvm, root, gfn, gfn + 1): (level, index, iter.gfn) of every position."""
    it = kvm.iter_for(root, spte.PG_LEVEL_4K, gfn)
    drive(it.start(), kvm.world)
    out = []
    while it.valid and it.gfn < gfn + 1:
        out.append((it.level, it.index, it.gfn))
        drive(it.next(), kvm.world)
    return out


@pytest.fixture(scope="module")
def gpaw48():
    slots = (Memslot(0, 0x12345600, 0x100, guest_memfd=True), Memslot(1, 0x7FFFFF00, 0x100, guest_memfd=True))
    kvm, vcpu = _vm(Gpaw.GPAW_48, slots, ((0x12345600, 0x12345700), (0x7FFFFF00, 0x80000000)))
    # 9.1 private, 9.3 the highest private page; 9.2's shared alias maps the same memslot gfn in the direct root
    # (made shared first: a shared fault on a private gfn would exit to userspace).
    assert _map(kvm, vcpu, 0x0000_0123_4567_8000, True) == 0
    assert _map(kvm, vcpu, 0x0000_07FF_FFFF_F000, True) == 0
    kvm.set_private_ranges(0x12345678, 0x12345679, False)
    assert _map(kvm, vcpu, 0x0000_8123_4567_8000, False) == 0
    return kvm, vcpu


def test_9_1_private_gpa_walks_the_mirror_root_at_natural_gfn(gpaw48):
    """tdp_mmu_get_root_for_fault + tdp_iter_refresh_sptep, gpaw 48, private GPA 0x123_4567_8000."""
    kvm, vcpu = gpaw48
    assert kvm.gfn_direct_bits == 0x8_0000_0000
    assert kvm.kvm_gfn_root_bits(vcpu.mirror_root) == 0
    assert _walk(kvm, vcpu.mirror_root, 0x12345678) == [
        (4, 2, 0x10000000), (3, 141, 0x12340000), (2, 43, 0x12345600), (1, 120, 0x12345678)]


def test_9_2_shared_alias_differs_only_in_the_top_index(gpaw48):
    """kvm_gfn_root_bits = gfn_direct_bits for the direct root: index address 0x812345678000, gfns without it."""
    kvm, vcpu = gpaw48
    assert kvm.kvm_gfn_root_bits(vcpu.direct_root) == 0x8_0000_0000
    assert _walk(kvm, vcpu.direct_root, 0x12345678) == [
        (4, 0x102, 0x10000000), (3, 141, 0x12340000), (2, 43, 0x12345600), (1, 120, 0x12345678)]


def test_9_3_highest_private_page_and_step_side_at_511(gpaw48):
    kvm, vcpu = gpaw48
    assert _walk(kvm, vcpu.mirror_root, 0x7FFFFFFF) == [
        (4, 15, 0x78000000), (3, 511, 0x7FFC0000), (2, 511, 0x7FFFFE00),
        (1, 511, 0x7FFFFFFF)]
    # try_step_side fails at index 511 (SPTE_ENT_PER_PAGE - 1): the walk steps up instead.
    it = kvm.iter_for(vcpu.mirror_root, spte.PG_LEVEL_4K, 0x7FFFFFFF)
    drive(it.start(), kvm.world)
    while it.level > 1:
        drive(it.next(), kvm.world)
    assert (it.level, it.index) == (1, 511)
    assert it._try_step_side() is False
    assert it._try_step_up() is True and (it.level, it.index, it.gfn) == (2, 511, 0x7FFFFE00)


def test_spte_index_and_gfn_round_for_level():
    """SPTE_INDEX and gfn_round_for_level (tdp_iter.h) on the first private fault's address."""
    addr = 0x12345678000
    assert [spte.spte_index(addr, lvl) for lvl in (4, 3, 2, 1)] == [2, 141, 43, 120]
    assert [spte.gfn_round_for_level(0x12345678, lvl) for lvl in (4, 3, 2, 1)] == [
        0x10000000, 0x12340000, 0x12345600, 0x12345678]
    assert spte.kvm_pages_per_hpage(2) == 512 and spte.kvm_pages_per_hpage(3) == 0x40000


@pytest.fixture(scope="module")
def gpaw52():
    slots = (Memslot(0, 0xABCD1200, 0x100, guest_memfd=True), Memslot(1, 0x812345600, 0x100, guest_memfd=True))
    kvm, vcpu = _vm(Gpaw.GPAW_52, slots, ((0xABCD1200, 0xABCD1234), (0xABCD1235, 0xABCD1300),
                                          (0x812345600, 0x812345700)))
    assert _map(kvm, vcpu, 0x0008_0ABC_D123_4000, False) == 0
    assert _map(kvm, vcpu, 0x0000_8123_4567_8000, True) == 0
    return kvm, vcpu


def test_9_4_gpaw52_shared_gpa_five_levels(gpaw52):
    kvm, vcpu = gpaw52
    assert kvm.root_level == 5
    assert kvm.gfn_direct_bits == 0x80_0000_0000
    assert _walk(kvm, vcpu.direct_root, 0xABCD1234) == [
        (5, 8, 0), (4, 21, 0xA8000000), (3, 243, 0xABCC0000), (2, 137, 0xABCD1200), (1, 52, 0xABCD1234)]
    # The same GPA without bit 51 (private, mirror root): L5 index 0, the rest identical.
    assert [spte.spte_index(0xABCD1234000, lvl) for lvl in (5, 4, 3, 2, 1)] == [0, 21, 243, 137, 52]


def test_9_5_gpaw52_bit47_is_a_private_address_bit(gpaw52):
    """Under GPAW 52 GPA bit 47 is an ordinary address bit: mirror root, gfn 0x812345678."""
    kvm, vcpu = gpaw52
    assert kvm.tdx_is_private_gpa(0x8123_4567_8000)
    assert _walk(kvm, vcpu.mirror_root, 0x812345678) == [
        (5, 0, 0), (4, 258, 0x810000000), (3, 141, 0x812340000), (2, 43, 0x812345600), (1, 120, 0x812345678)]


def test_tdp_iter_start_refuses_gfn_with_gfn_bits(gpaw48):
    """tdp_iter_start: WARN and invalid when gfn_bits && next_last_level_gfn >= gfn_bits."""
    kvm, vcpu = gpaw48
    it = kvm.iter_for(vcpu.direct_root, spte.PG_LEVEL_4K, 0x8_0000_0000 | 0x12345678)
    drive(it.start(), kvm.world)
    assert it.valid is False


def test_9_6_make_spte_4k_leaf():
    """make_spte (S3): 4K RWX writable leaf of pfn 0x1234."""
    assert spte.make_spte(1, 0x1234) == 0x8600_0000_0123_4B37
    assert spte.make_spte(1, 0x1234, memtype=0x70) == 0x8600_0000_0123_4B77   # WB | IPAT
    assert spte.make_spte(1, 0x1234, prefetch=True) == 0x8600_0000_0123_4A37  # no Accessed
    v = spte.make_spte(1, 0x1234)
    assert spte.is_shadow_present_pte(v) and spte.is_last_spte(v, 1) and spte.spte_to_pfn(v) == 0x1234
    assert not spte.is_ept_ve_possible(v)


def test_9_7_other_values():
    assert spte.make_nonleaf_spte(0x5678) == 0x8000_0000_0567_8907
    assert spte.FROZEN_SPTE == 0x8000_0000_0000_05A0
    assert spte.SHADOW_NONPRESENT_VALUE == NONPRESENT
    assert not spte.is_shadow_present_pte(spte.FROZEN_SPTE) and spte.is_frozen_spte(0x8000_0000_0000_05A0)
    assert not spte.is_frozen_spte(0x5A0)
    # Shared 2M leaf of pfn 0x200000 with the NX huge-page mitigation (exec dropped) and without.
    assert spte.make_spte(2, 0x200000, nx_huge_page_workaround=True) == 0x8600_0002_0000_0BB3
    assert spte.make_spte(2, 0x200000) == 0x8600_0002_0000_0BB7


def test_role_word_mirror_vs_direct(gpaw48):
    """union kvm_mmu_page_role: the two roots of a TD differ exactly in is_mirror (bit 19)."""
    kvm, vcpu = gpaw48
    mirror = kvm.sptep_to_sp(vcpu.mirror_root).role.word
    direct = kvm.sptep_to_sp(vcpu.direct_root).role.word
    assert mirror ^ direct == 0x80000
    assert mirror & 0xF == direct & 0xF == 4


def test_root_type_filter_private_is_mirror_plus_invalid():
    """kvm_tdp_mmu_unmap_gfn_range: KVM_FILTER_PRIVATE -> KVM_MIRROR_ROOTS | KVM_INVALID_ROOTS == 0x5."""
    kvm, _vcpu = _vm(Gpaw.GPAW_48, (), ())
    types = kvm.kvm_gfn_range_filter_to_root_types(AttrFilter.KVM_FILTER_PRIVATE) | RootTypes.KVM_INVALID_ROOTS
    assert int(types) == 0x5
    assert int(kvm.kvm_gfn_range_filter_to_root_types(AttrFilter.KVM_FILTER_SHARED)) == 0x2
    assert int(RootTypes.KVM_VALID_ROOTS) == 0x6 and int(RootTypes.KVM_ALL_ROOTS) == 0x7
