"""The Session API: stepping semantics, breakpoints, time travel, forks and views, on a small TD with one gmem
memslot of 64 MiB, all private, and one or two vCPUs accepting, writing and reading gpa 0x1000."""

from __future__ import annotations

import pytest

from tdxdbg.engine.gmem import Memslot
from tdxdbg.engine.spte import make_spte
from tdxdbg.engine.steps import EngineStep, SpteWrite
from tdxdbg.engine.vm import VmSetup
from tdxdbg.hw import guest
from tdxdbg.hw.tdx.leaves import Seamcall
from tdxdbg.hw.tdx.seamcall import TdxStep
from tdxdbg.hw.tdx.sept import SeptState
from tdxdbg.runtime.scheduler import Policy, ScheduleSpec
from tdxdbg.session import BreakpointKind, Session, StopReason, decode_spte

PAGES_64M = (64 << 20) >> 12


def accept_write_read():
    yield from guest.accept_memory(0x1000, 0x1000)
    yield from guest.write_value(0x1000, 0xAA)
    value = yield from guest.read_value(0x1000)
    assert value == 0xAA


def accept_read():
    yield from guest.accept_memory(0x1000, 0x1000)
    yield from guest.read_value(0x1000)


def setup_of(*programs) -> VmSetup:
    return VmSetup(memslots=(Memslot(0, 0, PAGES_64M, guest_memfd=True),), private_ranges=((0, PAGES_64M),),
                   vcpu_programs=tuple(programs))


def open_session(*programs, schedule: ScheduleSpec | None = None) -> Session:
    return Session.open(setup_of(*programs), schedule or ScheduleSpec(Policy.ROUND_ROBIN))


def sig(frame):
    """What a frame records, as comparable plain data (locals and wait predicates left out)."""
    return (frame.index, frame.task, frame.kind, frame.step.fields(),
            tuple((s.function, s.filename, s.line) for s in frame.stack), frame.effects, frame.reads,
            frame.violations)


def inner(session: Session) -> str:
    return session.frame.stack[-1].function.rpartition(".")[2]


def first(session: Session, pred) -> int:
    return next(f.index for f in session.frames if pred(f))


# -- stepping ---------------------------------------------------------------------------------------------------
def test_step_into_over_out_follow_the_kernel_functions():
    s = open_session(accept_write_read)
    bp = s.breakpoints.add_function("kvm_tdp_mmu_map")
    ev = s.continue_()
    assert ev.reason is StopReason.BREAKPOINT and ev.breakpoints == (bp.id,)
    # The first frame inside kvm_tdp_mmu_map is the walk's first read, from tdp_iter_start -> restart.
    assert s.frame.kind is EngineStep.ITER and inner(s) == "restart"
    assert [e.function.rpartition(".")[2] for e in s.frame.stack[-3:]] == ["kvm_tdp_mmu_map", "start", "restart"]
    s.breakpoints.disable(bp.id)

    assert s.step_into().reason is StopReason.STEP
    assert s.frame.kind is EngineStep.SP_ALLOC and inner(s) == "kvm_tdp_mmu_map"
    s.step_into()
    assert s.frame.kind is EngineStep.SPTE_CMPXCHG and inner(s) == "try_cmpxchg64"
    assert s.frame.step.payload.what is SpteWrite.FREEZE
    s.step_into()
    assert s.frame.kind is EngineStep.HOOK and inner(s) == "set_external_spte"
    # Over the SEAMCALL (two deeper frames in the TDX module) to the hook's return.
    depth = len(s.frame.stack)
    ev = s.step_over()
    assert ev.reason is StopReason.STEP
    assert s.frame.kind is EngineStep.HOOK_RETURN and inner(s) == "set_external_spte"
    assert len(s.frame.stack) == depth
    s.step_into()
    assert s.frame.kind is EngineStep.SPTE_WRITE and s.frame.step.payload.what is SpteWrite.UNFREEZE
    assert inner(s) == "kvm_tdp_mmu_write_spte"
    # Out of set_external_spte_present and __tdp_mmu_set_spte_atomic: handle_changed_spte is the next step
    # shallower than kvm_tdp_mmu_write_spte.
    ev = s.step_out()
    assert s.frame.kind is EngineStep.HANDLE_CHANGED and inner(s) == "handle_changed_spte"
    assert len(s.frame.stack) < depth
    # Out again: back in kvm_tdp_mmu_map's loop, at the walk's next step (tdp_iter_next).
    s.step_out()
    assert inner(s) == "next" and s.frame.kind is EngineStep.ITER
    assert s.frame.stack[-2].function.endswith("kvm_tdp_mmu_map")


def test_step_into_follows_the_current_task_and_select_task():
    s = open_session(accept_write_read, accept_read)
    s.step_into()
    assert s.frame.task == "vcpu0"
    for _ in range(5):
        s.step_into()
        assert s.frame.task == "vcpu0"
    # Round robin interleaves: frames of vcpu1 were passed over.
    assert any(f.task == "vcpu1" for f in s.frames[: s.position])
    assert s.select_task("vcpu1").ok
    s.step_into()
    assert s.frame.task == "vcpu1"
    assert s.select_task("nope").reason is StopReason.ERROR
    s.select_task(None)
    assert s.current_task == "vcpu1"


def test_step_frame_and_reverse_step_frame():
    s = open_session(accept_write_read, accept_read)
    for i in range(1, 6):
        assert s.step_frame().position == i
    assert [f.task for f in s.frames[:4]] == ["vcpu0", "vcpu1", "vcpu0", "vcpu1"]
    assert s.reverse_step_frame().position == 4
    assert s.step_frame().frames_run == 0   # inside the recording: only the cursor moved


# -- breakpoints -------------------------------------------------------------------------------------------------
def test_breakpoint_on_set_external_spte_present_stops_at_each_entry():
    s = open_session(accept_write_read)
    bp = s.breakpoints.add_function("set_external_spte_present")
    stops = []
    while (ev := s.continue_()).reason is StopReason.BREAKPOINT:
        assert ev.breakpoints == (bp.id,)
        stops.append(s.frame)
    assert ev.reason is StopReason.END
    # SEPT.ADD at three levels then PAGE.AUG: four activations, each entered with the freeze.
    assert len(stops) == 4
    assert all(f.step.payload.what is SpteWrite.FREEZE for f in stops)
    assert [f.step.payload.level for f in stops] == [4, 3, 2, 1]
    assert s.breakpoints.get(bp.id).hits == 4
    # reverse_continue visits them backwards, then reaches the start.
    back = []
    while (ev := s.reverse_continue()).reason is StopReason.BREAKPOINT:
        back.append(s.frame.index)
    assert back == [f.index for f in reversed(stops)]
    assert ev.reason is StopReason.START and s.position == 0


def test_breakpoint_on_seamcall_leaf_page_aug():
    s = open_session(accept_write_read)
    bp = s.breakpoints.add_seamcall("TDH.MEM.PAGE.AUG")
    assert bp.kind is BreakpointKind.SEAMCALL and bp.leaf is Seamcall.TDH_MEM_PAGE_AUG
    ev = s.continue_()
    assert ev.reason is StopReason.BREAKPOINT
    assert s.frame.kind is TdxStep.SEAMCALL and s.frame.step.payload.leaf is Seamcall.TDH_MEM_PAGE_AUG
    assert s.frame.step.payload.gpa == 0x1000
    assert s.continue_().reason is StopReason.END
    # Errors only: this run has none.
    s.goto(0)
    s.breakpoints.delete(bp.id)
    s.breakpoints.add_seamcall(None, errors_only=True)
    assert s.continue_().reason is StopReason.END


def test_gfn_ret_pf_watch_and_line_breakpoints():
    s = open_session(accept_write_read)
    s.run_to_end()
    fixed = first(s, lambda f: f.kind is EngineStep.RET_PF)
    s.goto(0)
    bp = s.breakpoints.add_ret_pf("FIXED")
    s.continue_()
    assert s.frame.index == fixed and s.breakpoints.get(bp.id).ret_pf == "RET_PF_FIXED"
    s.breakpoints.clear()

    s.goto(0)
    s.breakpoints.add_gfn(1)
    s.continue_()
    # The first frame about gfn 1: the guest's TDG.MEM.PAGE.ACCEPT of gpa 0x1000; then the fault entry.
    assert s.frame.kind is TdxStep.TDCALL and s.frame.step.get("gpa") == 0x1000
    while s.frame.kind is not EngineStep.FAULT:
        assert s.continue_().reason is StopReason.BREAKPOINT
    assert s.frame.step.get("gpa") == 0x1000
    s.breakpoints.clear()

    # A watch by position (the table does not exist yet at position 0) stops at the freeze, then the unfreeze.
    s.goto(0)
    w = s.watch_spte("mirror", 1, 1)
    assert w.key is None
    s.continue_()
    assert s.frame.step.payload.what is SpteWrite.FREEZE and s.frame.step.payload.gfn == 1
    s.continue_()
    assert s.frame.step.payload.what is SpteWrite.UNFREEZE
    # A watch by key, resolved now that the table exists.
    leaf_key = s.spte_at("mirror", 1, 1).key
    s.breakpoints.clear()
    s.goto(0)
    s.breakpoints.add_spte_watch(leaf_key[1], leaf_key[2])
    s.continue_()
    assert s.frame.step.payload.what is SpteWrite.FREEZE
    s.breakpoints.clear()

    # function:line on the line of set_external_spte_present that writes the unfrozen value.
    unfreeze = first(s, lambda f: f.kind is EngineStep.SPTE_WRITE and f.step.payload.what is SpteWrite.UNFREEZE)
    entry = next(e for e in s.frames[unfreeze].stack if e.function.endswith("set_external_spte_present"))
    s.goto(0)
    s.breakpoints.add_function_line("set_external_spte_present", entry.line)
    s.continue_()
    assert s.frame.index == unfreeze


def test_misuse_returns_error_events():
    s = open_session(accept_write_read)
    assert s.goto(-1).reason is StopReason.ERROR
    assert s.choose_task("vcpu7").reason is StopReason.ERROR
    assert s.reverse_step().reason is StopReason.START
    assert s.reverse_continue().reason is StopReason.START
    with pytest.raises(Exception):  # noqa: B017 - adding a bad breakpoint is an API error, reported by exception
        s.breakpoints.add_seamcall("TDH.NOPE")


# -- time travel ----------------------------------------------------------------------------------------------
def test_reverse_to_frame_0_and_forward_again_gives_identical_states():
    s = open_session(accept_write_read, accept_read)
    states = [dict(s.state_at(0))]
    while s.step_frame().reason is StopReason.STEP:
        states.append(dict(s.state_at()))
    assert s.finished and s.position == len(s.frames) == len(states) - 1
    s.select_task("vcpu0")
    while s.reverse_step().reason is StopReason.STEP:
        assert s.frame.task == "vcpu0"
        assert dict(s.state_at()) == states[s.position]
    assert s.position == 0
    s.select_task(None)
    while s.step_frame().reason is StopReason.STEP:
        assert dict(s.state_at()) == states[s.position]
    assert s.position == len(states) - 1


def test_same_setup_and_schedule_give_identical_frames():
    a = open_session(accept_write_read, accept_read)
    b = open_session(accept_write_read, accept_read)
    assert a.run_to_end().reason is StopReason.END
    assert b.continue_().reason is StopReason.END
    assert [sig(f) for f in a.frames] == [sig(f) for f in b.frames]


def test_goto():
    s = open_session(accept_write_read, accept_read)
    ev = s.goto(30)   # beyond the (empty) recording: runs the engine
    assert ev.reason is StopReason.STEP and s.position == 30 and len(s.frames) == 30 and ev.frames_run == 30
    assert s.goto(3).position == 3 and s.frame.index == 2 and len(s.frames) == 30
    assert s.goto_frame(9).position == 10 and s.frame.index == 9
    assert s.goto(0).position == 0 and s.frame is None
    ev = s.goto(10 ** 6)
    assert ev.reason is StopReason.END and s.position == len(s.frames)


# -- forks -----------------------------------------------------------------------------------------------------
def test_choose_task_forks_the_timeline():
    s = open_session(accept_write_read, accept_read)
    s.run_to_end()
    old = [sig(f) for f in s.frames]
    # A frame where the schedule ran vcpu0 while vcpu1 could run too.
    pos = next(i for i in range(10, len(old)) if old[i][1] == "vcpu0" and "vcpu1" in s.runnable_tasks(i))
    s.goto(pos)
    ev = s.choose_task("vcpu1")
    assert ev.ok and ev.forked and ev.position == pos + 1
    assert s.frame.index == pos and s.frame.task == "vcpu1"
    assert len(s.frames) == pos + 1
    assert [sig(f) for f in s.frames[:pos]] == old[:pos]
    assert len(s.forks) == 1 and s.forks[0].position == pos and s.forks[0].replaced == "vcpu0"
    assert s.forks[0].chosen == "vcpu1" and s.forks[0].length == len(old)
    assert s.run_to_end().reason is StopReason.END
    # At the recorded end, choosing a task needs no fork.
    t = open_session(accept_write_read, accept_read)
    t.step_frame()
    ev = t.choose_task("vcpu0")
    assert ev.ok and not ev.forked and t.frames[1].task == "vcpu0"


def test_choose_task_that_cannot_run_is_an_error():
    s = open_session(accept_write_read, accept_read)
    s.run_to_end()
    before = len(s.frames)
    s.goto(before)
    ev = s.choose_task("vcpu0")   # finished
    assert ev.reason is StopReason.ERROR and "cannot run" in ev.message
    assert len(s.frames) == before and not s.forks


# -- views -----------------------------------------------------------------------------------------------------
def test_views_after_the_first_fault_and_the_accept():
    s = open_session(accept_write_read)
    s.run_to_end()
    fixed = first(s, lambda f: f.kind is EngineStep.RET_PF)
    s.goto_frame(fixed)
    mirror = s.mirror_tree()
    assert mirror is not None and mirror.kind == "mirror" and mirror.depth == 4
    leaves = mirror.tree.leaves()
    assert len(leaves) == 1
    leaf = leaves[0]
    assert (leaf.gfn, leaf.level, leaf.index) == (1, 1, 1)
    faultin = first(s, lambda f: f.kind is EngineStep.FAULTIN)
    pfn = s.frames[faultin].step.get("pfn")
    assert leaf.value == make_spte(1, pfn) and leaf.bits.pfn == pfn
    bits = decode_spte(leaf.value)
    assert bits.r and bits.w and bits.x and bits.mmu_present and bits.suppress_ve and bits.memtype == 6
    assert not bits.ps and bits.host_writable and bits.mmu_writable
    assert s.direct_tree().tree.entries == ()
    # The S-EPT: AUGed but not yet accepted.
    assert s.sept_entry_at(0x1000).state is SeptState.PENDING
    sept = s.sept_tree()
    assert [(e.gpa, e.state) for e in sept.leaves()] == [(0x1000, SeptState.PENDING)]
    # After the guest's ACCEPT succeeds: MAPPED, same pfn.
    accepted = first(s, lambda f: f.kind is TdxStep.TDCALL_RETURN and f.step.get("status") == "TDX_SUCCESS")
    s.goto_frame(accepted)
    entry = s.sept_entry_at(0x1000)
    assert entry.state is SeptState.MAPPED and entry.pfn == pfn and entry.level == 0
    # last_write of the leaf SPTE: the unfreeze.
    lw = s.last_write(leaf.key)
    assert s.frames[lw].kind is EngineStep.SPTE_WRITE and s.frames[lw].step.payload.what is SpteWrite.UNFREEZE
    # VM-wide views.
    v = s.view()
    assert v.private_ranges == ((0, PAGES_64M),) and len(v.memslots) == 1
    assert v.td.td_epoch >= 1 and v.td.chldcnt > 0 and v.td.op_state is not None
    assert v.kvm.mmu_lock_writer is None and v.kvm.mmu_lock_readers == ()


def test_task_views_give_stacks_with_locals():
    s = open_session(accept_write_read, accept_read)
    s.breakpoints.add_function("set_external_spte_present")
    s.continue_()
    tv = s.task_view(s.frame.task)
    assert tv.frame_index == s.frame.index and tv.state == "ready"
    top = tv.stack[-1]
    assert top.function == "try_cmpxchg64" and top.qualname.endswith(".try_cmpxchg64")
    names = dict(top.locals)
    assert names["what"] is SpteWrite.FREEZE and "self" not in names
    sesp = next(a for a in tv.stack if a.function == "set_external_spte_present")
    assert dict(sesp.locals)["level"] == 4
    other = next(t for t in s.task_views() if t.name != s.frame.task)
    assert other.frame_index is None or other.frame_index < s.frame.index


# -- violations and interruption ------------------------------------------------------------------------------
def flag_freeze_of_gfn_1(kvm):
    """A stand-in check: every freeze of gfn 1's leaf is a 'violation'."""
    from tdxdbg.runtime.frame import Violation

    def check(world, step, effects):
        p = step.payload
        if step.kind is EngineStep.SPTE_CMPXCHG and p.what is SpteWrite.FREEZE and p.gfn == 1 and p.level == 1:
            return [Violation("test-freeze", f"froze gfn {p.gfn}")]
        return []

    return [check]


def test_continue_stops_at_violations_and_violation_breakpoints_count():
    s = Session.open(setup_of(accept_write_read), ScheduleSpec(), checks_factory=flag_freeze_of_gfn_1)
    ev = s.continue_()
    assert ev.reason is StopReason.VIOLATION and "test-freeze" in ev.message
    assert s.frame.violations[0].invariant == "test-freeze"
    assert s.continue_().reason is StopReason.END
    bp = s.breakpoints.add_violation("test-freeze")
    ev = s.reverse_continue()
    assert ev.reason is StopReason.VIOLATION and ev.breakpoints == (bp.id,)
    assert s.breakpoints.get(bp.id).hits == 1


def test_interrupt_stops_a_running_command():
    holder = {}

    def interrupting(kvm):
        count = [0]

        def check(world, step, effects):
            count[0] += 1
            if count[0] == 1000:
                holder["s"].interrupt()
            return []

        return [check]

    def many():
        yield from guest.accept_memory(0, 4096 << 12)

    s = Session.open(setup_of(many), ScheduleSpec(), checks_factory=interrupting)
    holder["s"] = s
    ev = s.continue_()
    assert ev.reason is StopReason.INTERRUPTED and 1000 <= s.position < 1000 + 512
    assert s.continue_(max_frames=10).reason is StopReason.MAX_FRAMES


def test_step_over_for_a_selected_task_that_has_not_run():
    s = open_session(accept_write_read, accept_read)
    s.select_task("vcpu1")
    s.step_over()
    assert s.frame.task == "vcpu1" and s.frame.index == first(s, lambda f: f.task == "vcpu1")
