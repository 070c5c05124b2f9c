"""The invariant checker (tdxdbg/engine/checks.py): clean runs stay green, and each invariant, when provoked
(by a broken variant or by writing the World directly), yields exactly its named Violation."""

from __future__ import annotations

from typing import Any

import pytest

from tdxdbg.engine.checks import INVARIANTS, make_checks
from tdxdbg.engine.gmem import Memslot
from tdxdbg.engine.kvm import K_MMU_LOCK, MmuLock
from tdxdbg.engine.spte import (
    EPT_SPTE_MMU_WRITABLE,
    FROZEN_SPTE,
    PT_WRITABLE_MASK,
    SHADOW_NONPRESENT_VALUE,
    make_spte,
    spte_to_pfn,
)
from tdxdbg.engine.steps import EngineStep, HookCall, LockEvent, SpteChange, SpteWrite
from tdxdbg.engine.vm import VariantError, VmSetup, build_vm, load_variant
from tdxdbg.hw import guest
from tdxdbg.hw.tdx.leaves import Seamcall
from tdxdbg.hw.tdx.seamcall import SeamcallEntry, SeamcallReturn, TdxStep
from tdxdbg.hw.tdx.status import OperandId, TdxStatus
from tdxdbg.runtime import Runtime, StackEntry, Step, StopReason
from tdxdbg.runtime.scheduler import ScheduleSpec

SHARED = 1 << 47
NPAGES = 16384


def private_prog() -> Any:
    yield from guest.accept_memory(0x1000, 0x1000)
    yield from guest.write_value(0x1000, 0xAA)
    value = yield from guest.read_value(0x1000)
    assert value == 0xAA


def conversion_prog() -> Any:
    yield from guest.accept_memory(0x2000, 0x1000)
    yield from guest.write_value(0x2000, 0x11)
    yield from guest.map_gpa(0x2000 | SHARED, 0x1000)          # private -> shared
    yield from guest.write_value(0x2000 | SHARED, 0x22)
    yield from guest.map_gpa(0x2000, 0x1000)                   # shared -> private
    yield from guest.accept_memory(0x2000, 0x1000)
    yield from guest.write_value(0x2000, 0x33)
    value = yield from guest.read_value(0x2000)
    assert value == 0x33


def mixed_prog() -> Any:
    """gfn 1 private, gfn 3 shared: leaves in both roots."""
    yield from private_prog()
    yield from guest.map_gpa(0x3000 | SHARED, 0x1000)
    yield from guest.write_value(0x3000 | SHARED, 0x44)


def run(prog: Any, variant: str = "upstream", checks: bool = True) -> tuple[Any, Runtime]:
    built = build_vm(VmSetup(variant=load_variant(variant), memslots=(Memslot(0, 0, NPAGES, guest_memfd=True),),
                             private_ranges=((0, NPAGES),), vcpu_programs=(lambda: prog(),)))
    rt = Runtime(built.machine.world, built.tasks, ScheduleSpec(),
                 checks=make_checks(built.kvm) if checks else ())
    assert rt.run(max_frames=50_000) is StopReason.DONE
    return built, rt


def violations(rt: Runtime) -> list[str]:
    return [v.invariant for f in rt.timeline.frames for v in f.violations]


# -- direct provocation: a finished clean VM, a fresh checker, then hand-made writes and steps ---------------------
class Poke:
    """A checker over a VM that ran `prog`; `frame()` judges the writes made since the last call plus a step."""

    def __init__(self, prog: Any = mixed_prog) -> None:
        self.built, _rt = run(prog, checks=False)
        self.kvm = self.built.kvm
        self.world = self.built.machine.world
        self.world.take_effects()
        self.world.task = "vcpu0"
        self.check = make_checks(self.kvm)[0]

    def frame(self, kind: Any = EngineStep.EXIT, payload: Any = None, stack: tuple = ()) -> list[str]:
        effects, _reads = self.world.take_effects()
        self.world.stack = stack
        step = Step(kind, payload if payload is not None else {})
        flat = tuple(x for effect in effects for x in effect)
        return [v.invariant for v in self.check(self.world, step, flat)]

    def table(self, mirror: bool, level: int = 1) -> int:
        for key, sp in self.world.items():
            if key[0] == "kvm.sp" and sp.role.is_mirror == mirror and sp.role.level == level:
                return key[1]
        raise AssertionError("no such table")

    def lock_write(self) -> None:
        self.world.set(K_MMU_LOCK, MmuLock("vcpu0", ()))


def change(table: int, index: int, old: int, new: int, what: SpteWrite = SpteWrite.SET,
           root: str = "mirror") -> SpteChange:
    return SpteChange(root, 1, index, table, index, old, new, True, what)


# -- clean runs ------------------------------------------------------------------------------------------------
def test_invariant_names_are_kebab_case_and_unique() -> None:
    assert len(set(INVARIANTS)) == len(INVARIANTS)
    assert all(name == name.lower() and " " not in name and "_" not in name for name in INVARIANTS)


def test_private_fault_accept_write_read_is_clean() -> None:
    _built, rt = run(private_prog)
    assert violations(rt) == []
    assert any(f.step.kind is TdxStep.SEAMCALL and f.step.payload.leaf is Seamcall.TDH_MEM_PAGE_AUG
               for f in rt.timeline.frames)


def test_private_shared_private_conversion_is_clean() -> None:
    _built, rt = run(conversion_prog)
    assert violations(rt) == []
    leaves = [f.step.payload.leaf for f in rt.timeline.frames if f.step.kind is TdxStep.SEAMCALL]
    # The private page really was zapped (BLOCK, TRACK, REMOVE) and mapped again.
    assert Seamcall.TDH_MEM_PAGE_REMOVE in leaves and leaves.count(Seamcall.TDH_MEM_PAGE_AUG) == 2


def test_handled_busy_is_not_a_violation() -> None:
    built = build_vm(VmSetup(memslots=(Memslot(0, 0, NPAGES, guest_memfd=True),), private_ranges=((0, NPAGES),),
                             vcpu_programs=(lambda: private_prog(),),
                             inject=((Seamcall.TDH_MEM_PAGE_AUG, 1, TdxStatus.TDX_OPERAND_BUSY | OperandId.RCX),)))
    rt = Runtime(built.machine.world, built.tasks, ScheduleSpec(), checks=make_checks(built.kvm))
    assert rt.run(max_frames=50_000) is StopReason.DONE
    assert violations(rt) == []


# -- broken variants ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("variant", "prog", "expected"), [
    ("no-freeze", private_prog, "mirror-present-without-sept"),
    ("zap-without-track", conversion_prog, "sept-removal-without-track"),
    ("atomic-mirror-zap", conversion_prog, "atomic-mirror-zap"),
])
def test_broken_variants_are_caught(variant: str, prog: Any, expected: str) -> None:
    try:
        load_variant(variant)
    except (VariantError, ImportError, AttributeError):
        pytest.skip(f"variant {variant} not available")
    built = build_vm(VmSetup(variant=load_variant(variant), memslots=(Memslot(0, 0, NPAGES, guest_memfd=True),),
                             private_ranges=((0, NPAGES),), vcpu_programs=(lambda: prog(),)))
    rt = Runtime(built.machine.world, built.tasks, ScheduleSpec(), checks=make_checks(built.kvm))
    rt.run(max_frames=50_000)
    found = violations(rt)
    assert expected in found
    assert "checker-error" not in found


# -- each invariant, provoked directly ------------------------------------------------------------------------
def test_mirror_present_without_sept() -> None:
    p = Poke()
    table = p.table(mirror=True)
    new = make_spte(1, 0x12345)
    p.world.set(("pte", table, 7), new)   # gfn 7: no S-EPT entry
    assert p.frame(EngineStep.SPTE_WRITE, change(table, 7, SHADOW_NONPRESENT_VALUE, new, SpteWrite.UNFREEZE)) \
        == ["mirror-present-without-sept"]


def test_mirror_present_with_wrong_pfn() -> None:
    p = Poke()
    table = p.table(mirror=True)
    old = p.world.peek(("pte", table, 1))
    p.lock_write()
    p.world.set(("pte", table, 1), SHADOW_NONPRESENT_VALUE)
    p.frame()
    new = make_spte(1, spte_to_pfn(old) + 1)
    p.world.set(("pte", table, 1), new)
    assert p.frame(EngineStep.SPTE_WRITE, change(table, 1, SHADOW_NONPRESENT_VALUE, new)) \
        == ["mirror-present-without-sept"]


def test_frozen_spte_leaked_and_not_when_unfrozen() -> None:
    p = Poke()
    table = p.table(mirror=True)
    p.world.set(("pte", table, 9), FROZEN_SPTE)
    assert p.frame(EngineStep.SPTE_CMPXCHG,
                   change(table, 9, SHADOW_NONPRESENT_VALUE, FROZEN_SPTE, SpteWrite.FREEZE)) == []
    assert p.frame(EngineStep.RET_PF, {"ret": "RET_PF_RETRY"}) == ["frozen-spte-leaked"]
    # Frozen, then restored: fine.
    p.world.set(("pte", table, 10), FROZEN_SPTE)
    p.frame(EngineStep.SPTE_CMPXCHG, change(table, 10, SHADOW_NONPRESENT_VALUE, FROZEN_SPTE, SpteWrite.FREEZE))
    p.world.set(("pte", table, 10), SHADOW_NONPRESENT_VALUE)
    p.frame(EngineStep.SPTE_WRITE, change(table, 10, FROZEN_SPTE, SHADOW_NONPRESENT_VALUE, SpteWrite.RESTORE))
    assert p.frame(EngineStep.LOCK, LockEvent("mmu_lock", "read", "release")) == []


@pytest.mark.parametrize("label", [SpteWrite.SET, SpteWrite.ZAP, SpteWrite.PUBLISH_UNFROZEN])
def test_a_freeze_labelled_otherwise_still_leaks(label: SpteWrite) -> None:
    """The freeze protocol is judged by value: FROZEN_SPTE written over another value is a freeze, whatever
    SpteWrite label a variant gave the write."""
    p = Poke()
    table = p.table(mirror=True)
    p.world.set(("pte", table, 12), FROZEN_SPTE)
    assert p.frame(EngineStep.SPTE_CMPXCHG, change(table, 12, SHADOW_NONPRESENT_VALUE, FROZEN_SPTE, label)) == []
    assert p.frame(EngineStep.LOCK, LockEvent("mmu_lock", "read", "release")) == ["frozen-spte-leaked"]


def test_frozen_children_of_a_removed_table_are_not_leaks() -> None:
    p = Poke()
    table = p.table(mirror=False)
    p.world.set(("pte", table, 11), FROZEN_SPTE)
    p.frame(EngineStep.SPTE_WRITE,
            change(table, 11, SHADOW_NONPRESENT_VALUE, FROZEN_SPTE, SpteWrite.FREEZE, "direct"))
    p.frame(EngineStep.SP_FREE, {"table": table, "level": 1, "gfn": 0, "kind": "direct"})
    assert p.frame(EngineStep.RET_PF, {"ret": "RET_PF_FIXED"}) == []


def test_mirror_zap_without_write_lock() -> None:
    p = Poke()
    assert p.frame(EngineStep.HOOK, HookCall("remove_external_spte", 1, 1, 0x10000)) \
        == ["mirror-zap-without-write-lock"]
    p.lock_write()
    assert p.frame(EngineStep.HOOK, HookCall("remove_external_spte", 1, 1, 0x10000)) == []


def test_atomic_mirror_zap() -> None:
    p = Poke()
    table = p.table(mirror=True)
    old = p.world.peek(("pte", table, 1))
    p.world.set(("pte", table, 1), SHADOW_NONPRESENT_VALUE)
    assert "atomic-mirror-zap" in p.frame(EngineStep.SPTE_CMPXCHG,
                                          change(table, 1, old, SHADOW_NONPRESENT_VALUE, "atomic zap"))


def _seamcall(p: Poke, leaf: Seamcall, rcx: int, rdx: int, rax: int = 0, stack: tuple = ()) -> list[str]:
    found = p.frame(TdxStep.SEAMCALL, SeamcallEntry(leaf, rcx, rdx, 0, 0, rcx & ~0xFFF, 0, (), False), stack)
    found += p.frame(TdxStep.SEAMCALL_RETURN, SeamcallReturn(leaf, rax, 0, 0, 0, rcx & ~0xFFF, 0, False), stack)
    return found


def test_sept_removal_without_track() -> None:
    p = Poke()
    p.lock_write()
    tdr_pa = p.kvm.tdr << 12
    assert _seamcall(p, Seamcall.TDH_MEM_RANGE_BLOCK, 0x1000, tdr_pa) == []
    assert _seamcall(p, Seamcall.TDH_MEM_PAGE_REMOVE, 0x1000, tdr_pa) == ["sept-removal-without-track"]
    assert _seamcall(p, Seamcall.TDH_MEM_RANGE_BLOCK, 0x5000, tdr_pa) == []
    assert _seamcall(p, Seamcall.TDH_MEM_TRACK, tdr_pa, 0) == []
    assert _seamcall(p, Seamcall.TDH_MEM_PAGE_REMOVE, 0x5000, tdr_pa) == []


def test_unexpected_tdx_status() -> None:
    p = Poke()
    p.lock_write()
    tdr_pa = p.kvm.tdr << 12
    busy = TdxStatus.TDX_OPERAND_BUSY | OperandId.RCX
    assert _seamcall(p, Seamcall.TDH_MEM_PAGE_AUG, 0x7000, tdr_pa, busy) == []
    assert _seamcall(p, Seamcall.TDH_MEM_SEPT_ADD, 0x7000, tdr_pa,
                     TdxStatus.TDX_EPT_WALK_FAILED | OperandId.RCX) == ["unexpected-tdx-status"]
    # Zap leaves: one BUSY is retried with vCPUs kept out; BUSY on the retry is a bug.
    assert _seamcall(p, Seamcall.TDH_MEM_RANGE_BLOCK, 0x1000, tdr_pa, busy) == []
    assert _seamcall(p, Seamcall.TDH_MEM_RANGE_BLOCK, 0x1000, tdr_pa, busy) == ["unexpected-tdx-status"]


def test_raw_host_seamcalls_are_results_not_violations() -> None:
    p = Poke()
    stack = (StackEntry("host_op", "/work/main/tdxdbg/scenario/ops.py", 10),
             StackEntry("TdxModule.seamcall", "/work/main/tdxdbg/hw/tdx/module.py", 200))
    assert _seamcall(p, Seamcall.TDH_MEM_SEPT_ADD, 0x7000, p.kvm.tdr << 12,
                     TdxStatus.TDX_EPT_WALK_FAILED | OperandId.RCX, stack) == []


def test_kvm_bug() -> None:
    p = Poke()
    assert p.frame(EngineStep.KVM_BUG, {"message": "x", "bug": True}) == ["kvm-bug"]
    assert p.frame(EngineStep.KVM_BUG, {"message": "guest accessed before accept", "bug": False}) == []


def test_alias_mapped_twice() -> None:
    p = Poke()
    table = p.table(mirror=False)
    new = make_spte(1, 0x23456)
    p.world.set(("pte", table, 1), new)    # shared alias of gfn 1, which the mirror root maps
    assert p.frame(EngineStep.SPTE_CMPXCHG, change(table, 1, SHADOW_NONPRESENT_VALUE, new, "", "direct")) \
        == ["alias-mapped-twice"]


def test_page_freed_while_mapped() -> None:
    p = Poke()
    table = p.table(mirror=True)
    pfn = spte_to_pfn(p.world.peek(("pte", table, 1)))
    p.kvm.memory.free(pfn)
    found = p.frame()
    assert found and set(found) == {"page-freed-while-mapped"}
    assert len(found) == 3   # PAMT says PT_REG, the S-EPT maps it, the mirror SPTE maps it


def test_chldcnt_mismatch() -> None:
    p = Poke()
    key = ("tdx.chldcnt", p.kvm.tdr)
    p.world.set(key, p.world.peek(key) + 1)
    assert p.frame() == ["chldcnt-mismatch"]


def test_spte_invariants() -> None:
    p = Poke()
    table = p.table(mirror=False)
    old = p.world.peek(("pte", table, 3))
    # Writable without MMU-writable.
    bad = old & ~EPT_SPTE_MMU_WRITABLE | PT_WRITABLE_MASK
    p.world.set(("pte", table, 3), bad)
    assert p.frame(EngineStep.SPTE_WRITE, change(table, 3, old, bad, "", "direct")) == ["spte-invariants"]
    # A present leaf replaced by another pfn.
    other = make_spte(1, spte_to_pfn(old) + 1)
    p.world.set(("pte", table, 3), other)
    assert p.frame(EngineStep.SPTE_WRITE, change(table, 3, bad, other, "", "direct")) == ["spte-invariants"]
    # #VE-possible: RWX without SUPPRESS_VE.
    p.world.set(("pte", table, 4), 0x7)
    assert p.frame(EngineStep.SPTE_WRITE, change(table, 4, SHADOW_NONPRESENT_VALUE, 0x7, "", "direct")) \
        == ["spte-invariants"]


def test_a_bug_in_a_check_is_a_checker_error() -> None:
    p = Poke()

    def boom(*_args: Any) -> None:
        raise RuntimeError("boom")

    frozen = next(inv for inv in p.check.invariants if inv.name == "frozen-spte-leaked")
    frozen.step = boom  # type: ignore[method-assign]
    assert p.frame(EngineStep.RET_PF, {}) == ["checker-error"]
    p.world.take_effects()
    found = p.check(p.world, Step(EngineStep.RET_PF, {}), ())
    assert [v.message for v in found] == ["frozen-spte-leaked (RET_PF): RuntimeError: boom"]


def test_a_variant_freezing_under_another_label_is_caught() -> None:
    """set_external_spte_present: a patch whose freeze step labels its FROZEN_SPTE write SpteWrite.SET and whose
    publish step forgets 4K leaves leaves the SPTE FROZEN past the mmu_lock release: frozen-spte-leaked, label or
    not."""
    from tdxdbg.engine.spte import PG_LEVEL_4K
    from tdxdbg.engine.variants.upstream import Upstream

    class MislabelledLeak(Upstream):
        def set_external_spte_present_freeze(self, table, index, gfn, old, new, level):
            ok, _cur = yield from self.try_cmpxchg64(table, index, old, FROZEN_SPTE, level, gfn, SpteWrite.SET)
            return FROZEN_SPTE if ok else None

        def set_external_spte_present_publish(self, table, index, gfn, held, value, level, ret):
            if level != PG_LEVEL_4K:
                yield from super().set_external_spte_present_publish(table, index, gfn, held, value, level, ret)

    built = build_vm(VmSetup(variant=MislabelledLeak, memslots=(Memslot(0, 0, NPAGES, guest_memfd=True),),
                             private_ranges=((0, NPAGES),), vcpu_programs=(lambda: private_prog(),)))
    rt = Runtime(built.machine.world, built.tasks, ScheduleSpec(), checks=make_checks(built.kvm))
    rt.run(max_frames=400)          # the guest refaults on the FROZEN leaf for ever: look at the first leak
    leaks = [(f.step.kind, v.message) for f in rt.timeline.frames for v in f.violations
             if v.invariant == "frozen-spte-leaked"]
    freeze = next(f.step.payload for f in rt.timeline.frames if f.step.kind is EngineStep.SPTE_CMPXCHG
                  and f.step.payload.level == PG_LEVEL_4K and f.step.payload.new == FROZEN_SPTE)
    assert (freeze.what, freeze.gfn, freeze.index) == (SpteWrite.SET, 1, 1)
    assert leaks[0] == (EngineStep.LOCK,
                        f"SPTE {freeze.table:#x}[1] frozen by vcpu0 still FROZEN at its mmu_lock release")
