"""Zero-step mitigation (td_exit_stepping.c `td_exit_epf_stepping_log`,
`td_entry_stepping_filter`, `is_epf_expected`)."""

from __future__ import annotations

from conftest import BUSY_SEPT_TREE, SC, SUCCESS, Env, regs

from tdxdbg.hw import insn
from tdxdbg.hw.ept import ExitReason
from tdxdbg.hw.tdx.guest_calls import TdcallResult
from tdxdbg.hw.tdx.seamcall import TdxStep
from tdxdbg.hw.tdx.sept import SeptState
from tdxdbg.runtime import Runtime, Task
from tdxdbg.runtime.scheduler import ScheduleSpec

G = 0x80000000
FAULT = 0x80005000
OK_PAGE = 0x80001000


def setup(env: Env) -> None:
    env.tables_for(G, 0)
    env.aug(OK_PAGE)
    assert env.guest_accept(OK_PAGE) == TdcallResult(SUCCESS)


def test_exits_1_to_6_do_not_arm(env: Env) -> None:
    """td_exit_epf_stepping_log: below STEPPING_EPF_THRESHOLD (6) only the counter moves; no GPA is recorded and
    every VP.ENTER enters the guest."""
    setup(env)
    v, _ = env.vcpu([insn.read(FAULT)])
    for _ in range(6):
        ex = env.enter(v)
        assert ex.entered and (ex.rax, ex.gpa) == (48, FAULT)
        assert env.epf_gpas(v) == ()
    ex = env.enter(v)                      # the 7th still enters; its exit records the GPA
    assert ex.entered and (ex.rax, ex.gpa) == (48, FAULT)
    assert env.epf_gpas(v) == (FAULT,)


def test_seventh_exit_records_then_vp_enter_refuses_until_mapped(env: Env) -> None:
    """td_entry_stepping_filter: with G recorded, VP.ENTER takes the tree exclusive, finds G still faulting
    (FREE, then PENDING: SVE = 1 so not convertible) and returns EPT_VIOLATION (48) with R8 = G without entering;
    epoch refcount reverted. After G is AUGed and accepted by another vCPU (MAPPED), the entry proceeds."""
    setup(env)
    v, results = env.vcpu([insn.read(FAULT)])
    for _ in range(7):
        assert env.enter(v).entered
    for _ in range(2):
        ex = env.enter(v)
        assert (ex.rax, ex.reason, ex.gpa, ex.entered) == (48, ExitReason.EPT_VIOLATION, FAULT, False)
        assert env.refcount() == (0, 0) and not v.in_guest
    hpa = env.aug(FAULT)
    ex = env.enter(v)
    assert (ex.rax, ex.gpa, ex.entered) == (48, FAULT, False)
    assert env.guest_accept(FAULT) == TdcallResult(SUCCESS)
    ex = env.enter(v)
    assert ex.entered and ex.reason is ExitReason.HLT
    assert results == [0]
    assert env.entry(FAULT, 0) == (0, SeptState.MAPPED, hpa)


def test_seventh_exit_counts_the_first_exit_after_progress(env: Env) -> None:
    """td_exit_epf_stepping_log resets the counter when RIP moved since TD entry and then counts *this* exit
    (reset, then possibly_epf_stepping++), so the 7th consecutive exit at the faulting RIP records the GPA even
    when the guest retired an instruction before the first fault."""
    setup(env)
    v, _ = env.vcpu([insn.read(OK_PAGE), insn.read(FAULT)])
    for i in range(7):
        ex = env.enter(v)
        assert ex.entered and ex.gpa == FAULT, i
    assert env.epf_gpas(v) == (FAULT,)
    assert env.enter(v).entered is False


def test_progress_resets_the_log(env: Env) -> None:
    """Forward progress (a different RIP at the exit than at entry) resets the log: after 6 faults at one RIP,
    mapping the page lets the guest progress to a new faulting RIP, whose count starts again."""
    setup(env)
    f2 = FAULT + 0x1000
    v, _ = env.vcpu([insn.read(FAULT), insn.read(f2)])
    for _ in range(6):
        assert env.enter(v).gpa == FAULT
    env.aug(FAULT)
    assert env.guest_accept(FAULT).rax == SUCCESS
    for _ in range(6):
        ex = env.enter(v)
        assert ex.entered and ex.gpa == f2
    assert env.epf_gpas(v) == ()


def test_filter_busy_when_tree_held(env: Env) -> None:
    """td_entry_stepping_filter: the tree lock is taken exclusive; a BLOCK holding it makes VP.ENTER return
    OPERAND_BUSY|SEPT_TREE 0x8000020000000092 (not entered, refcount reverted); without a recorded GPA the same
    interleaving enters normally (VP.ENTER takes no tree lock then)."""
    setup(env)
    v, _ = env.vcpu([insn.read(FAULT)])
    for _ in range(7):
        env.enter(v)
    tasks = [Task("block", env.tdx.seamcall(SC.TDH_MEM_RANGE_BLOCK, rcx=OK_PAGE, rdx=env.tdr_pa)),
             Task("vp", v.enter())]
    rt = Runtime(env.world, tasks, ScheduleSpec())
    rt.step(forced="block")
    f = rt.step(forced="vp")
    # A VP.ENTER that fails returns as a SEAMCALL (not a TD exit): the TD was not entered.
    assert (f.step.kind, f.step.get("rax")) == (TdxStep.SEAMCALL_RETURN, BUSY_SEPT_TREE)
    assert env.refcount() == (0, 0)
    assert regs(rt.step(forced="block")) == (SUCCESS, 0, 0)

    w, _ = env.vcpu([insn.read(OK_PAGE + 0x2000)])
    tasks = [Task("block", env.tdx.seamcall(SC.TDH_MEM_RANGE_BLOCK, rcx=G | 1, rdx=env.tdr_pa)),
             Task("vp", w.enter())]
    rt = Runtime(env.world, tasks, ScheduleSpec())
    rt.step(forced="block")
    f = rt.step(forced="vp")
    assert f.step.kind.value == "td_entry"


def test_filter_holds_tree_exclusive_against_aug(env: Env) -> None:
    """While the stepping filter holds the tree exclusive (between its steps), a host AUG gets
    OPERAND_BUSY|SEPT_TREE 0x8000020000000092 (KVM's comment on contention with AUG/SEPT.ADD)."""
    setup(env)
    v, _ = env.vcpu([insn.read(FAULT)])
    for _ in range(7):
        env.enter(v)
    page = env.page()
    tasks = [Task("vp", v.enter()),
             Task("aug", env.tdx.seamcall(SC.TDH_MEM_PAGE_AUG, rcx=OK_PAGE + 0x3000, rdx=env.tdr_pa, r8=page))]
    rt = Runtime(env.world, tasks, ScheduleSpec())
    f = rt.step(forced="vp")
    assert f.step.kind.value == "seamcall"           # the filter's step, tree held
    rt.step(forced="aug")
    assert regs(rt.step(forced="aug")) == (BUSY_SEPT_TREE, 0, 0)
    f = rt.step(forced="vp")
    assert (f.step.get("rax"), f.step.get("entered")) == (48, False)


def test_passing_the_filter_keeps_the_log_until_progress(env: Env) -> None:
    """td_entry_stepping_filter does not clear LAST_EPF_GPA_LIST or the counter when it lets the vCPU in; only
    forward progress at a later TD exit resets them. So if the guest faults again at the same RIP right after
    a passing filter (the host removed G again), that exit records G at once and the next VP.ENTER refuses."""
    setup(env)
    v, _ = env.vcpu([insn.read(FAULT)])
    for _ in range(7):
        env.enter(v)
    assert env.enter(v).entered is False
    hpa = env.aug(FAULT)
    assert env.guest_accept(FAULT).rax == SUCCESS
    # The host takes G away again before the vCPU re-enters (BLOCK, TRACK, REMOVE).
    env.block(FAULT)
    env.track()
    assert env.call(SC.TDH_MEM_PAGE_REMOVE, FAULT).rcx == hpa
    # G is FREE again: the still-armed filter refuses; AUG alone (PENDING) is not enough either.
    assert env.enter(v).entered is False
    env.aug(FAULT)
    tasks = [Task("vp", v.enter())]
    rt = Runtime(env.world, tasks, ScheduleSpec())
    rt.step(forced="vp")                       # filter step: G is PENDING -> still faults
    f = rt.step(forced="vp")
    assert (f.step.get("rax"), f.step.get("entered")) == (48, False)
    assert env.guest_accept(FAULT).rax == SUCCESS
    assert env.epf_gpas(v) == (FAULT,)
    rt = Runtime(env.world, [Task("vp", v.enter())], ScheduleSpec())
    rt.step(forced="vp")                       # filter passes (MAPPED) ...
    f = rt.step(forced="vp")
    assert f.step.kind.value == "td_entry"
    assert env.epf_gpas(v) == (FAULT,)         # ... and the log is kept
    # The vCPU is kicked out before it re-executes the read: an exit without progress keeps the log.
    v.kick()
    while not rt.task("vp").finished:
        rt.step(forced="vp")
    assert rt.task("vp").result.reason is ExitReason.EXTERNAL_INTERRUPT
    assert env.epf_gpas(v) == (FAULT,)         # no progress (same RIP): still armed
    assert env.enter(v).entered is True        # G is mapped: the read retires, RIP moves, HLT
    assert env.epf_gpas(v) == ()               # progress at that exit resets the log
