"""Races and BUSY on the fault path: two vCPUs on one gfn and TDX_OPERAND_BUSY from PAGE.AUG."""

from __future__ import annotations

from engine_helpers import (
    FROZEN,
    NONPRESENT,
    RET_PF_FIXED,
    RET_PF_RETRY,
    RET_PF_SPURIOUS,
    frames,
    no_kvm_bug,
    ret_pfs,
    seamcall_return,
    seamcalls,
    setup,
    step_until,
)

from tdxdbg.engine.steps import EngineStep, SpteWrite
from tdxdbg.engine.vm import build_vm
from tdxdbg.hw import guest
from tdxdbg.hw.tdx.leaves import Seamcall
from tdxdbg.hw.tdx.seamcall import TdxStep
from tdxdbg.hw.tdx.status import TdxStatus
from tdxdbg.runtime import Runtime, StopReason
from tdxdbg.runtime.scheduler import Policy, ScheduleSpec

GPA = 0x200000
GFN = 0x200


def _writer(value: int):
    def prog():
        yield from guest.accept_memory(GPA, 4096)
        yield from guest.write_value(GPA, value)
    return prog


def _is_mirror_leaf_iter(f) -> bool:
    return f.step.kind is EngineStep.ITER and f.step.get("root") == "mirror" and f.step.get("level") == 1


def test_two_vcpus_one_gfn_one_aug_loser_retries():
    """R1 / set_external_spte_present: both vCPUs read the non-present leaf; vCPU0 freezes it first, vCPU1's
    cmpxchg fails -> -EBUSY -> RET_PF_RETRY; its local retry finds the leaf present -> RET_PF_SPURIOUS."""
    built = build_vm(setup(_writer(1), _writer(2)))
    rt = Runtime(built.machine.world, built.tasks, ScheduleSpec(Policy.ROUND_ROBIN))
    step_until(rt, "vcpu0", _is_mirror_leaf_iter)
    step_until(rt, "vcpu1", _is_mirror_leaf_iter)
    # Both walkers are now at the leaf with old_spte = SHADOW_NONPRESENT_VALUE.
    at_leaf = [f for f in rt.timeline.frames if _is_mirror_leaf_iter(f)]
    assert [(f.task, f.step.get("old_spte")) for f in at_leaf] == [("vcpu0", NONPRESENT), ("vcpu1", NONPRESENT)]
    assert rt.run() is StopReason.DONE
    no_kvm_bug(rt)

    augs = seamcalls(rt, leaves=[Seamcall.TDH_MEM_PAGE_AUG])
    assert [f.task for f in augs] == ["vcpu0"]
    assert seamcall_return(rt, augs[0]).step.get("rax") == 0
    leaf_cas = [f for f in frames(rt, EngineStep.SPTE_CMPXCHG) if f.step.get("level") == 1]
    assert [(f.task, f.step.get("ok"), f.step.get("old"), f.step.get("new")) for f in leaf_cas] == [
        ("vcpu0", True, NONPRESENT, FROZEN),   # the winner freezes
        ("vcpu1", False, FROZEN, FROZEN),      # the loser finds FROZEN_SPTE where it expected non-present
    ]
    assert ret_pfs(rt, "vcpu0") == [("RET_PF_FIXED", RET_PF_FIXED)]
    assert ret_pfs(rt, "vcpu1") in ([("RET_PF_RETRY", RET_PF_RETRY), ("RET_PF_SPURIOUS", RET_PF_SPURIOUS)],
                                    [("RET_PF_RETRY", RET_PF_RETRY), ("RET_PF_FIXED", RET_PF_FIXED)])
    # The retry is the local loop of tdx_handle_ept_violation: vCPU1 is not re-entered between the two.
    r1 = frames(rt, EngineStep.RET_PF, task="vcpu1")
    assert frames(rt, EngineStep.EXIT, task="vcpu1", what="local retry")
    assert not [f for f in frames(rt, TdxStep.TD_ENTRY, task="vcpu1") if r1[0].index < f.index < r1[1].index]
    assert [t.result for t in rt.tasks] == ["halted", "halted"]
    # Both writes went to the one page.
    assert built.kvm.memory.read_word(built.kvm.world.peek(("gmem.pfn", 0, GFN)), 0) in (1, 2)


def test_loser_that_reads_frozen_retries_without_allocating():
    """kvm_tdp_mmu_map: `if (is_frozen_spte(iter.old_spte)) goto retry` when the walker reads FROZEN_SPTE."""
    built = build_vm(setup(_writer(1), _writer(2)))
    rt = Runtime(built.machine.world, built.tasks, ScheduleSpec(Policy.ROUND_ROBIN))

    def froze(f) -> bool:
        return f.step.kind is EngineStep.SPTE_CMPXCHG and f.step.get("level") == 1 and f.step.get("ok")

    step_until(rt, "vcpu0", froze)
    step_until(rt, "vcpu1", lambda f: f.step.kind is EngineStep.RET_PF)
    seen = [f for f in rt.timeline.frames if _is_mirror_leaf_iter(f) and f.task == "vcpu1"]
    assert [f.step.get("old_spte") for f in seen] == [FROZEN]
    assert ret_pfs(rt, "vcpu1") == [("RET_PF_RETRY", RET_PF_RETRY)]
    assert not frames(rt, EngineStep.SPTE_CMPXCHG, task="vcpu1")
    assert rt.run() is StopReason.DONE
    no_kvm_bug(rt)
    assert len(seamcalls(rt, leaves=[Seamcall.TDH_MEM_PAGE_AUG])) == 1


def test_busy_on_page_aug_restores_and_retries_locally():
    """R2: tdx_mem_page_aug BUSY -> -EBUSY; set_external_spte_present writes `old` back over FROZEN_SPTE;
    RET_PF_RETRY; the local retry loop reissues AUG, which succeeds; the guest is not entered in between."""
    s = setup(_writer(7), inject=((Seamcall.TDH_MEM_PAGE_AUG, 1, TdxStatus.TDX_OPERAND_BUSY),))
    built = build_vm(s)
    rt = Runtime(built.machine.world, built.tasks, ScheduleSpec(Policy.ROUND_ROBIN))
    assert rt.run() is StopReason.DONE
    no_kvm_bug(rt)
    augs = seamcalls(rt, leaves=[Seamcall.TDH_MEM_PAGE_AUG])
    assert len(augs) == 2
    first, second = (seamcall_return(rt, a) for a in augs)
    assert first.step.get("rax") == 0x8000_0200_0000_0000 and first.step.get("injected")
    assert second.step.get("rax") == 0
    leaf_writes = [(f.step.kind, f.step.get("old"), f.step.get("new"), f.step.get("what"))
                   for f in frames(rt, EngineStep.SPTE_CMPXCHG, EngineStep.SPTE_WRITE) if f.step.get("level") == 1]
    gmem_pfn = built.kvm.world.peek(("gmem.pfn", 0, GFN))
    final = 0x8600_0000_0000_0B37 | gmem_pfn << 12
    assert leaf_writes == [
        (EngineStep.SPTE_CMPXCHG, NONPRESENT, FROZEN, SpteWrite.FREEZE),
        (EngineStep.SPTE_WRITE, FROZEN, NONPRESENT, SpteWrite.RESTORE),
        (EngineStep.SPTE_CMPXCHG, NONPRESENT, FROZEN, SpteWrite.FREEZE),
        (EngineStep.SPTE_WRITE, FROZEN, final, SpteWrite.UNFREEZE),
    ]
    assert ret_pfs(rt) == [("RET_PF_RETRY", RET_PF_RETRY), ("RET_PF_FIXED", RET_PF_FIXED)]
    r = frames(rt, EngineStep.RET_PF)
    assert not [f for f in frames(rt, TdxStep.TD_ENTRY) if r[0].index < f.index < r[1].index]
    assert frames(rt, EngineStep.EXIT, what="EPT violation handled")[0].step.get("retries") == 1
    assert rt.task("vcpu0").result == "halted"


def test_busy_on_sept_add_restores_and_retries_locally():
    """tdx_sept_link_private_spt BUSY -> -EBUSY: the non-leaf mirror SPTE is restored, the new table freed
    (tdp_mmu_free_sp), and the retry links a fresh one."""
    s = setup(_writer(7), inject=((Seamcall.TDH_MEM_SEPT_ADD, 2, TdxStatus.TDX_OPERAND_BUSY),))
    built = build_vm(s)
    rt = Runtime(built.machine.world, built.tasks, ScheduleSpec(Policy.ROUND_ROBIN))
    assert rt.run() is StopReason.DONE
    no_kvm_bug(rt)
    assert [f.step.get("rcx") & 7 for f in seamcalls(rt, leaves=[Seamcall.TDH_MEM_SEPT_ADD])] == [3, 2, 2, 1]
    restores = frames(rt, EngineStep.SPTE_WRITE, what=SpteWrite.RESTORE)
    assert [(f.step.get("level"), f.step.get("old"), f.step.get("new")) for f in restores] == [(3, FROZEN, NONPRESENT)]
    assert frames(rt, EngineStep.SP_FREE, why="link failed")
    assert ret_pfs(rt) == [("RET_PF_RETRY", RET_PF_RETRY), ("RET_PF_FIXED", RET_PF_FIXED)]
    assert rt.task("vcpu0").result == "halted"
