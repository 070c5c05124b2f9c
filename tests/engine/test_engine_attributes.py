"""KVM_SET_MEMORY_ATTRIBUTES (kvm_vm_set_mem_attributes, kvm_arch_pre_set_memory_attributes): the early return
when nothing changes, and the head/tail hugepage ranges of commit 9129633d568e (story 5)."""

from __future__ import annotations

from engine_helpers import SHARED, SHARED_GFN, frames, leaf_value, no_kvm_bug, step_until

from tdxdbg.engine.gmem import K_INVALIDATE, Memslot
from tdxdbg.engine.kvm import LockEvent
from tdxdbg.engine.steps import EngineStep
from tdxdbg.engine.vm import VmSetup, build_vm
from tdxdbg.hw import guest
from tdxdbg.runtime import Runtime, StopReason
from tdxdbg.runtime.scheduler import Policy, ScheduleSpec

# An ordinary (THP-backed) 8M memslot at gfn 0x4000: 2M pages at 0x4000, 0x4200, 0x4400, 0x4600.
SLOT = Memslot(1, 0x4000, 0x800)


def test_setting_attributes_a_range_already_has_does_not_invalidate():
    """kvm_vm_set_mem_attributes: "Nothing to do if the entire range has the desired attributes"
    (kvm_range_has_memory_attributes): no mmu_lock, no invalidation, mmu_invalidate_seq unchanged."""
    def host(kvm):
        yield from kvm.kvm_vm_set_mem_attributes(0x4400, 0x4410, True)    # shared -> private: seq 0 -> 1
        yield from kvm.kvm_vm_set_mem_attributes(0x4404, 0x4408, True)    # already private
        yield from kvm.kvm_vm_set_mem_attributes(0x4500, 0x4600, False)   # already shared

    built = build_vm(VmSetup(memslots=(SLOT,), host_programs=(host,)))
    rt = Runtime(built.machine.world, built.tasks, ScheduleSpec(Policy.SEQUENTIAL))
    assert rt.run() is StopReason.DONE
    assert built.kvm.world.peek(K_INVALIDATE).seq == 1
    assert [f.step.get("what") for f in frames(rt, EngineStep.INVALIDATE)] == ["begin", "end"]
    assert len(frames(rt, EngineStep.HOST_OP, op="attributes already set: nothing to do")) == 2
    assert built.kvm.private_ranges() == ((0x4400, 0x4410),)


def _race(variant=None):
    """host0 makes gfn 0x4210 private; vCPU0's shared read of gfn 0x4300 (same 2M page, attribute not changing)
    faults entirely inside the window between the zap and the attribute store."""
    def prog():
        yield from guest.read_value(SHARED | 0x4300 << 12)

    def host(kvm):
        yield from kvm.kvm_vm_set_mem_attributes(0x4210, 0x4211, True)

    kw = {"variant": variant} if variant is not None else {}
    built = build_vm(VmSetup(memslots=(SLOT,), vcpu_programs=(prog,), host_programs=(host,), **kw))
    rt = Runtime(built.machine.world, built.tasks, ScheduleSpec(Policy.ROUND_ROBIN))
    step_until(rt, "host0", lambda f: f.step.payload == LockEvent("mmu_lock", "write", "release"))
    step_until(rt, "vcpu0", lambda f: f.step.kind is EngineStep.RET_PF)
    assert rt.run() is StopReason.DONE
    no_kvm_bug(rt)
    return built, rt


def test_head_hugepage_joins_the_invalidation_so_no_huge_leaf_spans_the_change():
    """kvm_arch_pre_set_memory_attributes (9129633d568e): the 2M page [0x4200, 0x4400) is only partly converted,
    so it joins the invalidation ([0x4200, 0x4400) instead of [0x4210, 0x4211)); the racing shared fault at gfn
    0x4300 retries (is_page_fault_stale) and, once the attribute is stored and the range mixed, maps 4K."""
    built, rt = _race()
    kvm = built.kvm
    begin = frames(rt, EngineStep.INVALIDATE, what="begin")[0]
    assert (begin.step.get("start"), begin.step.get("end")) == (0x4200, 0x4400)
    assert next(f.step.get("ret") for f in frames(rt, EngineStep.RET_PF)) == "RET_PF_RETRY"
    level, _v = leaf_value(kvm, kvm.vcpus[0].direct_root, 0x4300, SHARED_GFN)
    assert level == 1
    assert leaf_value(kvm, kvm.vcpus[0].direct_root, 0x4210, SHARED_GFN)[0] == 1


def test_without_the_head_range_a_2m_shared_leaf_covers_the_new_private_gfn():
    """Before 9129633d568e: only [0x4210, 0x4211) is invalidated, the fault at gfn 0x4300 is not stale and
    installs a 2M leaf over [0x4200, 0x4400), which survives the attribute store: gfn 0x4210 is private but still
    mapped shared."""
    from tdxdbg.engine.variants.upstream import Upstream

    class Before(Upstream):
        def kvm_arch_pre_set_memory_attributes_hugepages(self, slot, start, end):
            pass

    built, _rt = _race(Before)
    kvm = built.kvm
    level, value = leaf_value(kvm, kvm.vcpus[0].direct_root, 0x4210, SHARED_GFN)
    assert level == 2 and value & 1
    assert kvm.kvm_mem_is_private(0x4210)
