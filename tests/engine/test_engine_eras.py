"""Kernel eras as variants: each difference between `upstream` (the newest kvm-x86 tree), `v6.16` and `v7` (the
2022 series), shown with the same inputs in both eras, and the ioctl gate of a bugged (or, in v6.16, dead) VM."""

from __future__ import annotations

import pytest
from engine_helpers import frames, ret_pfs, run, seamcall_return, seamcalls, setup, step_until

from tdxdbg.engine.checks import make_checks
from tdxdbg.engine.kvm import K_NR_PREMAPPED, K_VM_BUGGED, K_VM_DEAD
from tdxdbg.engine.steps import EngineStep
from tdxdbg.engine.variants.upstream import Upstream
from tdxdbg.engine.variants.v6_16 import V6_16
from tdxdbg.engine.variants.v7 import V7
from tdxdbg.engine.vm import build_vm, load_variant
from tdxdbg.hw import guest
from tdxdbg.hw.tdx.leaves import Seamcall
from tdxdbg.hw.tdx.status import TdxStatus
from tdxdbg.runtime import Runtime, Step, StopReason
from tdxdbg.runtime.scheduler import Policy, ScheduleSpec
from tdxdbg.scenario.builder import host_op
from tdxdbg.scenario.ops import parse_host_op

SC = Seamcall
EIO, EINVAL = -5, -22


def _build_time(variant: type, inject: tuple = (), then: tuple[str, ...] = ("finalize",)):
    """A TD being built: KVM_TDX_INIT_MEM_REGION of 0x0..0x2000, then the given host ops (as a scenario's)."""
    seen: dict[str, object] = {}

    def host(kvm):
        seen["init"] = yield from host_op(kvm, parse_host_op("init_mem_region 0x0 8K"))
        for text in then:
            seen[text] = yield from host_op(kvm, parse_host_op(text))

    built, rt = run(setup(lambda: guest.read_value(0x0), host_programs=(host,), runnable=False, variant=variant,
                          inject=inject))
    return built, rt, seen


def _spte_writes(rt, gfn: int, level: int) -> list:
    return [f for f in frames(rt, EngineStep.SPTE_CMPXCHG, EngineStep.SPTE_WRITE)
            if f.step.get("gfn") == gfn and f.step.get("level") == level]


def test_variants_load_by_name():
    assert load_variant("upstream") is Upstream and load_variant("v6.16") is V6_16 and load_variant("v7") is V7
    assert issubclass(V7, V6_16)


# -- tdx_gmem_post_populate: PAGE.ADD from the map path (upstream) or after premapping (v6.16) -----------------
def test_upstream_page_add_issued_by_the_leaf_hook_while_frozen():
    """upstream tdx_gmem_post_populate -> kvm_tdp_mmu_map_private_pfn: tdx_sept_set_private_spte (leaf) on a TD not
    yet runnable issues TDH.MEM.PAGE.ADD (tdx_mem_page_add) between the freeze and the unfreeze of the mirror
    leaf; nr_premapped is never written."""
    _built, rt, seen = _build_time(Upstream)
    assert seen == {"init": 0, "finalize": 0}
    add = seamcalls(rt, leaves=[SC.TDH_MEM_PAGE_ADD])[0]
    assert add.step.get("rcx") == 0x0
    freeze, unfreeze = _spte_writes(rt, 0, 1)
    assert freeze.step.get("new") == 0x80000000000005A0       # FROZEN_SPTE
    assert freeze.index < add.index < unfreeze.index
    assert seamcall_return(rt, add).step.get("rax") == TdxStatus.TDX_SUCCESS
    assert not [f for f in rt.timeline.frames if f.wrote(K_NR_PREMAPPED)]


def test_v6_16_page_add_after_the_premapped_leaf_is_published():
    """v6.16 tdx_gmem_post_populate: kvm_tdp_map_page premaps the leaf (tdx_mem_page_record_premap_cnt:
    nr_premapped 0 -> 1), the leaf is unfrozen, and only then TDH.MEM.PAGE.ADD (nr_premapped back to 0)."""
    _built, rt, seen = _build_time(V6_16)
    assert seen == {"init": 0, "finalize": 0}
    add = seamcalls(rt, leaves=[SC.TDH_MEM_PAGE_ADD])[0]
    _freeze, unfreeze = _spte_writes(rt, 0, 1)
    assert unfreeze.index < add.index
    counts = [new for f in rt.timeline.frames for k, _o, new in f.effects if k == K_NR_PREMAPPED]
    assert counts == [1, 0, 1, 0]


def test_page_add_error_bugs_the_vm_upstream_only():
    """TDH.MEM.PAGE.ADD fails with TDX_OPERAND_INVALID. upstream tdx_mem_page_add: TDX_BUG_ON_2 -> the VM is bugged,
    KVM_TDX_INIT_MEM_REGION returns -EIO and kvm_vm_ioctl refuses KVM_TDX_FINALIZE_VM with -EIO (no MR.FINALIZE).
    v6.16 tdx_gmem_post_populate: -EIO without a bug; the page stays premapped, so finalize is -EINVAL."""
    inject = ((SC.TDH_MEM_PAGE_ADD, 1, int(TdxStatus.TDX_OPERAND_INVALID)),)
    built, rt, seen = _build_time(Upstream, inject, ("finalize", "destroy"))
    assert seen["init"] == EIO and seen["finalize"] == EIO
    assert len(frames(rt, EngineStep.KVM_BUG)) == 1
    assert built.machine.world.peek(K_VM_BUGGED)
    assert not seamcalls(rt, leaves=[SC.TDH_MR_FINALIZE, SC.TDH_MR_EXTEND])
    refused = frames(rt, EngineStep.WARN, task="host0")
    assert refused[0].step.get("message") == "KVM_MEMORY_ENCRYPT_OP(KVM_TDX_FINALIZE_VM) on a bugged VM: -EIO"

    built, rt, seen = _build_time(V6_16, inject, ("finalize", "destroy"))
    assert seen["init"] == EIO and seen["finalize"] == EINVAL
    assert not frames(rt, EngineStep.KVM_BUG)
    assert not seamcalls(rt, leaves=[SC.TDH_MR_FINALIZE, SC.TDH_MR_EXTEND])
    # Teardown finds the premapped leaf's S-EPT entry empty (tdx_is_sept_zap_err_due_to_premap) and only drops
    # the count: nr_premapped 0 -> 1 (premap), 1 -> 0 (the zap at destroy).
    counts = [new for f in rt.timeline.frames for k, _o, new in f.effects if k == K_NR_PREMAPPED]
    assert counts == [1, 0]
    block = seamcalls(rt, leaves=[SC.TDH_MEM_RANGE_BLOCK])[0]
    assert seamcall_return(rt, block).step.get("rax") == TdxStatus.TDX_EPT_ENTRY_STATE_INCORRECT | 0x1


def test_mr_extend_error_bugs_the_vm_upstream_only():
    """The 3rd TDH.MR.EXTEND fails with TDX_OPERAND_INVALID: upstream TDX_BUG_ON_2(TDH_MR_EXTEND) bugs the VM;
    v6.16 returns -EIO and the VM lives on (finalize then succeeds: the page was PAGE.ADDed)."""
    inject = ((SC.TDH_MR_EXTEND, 3, int(TdxStatus.TDX_OPERAND_INVALID)),)
    built, rt, seen = _build_time(Upstream, inject, ("finalize", "destroy"))
    assert seen["init"] == EIO and seen["finalize"] == EIO
    assert len(seamcalls(rt, leaves=[SC.TDH_MR_EXTEND])) == 3
    assert built.machine.world.peek(K_VM_BUGGED)

    built, rt, seen = _build_time(V6_16, inject)
    assert seen == {"init": EIO, "finalize": 0}
    assert len(seamcalls(rt, leaves=[SC.TDH_MR_EXTEND])) == 3
    assert not frames(rt, EngineStep.KVM_BUG) and not built.machine.world.peek(K_VM_DEAD)


def test_tdx_bug_on_and_kvm_bug_on_warn_only_the_first_time():
    """__TDX_BUG_ON and KVM_BUG_ON: WARN_ON_ONCE(err && !kvm->vm_bugged) - once bugged, another SEAMCALL error or
    KVM_BUG_ON returns true without a second KVM_BUG (red frame), and the VM keeps its first reason."""
    inject = ((SC.TDH_MR_EXTEND, 1, int(TdxStatus.TDX_OPERAND_INVALID)),)
    built, rt, _seen = _build_time(Upstream, inject, ("finalize", "destroy"))
    kvm = built.kvm
    first = built.machine.world.peek(K_VM_BUGGED)
    assert first.startswith("SEAMCALL TDH_MR_EXTEND failed")

    def again():
        r = yield from kvm.seamcall(SC.TDH_MR_EXTEND, 0x1000)
        a = yield from kvm.tdx_bug_on(r.rax != 0, "TDH_MR_EXTEND", r)
        b = yield from kvm.kvm_bug_on(True, "another bug")
        return a, b

    gen = again()
    steps = []
    try:
        while True:
            steps.append(next(gen))
    except StopIteration as stop:
        assert stop.value == (True, True)
    assert steps and EngineStep.KVM_BUG not in [st.kind for st in steps]
    assert built.machine.world.peek(K_VM_BUGGED) == first
    assert len(frames(rt, EngineStep.KVM_BUG)) == 1


# -- kvm_vm_ioctl / kvm_vcpu_ioctl on a dead or bugged VM ----------------------------------------------------
@pytest.mark.parametrize("variant, refused", [(Upstream, False), (V6_16, True)])
def test_ioctls_of_a_dead_but_not_bugged_vm(variant, refused):
    """The guest touches a private page it never accepted with SEPT_VE_DISABLE: tdx_handle_ept_violation calls
    kvm_vm_dead (not bugged). v6.16 kvm_vm_ioctl checks vm_dead: KVM_SET_MEMORY_ATTRIBUTES is -EIO. upstream checks
    only vm_bugged: the ioctl runs (0). KVM_PRE_FAULT_MEMORY is -EIO in both: kvm_tdp_map_page bails out on
    KVM_REQ_VM_DEAD before faulting."""
    out = {}

    def host(kvm):
        yield Step(EngineStep.HOST_OP, {"op": "wait for the vCPU"}, lambda w: w.peek(kvm.vcpus[0].stopped_key))
        out["attr"] = yield from host_op(kvm, parse_host_op("set_attributes 0x200000 4K shared"))
        out["prefault"] = yield from host_op(kvm, parse_host_op("prefault 0x300000 4K"))

    built, rt = run(setup(lambda: guest.read_value(0x1000), host_programs=(host,), variant=variant))
    w = built.machine.world
    assert w.peek(K_VM_DEAD) and not w.peek(K_VM_BUGGED)
    assert out == ({"attr": EIO, "prefault": EIO} if refused else {"attr": 0, "prefault": EIO})
    assert rt.task("vcpu0").result == "KVM_RUN: -5"


def test_bugged_vm_refuses_vm_and_vcpu_ioctls():
    """A TDH.MEM.PAGE.AUG error bugs the VM (TDX_BUG_ON_2 in tdx_mem_page_aug); afterwards kvm_vm_ioctl refuses
    KVM_SET_MEMORY_ATTRIBUTES and KVM_SET_USER_MEMORY_REGION2, and kvm_vcpu_ioctl KVM_PRE_FAULT_MEMORY, with -EIO
    before doing anything (no mmu_lock taken, no SEAMCALL). guest_memfd PUNCH_HOLE is not a KVM ioctl: it runs."""
    out = {}

    def prog():
        yield from guest.accept_memory(0x1000, 4096)

    def host(kvm):
        yield Step(EngineStep.HOST_OP, {"op": "wait for the vCPU"}, lambda w: w.peek(kvm.vcpus[0].stopped_key))
        for text in ("set_attributes 0x200000 4K shared", "delete_memslot 0", "prefault 0x300000 4K",
                     "punch_hole 0x400000 4K"):
            out[text.split()[0]] = yield from host_op(kvm, parse_host_op(text))

    inject = ((SC.TDH_MEM_PAGE_AUG, 1, int(TdxStatus.TDX_OPERAND_INVALID)),)
    built, rt = run(setup(prog, host_programs=(host,), inject=inject))
    assert built.machine.world.peek(K_VM_BUGGED)
    assert out == {"set_attributes": EIO, "delete_memslot": EIO, "prefault": EIO, "punch_hole": 0}
    bugged_at = frames(rt, EngineStep.KVM_BUG)[0].index
    assert not [f for f in seamcalls(rt, task="host0") if f.index > bugged_at]
    assert [f.step.get("message") for f in frames(rt, EngineStep.WARN, task="host0")][:3] == [
        "KVM_SET_MEMORY_ATTRIBUTES on a bugged VM: -EIO",
        "KVM_SET_USER_MEMORY_REGION2 on a bugged VM: -EIO",
        "KVM_PRE_FAULT_MEMORY (vCPU 0) on a bugged VM: -EIO"]
    assert [s.id for s in built.kvm.memslots()] == [0]


# -- tdx_handle_ept_violation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("variant, first_exit", [(Upstream, "EPT violation handled"), (V6_16, "local retry")])
def test_local_retry_on_an_invalid_memslot(variant, first_exit):
    """vCPU0 faults 0x2000 while host0 has marked memslot 0 KVM_MEMSLOT_INVALID: kvm_mmu_faultin_pfn returns
    RET_PF_RETRY. upstream tdx_handle_ept_violation leaves the local retry loop on an invalid slot (so the vCPU
    can drop SRCU); v6.16 has no such bail and retries locally."""
    def prog():
        yield from guest.accept_memory(0x1000, 4096)
        yield from guest.write_value(0x1000, 5)
        yield from guest.accept_memory(0x2000, 4096)

    def host(kvm):
        yield from kvm.kvm_delete_memslot(0)

    built = build_vm(setup(prog, host_programs=(host,), variant=variant))
    rt = Runtime(built.machine.world, built.tasks, ScheduleSpec(Policy.ROUND_ROBIN))
    step_until(rt, "vcpu0", lambda f: f.step.kind is EngineStep.RET_PF)
    step_until(rt, "host0", lambda f: f.step.get("op") == "memslot marked KVM_MEMSLOT_INVALID")
    step_until(rt, "vcpu0", lambda f: f.step.kind is EngineStep.RET_PF)
    assert ret_pfs(rt)[-1] == ("RET_PF_RETRY", 1)
    step_until(rt, "vcpu0", lambda f: f.step.kind is EngineStep.EXIT)
    assert frames(rt, EngineStep.EXIT)[-1].step.get("what") == first_exit


# -- v7: no detection of an unexpected pending-page violation -------------------------------------------------
def test_v7_has_no_unexpected_pending_detection():
    """The guest reads 0x300000 it never accepted, with SEPT_VE_DISABLE. upstream (and v6.16)
    tdx_is_sept_violation_unexpected_pending sees the PENDING EPT violation and calls kvm_vm_dead. The 2022 v7
    series had no such check: the second fault finds its mirror SPTE present, RET_PF_SPURIOUS (5 in that era),
    and the guest is re-entered into the same violation again and again."""
    def reader():
        yield from guest.read_value(0x300000)

    for variant in (Upstream, V6_16):
        built, rt = run(setup(reader, sept_ve_disable=True, variant=variant))
        assert [f.step.get("message") for f in frames(rt, EngineStep.KVM_BUG)] == [
            "Guest access before accepting 0x300000 on vCPU 0"]

    built = build_vm(setup(reader, sept_ve_disable=True, variant=V7))
    rt = Runtime(built.machine.world, built.tasks, ScheduleSpec(Policy.ROUND_ROBIN))
    assert rt.run(max_frames=2000) is StopReason.MAX_FRAMES
    assert not frames(rt, EngineStep.KVM_BUG) and not built.kvm.vm_dead
    rets = ret_pfs(rt)
    assert rets[0] == ("RET_PF_FIXED", 4) and len(rets) > 10
    assert set(rets[1:]) == {("RET_PF_SPURIOUS", 5)}
    assert len(seamcalls(rt, leaves=[SC.TDH_MEM_PAGE_AUG])) == 1


# -- kvm_x86_ops: one set_external_spte (upstream) or one hook per operation (v6.16) --------------------------
@pytest.mark.parametrize("variant", [Upstream, V6_16])
def test_external_spte_hooks_per_era(variant):
    """The guest accepts and writes 0x1000, then the host converts it to shared (KVM_SET_MEMORY_ATTRIBUTES zaps
    the private leaf). upstream: kvm_x86_ops.set_external_spte(kvm, gfn, old, new, level) for the three tables,
    the leaf and the zap, dispatched by tdx_sept_set_private_spte to tdx_sept_map_nonleaf_spte /
    tdx_sept_map_leaf_spte / tdx_sept_remove_leaf_spte. v6.16: link_external_spt x3, set_external_spte for the
    leaf, remove_external_spte for the zap. The SEAMCALLs are the same in both eras."""
    def prog():
        yield from guest.accept_memory(0x1000, 4096)
        yield from guest.write_value(0x1000, 7)

    def host(kvm):
        yield Step(EngineStep.HOST_OP, {"op": "wait for the vCPU"}, lambda w: w.peek(kvm.vcpus[0].stopped_key))
        return (yield from host_op(kvm, parse_host_op("set_attributes 0x1000 4K shared")))

    _built, rt = run(setup(prog, host_programs=(host,), variant=variant))
    hooks = [(f.step.get("name"), f.step.get("gfn"), f.step.get("level")) for f in frames(rt, EngineStep.HOOK)]
    if variant is Upstream:
        assert hooks == [("set_external_spte", 0, lvl) for lvl in (4, 3, 2)] + [("set_external_spte", 1, 1)] * 2
    else:
        assert hooks == ([("link_external_spt", 0, lvl) for lvl in (4, 3, 2)] + [("set_external_spte", 1, 1),
                                                                                 ("remove_external_spte", 1, 1)])
    # The zap's HOOK names the removed page (the guest_memfd pfn the leaf mapped) and the stack below it.
    zap = frames(rt, EngineStep.HOOK)[-1]
    aug = seamcalls(rt, leaves=[SC.TDH_MEM_PAGE_AUG])[0]
    assert zap.step.get("pfn") == aug.step.get("r8") >> 12
    remove = seamcalls(rt, leaves=[SC.TDH_MEM_PAGE_REMOVE])[0]
    names = [e.function.rpartition(".")[2] for e in remove.stack]
    want = (["set_external_spte", "tdx_sept_set_private_spte", "tdx_sept_remove_leaf_spte", "tdh_do_no_vcpus"]
            if variant is Upstream else
            ["remove_external_spte_hook", "tdx_sept_remove_private_spte", "tdx_sept_drop_private_spte"])
    assert names[names.index(want[0]):][:len(want)] == want
    leaves = [f.step.get("leaf") for f in seamcalls(rt)]
    assert leaves == [SC.TDH_MEM_SEPT_ADD] * 3 + [SC.TDH_MEM_PAGE_AUG, SC.TDH_MEM_RANGE_BLOCK, SC.TDH_MEM_TRACK,
                                                  SC.TDH_MEM_PAGE_REMOVE, SC.TDH_PHYMEM_PAGE_WBINVD]


@pytest.mark.parametrize("variant, message", [
    (Upstream, "SEAMCALL TDH_MR_FINALIZE failed: TDH.MR.FINALIZE = TDX_OPERAND_INVALID"),
    (V6_16, "TDH.MR.FINALIZE failed: TDH.MR.FINALIZE = TDX_OPERAND_INVALID")])
def test_mr_finalize_error_bugs_the_vm(variant, message):
    """tdx_td_finalize: TDH.MR.FINALIZE failing with anything but BUSY bugs the VM (upstream TDX_BUG_ON, v6.16
    KVM_BUG_ON + pr_tdx_error) and KVM_TDX_FINALIZE_VM returns -EIO; the TD stays not runnable."""
    inject = ((SC.TDH_MR_FINALIZE, 1, int(TdxStatus.TDX_OPERAND_INVALID)),)
    built, rt, seen = _build_time(variant, inject, ("finalize", "destroy"))
    assert seen["init"] == 0 and seen["finalize"] == EIO
    assert [f.step.get("message") for f in frames(rt, EngineStep.KVM_BUG)] == [message]
    assert built.machine.world.peek(K_VM_BUGGED) == message


# -- the invariant checks know the era: a premapped leaf is legal in v6.16 only -------------------------------------
def _violations_of_build(variant: type) -> list[str]:
    def host(kvm):
        yield from kvm.kvm_tdx_init_mem_region(kvm.vcpus[0], 0x0, 0x1000)
        yield from kvm.tdx_td_finalize()

    built = build_vm(setup(lambda: guest.read_value(0x0), host_programs=(host,), runnable=False, variant=variant))
    rt = Runtime(built.machine.world, built.tasks, ScheduleSpec(), checks=make_checks(built.kvm))
    assert rt.run(max_frames=50_000) is StopReason.DONE
    return sorted({f"{v.invariant}: {v.message.rpartition(' present but ')[2]}"
                   for f in rt.timeline.frames for v in f.violations})


def test_premapped_leaf_is_legal_only_in_v6_16():
    """v6.16 publishes the mirror leaf before TDH.MEM.PAGE.ADD (tdx_mem_page_record_premap_cnt): the checks allow a
    present mirror leaf over a FREE S-EPT entry before finalize. Upstream PAGE.ADDs while the leaf is frozen, so a
    variant that publishes first (no-freeze, built on upstream) is caught at build time too."""
    assert _violations_of_build(V6_16) == []
    assert _violations_of_build(Upstream) == []
    # The leaf published over a FREE S-EPT entry (the tables published before SEPT.ADD are caught in any era).
    assert "mirror-present-without-sept: the S-EPT entry is FREE" in _violations_of_build(load_variant("no-freeze"))
