"""BUSY on a zap (tdx_sept_zap_private_spte, tdh_do_no_vcpus): one retry with every vCPU kept out of the
TD (tdx_no_vcpus_enter_start: wait_for_sept_zap + kick); a second BUSY is a KVM_BUG and a dead VM."""

from __future__ import annotations

from engine_helpers import SHARED, frames, seamcall_return, seamcalls, setup

from tdxdbg.engine.kvm import K_WAIT_FOR_SEPT_ZAP
from tdxdbg.engine.steps import EngineStep
from tdxdbg.engine.vm import build_vm
from tdxdbg.hw import guest
from tdxdbg.hw.tdx.leaves import Seamcall
from tdxdbg.hw.tdx.seamcall import TdxStep
from tdxdbg.hw.tdx.status import TdxStatus
from tdxdbg.runtime import Runtime, StepKind, StopReason
from tdxdbg.runtime.scheduler import Policy, ScheduleSpec

P = 0x300000
Q = 0x500000
BUSY = 0x8000_0200_0000_0000


def _converter():
    yield from guest.accept_memory(P, 4096)
    yield from guest.map_gpa(P | SHARED, 4096)
    yield from guest.write_value(P | SHARED, 1)


def _spinner():
    yield from guest.accept_memory(Q, 4096)
    for i in range(40):
        yield from guest.write_value(Q, i)


def _run(busy_count: int):
    inject = tuple((Seamcall.TDH_MEM_RANGE_BLOCK, i, TdxStatus.TDX_OPERAND_BUSY) for i in range(1, busy_count + 1))
    built = build_vm(setup(_converter, _spinner, inject=inject))
    rt = Runtime(built.machine.world, built.tasks, ScheduleSpec(Policy.ROUND_ROBIN))
    assert rt.run(max_frames=20_000) is StopReason.DONE
    return built, rt


def _writes(rt, key):
    return [(f.index, new) for f in rt.timeline.frames for k, _old, new in f.effects if k == key]


def test_block_busy_once_retries_with_vcpus_kept_out():
    built, rt = _run(1)
    assert not frames(rt, EngineStep.KVM_BUG) and not frames(rt, StepKind.TASK_ERROR)
    blocks = seamcalls(rt, leaves=[Seamcall.TDH_MEM_RANGE_BLOCK])
    assert [seamcall_return(rt, b).step.get("rax") for b in blocks] == [BUSY, 0]
    flag = _writes(rt, K_WAIT_FOR_SEPT_ZAP)
    assert [v for _i, v in flag] == [True, False]
    (set_at, _), (clear_at, _) = flag
    assert blocks[0].index < set_at < blocks[1].index < clear_at
    # tdx_no_vcpus_enter_start kicks every vCPU out of guest mode (KVM_REQ_OUTSIDE_GUEST_MODE) ...
    kicks = frames(rt, EngineStep.KICK, what="KVM_REQ_OUTSIDE_GUEST_MODE")
    assert any(set_at <= k.index < blocks[1].index for k in kicks)
    # ... and no vCPU enters the TD while wait_for_sept_zap is set (tdx_vcpu_run).
    assert not [f for f in frames(rt, TdxStep.TD_ENTRY) if set_at < f.index < clear_at]
    # The zap completes in the kernel's order and the run finishes normally.
    after = [f.step.get("leaf") for f in seamcalls(rt) if f.index > blocks[1].index][:3]
    assert after == [Seamcall.TDH_MEM_TRACK, Seamcall.TDH_MEM_PAGE_REMOVE, Seamcall.TDH_PHYMEM_PAGE_WBINVD]
    assert not built.kvm.vm_dead
    assert [t.result for t in rt.tasks] == ["halted", "halted"]


def test_block_busy_twice_is_a_kvm_bug_and_a_dead_vm():
    built, rt = _run(2)
    bugs = frames(rt, EngineStep.KVM_BUG)
    assert bugs and bugs[0].step.get("bug") is True
    assert bugs[0].step.get("message").startswith("SEAMCALL TDH_MEM_RANGE_BLOCK failed")
    assert built.kvm.vm_dead
    # Never a Python exception: both vCPU threads end with KVM_RUN's -EIO.
    assert not frames(rt, StepKind.TASK_ERROR)
    assert [t.result for t in rt.tasks] == ["KVM_RUN: -5", "KVM_RUN: -5"]
    # The page was never removed from the S-EPT and no vCPU entered the TD after the bug.
    assert not seamcalls(rt, leaves=[Seamcall.TDH_MEM_PAGE_REMOVE])
    assert not [f for f in frames(rt, TdxStep.TD_ENTRY) if f.index > bugs[0].index]
    # wait_for_sept_zap was set and cleared again around the failed retry.
    assert [v for _i, v in _writes(rt, K_WAIT_FOR_SEPT_ZAP)] == [True, False]
