"""Values a KVM engineer reads off the screen: the page-fault error code __vmx_handle_ept_violation builds per
era, the prefetch faults of KVM_PRE_FAULT_MEMORY (kvm_arch_vcpu_pre_fault_memory, kvm_tdp_map_page), and the MMIO
SPTE make_mmio_spte builds (memslot generation, shadow_mmio_value, gpa)."""

from __future__ import annotations

import pytest
from engine_helpers import NONPRESENT, SHARED, SHARED_GFN, frames, leaf_value, no_kvm_bug, run, setup, step_until

from tdxdbg.engine.gmem import Memslot
from tdxdbg.engine.steps import EngineStep
from tdxdbg.engine.variants.upstream import Upstream
from tdxdbg.engine.variants.v6_16 import V6_16
from tdxdbg.engine.vm import VmSetup, build_vm
from tdxdbg.hw import guest
from tdxdbg.runtime import Runtime, StopReason
from tdxdbg.runtime.scheduler import Policy, ScheduleSpec

PFERR_WRITE, PFERR_USER, PFERR_PRIVATE = 1 << 1, 1 << 2, 1 << 49
A_BIT = 1 << 8


@pytest.mark.parametrize(("variant", "shared_read", "shared_write"), [
    (Upstream, 0, PFERR_WRITE),                    # kvm-x86: no bit for a read
    (V6_16, PFERR_USER, PFERR_WRITE),              # v6.16: "Is it a read fault?" -> PFERR_USER_MASK
])
def test_ept_violation_error_codes(variant, shared_read, shared_write):
    """__vmx_handle_ept_violation: the TDX module clears exit-qualification bits 12:7 (tdx_ept_violation_exit_to_vmm),
    so GUEST_FINAL/GUEST_PAGE (set only when the GVA is valid) never appear for a TD; a private violation is
    always handled as a write (tdx_handle_ept_violation) and carries PFERR_PRIVATE_ACCESS."""
    def prog():
        yield from guest.read_value(SHARED | 0x20_0000)
        yield from guest.write_value(SHARED | 0x30_0010, 7)
        yield from guest.accept_memory(0x1000, 4096)

    _built, rt = run(setup(prog, private=((0, 0x100),), variant=variant))
    no_kvm_bug(rt)
    assert [f.step.get("error_code") for f in frames(rt, EngineStep.FAULT)] == [
        shared_read, shared_write, PFERR_WRITE | PFERR_PRIVATE]


def _idle():
    return
    yield


def _prefault(kvm, out):
    def host(k):
        out.append((yield from k.kvm_vcpu_pre_fault_memory(k.vcpus[0], 0x5000, 0x2000)))
        out.append((yield from k.kvm_vcpu_pre_fault_memory(k.vcpus[0], 0x20_1000, 0x1000)))
        out.append((yield from k.kvm_vcpu_pre_fault_memory(k.vcpus[0], SHARED | 0x20_1000, 0x1000)))
    return host


def test_prefault_decides_private_from_attributes_and_maps_prefetch_leaves():
    """kvm_arch_vcpu_pre_fault_memory: error code PFERR_GUEST_FINAL (+ PRIVATE when the attributes say private),
    never WRITE; a shared gfn is faulted at gpa | shared bit (direct root); a GPA with the shared bit is an alias
    (-EINVAL). kvm_tdp_map_page faults with prefetch=true, so make_spte leaves Accessed clear."""
    out: list = []
    seen: list = []

    class Recording(Upstream):
        def kvm_mmu_do_page_fault(self, vcpu, gpa, err, prefetch, level=None):
            seen.append((gpa, err, prefetch))
            return (yield from super().kvm_mmu_do_page_fault(vcpu, gpa, err, prefetch, level))

    # KVM_PRE_FAULT_MEMORY needs a vCPU: one whose guest does nothing.
    built = build_vm(setup(_idle, private=((0, 0x100),), host_programs=(_prefault(None, out),), variant=Recording))
    rt = Runtime(built.machine.world, built.tasks, ScheduleSpec(Policy.SEQUENTIAL))
    assert rt.run() is StopReason.DONE
    no_kvm_bug(rt)
    kvm = built.kvm
    assert out == [0, 0, -22]
    assert seen == [(0x5000, 1 << 32 | PFERR_PRIVATE, True), (0x6000, 1 << 32 | PFERR_PRIVATE, True),
                    (SHARED | 0x20_1000, 1 << 32, True)]
    v = kvm.vcpus[0]
    for gfn in (5, 6):
        level, spte = leaf_value(kvm, v.mirror_root, gfn)
        assert level == 1 and spte & 1 and not spte & A_BIT
    level, spte = leaf_value(kvm, v.direct_root, 0x201, SHARED_GFN)
    assert level == 1 and spte & 1 and not spte & A_BIT and spte & (1 << 9)   # D set: writable, not accessed


@pytest.mark.parametrize(("variant", "ends"), [(Upstream, True), (V6_16, False)])
def test_prefault_into_a_slot_being_deleted(variant, ends):
    """kvm_mmu_faultin_pfn: a prefetch fault on a KVM_MEMSLOT_INVALID slot returns -EAGAIN (v6.18), so the
    pre-fault ioctl drops kvm->srcu and the deletion completes. v6.16 retries RET_PF_RETRY with SRCU held:
    synchronize_srcu_expedited in kvm_swap_active_memslots never returns (story 3, through KVM_PRE_FAULT_MEMORY)."""
    out: list = []

    def prefault(k):
        out.append((yield from k.kvm_vcpu_pre_fault_memory(k.vcpus[0], 0x5000, 0x2000)))

    def delete(k):
        yield from k.kvm_delete_memslot(0)

    built = build_vm(setup(_idle, private=((0, 0x100),), host_programs=(prefault, delete),
                           variant=variant))
    rt = Runtime(built.machine.world, built.tasks, ScheduleSpec(Policy.ROUND_ROBIN))
    step_until(rt, "host0", lambda f: f.step.kind is EngineStep.RET_PF)          # gfn 5 mapped
    step_until(rt, "host1", lambda f: f.step.get("op") == "memslot marked KVM_MEMSLOT_INVALID")
    stop = rt.run(max_frames=3000)
    if ends:
        assert stop is StopReason.DONE
        assert out == [0]                          # one page was mapped: success
        assert built.kvm.memslots() == ()
        assert leaf_value(built.kvm, built.kvm.vcpus[0].mirror_root, 5) == (1, NONPRESENT)
    else:
        assert stop is StopReason.MAX_FRAMES
        assert out == []
        assert {f.task for f in rt.timeline.frames[-500:]} == {"host0"}


def test_mmio_spte_carries_the_memslot_generation():
    """make_mmio_spte: generation_mmio_spte_mask(memslots->generation) | shadow_mmio_value (0 for a TD) | gpa.
    Two memslots created: generation 2; deleting one swaps the memslots twice: 4 (bits 3-10 hold 4 << 3)."""
    mmio_gfn = 0x9_0000

    def prog():
        yield from guest.read_value(SHARED | mmio_gfn << 12)

    def host(k):
        yield from k.kvm_delete_memslot(1)

    s = VmSetup(memslots=(Memslot(0, 0, 0x1000, guest_memfd=True), Memslot(1, 0x1000, 0x100)),
                vcpu_programs=(prog,), host_programs=(host,))
    built = build_vm(s)
    rt = Runtime(built.machine.world, built.tasks, ScheduleSpec(Policy.SEQUENTIAL, order=("host0",) * 40))
    rt.run()
    kvm = built.kvm
    assert kvm.kvm_memslots_generation() == 4
    assert leaf_value(kvm, kvm.vcpus[0].direct_root, mmio_gfn, SHARED_GFN) == (1, 4 << 3 | mmio_gfn << 12)
