"""Shared faults (reference §1.2 step 6, §1.6, §9.2, §9.7): the direct root, gfns without the shared bit, 2M
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
    """kvm_handle_noslot_fault + make_mmio_spte: a TD's MMIO SPTE is the per-VM value 0 (SUPPRESS_VE clear),
    RET_PF_EMULATE (2); vt_check_emulate_instruction answers X86EMUL_RETRY_INSTR for a TD, so the guest re-executes
    and takes a #VE (it would then use TDVMCALL<MMIO>; this guest has no handler and panics). Not a KVM bug."""
    mmio_gfn = 0x80000

    def prog():
        yield from guest.read_value(SHARED | mmio_gfn << 12)

    built, rt = run(VmSetup(memslots=(Memslot(0, 0, 0x1000, guest_memfd=True),), vcpu_programs=(prog,)))
    assert not frames(rt, EngineStep.KVM_BUG)
    assert frames(rt, EngineStep.FAULTIN, result="no memslot: MMIO")
    assert ret_pfs(rt) == [("RET_PF_EMULATE", 2)]
    kvm = built.kvm
    assert leaf_value(kvm, kvm.vcpus[0].direct_root, mmio_gfn, SHARED_GFN) == (1, 0)
    assert not kvm.vm_dead
    assert rt.task("vcpu0").error == f"GuestPanic: Unexpected #VE on shared gpa {SHARED | mmio_gfn << 12:#x}"
