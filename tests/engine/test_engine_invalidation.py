"""Invalidations racing faults (reference §1.3 step 13, §1.5, §6.3, race R4): mmu-notifier invalidation of the
shared backing and memslot deletion."""

from __future__ import annotations

from engine_helpers import (
    NONPRESENT,
    RET_PF_FIXED,
    RET_PF_RETRY,
    SHARED,
    frames,
    leaf_value,
    no_kvm_bug,
    ret_pfs,
    seamcalls,
    setup,
    step_until,
)

from tdxdbg.engine.steps import EngineStep
from tdxdbg.engine.vm import build_vm
from tdxdbg.hw import guest
from tdxdbg.hw.tdx.leaves import Seamcall
from tdxdbg.runtime import Runtime, Step, StopReason
from tdxdbg.runtime.scheduler import Policy, ScheduleSpec

G = 0x3000   # a shared gfn


def _notifier_vm():
    def prog():
        yield from guest.write_value(SHARED | G << 12, 5)

    def host(kvm):
        yield from kvm.kvm_mmu_notifier_invalidate_range_start(G, G + 1)
        yield Step(EngineStep.HOST_OP, {"op": "notifier: between start and end"})
        yield from kvm.kvm_mmu_notifier_invalidate_range_end(G, G + 1)

    built = build_vm(setup(prog, host_programs=(host,), private=((0, 0x2000),)))
    return Runtime(built.machine.world, built.tasks, ScheduleSpec(Policy.ROUND_ROBIN))


def _faultin_done(f) -> bool:
    return f.step.kind is EngineStep.FAULTIN and f.step.get("result") == "pfn"


def test_notifier_invalidation_seen_by_is_page_fault_stale():
    """The notifier takes mmu_lock for write after the fault snapshotted mmu_invalidate_seq and passed the
    lockless checks; the fault waits for read_lock, then is_page_fault_stale sees the in-progress range ->
    RET_PF_RETRY without touching an SPTE."""
    rt = _notifier_vm()
    step_until(rt, "vcpu0", _faultin_done)
    step_until(rt, "host0", lambda f: f.step.kind is EngineStep.LOCK)          # write_lock taken, begin not yet
    step_until(rt, "vcpu0", lambda f: f.step.kind is EngineStep.LOCK_WAIT)     # read_lock waits for the writer
    step_until(rt, "host0", lambda f: f.step.get("op") == "notifier: between start and end")
    step_until(rt, "vcpu0", lambda f: f.step.kind is EngineStep.RET_PF)
    assert ret_pfs(rt) == [("RET_PF_RETRY", RET_PF_RETRY)]
    assert frames(rt, EngineStep.FAULTIN, result="stale: retry")
    assert not frames(rt, EngineStep.SPTE_CMPXCHG) and not frames(rt, EngineStep.ITER, task="vcpu0")
    assert rt.run() is StopReason.DONE
    no_kvm_bug(rt)
    end = frames(rt, EngineStep.INVALIDATE, what="end")[-1]
    fixed = frames(rt, EngineStep.RET_PF, ret="RET_PF_FIXED")
    assert len(fixed) == 1 and fixed[0].index > end.index
    assert rt.task("vcpu0").result == "halted"


def test_notifier_invalidation_between_faultin_and_map_retries():
    """mmu_invalidate_retry_gfn_unsafe after the pfn lookup sees the invalidation -> RET_PF_RETRY (no SPTE
    written); the re-entered fault retries again before looking up the pfn until invalidate_range_end, then
    RET_PF_FIXED."""
    rt = _notifier_vm()
    step_until(rt, "vcpu0", _faultin_done)
    step_until(rt, "host0", lambda f: f.step.get("op") == "notifier: between start and end")
    step_until(rt, "vcpu0", lambda f: f.step.kind is EngineStep.RET_PF)
    assert ret_pfs(rt) == [("RET_PF_RETRY", RET_PF_RETRY)]
    assert not frames(rt, EngineStep.SPTE_CMPXCHG)
    # A shared fault is not retried locally: the vCPU re-enters and faults again while the range is in progress.
    step_until(rt, "vcpu0", lambda f: f.step.kind is EngineStep.RET_PF)
    assert ret_pfs(rt)[-1] == ("RET_PF_RETRY", RET_PF_RETRY)
    assert frames(rt, EngineStep.FAULTIN, result="invalidation in progress")
    assert rt.run() is StopReason.DONE
    no_kvm_bug(rt)
    end = frames(rt, EngineStep.INVALIDATE, what="end")[-1]
    fixed = frames(rt, EngineStep.RET_PF, ret="RET_PF_FIXED")
    assert len(fixed) == 1 and fixed[0].index > end.index
    assert ret_pfs(rt)[-1] == ("RET_PF_FIXED", RET_PF_FIXED)
    assert rt.task("vcpu0").result == "halted"


def test_memslot_deletion_retries_then_memory_fault_exit():
    """KVM_MEMSLOT_INVALID: faults on the slot return RET_PF_RETRY (and the TDX local loop bails out so deletion
    can finish); kvm_mmu_zap_memslot_leafs removes the private leaf (BLOCK/TRACK/REMOVE); afterwards a private
    access has no memslot -> KVM_EXIT_MEMORY_FAULT, which userspace cannot resolve for unassigned memory."""
    P, Q = 0x1000, 0x2000

    def prog():
        yield from guest.accept_memory(P, 4096)
        yield from guest.write_value(P, 5)
        yield from guest.accept_memory(Q, 4096)

    def host(kvm):
        yield from kvm.kvm_delete_memslot(0)

    built = build_vm(setup(prog, host_programs=(host,)))
    kvm = built.kvm
    rt = Runtime(built.machine.world, built.tasks, ScheduleSpec(Policy.ROUND_ROBIN))
    step_until(rt, "vcpu0", lambda f: f.step.kind is EngineStep.RET_PF)
    step_until(rt, "host0", lambda f: f.step.get("op") == "memslot marked KVM_MEMSLOT_INVALID")
    step_until(rt, "vcpu0", lambda f: f.step.kind is EngineStep.RET_PF)
    assert ret_pfs(rt) == [("RET_PF_FIXED", RET_PF_FIXED), ("RET_PF_RETRY", RET_PF_RETRY)]
    assert frames(rt, EngineStep.FAULTIN, result="memslot being deleted")
    # The local retry loop does not spin on an invalid memslot: the handler returns and KVM_RUN goes on.
    step_until(rt, "vcpu0", lambda f: f.step.kind is EngineStep.EXIT and f.step.get("what") == "EPT violation handled")
    assert not frames(rt, EngineStep.EXIT, what="local retry")
    assert rt.run() is StopReason.DONE
    no_kvm_bug(rt)
    zap = [f.step.get("leaf") for f in seamcalls(rt, task="host0")]
    assert zap[:3] == [Seamcall.TDH_MEM_RANGE_BLOCK, Seamcall.TDH_MEM_TRACK, Seamcall.TDH_MEM_PAGE_REMOVE]
    assert leaf_value(kvm, kvm.vcpus[0].mirror_root, P >> 12) == (1, NONPRESENT)
    assert kvm.memslots() == ()
    mf = frames(rt, EngineStep.USER_EXIT, reason="KVM_EXIT_MEMORY_FAULT")
    assert [(f.step.get("gpa"), f.step.get("private")) for f in mf] == [(Q, True)]
    assert rt.task("vcpu0").result == f"KVM_EXIT_MEMORY_FAULT: cannot convert {Q:#x} to private"
