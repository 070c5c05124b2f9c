"""The first private fault on an empty tree (kvm_tdp_mmu_map, set_external_spte_present): kvm_tdp_mmu_map links
three mirror
tables through set_external_spte (TDH.MEM.SEPT.ADD at TDX levels 3, 2, 1) and installs the leaf through
set_external_spte (TDH.MEM.PAGE.AUG); every install goes through set_external_spte_present's freeze protocol."""

from __future__ import annotations

import pytest
from engine_helpers import (
    FROZEN,
    NONPRESENT,
    RET_PF_FIXED,
    frames,
    leaf_value,
    no_kvm_bug,
    run,
    seamcall_return,
    seamcalls,
)

from tdxdbg.engine.gmem import Memslot
from tdxdbg.engine.mmu_page import root_ref_key
from tdxdbg.engine.steps import EngineStep
from tdxdbg.engine.vm import VmSetup, load_variant
from tdxdbg.hw import guest
from tdxdbg.hw.tdx.leaves import Seamcall
from tdxdbg.hw.tdx.seamcall import TdxStep
from tdxdbg.runtime.world import MISSING

GPA = 0x0000_0123_4567_8000
GFN = 0x12345678


def _prog():
    yield from guest.accept_memory(GPA, 4096)
    yield from guest.write_value(GPA, 0xC0FFEE)
    assert (yield from guest.read_value(GPA)) == 0xC0FFEE


@pytest.fixture(scope="module")
def first_fault():
    s = VmSetup(memslots=(Memslot(0, 0x12345600, 0x200, guest_memfd=True),),
                private_ranges=((0x12345600, 0x12345800),), vcpu_programs=(_prog,))
    return run(s)


def test_sept_add_levels_3_2_1_then_page_aug(first_fault):
    """tdx_sept_link_private_spt x3 then tdx_mem_page_aug, with gpa = iter.gfn << 12 and tdx level = level - 1."""
    _built, rt = first_fault
    calls = seamcalls(rt)
    assert [(f.step.get("leaf"), f.step.get("level"), f.step.get("gpa")) for f in calls] == [
        (Seamcall.TDH_MEM_SEPT_ADD, 3, 0x10000000 << 12),
        (Seamcall.TDH_MEM_SEPT_ADD, 2, 0x12340000 << 12),
        (Seamcall.TDH_MEM_SEPT_ADD, 1, 0x12345600 << 12),
        (Seamcall.TDH_MEM_PAGE_AUG, 0, 0x12345678 << 12),
    ]
    assert all(seamcall_return(rt, f).step.get("rax") == 0 for f in calls)


def test_each_install_goes_through_a_frozen_mirror_spte(first_fault):
    """set_external_spte_present: cmpxchg(old -> FROZEN_SPTE), SEAMCALL, then write the final value."""
    built, rt = first_fault
    kvm = built.kvm
    gmem_pfn = kvm.world.peek(("gmem.pfn", 0, GFN))
    sps = [f.step.payload for f in frames(rt, EngineStep.SP_ALLOC)]
    assert [(p["level"], p["gfn"], p["kind"]) for p in sps] == [
        (3, 0x10000000, "mirror"), (2, 0x12340000, "mirror"), (1, 0x12345600, "mirror")]
    expected_new = [0x8000_0000_0000_0907 | (p["table"] << 12) for p in sps] + [0x8600_0000_0000_0B37 | gmem_pfn << 12]
    for call, level, gfn, new in zip(seamcalls(rt), (4, 3, 2, 1), (0x10000000, 0x12340000, 0x12345600, GFN),
                                     expected_new, strict=True):
        writes = [f for f in frames(rt, EngineStep.SPTE_CMPXCHG, EngineStep.SPTE_WRITE)
                  if f.step.get("level") == level and f.step.get("gfn") == gfn]
        assert len(writes) == 2
        freeze, unfreeze = writes
        assert freeze.step.kind is EngineStep.SPTE_CMPXCHG and freeze.step.get("ok")
        assert (freeze.step.get("root"), freeze.step.get("old"), freeze.step.get("new")) == ("mirror", NONPRESENT,
                                                                                          FROZEN)
        assert unfreeze.step.kind is EngineStep.SPTE_WRITE
        assert (unfreeze.step.get("old"), unfreeze.step.get("new")) == (FROZEN, new)
        assert freeze.step.get("sptep") == unfreeze.step.get("sptep")
        ret = seamcall_return(rt, call)
        assert freeze.index < call.index < ret.index < unfreeze.index
        # handle_changed_spte runs after the unfreeze, seeing the non-present -> present change.
        hc = [f for f in frames(rt, EngineStep.HANDLE_CHANGED) if f.step.get("gfn") == gfn
              and f.step.get("level") == level]
        assert len(hc) == 1 and hc[0].index > unfreeze.index
        assert (hc[0].step.get("old"), hc[0].step.get("new"), hc[0].step.get("shared")) == (NONPRESENT, new, True)
    # SEPT.ADD hands the module each child's external_spt page (R8), AUG the guest_memfd page.
    calls = seamcalls(rt)
    assert [c.step.get("r8") >> 12 for c in calls] == [p["external_spt"] for p in sps] + [gmem_pfn]


def test_final_values_and_empty_direct_root(first_fault):
    built, _rt = first_fault
    kvm = built.kvm
    vcpu = kvm.vcpus[0]
    gmem_pfn = kvm.world.peek(("gmem.pfn", 0, GFN))
    assert leaf_value(kvm, vcpu.mirror_root, GFN) == (1, 0x8600_0000_0000_0B37 | gmem_pfn << 12)
    assert all(kvm.memory.read_entry(vcpu.direct_root, i) == NONPRESENT for i in range(512))
    # The S-EPT agrees: the leaf maps the same page (and the guest accepted it and wrote through it).
    assert kvm.memory.read_word(gmem_pfn, 0) == 0xC0FFEE


def test_ret_pf_fixed_without_reentering(first_fault):
    """kvm_tdp_mmu_map returns RET_PF_FIXED (5 in v6.12+); the vCPU re-enters only afterwards."""
    _built, rt = first_fault
    rets = frames(rt, EngineStep.RET_PF)
    assert [(f.step.get("ret"), f.step.get("value"), f.step.get("gfn"), f.step.get("private")) for f in rets] == [
        ("RET_PF_FIXED", RET_PF_FIXED, GFN, True)]
    fault = frames(rt, EngineStep.FAULT)[0]
    entries = [f.index for f in frames(rt, TdxStep.TD_ENTRY)]
    assert not [i for i in entries if fault.index < i < rets[0].index]
    # Private EPT violations are handled as writes (tdx_handle_ept_violation) with PFERR_PRIVATE_ACCESS (bit 49).
    assert fault.step.get("error_code") & (1 << 49) and fault.step.get("error_code") & 0x2
    assert rt.task("vcpu0").result == "halted"
    no_kvm_bug(rt)


@pytest.mark.parametrize(("variant", "lock_mode", "refcount"), [("upstream", "read", 2), ("v7", "write", 1)])
def test_alloc_root_lock_and_initial_refcount(variant, lock_mode, refcount):
    """kvm_mmu_load allocates the mirror root, then the direct one. kvm_tdp_mmu_alloc_root (upstream): mmu_lock
    for read, a new root holds the vCPU's reference and the TDP MMU's own (2). v7's
    kvm_tdp_mmu_get_vcpu_root_hpa: mmu_lock for write, one reference."""
    def prog():
        yield from guest.accept_memory(0x1000, 0x1000)

    _built, rt = run(VmSetup(variant=load_variant(variant), memslots=(Memslot(0, 0, 16, guest_memfd=True),),
                             private_ranges=((0, 16),), vcpu_programs=(prog,)))
    allocs = frames(rt, EngineStep.ROOT, action="alloc")
    assert [(f.step.get("kind"), f.step.get("refcount")) for f in allocs] == \
        [("mirror", refcount), ("direct", refcount)]
    for alloc in allocs:
        key = root_ref_key(alloc.step.get("root"))
        assert [e[1:] for f in rt.timeline.frames[:alloc.index + 1] for e in f.effects if e[0] == key] == \
            [(MISSING, refcount)]
    locks = [f for f in frames(rt, EngineStep.LOCK, task="vcpu0")
             if f.stack and f.stack[-2].function.endswith("kvm_tdp_mmu_alloc_root")]
    assert [(f.step.get("mode"), f.step.get("action")) for f in locks] == \
        [(lock_mode, "acquire"), (lock_mode, "release")] * 2
