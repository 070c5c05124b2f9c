"""Private -> shared -> private with data (kvm_vm_set_mem_attributes, kvm_arch_pre_set_memory_attributes; the
kernel's private_mem_conversions selftest):
MapGPA exits to userspace, KVM_SET_MEMORY_ATTRIBUTES zaps the alias that stops being valid, and the private
page's contents do not survive the round trip."""

from __future__ import annotations

import pytest
from engine_helpers import NONPRESENT, SHARED, SHARED_GFN, frames, leaf_value, no_kvm_bug, run, seamcalls, setup

from tdxdbg.engine.steps import EngineStep, SpteWrite
from tdxdbg.hw import guest
from tdxdbg.hw.tdx.leaves import Seamcall

P = 0x300000
GFN = 0x300
ZAP_LEAVES = [Seamcall.TDH_MEM_RANGE_BLOCK, Seamcall.TDH_MEM_TRACK, Seamcall.TDH_MEM_PAGE_REMOVE,
              Seamcall.TDH_PHYMEM_PAGE_WBINVD]


@pytest.fixture(scope="module")
def conversion():
    seen: dict[str, int] = {}

    def prog():
        yield from guest.accept_memory(P, 4096)
        yield from guest.write_value(P, 0x1234)
        seen["private"] = yield from guest.read_value(P)
        yield from guest.map_gpa(P | SHARED, 4096)           # to shared
        yield from guest.write_value(P | SHARED, 0x5678)
        seen["shared"] = yield from guest.read_value(P | SHARED)
        yield from guest.map_gpa(P, 4096)                    # back to private
        yield from guest.accept_memory(P, 4096)
        seen["after"] = yield from guest.read_value(P)

    built, rt = run(setup(prog))
    return built, rt, seen


def test_data_written_before_is_lost_after(conversion):
    """private_mem_conversions: the page reads 0 after converting back and accepting again."""
    _built, rt, seen = conversion
    no_kvm_bug(rt)
    assert seen == {"private": 0x1234, "shared": 0x5678, "after": 0}
    assert rt.task("vcpu0").result == "halted"


def test_map_gpa_exits_and_attributes_flip(conversion):
    """tdx_map_gpa -> KVM_EXIT_HYPERCALL(KVM_HC_MAP_GPA_RANGE); the VMM answers with KVM_SET_MEMORY_ATTRIBUTES."""
    _built, rt, _seen = conversion
    exits = frames(rt, EngineStep.USER_EXIT, reason="KVM_EXIT_HYPERCALL")
    assert [(f.step.get("nr"), f.step.get("gpa"), f.step.get("npages"), f.step.get("private")) for f in exits] == [
        (12, P, 1, False), (12, P, 1, True)]
    ops = frames(rt, EngineStep.HOST_OP, op="KVM_SET_MEMORY_ATTRIBUTES")
    assert [(f.step.get("start"), f.step.get("end"), f.step.get("private")) for f in ops] == [
        (GFN, GFN + 1, False), (GFN, GFN + 1, True)]


def test_mirror_leaf_zapped_block_track_remove_under_write_lock(conversion):
    """kvm_arch_pre_set_memory_attributes(KVM_FILTER_PRIVATE) -> tdp_mmu_zap_leafs -> tdp_mmu_set_spte ->
    remove_external_spte: RANGE.BLOCK, TRACK, PAGE.REMOVE, PHYMEM.PAGE.WBINVD, all under mmu_lock for write ("TDX
    requires TLB tracking before dropping private page")."""
    _built, rt, _seen = conversion
    to_shared = frames(rt, EngineStep.HOST_OP, op="KVM_SET_MEMORY_ATTRIBUTES")[0]
    zap = next(f for f in frames(rt, EngineStep.SPTE_WRITE, what=SpteWrite.ZAP) if f.step.get("root") == "mirror")
    assert (zap.step.get("level"), zap.step.get("gfn"), zap.step.get("new")) == (1, GFN, NONPRESENT)
    assert zap.index > to_shared.index
    acquire = max(f.index for f in frames(rt, EngineStep.LOCK) if f.index < zap.index
                  and f.step.get("mode") == "write" and f.step.get("action") == "acquire")
    release = min(f.index for f in frames(rt, EngineStep.LOCK) if f.index > zap.index
                  and f.step.get("mode") == "write" and f.step.get("action") == "release")
    inside = [f for f in seamcalls(rt) if acquire < f.index < release]
    assert [f.step.get("leaf") for f in inside] == ZAP_LEAVES
    block, _track, remove, wbinvd = inside
    assert block.step.get("gpa") == remove.step.get("gpa") == P
    old_pfn = seamcalls(rt, leaves=[Seamcall.TDH_MEM_PAGE_AUG])[0].step.get("r8") >> 12
    assert (wbinvd.step.get("rcx") & ((1 << 46) - 1)) >> 12 == old_pfn   # the page, with the TD's HKID above
    # Nothing else removed a private page in the whole run.
    assert len(seamcalls(rt, leaves=[Seamcall.TDH_MEM_PAGE_REMOVE])) == 1


def test_shared_alias_zapped_when_going_private(conversion):
    """Going private zaps the direct-root leaf (KVM_FILTER_SHARED) without any SEAMCALL for it; the final state
    has the private page mapped again (a new guest_memfd page) and no shared mapping."""
    built, rt, _seen = conversion
    kvm = built.kvm
    vcpu = kvm.vcpus[0]
    to_private = frames(rt, EngineStep.HOST_OP, op="KVM_SET_MEMORY_ATTRIBUTES")[1]
    direct_zaps = [f for f in frames(rt, EngineStep.SPTE_WRITE, what=SpteWrite.ZAP) if f.step.get("root") == "direct"]
    assert [(f.step.get("gfn"), f.step.get("level")) for f in direct_zaps] == [(GFN, 1)]
    assert direct_zaps[0].index > to_private.index
    assert leaf_value(kvm, vcpu.direct_root, GFN, SHARED_GFN) == (1, NONPRESENT)
    pfn = kvm.world.peek(("gmem.pfn", 0, GFN))
    assert leaf_value(kvm, vcpu.mirror_root, GFN) == (1, 0x8600_0000_0000_0B37 | pfn << 12)
    assert [f.step.get("gpa") for f in seamcalls(rt, leaves=[Seamcall.TDH_MEM_PAGE_AUG])] == [P, P]


def test_variant_overriding_inner_map_gpa_is_called():
    """__tdx_map_gpa (engine: _tdx_map_gpa, not name-mangled) is an override point: a variant that halves each
    chunk sees its override called for every KVM_EXIT_HYPERCALL of the MapGPA."""
    from tdxdbg.engine.variants.upstream import Upstream

    calls: list[tuple[int, int]] = []

    class Recording(Upstream):
        def _tdx_map_gpa(self, vcpu):
            calls.append(vcpu.map_gpa)
            yield from super()._tdx_map_gpa(vcpu)

    def prog():
        yield from guest.map_gpa(P | SHARED, 3 << 20)           # 3 MiB: two chunks of at most 2 MiB

    _built, rt = run(setup(prog, variant=Recording))
    no_kvm_bug(rt)
    assert calls == [(P | SHARED, (P | SHARED) + (3 << 20)), ((P | SHARED) + (2 << 20), (P | SHARED) + (3 << 20))]
    exits = frames(rt, EngineStep.USER_EXIT, reason="KVM_EXIT_HYPERCALL")
    assert [(f.step.get("gpa"), f.step.get("npages")) for f in exits] == [(P, 512), (P + (2 << 20), 256)]


def test_conversion_discards_exactly_the_converted_range():
    """QEMU's kvm_convert_memory discards exactly the converted range (ram_block_discard_range ->
    MADV_DONTNEED): converting gfn 0x1202 to private frees only its shared page. gfn 0x1201, in the same 2M
    THP, keeps its data and its host page; the THP is split, so later shared faults in that 2M map 4K."""
    from tdxdbg.engine.gmem import Memslot
    from tdxdbg.engine.vm import VmSetup

    def prog():
        yield from guest.write_value(SHARED | 0x0120_1000, 0xA1)
        yield from guest.write_value(SHARED | 0x0120_2000, 0xB2)
        yield from guest.map_gpa(0x0120_2000, 4096)            # to private: the VMM converts gfn 0x1202
        assert (yield from guest.read_value(SHARED | 0x0120_1000)) == 0xA1
        yield from guest.write_value(SHARED | 0x0120_3000, 0xC3)

    built, _rt = run(VmSetup(memslots=(Memslot(0, 0x1000, 0x1000),), vcpu_programs=(prog,)))
    kvm = built.kvm
    w = kvm.world
    assert w.peek(("hva.chunk", 0, 0x1200 // 512)) is None
    assert w.peek(("hva.split", 0, 0x1200 // 512)) is True
    p1, p3 = w.peek(("hva.page", 0, 0x1201)), w.peek(("hva.page", 0, 0x1203))
    assert p3 == p1 + 2                                       # the THP's own pages, not new ones
    assert w.peek(("hva.page", 0, 0x1202)) is None            # discarded
    assert kvm.memory.read_word(p1, 0) == 0xA1 and kvm.memory.read_word(p3, 0) == 0xC3
