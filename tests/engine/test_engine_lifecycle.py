"""Build time and teardown of a TD (KVM_TDX_INIT_MEM_REGION / tdx_td_finalize, kvm_destroy_vm):
pages premapped then PAGE.ADDed and measured, and a VM destroyed in the kernel's order with the HKID rules of
tdx_sept_remove_private_spte / tdx_sept_free_private_spt."""

from __future__ import annotations

import pytest
from engine_helpers import SHARED, frames, no_kvm_bug, run, seamcall_return, seamcalls, setup

from tdxdbg.engine.gmem import Memslot
from tdxdbg.engine.kvm import K_NR_PREMAPPED, K_PRE_FAULT_ALLOWED, K_TD_STATE, TdState
from tdxdbg.engine.steps import EngineStep
from tdxdbg.engine.variants.upstream import Upstream
from tdxdbg.engine.variants.v6_16 import V6_16
from tdxdbg.hw import guest
from tdxdbg.hw.tdx.leaves import Seamcall
from tdxdbg.hw.tdx.seamcall import TdxStep
from tdxdbg.hw.tdx.sept import SeptState
from tdxdbg.runtime import Step

SC = Seamcall


# -- build time ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[Upstream, V6_16], ids=["upstream", "v6.16"])
def built_td(request):
    seen: dict[str, int] = {}

    def prog():
        seen[0x1000] = yield from guest.read_value(0x1000)
        seen[0x0] = yield from guest.read_value(0x0)

    def host(kvm):
        seen["init"] = yield from kvm.kvm_tdx_init_mem_region(kvm.vcpus[0], 0x0, 0x2000)
        seen["finalize"] = yield from kvm.tdx_td_finalize()

    built, rt = run(setup(prog, host_programs=(host,), runnable=False, variant=request.param))
    return built, rt, seen


def test_init_mem_region_page_add_and_mr_extend(built_td):
    """tdx_gmem_post_populate: the mirror path (SEPT.ADD x3 the first time, no AUG), TDH.MEM.PAGE.ADD and 16
    TDH.MR.EXTEND of 256 bytes per page; then TDH.MR.FINALIZE. The same SEAMCALLs in both eras: upstream issues
    PAGE.ADD from the leaf hook (kvm_tdp_mmu_map_private_pfn), v6.16 after premapping (kvm_tdp_map_page)."""
    _built, rt, seen = built_td
    no_kvm_bug(rt)
    assert seen["init"] == 0 and seen["finalize"] == 0
    calls = [(f.step.get("leaf"), f.step.get("rcx")) for f in seamcalls(rt)]
    expected = [(SC.TDH_MEM_SEPT_ADD, 3), (SC.TDH_MEM_SEPT_ADD, 2), (SC.TDH_MEM_SEPT_ADD, 1)]
    for page in (0x0, 0x1000):
        expected.append((SC.TDH_MEM_PAGE_ADD, page))
        expected += [(SC.TDH_MR_EXTEND, page + off) for off in range(0, 4096, 256)]
    assert calls[:-1] == expected
    assert calls[-1][0] is SC.TDH_MR_FINALIZE
    assert not seamcalls(rt, leaves=[SC.TDH_MEM_PAGE_AUG])
    assert all(seamcall_return(rt, f).step.get("rax") == 0 for f in seamcalls(rt))
    # Each change goes through the freeze protocol and a hook: upstream's one set_external_spte for the three
    # tables and the two leaves; v6.16's set_external_spte for leaves only (link_external_spt for tables).
    hooks = frames(rt, EngineStep.HOOK, name="set_external_spte")
    got = [(f.step.get("gfn"), f.step.get("level")) for f in hooks]
    if _built.kvm.name == "upstream":
        assert got == [(0, 4), (0, 3), (0, 2), (0, 1), (1, 1)]
    else:
        assert got == [(0, 1), (1, 1)]
        links = frames(rt, EngineStep.HOOK, name="link_external_spt")
        assert [(f.step.get("gfn"), f.step.get("level")) for f in links] == [(0, 4), (0, 3), (0, 2)]


def test_nr_premapped_counts_up_and_back_to_zero(built_td):
    """v6.16 tdx_mem_page_record_premap_cnt / tdx_gmem_post_populate count premapped pages; upstream has no count."""
    built, rt, _seen = built_td
    counts = [new for f in rt.timeline.frames for k, _o, new in f.effects if k == K_NR_PREMAPPED]
    if built.kvm.name == "upstream":
        assert counts == []
        return
    assert counts == [1, 0, 1, 0]
    # PAGE.ADD comes after the premap and before the decrement.
    adds = seamcalls(rt, leaves=[SC.TDH_MEM_PAGE_ADD])
    inc = [f.index for f in rt.timeline.frames if f.wrote(K_NR_PREMAPPED)]
    assert inc[0] < adds[0].index < inc[1] < inc[2] < adds[1].index < inc[3]
    world = built.machine.world
    assert world.peek(K_NR_PREMAPPED) == 0
    assert world.peek(K_TD_STATE) is TdState.TD_STATE_RUNNABLE and world.peek(K_PRE_FAULT_ALLOWED) is True


def test_pages_mapped_and_guest_reads_initial_image(built_td):
    built, rt, seen = built_td
    kvm = built.kvm
    for gpa in (0x0, 0x1000):
        level, entry = kvm.tdx_module.sept_entry(kvm.tdr, gpa, 0)
        assert level == 0 and entry.state is SeptState.MAPPED
    # The vCPU only runs after finalize, and reads each page's first word: its GPA. No fault was needed.
    finalize = seamcalls(rt, leaves=[SC.TDH_MR_FINALIZE])[0]
    assert all(f.index > finalize.index for f in frames(rt, TdxStep.TD_ENTRY))
    assert not frames(rt, EngineStep.FAULT)
    assert seen[0x1000] == 0x1000 and seen[0x0] == 0x0
    assert rt.task("vcpu0").result == "halted"


# -- teardown -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def destroyed():
    def prog():
        yield from guest.accept_memory(0x1000, 4096)
        yield from guest.write_value(0x1000, 5)
        yield from guest.write_value(SHARED | 0x2000000, 6)

    def host(kvm):
        yield Step(EngineStep.HOST_OP, {"op": "wait for the vCPU"}, lambda w: w.peek(kvm.vcpus[0].stopped_key))
        return (yield from kvm.kvm_destroy_vm())

    return run(setup(prog, host_programs=(host,), private=((0, 0x1000),)))


def test_teardown_order_and_hkid_rules(destroyed):
    """Private leaves removed (BLOCK/TRACK/REMOVE/WBINVD) while the HKID is assigned; KEY.FREEID; then the mirror
    page tables reclaimed (free_external_spt -> PHYMEM.PAGE.RECLAIM); the TD's control pages and the TDR last."""
    built, rt = destroyed
    no_kvm_bug(rt)
    assert rt.task("host0").result == 0
    calls = seamcalls(rt, task="host0")
    leaves = [f.step.get("leaf") for f in calls]
    freeid = leaves.index(SC.TDH_MNG_KEY_FREEID)
    assert leaves[:4] == [SC.TDH_MEM_RANGE_BLOCK, SC.TDH_MEM_TRACK, SC.TDH_MEM_PAGE_REMOVE, SC.TDH_PHYMEM_PAGE_WBINVD]
    assert calls[0].step.get("gpa") == 0x1000
    assert leaves[4:freeid + 1] == [SC.TDH_VP_FLUSH, SC.TDH_MNG_VPFLUSHDONE, SC.TDH_PHYMEM_CACHE_WB,
                                    SC.TDH_MNG_KEY_FREEID]
    after = leaves[freeid + 1:]
    assert set(after) == {SC.TDH_PHYMEM_PAGE_RECLAIM, SC.TDH_PHYMEM_PAGE_WBINVD}
    assert after[-2:] == [SC.TDH_PHYMEM_PAGE_RECLAIM, SC.TDH_PHYMEM_PAGE_WBINVD]
    assert all(seamcall_return(rt, f).step.get("rax") == 0 for f in calls)
    # The three mirror tables' S-EPT pages come back after KEY.FREEID, deepest first, each from
    # free_external_spt(kvm, sp->gfn, sp->role.level, sp->external_spt).
    frees = frames(rt, EngineStep.HOOK, name="free_external_spt")
    assert [(f.step.get("gfn"), f.step.get("level")) for f in frees] == [(0, 1), (0, 2), (0, 3)]
    assert all(f.index > calls[freeid].index for f in frees)
    sept_add_pages = [f.step.get("r8") >> 12 for f in seamcalls(rt, task="vcpu0", leaves=[SC.TDH_MEM_SEPT_ADD])]
    assert [f.step.get("pfn") for f in frees] == sept_add_pages[::-1]
    # The TDR is reclaimed last (CHLDCNT 0 by then), then its cache lines flushed.
    tdr_pa = built.kvm.tdr << 12
    assert (calls[-2].step.get("leaf"), calls[-2].step.get("rcx")) == (SC.TDH_PHYMEM_PAGE_RECLAIM, tdr_pa)
    assert (calls[-1].step.get("leaf"), calls[-1].step.get("rcx")) == (SC.TDH_PHYMEM_PAGE_WBINVD, tdr_pa)
    assert built.kvm.tdx_module.chldcnt(built.kvm.tdr) == 0


def test_teardown_leaves_no_roots(destroyed):
    built, rt = destroyed
    kvm = built.kvm
    assert kvm.roots() == ()
    freed = frames(rt, EngineStep.ROOT, action="free")
    assert sorted(f.step.get("kind") for f in freed) == ["direct", "mirror"]
    assert built.machine.world.peek(K_TD_STATE) is TdState.TD_STATE_UNINITIALIZED
    assert not frames(rt, EngineStep.WARN)


def test_teardown_zaps_the_mirror_root_in_passes_by_level():
    """tdp_mmu_zap_root: __tdp_mmu_zap_root at 4K, 2M, 1G, then the root level. With private pages 1 GiB apart
    (gfn 0x1 and 0x40001: two PDs, two PTs under one PDPT), the S-EPT pages come back level by level - both PTs,
    then both PDs, then the PDPT - where a depth-first zap would give PT, PD, PT, PD, PDPT."""
    def prog():
        yield from guest.accept_memory(0x1000, 4096)
        yield from guest.accept_memory(0x4000_1000, 4096)

    def host(kvm):
        yield Step(EngineStep.HOST_OP, {"op": "wait for the vCPU"}, lambda w: w.peek(kvm.vcpus[0].stopped_key))
        return (yield from kvm.kvm_destroy_vm())

    slots = (Memslot(0, 0, 0x40100, guest_memfd=True),)
    _built, rt = run(setup(prog, host_programs=(host,), private=((0, 0x40100),), memslots=slots))
    no_kvm_bug(rt)
    frees = frames(rt, EngineStep.HOOK, name="free_external_spt")
    assert [(f.step.get("gfn"), f.step.get("level")) for f in frees] == [
        (0x0, 1), (0x40000, 1), (0x0, 2), (0x40000, 2), (0x0, 3)]
