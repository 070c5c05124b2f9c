"""The VM's files and teardown: kvm_destroy_vm runs at the last kvm_put_kvm, once userspace closed the VM fd, the
vCPU fds and guest_memfd (kvm_vm_release, kvm_vcpu_release, kvm_gmem_release) and every system call in progress
on them returned. A host operation after `destroy` finds its descriptor closed (-EBADF from the VFS, KVM is not
reached); one in progress when `destroy` begins delays the teardown."""

from __future__ import annotations

from pathlib import Path

from tdxdbg.engine.ioctls import EBADF
from tdxdbg.engine.steps import EngineStep
from tdxdbg.runtime.scheduler import Policy, ScheduleSpec
from tdxdbg.scenario.builder import build_setup
from tdxdbg.scenario.loader import loads
from tdxdbg.scenario.run import run_scenario
from tdxdbg.scenario.runner import run_setup

BUILD_TIME_TWO_SLOTS = """
[td]
state = "initialized"
[[memslot]]
id = 0
gpa = 0
size = "16M"
guest_memfd = true
[[memslot]]
id = 1
gpa = 0x1000000
size = "16M"
guest_memfd = true
[attributes]
private = [[0, "2M"]]
[[vcpu]]
program = ["read 0x201000"]
"""


def _host_results(text: str, order: tuple[str, ...] = (), policy: Policy = Policy.SEQUENTIAL, seed: int = 0):
    scenario = loads(text, "t.toml")
    frames, final, _kvm, stop = run_setup(build_setup(scenario, Path(".")),
                                          ScheduleSpec(policy, seed, order, None))
    rets = [(f.task, f.step.get("op"), f.step.get("ret")) for f in frames
            if f.step.kind is EngineStep.HOST_OP and f.step.get("scenario_op") is not None
            and "ret" in f.step.payload]
    return frames, final, stop, rets


def test_kvm_tdx_init_mem_region_after_kvm_destroy_vm_is_ebadf_not_an_engine_error() -> None:
    """The fuzzer's crash (random seed 90): KVM_TDX_INIT_MEM_REGION after `destroy` reached kvm_mmu_load with
    vcpu0 still naming the root teardown freed (AttributeError). The ioctl's vCPU fd is closed: -EBADF (-9),
    no SEAMCALL; the raw DEMOTE after it still reaches the module (the playground is not a KVM file)."""
    text = BUILD_TIME_TWO_SLOTS + """
[[host]]
program = ["set_attributes 0x200000 2M private"]
[[host]]
program = ["destroy", "init_mem_region 0x201000 4K", "seamcall TDH.MEM.PAGE.DEMOTE 0x400000 1"]
[schedule]
policy = "random"
seed = 90
"""
    report = run_scenario(loads(text, "t.toml"))
    assert report.facts.errors == ()
    assert report.facts.stop == "done" and report.ok
    _frames, _final, _stop, rets = _host_results(text, policy=Policy.RANDOM, seed=90)
    assert [r for r in rets if r[0] == "host1"] == [
        ("host1", "destroy", 0), ("host1", "init_mem_region 0x201000 4K", EBADF),
        ("host1", "seamcall TDH.MEM.PAGE.DEMOTE 0x400000 1", "TDX_PAGE_METADATA_INCORRECT")]
    assert report.facts.seamcalls[-1].leaf == "TDH.MEM.PAGE.DEMOTE"
    assert EBADF == -9
    assert not [s for s in report.facts.seamcalls if s.leaf in ("TDH.MEM.PAGE.ADD", "TDH.MR.EXTEND")]


def test_every_vm_file_call_after_destroy_is_ebadf_and_invalidate_reaches_no_notifier() -> None:
    """kvm_destroy_vm: after it, KVM_SET_MEMORY_ATTRIBUTES, fallocate on guest_memfd, KVM_SET_USER_MEMORY_REGION2,
    KVM_PRE_FAULT_MEMORY, KVM_TDX_FINALIZE_VM and a second close all get -EBADF; a discard of the shared backing
    reaches no KVM mmu notifier (mmu_notifier_unregister) and returns 0."""
    text = BUILD_TIME_TWO_SLOTS + """
[[host]]
program = ["destroy", "set_attributes 0x0 4K shared", "punch_hole 0x0 4K", "delete_memslot 1", "dirty_log 1 on",
           "prefault 0x0 4K", "finalize", "destroy", "invalidate 0x1000000 4K"]
"""
    frames, _final, stop, rets = _host_results(text)
    assert stop == "done"
    assert [r[2] for r in rets if r[0] == "host0"] == [0, EBADF, EBADF, EBADF, EBADF, EBADF, EBADF, EBADF, 0]
    assert not [f for f in frames if f.task == "host0" and f.step.kind is EngineStep.LOCK
                and f.index > next(i for i, r in enumerate(frames) if r.step.get("op") == "finalize")]


def test_kvm_destroy_vm_waits_for_an_ioctl_in_progress() -> None:
    """An ioctl in progress holds its file (fdget) and so the VM: host1's destroy, begun while host0 is inside
    KVM_SET_MEMORY_ATTRIBUTES, waits for it to return 0 before kvm_gmem_release zaps anything."""
    text = BUILD_TIME_TWO_SLOTS + """
[[host]]
program = ["set_attributes 0x0 2M shared"]
[[host]]
program = ["destroy"]
"""
    frames, _final, stop, rets = _host_results(text, order=("host0",) * 3 + ("host1",) * 3)
    assert stop == "done"
    waiting = [f.index for f in frames if f.task == "host1"
               and f.step.get("op") == "waiting for in-flight ioctls to drop their VM references"]
    attrs_done = next(f.index for f in frames if f.task == "host0" and f.step.get("ret") == 0)
    release = next(f.index for f in frames if f.step.get("op") == "guest_memfd release")
    assert len(waiting) == 1 and waiting[0] < attrs_done < release
    assert ("host0", "set_attributes 0x0 2M shared", 0) in rets and ("host1", "destroy", 0) in rets
