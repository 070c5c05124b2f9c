"""A guest access to an AUGed but not yet accepted private page (
tdx_is_sept_violation_unexpected_pending): with SEPT_VE_DISABLE the TD exits and KVM kills the VM; without it
the TDX module injects #VE into the guest."""

from __future__ import annotations

from engine_helpers import frames, ret_pfs, run, seamcalls, setup

from tdxdbg.engine.steps import EngineStep
from tdxdbg.hw import guest
from tdxdbg.hw.tdx.leaves import Seamcall
from tdxdbg.runtime import StepKind

P = 0x300000


def _reader():
    yield from guest.read_value(P)


def test_pending_access_with_sept_ve_disable_kills_the_vm():
    built, rt = run(setup(_reader, sept_ve_disable=True))
    # First access: not mapped -> EPT violation -> AUG (the page is now PENDING in the S-EPT).
    assert ret_pfs(rt) == [("RET_PF_FIXED", 5)]
    assert len(seamcalls(rt, leaves=[Seamcall.TDH_MEM_PAGE_AUG])) == 1
    # Second access: the PENDING EPT violation exits to KVM -> kvm_vm_dead.
    dead = frames(rt, EngineStep.KVM_BUG)
    assert len(dead) == 1
    assert dead[0].step.get("message") == "Guest access before accepting 0x300000 on vCPU 0"
    assert dead[0].step.get("bug") is False        # kvm_vm_dead, not KVM_BUG_ON
    assert built.kvm.vm_dead
    assert frames(rt, EngineStep.EXIT, what="EPT violation handled")[-1].step.get("ret") == -5
    assert rt.task("vcpu0").result == "KVM_RUN: -5"
    assert not frames(rt, StepKind.TASK_ERROR)


def test_pending_access_without_sept_ve_disable_is_a_ve_in_the_guest():
    built, rt = run(setup(_reader, sept_ve_disable=False))
    assert ret_pfs(rt) == [("RET_PF_FIXED", 5)]
    assert not frames(rt, EngineStep.KVM_BUG)
    assert not built.kvm.vm_dead
    # The guest kernel has no handler for a #VE on pending private memory: it panics, ending the vCPU task.
    errors = frames(rt, StepKind.TASK_ERROR)
    assert [f.task for f in errors] == ["vcpu0"]
    assert errors[0].step.get("error") == "GuestPanic: Unexpected #VE on pending private gpa 0x300000"
    assert rt.task("vcpu0").error == "GuestPanic: Unexpected #VE on pending private gpa 0x300000"
