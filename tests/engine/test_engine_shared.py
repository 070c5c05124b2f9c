"""Shared faults (kvm_tdp_mmu_page_fault on the direct root): the direct root, gfns without the shared bit, 2M
leaves for THP-backed shared memory, and kvm_mmu_hugepage_adjust refusing a huge leaf over mixed attributes."""

from __future__ import annotations

import pytest
from engine_helpers import NONPRESENT, SHARED, SHARED_GFN, frames, leaf_value, no_kvm_bug, ret_pfs, run, seamcalls, walk

from tdxdbg.engine.gmem import Memslot
from tdxdbg.engine.steps import EngineStep
from tdxdbg.engine.vm import VmSetup
from tdxdbg.hw import guest

PS = 0x80
FLAGS_4K = 0x8600_0000_0000_0B37   # make_spte(1, 0): WB (no IPAT), A, D, RWX, host/MMU-writable
FLAGS_2M = 0x8600_0000_0000_0BB7   # make_spte(2, 0): the same plus PS


def _prog():
    yield from guest.write_value(SHARED | 0x0090_0000, 0x11)        # gmem slot, shared gfn 0x900
    yield from guest.write_value(SHARED | 0x0120_0008, 0x22)        # plain slot, 2M region at gfn 0x1200
    yield from guest.write_value(SHARED | 0x0141_0000, 0x33)        # plain slot, 2M region 0x1400 is mixed
    assert (yield from guest.read_value(SHARED | 0x0090_0000)) == 0x11
    assert (yield from guest.read_value(SHARED | 0x0120_0008)) == 0x22
    assert (yield from guest.read_value(SHARED | 0x0141_0000)) == 0x33


@pytest.fixture(scope="module")
def shared_run():
    s = VmSetup(memslots=(Memslot(0, 0, 0x1000, guest_memfd=True), Memslot(1, 0x1000, 0x1000)),
                private_ranges=((0, 0x800), (0x1400, 0x1401)), vcpu_programs=(_prog,))
    return run(s)


def test_shared_fault_maps_through_the_direct_root(shared_run):
    """kvm_mmu_do_page_fault strips gfn_direct_bits; tdp_mmu_get_root_for_fault picks the direct root; the
    leaf sits at the gfn without the shared bit, indexed with it (L4 index 256)."""
    built, rt = shared_run
    kvm = built.kvm
    vcpu = kvm.vcpus[0]
    no_kvm_bug(rt)
    fault = frames(rt, EngineStep.RET_PF)[0]
    assert (fault.step.get("gpa"), fault.step.get("gfn"), fault.step.get("private")) == (SHARED | 0x900000, 0x900,
                                                                                         False)
    iters = [f for f in frames(rt, EngineStep.ITER) if f.step.get("gfn") & SHARED_GFN == 0
             and f.index < fault.index]
    assert {f.step.get("root") for f in iters} == {"direct"}
    assert next((f.step.get("level"), f.step.get("index")) for f in iters) == (4, 256)
    path = walk(kvm, vcpu.direct_root, 0x900, SHARED_GFN)
    assert [(lvl, idx) for lvl, idx, _v in path] == [(4, 256), (3, 0), (2, 4), (1, 256)]
    level, value = leaf_value(kvm, vcpu.direct_root, 0x900, SHARED_GFN)
    pfn = kvm.world.peek(("hva.chunk", 0, 0x900 // 512)) + 0x900 % 512
    assert (level, value) == (1, FLAGS_4K | pfn << 12)
    # The mirror root is not touched, and no SEAMCALL was needed for shared memory.
    assert all(kvm.memory.read_entry(vcpu.mirror_root, i) == NONPRESENT for i in range(512))
    assert seamcalls(rt) == []
    assert [r for r, _v in ret_pfs(rt)] == ["RET_PF_FIXED"] * 3


def test_2m_shared_region_in_plain_memslot_gets_a_2m_leaf(shared_run):
    """kvm_mmu_hugepage_adjust: slot covers the 2M range, THP backing, uniform attributes -> goal_level 2M."""
    built, _rt = shared_run
    kvm = built.kvm
    level, value = leaf_value(kvm, kvm.vcpus[0].direct_root, 0x1200, SHARED_GFN)
    assert level == 2
    pfn = value >> 12 & 0xFF_FFFF_FFFF
    assert pfn % 512 == 0 and pfn == kvm.world.peek(("hva.chunk", 1, 0x1200 // 512))
    assert value == FLAGS_2M | pfn << 12 and value & PS


def test_mixed_attributes_prevent_the_huge_leaf(shared_run):
    """KVM_LPAGE_MIXED_FLAG: one private gfn inside [0x1400, 0x1600) keeps the shared fault at 4K."""
    built, _rt = shared_run
    kvm = built.kvm
    level, value = leaf_value(kvm, kvm.vcpus[0].direct_root, 0x1410, SHARED_GFN)
    pfn = kvm.world.peek(("hva.chunk", 1, 0x1410 // 512)) + 0x1410 % 512
    assert (level, value) == (1, FLAGS_4K | pfn << 12)


def test_shared_access_without_memslot_installs_mmio_spte_and_retries_the_instruction():
    """kvm_handle_noslot_fault + make_mmio_spte: a TD's MMIO SPTE is the memslot generation (1: one memslot
    created, in bits 3-10) | the per-VM shadow_mmio_value 0 (RWX and SUPPRESS_VE clear) | the gpa (without the
    shared bit: iter->gfn), RET_PF_EMULATE (2); vt_check_emulate_instruction answers X86EMUL_RETRY_INSTR for a
    TD, so the guest re-executes and takes a #VE (it would then use TDVMCALL<MMIO>; this guest has no handler and
    panics). Not a KVM bug."""
    mmio_gfn = 0x80000

    def prog():
        yield from guest.read_value(SHARED | mmio_gfn << 12)

    built, rt = run(VmSetup(memslots=(Memslot(0, 0, 0x1000, guest_memfd=True),), vcpu_programs=(prog,)))
    assert not frames(rt, EngineStep.KVM_BUG)
    assert frames(rt, EngineStep.FAULTIN, result="no memslot: MMIO")
    assert ret_pfs(rt) == [("RET_PF_EMULATE", 2)]
    kvm = built.kvm
    assert leaf_value(kvm, kvm.vcpus[0].direct_root, mmio_gfn, SHARED_GFN) == (1, 0x8000_0008)
    assert not kvm.vm_dead
    assert rt.task("vcpu0").error == f"GuestPanic: Unexpected #VE on shared gpa {SHARED | mmio_gfn << 12:#x}"


def _offset_in_2m():
    # gfn 0x1234 is 0x34 pages into the 2M region [0x1200, 0x1400) of the plain slot: the first touch.
    yield from guest.write_value(SHARED | 0x0123_4010, 0x5151)
    yield from guest.write_value(SHARED | 0x0120_0010, 0x2020)
    assert (yield from guest.read_value(SHARED | 0x0123_4010)) == 0x5151
    assert (yield from guest.read_value(SHARED | 0x0120_0010)) == 0x2020


def test_2m_leaf_from_a_fault_inside_the_huge_page_maps_its_first_page():
    """kvm_mmu_hugepage_adjust: `fault->pfn &= ~mask`. A fault at gfn 0x1234 installs a 2M leaf whose pfn is the
    2M-aligned first page of the THP (bits 20:12 clear: reserved in a 2M EPT entry), so gfn 0x1200 reaches the
    THP's first page and gfn 0x1234 its page 0x34, each with its own data."""
    s = VmSetup(memslots=(Memslot(0, 0, 0x1000, guest_memfd=True), Memslot(1, 0x1000, 0x1000)),
                private_ranges=((0, 0x800),), vcpu_programs=(_offset_in_2m,))
    built, rt = run(s)
    no_kvm_bug(rt)
    kvm = built.kvm
    base = kvm.world.peek(("hva.chunk", 1, 0x1234 // 512))
    level, value = leaf_value(kvm, kvm.vcpus[0].direct_root, 0x1234, SHARED_GFN)
    assert (level, value) == (2, FLAGS_2M | base << 12)
    assert kvm.memory.read_word(base + 0x34, 0x10) == 0x5151
    assert kvm.memory.read_word(base, 0x10) == 0x2020
    # One fault maps the whole 2M page: the second write needs none.
    assert [r for r, _v in ret_pfs(rt)] == ["RET_PF_FIXED"]


def test_unaligned_2m_leaf_is_an_ept_misconfiguration_and_a_kvm_bug():
    """A variant that forgets `fault->pfn &= ~mask` writes the faulting page's offset into bits 20:12 of the 2M
    leaf; the CPU exits with EPT_MISCONFIG and tdx_handle_exit KVM_BUG_ONs (vp_enter_ret == EPT_MISCONFIG)."""
    from tdxdbg.engine.variants.upstream import Upstream

    class NoAlign(Upstream):
        def kvm_mmu_hugepage_adjust(self, vcpu, fault):
            offset = fault.pfn & 511
            super().kvm_mmu_hugepage_adjust(vcpu, fault)
            fault.pfn |= offset

    s = VmSetup(memslots=(Memslot(0, 0, 0x1000, guest_memfd=True), Memslot(1, 0x1000, 0x1000)),
                private_ranges=((0, 0x800),), vcpu_programs=(_offset_in_2m,), variant=NoAlign)
    _built, rt = run(s)
    bugs = frames(rt, EngineStep.KVM_BUG)
    assert [f.step.get("message") for f in bugs] == [f"EPT misconfiguration at {SHARED | 0x0123_4000:#x}"]
