"""Direct-root-only operations: dirty logging (eager split of a 2M shared leaf, write-protection, the lockless
fast_page_fault that makes a write-protected leaf writable again and marks the gfn dirty), clearing D bits and
aging A bits (kvm_tdp_mmu_age_gfn_range), and loading a user's own variant from a Python file."""

from __future__ import annotations

from pathlib import Path

import pytest
from engine_helpers import SHARED, frames

from tdxdbg.engine.gmem import Memslot, dirty_bitmap_key
from tdxdbg.engine.spte import (
    EPT_SPTE_MMU_WRITABLE,
    PT_PAGE_SIZE_MASK,
    PT_WRITABLE_MASK,
    VMX_EPT_ACCESS_BIT,
    VMX_EPT_DIRTY_BIT,
    is_shadow_present_pte,
    spte_to_pfn,
)
from tdxdbg.engine.steps import EngineStep, SpteWrite
from tdxdbg.engine.vm import VariantError, VmSetup, build_vm, load_variant
from tdxdbg.hw import guest
from tdxdbg.runtime import Runtime, StopReason
from tdxdbg.runtime.scheduler import Policy, ScheduleSpec

GPA = 0x200000          # 2 MiB-aligned, inside a 4 MiB shared (non-guest_memfd) slot


def _direct_leaves(kvm, world) -> dict[int, tuple[int, int]]:
    """gfn -> (level, spte) of every present leaf under the direct root."""
    out = {}
    root = next(r for r in world.peek(("kvm.roots",)) if not world.peek(("kvm.sp", r)).role.is_mirror)

    def walk(table: int, level: int, base: int) -> None:
        for i in range(512):
            v = kvm.memory.read_entry(table, i)
            if not is_shadow_present_pte(v):
                continue
            gfn = base + (i << (9 * (level - 1)))
            if level == 1 or v & PT_PAGE_SIZE_MASK:
                out[gfn & ~kvm.gfn_direct_bits] = (level, v)
            else:
                walk(spte_to_pfn(v), level - 1, gfn)
    walk(root, 4, 0)
    return out


def _run_three(write_before, host, write_after):
    setup = VmSetup(memslots=(Memslot(0, 0, 1024),), vcpu_programs=(write_before, write_after),
                    host_programs=(host,))
    built = build_vm(setup)
    v0, v1, h0 = built.tasks
    rt = Runtime(built.machine.world, [v0, h0, v1], ScheduleSpec(Policy.SEQUENTIAL))
    assert rt.run(max_frames=200_000) is StopReason.DONE
    assert all(t.error is None for t in built.tasks), [t.error for t in built.tasks]
    return built, rt


def test_dirty_logging_splits_write_protects_and_fast_pf_marks_dirty() -> None:
    """KVM_MEM_LOG_DIRTY_PAGES on: the 2M shared leaf is split eagerly into 512 4K leaves with contiguous pfns
    (tdp_mmu_split_huge_pages_root), every leaf loses W but keeps MMU-writable (wrprot_gfn_range); the next
    guest write is fixed by fast_page_fault with a cmpxchg setting W and D, and the gfn lands in the dirty
    bitmap (mark_page_dirty_in_slot)."""
    def before():
        yield from guest.write_value(SHARED | GPA, 0x11)

    def after():
        yield from guest.write_value(SHARED | (GPA + 0x3000), 0x22)
        v = yield from guest.read_value(SHARED | GPA)
        assert v == 0x11

    built, rt = _run_three(lambda: before(), lambda kvm: kvm.kvm_set_dirty_logging(0, True), lambda: after())
    kvm, world = built.kvm, built.machine.world
    leaves = _direct_leaves(kvm, world)
    first = GPA >> 12
    assert all(leaves[first + i][0] == 1 for i in range(512))
    base = spte_to_pfn(leaves[first][1])
    assert [spte_to_pfn(leaves[first + i][1]) for i in range(512)] == [base + i for i in range(512)]
    written = leaves[first + 3][1]
    assert written & PT_WRITABLE_MASK and written & VMX_EPT_DIRTY_BIT and written & EPT_SPTE_MMU_WRITABLE
    untouched = leaves[first + 7][1]
    assert not untouched & PT_WRITABLE_MASK and untouched & EPT_SPTE_MMU_WRITABLE
    fast = frames(rt, EngineStep.SPTE_CMPXCHG, what=SpteWrite.FAST_PF)
    assert len(fast) == 1 and fast[0].step.get("ok") and fast[0].step.get("gfn") == first + 3
    assert world.peek(dirty_bitmap_key(0)) == frozenset({first + 3})
    assert frames(rt, EngineStep.RET_PF, task="vcpu1", gpa=SHARED | (GPA + 0x3000))[0].step.get("ret") \
        == "RET_PF_FIXED"


def test_clear_dirty_and_age_work_on_the_direct_root_only() -> None:
    """clear_dirty_gfn_range clears D on direct-root leaves; kvm_tdp_mmu_age_gfn_range reports young and clears
    A; neither touches mirror SPTEs."""
    def prog():
        yield from guest.write_value(SHARED | GPA, 0x11)

    def host(kvm):
        root = next(r for r in kvm.roots() if not kvm.sptep_to_sp(r).role.is_mirror)
        yield from kvm.write_lock()
        changed = yield from kvm.clear_dirty_gfn_range(root, GPA >> 12, (GPA >> 12) + 512)
        yield from kvm.write_unlock()
        young = yield from kvm.age_gfn_range(GPA >> 12, (GPA >> 12) + 512)
        again = yield from kvm.age_gfn_range(GPA >> 12, (GPA >> 12) + 512, test_only=True)
        return changed, young, again

    setup = VmSetup(memslots=(Memslot(0, 0, 1024),), vcpu_programs=(lambda: prog(),),
                    host_programs=(lambda kvm: host(kvm),))
    built = build_vm(setup)
    rt = Runtime(built.machine.world, built.tasks, ScheduleSpec(Policy.SEQUENTIAL))
    assert rt.run() is StopReason.DONE
    assert built.tasks[1].result == (True, True, False)
    level, spte = _direct_leaves(built.kvm, built.machine.world)[GPA >> 12]
    assert level == 2 and not spte & VMX_EPT_DIRTY_BIT and not spte & VMX_EPT_ACCESS_BIT


def test_user_variant_from_a_python_file(tmp_path: Path) -> None:
    """[td].variant = "file.py:Class" loads a subclass of Upstream; its override runs in place of KVM's."""
    path = tmp_path / "myvariant.py"
    path.write_text(
        "from tdxdbg.engine.variants.upstream import Upstream\n"
        "class Mine(Upstream):\n"
        "    name = 'mine'\n"
        "    def private_max_mapping_level(self, gfn):\n"
        "        self.world.set(('mine.called', gfn), True)\n"
        "        return super().private_max_mapping_level(gfn)\n")
    cls = load_variant(f"{path}:Mine")
    assert cls.name == "mine"

    def prog():
        yield from guest.accept_memory(0x1000, 0x1000)

    setup = VmSetup(variant=cls, memslots=(Memslot(0, 0, 1024, guest_memfd=True),), private_ranges=((0, 1024),),
                    vcpu_programs=(lambda: prog(),))
    built = build_vm(setup)
    Runtime(built.machine.world, built.tasks).run()
    assert built.machine.world.peek(("mine.called", 1))


@pytest.mark.parametrize("spec, message", [
    ("nosuch", "unknown variant 'nosuch'"),
    ("missing.py:X", "does not exist"),
])
def test_bad_variant_specs_are_reported(spec: str, message: str) -> None:
    with pytest.raises(VariantError, match=message):
        load_variant(spec)


def test_variant_class_must_derive_from_upstream(tmp_path: Path) -> None:
    path = tmp_path / "v.py"
    path.write_text("class NotKvm:\n    pass\n")
    with pytest.raises(VariantError, match="not a class derived from"):
        load_variant(f"{path}:NotKvm")
    path.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(VariantError, match="cannot load variant: RuntimeError: boom"):
        load_variant(f"{path}:NotKvm")


def test_dirty_logging_is_refused_on_a_guest_memfd_slot():
    """check_memory_region_flags: "Dirty logging private memory is not currently supported": the FLAGS_ONLY
    update fails with -EINVAL and the slot keeps its flags (no swap, no write-protection)."""
    out = []

    def host(kvm):
        out.append((yield from kvm.kvm_set_dirty_logging(0, True)))

    built = build_vm(VmSetup(memslots=(Memslot(0, 0, 1024, guest_memfd=True),), host_programs=(host,)))
    rt = Runtime(built.machine.world, built.tasks, ScheduleSpec(Policy.SEQUENTIAL))
    assert rt.run() is StopReason.DONE
    assert out == [-22]
    assert built.kvm.memslots()[0].dirty_log is False
    assert built.kvm.kvm_memslots_generation() == 1
    assert frames(rt, EngineStep.WARN)[0].step.get("message").endswith("-EINVAL (check_memory_region_flags)")


def test_fault_in_a_dirty_logged_slot_marks_the_page_dirty():
    """make_spte: a writable SPTE in a dirty-tracked slot calls mark_page_dirty_in_slot (a 4K leaf: dirty
    logging keeps the slot at 4K). A read maps writable too (map_writable, ACC_ALL), so it dirties its gfn as
    well; a gfn never faulted stays clean. The FLAGS_ONLY update bumps the memslot generation (1 -> 2)."""
    def prog():
        yield from guest.write_value(SHARED | 0x3000, 1)
        yield from guest.read_value(SHARED | 0x5000)

    def host(kvm):
        yield from kvm.kvm_set_dirty_logging(0, True)

    built = build_vm(VmSetup(memslots=(Memslot(0, 0, 1024),), vcpu_programs=(prog,), host_programs=(host,)))
    rt = Runtime(built.machine.world, built.tasks, ScheduleSpec(Policy.SEQUENTIAL, order=("host0",) * 20))
    assert rt.run() is StopReason.DONE
    assert built.machine.world.peek(("kvm.dirty_bitmap", 0)) == frozenset({0x3, 0x5})
    assert built.kvm.kvm_memslots_generation() == 2
