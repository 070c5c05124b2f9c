"""Invalidations racing faults (is_page_fault_stale, mmu_invalidate_retry_gfn): mmu-notifier invalidation of the
shared backing and memslot deletion."""

from __future__ import annotations

import pytest
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

from tdxdbg.engine.checks import make_checks
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


def _delete_slot0_during_fault(variant=None):
    """vCPU0 faults private gfn 1 in memslot 0 and is stopped just after kvm_mmu_faultin_pfn got the pfn; host0
    then deletes memslot 0 as far as it can go."""
    def prog():
        yield from guest.accept_memory(0x1000, 4096)

    def host(kvm):
        yield from kvm.kvm_delete_memslot(0)

    kw = {"variant": variant} if variant is not None else {}
    built = build_vm(setup(prog, host_programs=(host,), **kw))
    rt = Runtime(built.machine.world, built.tasks, ScheduleSpec(Policy.ROUND_ROBIN), checks=make_checks(built.kvm))
    step_until(rt, "vcpu0", lambda f: f.step.kind is EngineStep.FAULTIN and f.step.get("result") == "pfn")
    while True:
        try:
            f = rt.step(forced="host0")
        except ValueError:          # host0 finished
            break
        if f is None or f.step.kind is EngineStep.LOCK_WAIT:
            break
    return built, rt


def test_memslot_deletion_waits_for_the_fault_holding_srcu():
    """kvm_invalidate_memslot -> kvm_swap_active_memslots -> synchronize_srcu_expedited: the vCPU holds kvm->srcu
    across the fault (kvm_arch_vcpu_ioctl_run), so the deletion waits before kvm_arch_flush_shadow_memslot. The
    fault then AUGs the page of the (now invalid) slot, and only afterwards does the zap BLOCK/TRACK/REMOVE it:
    no SPTE is left for a gfn outside every memslot."""
    built, rt = _delete_slot0_during_fault()
    kvm = built.kvm
    wait = rt.timeline.frames[-1]
    assert (wait.task, wait.step.kind, wait.step.get("lock"), wait.step.get("mode")) == (
        "host0", EngineStep.LOCK_WAIT, "kvm->srcu", "synchronize")
    assert [s.invalid for s in kvm.memslots()] == [True]
    with pytest.raises(ValueError, match="not runnable"):      # still waiting: vCPU0 is in its read section
        rt.step(forced="host0")
    assert rt.run() is StopReason.DONE
    no_kvm_bug(rt)
    assert not [v for f in rt.timeline.frames for v in f.violations]
    calls = [(f.task, f.step.get("leaf")) for f in seamcalls(rt)]
    assert calls == [("vcpu0", Seamcall.TDH_MEM_SEPT_ADD)] * 3 + [
        ("vcpu0", Seamcall.TDH_MEM_PAGE_AUG), ("host0", Seamcall.TDH_MEM_RANGE_BLOCK),
        ("host0", Seamcall.TDH_MEM_TRACK), ("host0", Seamcall.TDH_MEM_PAGE_REMOVE),
        ("host0", Seamcall.TDH_PHYMEM_PAGE_WBINVD)]
    assert kvm.memslots() == ()
    assert leaf_value(kvm, kvm.vcpus[0].mirror_root, 1) == (1, NONPRESENT)


def test_spte_outside_memslot_is_reported_when_deletion_does_not_wait():
    """Without synchronize_srcu (a variant whose memslot swap does not wait for readers) the zap runs first and
    the in-flight fault AUGs and maps gfn 1 after memslot 0 is gone: invariant spte-outside-memslot."""
    from tdxdbg.engine.variants.upstream import Upstream

    class NoSrcu(Upstream):
        def synchronize_srcu_expedited(self):
            return (yield from ())

    _built, rt = _delete_slot0_during_fault(NoSrcu)
    assert rt.run() is StopReason.DONE
    names = {v.invariant for f in rt.timeline.frames for v in f.violations}
    assert "spte-outside-memslot" in names


def test_local_retry_on_an_invalid_slot_deadlocks_with_memslot_deletion():
    """Story 3 (SRCU deadlock), in v6.16: without the v6.18 bail in tdx_handle_ept_violation, the local-retry loop
    retries RET_PF_RETRY ("memslot being deleted") with kvm->srcu held, while kvm_swap_active_memslots waits in
    synchronize_srcu_expedited for that very reader. Neither finishes; the zap never runs."""
    from tdxdbg.engine.variants.v6_16 import V6_16

    def prog():
        yield from guest.accept_memory(0x1000, 4096)

    def host(kvm):
        yield from kvm.kvm_delete_memslot(0)

    built = build_vm(setup(prog, host_programs=(host,), variant=V6_16))
    rt = Runtime(built.machine.world, built.tasks, ScheduleSpec(Policy.ROUND_ROBIN))
    step_until(rt, "vcpu0", lambda f: f.step.kind is EngineStep.FAULT)
    step_until(rt, "host0", lambda f: f.step.kind is EngineStep.LOCK_WAIT)
    assert rt.run(max_frames=3000) is StopReason.MAX_FRAMES
    tail = rt.timeline.frames[-1000:]
    assert {f.task for f in tail} == {"vcpu0"}
    assert len([f for f in tail if f.step.get("what") == "local retry"]) > 50
    assert frames(rt, EngineStep.FAULTIN, result="memslot being deleted")
    assert not seamcalls(rt, task="host0")          # kvm_arch_flush_shadow_memslot never ran
