"""TLB tracking (tdh_mem_track.c, is_tlb_tracked): the tracked predicate and TDH.MEM.TRACK."""

from __future__ import annotations

from conftest import (
    BUSY_TD_EPOCH,
    PREVIOUS_TLB_EPOCH_BUSY,
    SC,
    SUCCESS,
    TLB_TRACKING_NOT_DONE_RCX,
    TLB_TRACKING_NOT_DONE_SEPT_TREE,
    Env,
    regs,
)

from tdxdbg.hw import insn
from tdxdbg.hw.ept import ExitReason
from tdxdbg.hw.tdx.seamcall import TdxStep
from tdxdbg.hw.tdx.sept import SeptState
from tdxdbg.runtime import Runtime, Task
from tdxdbg.runtime.scheduler import ScheduleSpec

G = 0x80000000
G1 = 0x80001000


def mapped(env: Env, gpa: int = G1) -> int:
    env.tables_for(gpa, 0)
    hpa = env.aug(gpa)
    assert env.guest_accept(gpa).rax == SUCCESS
    return hpa


def test_initial_epoch_is_one_and_refcounts_zero(env: Env) -> None:
    """TDH.MNG.INIT (tdh_mng_init.c) sets td_epoch = 1 and both refcounts to 0."""
    assert (env.epoch(), env.refcount()) == (1, (0, 0))


def test_remove_fails_until_track(env: Env) -> None:
    """is_tlb_tracked: BLOCK stamps BEPOCH = TD_EPOCH; REMOVE -> TLB_TRACKING_NOT_DONE|RCX until TRACK."""
    hpa = mapped(env)
    env.block(G1)
    for _ in range(3):
        r = env.call(SC.TDH_MEM_PAGE_REMOVE, G1)
        assert (r.rax, r.rcx, r.rdx) == (TLB_TRACKING_NOT_DONE_RCX, 0, 0)
    env.track()
    assert env.call(SC.TDH_MEM_PAGE_REMOVE, G1).rcx == hpa


def test_block_after_track_needs_a_new_track(env: Env) -> None:
    """BEPOCH is the epoch at BLOCK time: a TRACK before the BLOCK does not count (BEPOCH = 2, TD_EPOCH = 2)."""
    mapped(env)
    env.track()
    env.block(G1)
    assert env.pamt(env.entry(G1, 0)[2]).bepoch == 2
    assert env.call(SC.TDH_MEM_PAGE_REMOVE, G1).rax == TLB_TRACKING_NOT_DONE_RCX
    env.track()
    assert env.call(SC.TDH_MEM_PAGE_REMOVE, G1).rax == SUCCESS


def test_vcpu_from_old_epoch_keeps_remove_failing_until_exit(env: Env) -> None:
    """is_tlb_tracked, TD_EPOCH == BEPOCH + 1 branch: a vCPU that entered in epoch BEPOCH and is still in guest
    mode keeps REMOVE failing with TLB_TRACKING_NOT_DONE|RCX after TRACK (REFCOUNT[BEPOCH & 1] != 0), and also
    UNBLOCK with |SEPT_TREE; once it exits, REMOVE succeeds."""
    hpa = mapped(env)
    v, _ = env.vcpu([insn.read(G1)])   # stays in the guest until stepped
    rt = Runtime(env.world, [Task("vcpu0", v.enter())], ScheduleSpec())
    rt.step(forced="vcpu0")                   # TD entry in epoch 1
    assert v.in_guest and env.refcount() == (0, 1)
    env.block(G1)
    env.track()
    assert env.epoch() == 2
    r = env.call(SC.TDH_MEM_PAGE_REMOVE, G1)
    assert (r.rax, r.rcx, r.rdx) == (TLB_TRACKING_NOT_DONE_RCX, 0, 0)
    r = env.call(SC.TDH_MEM_RANGE_UNBLOCK, G1)
    assert r.rax == TLB_TRACKING_NOT_DONE_SEPT_TREE
    v.kick()
    while not rt.task("vcpu0").finished:
        rt.step(forced="vcpu0")
    assert rt.task("vcpu0").result.reason is ExitReason.EXTERNAL_INTERRUPT
    assert env.refcount() == (0, 0)
    r = env.call(SC.TDH_MEM_PAGE_REMOVE, G1)
    assert (r.rax, r.rcx, r.rdx) == (SUCCESS, hpa, 0)


def test_vcpu_entering_after_track_does_not_block_remove(env: Env) -> None:
    """A vCPU that enters after TRACK samples the new epoch (REFCOUNT[new & 1]) and flushes: REMOVE succeeds while
    it is still in the guest."""
    hpa = mapped(env)
    env.block(G1)
    env.track()
    v, _ = env.vcpu([insn.read(G1)])
    rt = Runtime(env.world, [Task("vcpu0", v.enter())], ScheduleSpec())
    f = rt.step(forced="vcpu0")
    assert f.step.get("epoch") == 2 and f.step.get("flush") is True
    assert v.in_guest and env.refcount() == (1, 0)
    r = env.call(SC.TDH_MEM_PAGE_REMOVE, G1)
    assert (r.rax, r.rcx, r.rdx) == (SUCCESS, hpa, 0)


def test_two_epochs_later_tracked_regardless_of_refcount(env: Env) -> None:
    """is_tlb_tracked: TD_EPOCH > BEPOCH + 1 is tracked whatever the refcounts (a vCPU in the guest since epoch 2
    does not hold back a block from epoch 1 once TD_EPOCH = 3)."""
    hpa = mapped(env)
    env.block(G1)                               # BEPOCH 1
    env.track()                                 # epoch 2
    v, _ = env.vcpu([insn.read(G)])
    rt = Runtime(env.world, [Task("vcpu0", v.enter())], ScheduleSpec())
    rt.step(forced="vcpu0")                     # in guest, epoch 2
    r = env.call(SC.TDH_MEM_TRACK, env.tdr_pa)  # previous epoch (1) is empty: succeeds
    assert r.rax == SUCCESS and env.epoch() == 3
    assert env.call(SC.TDH_MEM_TRACK, env.tdr_pa).rax == PREVIOUS_TLB_EPOCH_BUSY   # epoch 2 still occupied
    assert env.call(SC.TDH_MEM_PAGE_REMOVE, G1).rcx == hpa


def test_track_vs_vp_enter_epoch_lock_busy(env: Env) -> None:
    """TDH.MEM.TRACK holds the TD epoch lock exclusive between its steps; TDH.VP.ENTER (epoch lock shared) gets
    OPERAND_BUSY|TD_EPOCH 0x80000200000000A9 and does not enter; refcounts are untouched."""
    v, _ = env.vcpu([insn.read(G)])
    tasks = [Task("track", env.tdx.seamcall(SC.TDH_MEM_TRACK, rcx=env.tdr_pa)), Task("vp", v.enter())]
    rt = Runtime(env.world, tasks, ScheduleSpec())
    rt.step(forced="track")
    f = rt.step(forced="vp")
    # A VP.ENTER that fails returns as a SEAMCALL (not a TD exit): the TD was not entered.
    assert (f.step.kind, f.step.get("rax")) == (TdxStep.SEAMCALL_RETURN, BUSY_TD_EPOCH)
    assert env.refcount() == (0, 0) and not v.in_guest
    assert regs(rt.step(forced="track")) == (SUCCESS, 0, 0)
    assert env.epoch() == 2
    # A later VP.ENTER is fine.
    assert env.enter(v).reason is ExitReason.EPT_VIOLATION


def test_track_epoch_busy_vs_track(env: Env) -> None:
    """Two TDH.MEM.TRACK on one TD: the second finds the epoch lock held exclusive -> OPERAND_BUSY|TD_EPOCH."""
    tasks = [Task("t1", env.tdx.seamcall(SC.TDH_MEM_TRACK, rcx=env.tdr_pa)),
             Task("t2", env.tdx.seamcall(SC.TDH_MEM_TRACK, rcx=env.tdr_pa))]
    rt = Runtime(env.world, tasks, ScheduleSpec())
    rt.step(forced="t1")
    rt.step(forced="t2")
    assert regs(rt.step(forced="t2")) == (BUSY_TD_EPOCH, 0, 0)
    assert regs(rt.step(forced="t1")) == (SUCCESS, 0, 0)
    assert env.epoch() == 2


def test_vcpu_epoch_flush_only_when_epoch_changed(env: Env) -> None:
    """adjust_tlb_tracking_state: VP.ENTER flushes when VCPU_EPOCH != TD_EPOCH, not when it is unchanged."""
    v, _ = env.vcpu([insn.read(G), insn.read(G)])
    flushes = []
    for track in (False, False, True):
        if track:
            env.track()
        rt = Runtime(env.world, [Task("vcpu0", v.enter())], ScheduleSpec())
        f = rt.step(forced="vcpu0")
        flushes.append((f.step.get("epoch"), f.step.get("flush")))
        v.kick()
        while not rt.task("vcpu0").finished:
            rt.step(forced="vcpu0")
    assert flushes == [(1, True), (1, False), (2, True)]


def test_accept_after_track_keeps_working(env: Env) -> None:
    """Sanity for the epoch bookkeeping across many entries/exits: refcounts return to (0, 0)."""
    env.tables_for(G, 0)
    for i in range(4):
        env.aug(G + i * 0x1000)
        env.track()
        assert env.guest_accept(G + i * 0x1000).rax == SUCCESS
    assert env.refcount() == (0, 0)
    assert env.epoch() == 5
    assert env.state(G + 0x3000, 0) is SeptState.MAPPED
