"""handle_removed_pt under mmu_lock held for read, and the RCU-deferred free of the removed table
(arch/x86/kvm/mmu/tdp_mmu.c), reached with forced schedules.

The table: a shared 4K leaf at gfn 0x200 of a 4 MiB non-guest_memfd slot, mapped while dirty logging forced 4K
mappings. With dirty logging off again, a fault on gfn 0x201 maps a 2M leaf over the L1 table
(tdp_mmu_map_handle_target_level -> tdp_mmu_set_spte_atomic -> handle_changed_spte(shared=true) ->
handle_removed_pt(shared=true)). Meanwhile a host task zaps the 4K leaf the way tdp_mmu_zap_spte_atomic does
(freeze, flush, write SHADOW_NONPRESENT_VALUE; the kernel uses it to recover NX huge pages, which the model has
no operation for, so the test spells its three steps with the engine's own functions)."""

from __future__ import annotations

from engine_helpers import FROZEN, NONPRESENT, SHARED, frames, no_kvm_bug, step_until

from tdxdbg.engine.gmem import Memslot
from tdxdbg.engine.mmu_page import sp_key
from tdxdbg.engine.spte import PG_LEVEL_4K, PgLevel, make_nonleaf_spte
from tdxdbg.engine.steps import EngineStep, SpteWrite
from tdxdbg.engine.tdp_mmu import K_RCU_PENDING, K_RCU_READERS
from tdxdbg.engine.vm import VmSetup, build_vm
from tdxdbg.hw import guest
from tdxdbg.runtime import Runtime
from tdxdbg.runtime.scheduler import Policy, ScheduleSpec

GPA = 0x200000                       # 2 MiB-aligned; the 4K leaf at gfn 0x200 sits at index 0 of its L1 table
GFN = GPA >> 12                      # tdp_iter gfns leave out the direct root's gfn_bits (the shared bit)


def vcpu_prog():
    yield from guest.write_value(SHARED | GPA, 0x11)              # 4K: dirty logging is on
    yield from guest.write_value(SHARED | (GPA + 0x1000), 0x22)   # 2M over the L1 table: dirty logging is off


def zap_spte_atomic(kvm):
    """tdp_mmu_zap_spte_atomic on the 4K leaf of gfn 0x200, inside mmu_lock (read) and an RCU read section."""
    yield from kvm.read_lock()
    kvm.rcu_read_lock()
    it = kvm.iter_for(kvm.vcpus[0].direct_root, PG_LEVEL_4K, GFN)
    yield from it.start()
    while it.valid and it.level > PG_LEVEL_4K:
        yield from it.next()
    assert it.valid and it.gfn == GFN
    ok, _cur = yield from kvm.try_cmpxchg64(it.table, it.index, it.old_spte, FROZEN, it.level, it.gfn,
                                            SpteWrite.FREEZE)
    assert ok
    yield from kvm.kvm_flush_remote_tlbs_gfn(it.gfn, it.level)
    yield from kvm.kvm_tdp_mmu_write_spte(it.table, it.index, FROZEN, NONPRESENT, it.level, it.gfn, SpteWrite.ZAP)
    kvm.rcu_read_unlock()
    yield from kvm.read_unlock()


def race():
    setup = VmSetup(memslots=(Memslot(0, 0, 1024),), vcpu_programs=(vcpu_prog,),
                    host_programs=(lambda kvm: kvm.kvm_set_dirty_logging(0, True),
                                   lambda kvm: kvm.kvm_set_dirty_logging(0, False), zap_spte_atomic))
    built = build_vm(setup)
    rt = Runtime(built.machine.world, built.tasks, ScheduleSpec(Policy.SEQUENTIAL))
    return built, rt


def is_kind(kind, **fields):
    return lambda f: f.step.kind is kind and all(f.step.get(k) == v for k, v in fields.items())


def test_handle_removed_pt_shared_spins_on_a_frozen_child_then_takes_it_non_present():
    """handle_removed_pt(shared): xchg FROZEN_SPTE into each child in a loop (kvm_tdp_mmu_write_spte_atomic,
    cpu_relax) until the value it displaced was not FROZEN_SPTE, i.e. until the thread that froze the child has
    written it (with write lock held it takes the child with one plain write). The remover spins
    on the child the zapper froze, each spin a failed freeze with nothing written, and once the zapper wrote
    SHADOW_NONPRESENT_VALUE it freezes that value silently and calls no handle_changed_spte for it."""
    built, rt = race()
    world = built.machine.world
    step_until(rt, "host0", is_kind(EngineStep.HOST_OP, op="memslot flags updated"))   # dirty logging on
    step_until(rt, "vcpu0", is_kind(EngineStep.RET_PF, ret="RET_PF_FIXED"))   # the 4K leaf
    step_until(rt, "host1", is_kind(EngineStep.HOST_OP, op="memslot flags updated"))   # dirty logging off
    step_until(rt, "host2", is_kind(EngineStep.SPTE_CMPXCHG, what=SpteWrite.FREEZE))
    frozen = rt.timeline.frames[-1].step.payload
    table, leaf = frozen.table, frozen.old
    assert (frozen.level, frozen.gfn, frozen.index, frozen.new, frozen.ok) == (1, GFN, 0, FROZEN, True)
    # The vCPU faults on gfn 0x201, installs the 2M leaf and starts removing the L1 table: it spins on index 0.
    step_until(rt, "vcpu0", is_kind(EngineStep.SPTE_CMPXCHG, what=SpteWrite.FREEZE_SPIN))
    for _ in range(2):
        f = rt.step(forced="vcpu0")
        assert f.step.kind is EngineStep.SPTE_CMPXCHG and f.step.payload.what is SpteWrite.FREEZE_SPIN
        assert f.effects == ()                                                  # a spin writes nothing
    spins = frames(rt, EngineStep.SPTE_CMPXCHG, task="vcpu0", what=SpteWrite.FREEZE_SPIN)
    assert [(s.step.get("table"), s.step.get("index"), s.step.get("old"), s.step.get("new"), s.step.get("ok"))
            for s in spins] == [(table, 0, FROZEN, FROZEN, False)] * 3
    huge = frames(rt, EngineStep.SPTE_CMPXCHG, task="vcpu0")[-4].step.payload     # the table -> 2M leaf
    # The L2 entry: make_nonleaf_spte(table) -> the 2M leaf of the same pfn 0x10200 as the 4K one (bit 7, PS, set).
    assert (table, leaf) == (0x10402, 0x8600000010200B37)
    assert (huge.level, huge.gfn, huge.old, huge.new, huge.ok) == (
        PgLevel.PG_LEVEL_2M, GFN, make_nonleaf_spte(table), 0x8600000010200BB7, True)
    assert make_nonleaf_spte(table) == 0x8000000010402907
    # The zapper flushes and writes SHADOW_NONPRESENT_VALUE; the remover then freezes it silently.
    step_until(rt, "host2", is_kind(EngineStep.SPTE_WRITE, what=SpteWrite.ZAP))
    assert built.kvm.memory.read_entry(table, 0) == NONPRESENT
    step_until(rt, "vcpu0", is_kind(EngineStep.SP_FREE))
    assert frames(rt, EngineStep.SP_FREE, task="vcpu0")[0].step.get("table") == table
    assert [built.kvm.memory.read_entry(table, i) for i in (0, 1, 511)] == [FROZEN] * 3
    changed = [(f.step.get("gfn"), f.step.get("old"), f.step.get("new"), f.step.get("shared"))
               for f in frames(rt, EngineStep.HANDLE_CHANGED, task="vcpu0")]
    assert changed[-1] == (GFN, huge.old, huge.new, True)        # the 2M leaf only: gfn 0x200 was the zapper's
    assert all(c[0] != GFN or c[1] != leaf for c in changed)   # never handled the 4K leaf's removal itself
    assert world.peek(sp_key(table)) is not None                 # RCU: host2 still reads, the table is kept


def test_removed_table_is_freed_when_the_last_rcu_reader_leaves():
    """call_rcu(tdp_mmu_free_sp_rcu_callback): the table handle_removed_pt unlinked stays allocated (its
    entries FROZEN) while another task is inside rcu_read_lock, and is freed when that task leaves; the remover
    leaving its own section frees nothing."""
    built, rt = race()
    world = built.machine.world
    step_until(rt, "host0", is_kind(EngineStep.HOST_OP, op="memslot flags updated"))
    step_until(rt, "vcpu0", is_kind(EngineStep.RET_PF, ret="RET_PF_FIXED"))
    step_until(rt, "host1", is_kind(EngineStep.HOST_OP, op="memslot flags updated"))
    step_until(rt, "host2", is_kind(EngineStep.SPTE_WRITE, what=SpteWrite.ZAP))  # zapped; still in RCU
    step_until(rt, "vcpu0", is_kind(EngineStep.SP_FREE))
    table = rt.timeline.frames[-1].step.get("table")
    step_until(rt, "vcpu0", is_kind(EngineStep.RET_PF))                         # past its rcu_read_unlock
    assert world.peek(K_RCU_PENDING) == ((table, ("host2",)),)
    assert world.peek(K_RCU_READERS) == ("host2",)
    assert world.peek(sp_key(table)) is not None
    # host2 leaves its read section: the callback runs in that step, before its mmu_lock release.
    release = None
    while release is None:
        f = rt.step(forced="host2")
        if f.step.kind is EngineStep.LOCK:
            release = f
    assert release.step.payload.action == "release"
    assert (sp_key(table), world.peek(sp_key(table)), None) not in release.effects
    deleted = [k for k, _old, new in release.effects if k == sp_key(table)]
    assert deleted == [sp_key(table)]
    assert world.peek(sp_key(table)) is None and world.peek(K_RCU_PENDING) == ()
    rt.run(max_frames=10_000)
    no_kvm_bug(rt)
    assert rt.task("vcpu0").result == "halted"
