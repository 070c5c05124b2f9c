"""14 worked examples of TDX module SEAMCALLs, with exact RAX/RCX/RDX.

Setup: GPAW 48, 4-level S-EPT, OP_STATE RUNNABLE unless stated, no vCPU in the guest unless stated.
Where the TDX module source decides a detail, the docstring names the source file.
"""

from __future__ import annotations

from conftest import (
    ARCH_FREE,
    ARCH_NL_BLOCKED,
    ARCH_NL_MAPPED,
    BUSY_HOST_PRIORITY_RCX,
    BUSY_RCX,
    BUSY_SEPT_TREE,
    EPT_ENTRY_STATE_INCORRECT_RCX,
    EPT_PAGE_NOT_FREE_RCX,
    EPT_WALK_FAILED_RCX,
    GPA_RANGE_ALREADY_BLOCKED_RCX,
    GPA_RANGE_NOT_BLOCKED_RCX,
    LIFECYCLE_STATE_INCORRECT,
    OPERAND_INVALID_RCX,
    PAGE_ALREADY_ACCEPTED,
    PAGE_SIZE_MISMATCH,
    PREVIOUS_TLB_EPOCH_BUSY,
    SC,
    SUCCESS,
    TD_ASSOCIATED_PAGES_EXIST,
    TLB_TRACKING_NOT_DONE_RCX,
    TLB_TRACKING_NOT_DONE_SEPT_TREE,
    Env,
    accept,
    arch_entry,
    regs,
    tdcall_rax,
)

from tdxdbg.hw import insn
from tdxdbg.hw.ept import ExitReason
from tdxdbg.hw.machine import drive
from tdxdbg.hw.tdx.guest_calls import TdcallResult
from tdxdbg.hw.tdx.pamt import PageType
from tdxdbg.hw.tdx.seamcall import TdxStep
from tdxdbg.hw.tdx.sept import SeptState
from tdxdbg.hw.tdx.td import Lifecycle, OpState, TdAttr
from tdxdbg.runtime import Runtime, Task
from tdxdbg.runtime.scheduler import ScheduleSpec

G = 0x80000000          # the 1G/2M-aligned region of the examples
G1 = 0x80001000         # PTE[1]
G2 = 0x80002000         # PTE[2]
G3 = 0x80003000


def build_ex4(env: Env) -> int:
    """Examples 1, 2 and 4: PML4E[0], PDPTE[2], PDE[0] linked; PTE[1] AUGed (PENDING). Returns its HPA."""
    env.sept_add(0, 3)
    env.sept_add(G, 2)
    env.sept_add(G, 1)
    return env.aug(G1, 0)


def build_ex5(env: Env) -> int:
    hpa = build_ex4(env)
    r = env.guest_accept(G1)
    assert r == TdcallResult(SUCCESS)
    return hpa


# -- 1 --------------------------------------------------------------------------------------------------------
def test_ex01_sept_add_l3_at_0_links_empty_pdpt(env: Env) -> None:
    """Ex.1 tdh_mem_sept_add L3 at GPA 0 on a FREE PML4E: SUCCESS, NL_MAPPED, new page PT_EPT all FREE, CHLDCNT+1."""
    before = env.chldcnt()
    page = env.page()
    r = env.call(SC.TDH_MEM_SEPT_ADD, 0 | 3, r8=page)
    assert (r.rax, r.rcx, r.rdx) == (SUCCESS, 0, 0)
    assert env.entry(0, 3) == (3, SeptState.NL_MAPPED, page)
    assert env.pamt(page).page_type is PageType.PT_EPT
    assert env.pamt(page).owner == env.tdr
    assert env.chldcnt() == before + 1
    # The new PDPT is all FREE: a walk to level 2 anywhere below stops at level 2 on a FREE entry.
    for gpa in (0, G, 0x7FC0000000):
        assert env.entry(gpa, 2)[:2] == (2, SeptState.FREE)


# -- 2 --------------------------------------------------------------------------------------------------------
def test_ex02_sept_add_l2_success(env: Env) -> None:
    """Ex.2 tdh_mem_sept_add L2 at 0x80000000 after ex.1: SUCCESS and PDPTE[2] NL_MAPPED."""
    env.sept_add(0, 3)
    page = env.page()
    r = env.call(SC.TDH_MEM_SEPT_ADD, G | 2, r8=page)
    assert (r.rax, r.rcx, r.rdx) == (SUCCESS, 0, 0)
    assert env.entry(G, 2) == (2, SeptState.NL_MAPPED, page)


def test_ex02_sept_add_misaligned_operand_invalid(env: Env) -> None:
    """Ex.2 tdh_mem_sept_add: GPA 0x80001000|2 is not 1G-aligned -> OPERAND_INVALID|RCX, nothing changes."""
    env.sept_add(0, 3)
    before = env.chldcnt()
    page = env.page()
    r = env.call(SC.TDH_MEM_SEPT_ADD, G1 | 2, r8=page)
    assert (r.rax, r.rcx, r.rdx) == (OPERAND_INVALID_RCX, 0, 0)
    assert env.pamt(page).page_type is PageType.PT_NDA
    assert env.chldcnt() == before


def test_ex02_sept_add_l2_before_l3_walk_failed_rdx_3(env: Env) -> None:
    """Ex.2 tdh_mem_sept_add L2 before ex.1: EPT_WALK_FAILED|RCX, RCX = FREE entry (SVE only), RDX = 0x3."""
    r = env.call(SC.TDH_MEM_SEPT_ADD, G | 2, r8=env.page())
    assert (r.rax, r.rcx, r.rdx) == (EPT_WALK_FAILED_RCX, 0x8000000000000000, 0x3)


# -- 3 --------------------------------------------------------------------------------------------------------
def test_ex03_aug_with_free_pde_walk_failed_rdx_1(env: Env) -> None:
    """Ex.3 tdh_mem_page_aug L0 while PDE (level 1) is FREE: EPT_WALK_FAILED|RCX, RCX = 0x8000000000000000, RDX 0x1."""
    env.sept_add(0, 3)
    env.sept_add(G, 2)
    before = env.chldcnt()
    page = env.page()
    r = env.call(SC.TDH_MEM_PAGE_AUG, G1 | 0, r8=page)
    assert (r.rax, r.rcx, r.rdx) == (EPT_WALK_FAILED_RCX, 0x8000000000000000, 0x1)
    assert env.pamt(page).page_type is PageType.PT_NDA
    assert env.chldcnt() == before


# -- 4 --------------------------------------------------------------------------------------------------------
def test_ex04_aug_pending_then_aug_again_state_incorrect(env: Env) -> None:
    """Ex.4 tdh_mem_page_aug: SUCCESS -> PTE[1] PENDING (public 2), CHLDCNT+1, PT_REG; AUG again ->
    EPT_ENTRY_STATE_INCORRECT|RCX 0xC0000B0D00000001 with RDX 0x200 and RCX = the PENDING leaf (RWX 0)."""
    env.sept_add(0, 3)
    env.sept_add(G, 2)
    env.sept_add(G, 1)
    before = env.chldcnt()
    hpa = env.page()
    r = env.call(SC.TDH_MEM_PAGE_AUG, G1 | 0, r8=hpa)
    assert (r.rax, r.rcx, r.rdx) == (SUCCESS, 0, 0)
    assert env.entry(G1, 0) == (0, SeptState.PENDING, hpa)
    assert env.chldcnt() == before + 1
    assert env.pamt(hpa).page_type is PageType.PT_REG and env.pamt(hpa).owner == env.tdr
    other = env.page()
    r = env.call(SC.TDH_MEM_PAGE_AUG, G1 | 0, r8=other)
    assert r.rax == EPT_ENTRY_STATE_INCORRECT_RCX
    assert r.rdx == 0x200
    assert r.rcx == 0x8000000000000000 | hpa | 0xF0
    assert env.pamt(other).page_type is PageType.PT_NDA
    assert env.chldcnt() == before + 1


# -- 5 --------------------------------------------------------------------------------------------------------
def test_ex05_accept_zeroes_and_maps(env: Env) -> None:
    """Ex.5 tdg_mem_page_accept(0x80001000|0) on PENDING: RAX 0, page zeroed, PTE MAPPED (public 4)."""
    hpa = build_ex4(env)
    env.m.memory.write_word(hpa >> 12, 0x18, 0xDEADBEEF)
    results, ex = env.run_guest([accept(G1), insn.read(G1 + 0x18)])
    assert results == [TdcallResult(SUCCESS), 0]
    assert ex.reason is ExitReason.HLT
    assert env.entry(G1, 0) == (0, SeptState.MAPPED, hpa)
    assert env.m.memory.read_word(hpa >> 12, 0x18) == 0


def test_ex05_second_accept_already_accepted(env: Env) -> None:
    """Ex.5 tdg_mem_page_accept twice: the second returns PAGE_ALREADY_ACCEPTED|0 = 0x00000B0A00000000."""
    build_ex4(env)
    results, _ = env.run_guest([accept(G1), accept(G1)])
    assert [r.rax for r in results] == [SUCCESS, 0x00000B0A00000000]
    assert results[1].rax == PAGE_ALREADY_ACCEPTED


def test_ex05_accept_2m_over_nl_mapped_size_mismatch(env: Env) -> None:
    """Ex.5 tdg_mem_page_accept(0x80000000|1) while PDE[0] is NL_MAPPED: PAGE_SIZE_MISMATCH|1 = 0xC0000B0B00000001."""
    build_ex5(env)
    r = env.guest_accept(G, 1)
    assert r == TdcallResult(0xC0000B0B00000001)
    assert r.rax == PAGE_SIZE_MISMATCH | 1
    assert env.state(G, 1) is SeptState.NL_MAPPED


def test_ex05_accept_free_pte_async_ept_violation_exit(env: Env) -> None:
    """Ex.5 tdg_mem_page_accept(0x80002000|0) on a FREE PTE: no RAX to the guest; TD exit EPT violation (48),
    EEQ type 1 (ACCEPT), R8 = 0x80002000, exit qualification = write with no allowed bits. After KVM AUGs, the
    re-executed ACCEPT succeeds (RIP did not move)."""
    build_ex5(env)
    v, results = env.vcpu([accept(G2)])
    ex = env.enter(v)
    assert results == []
    assert ex.rax == 48 and ex.reason is ExitReason.EPT_VIOLATION and ex.entered
    assert ex.gpa == 0x80002000
    assert ex.ext_qual & 0xF == 1
    assert ex.exit_qual == 0x2
    hpa = env.aug(G2)
    ex = env.enter(v)
    assert results == [TdcallResult(SUCCESS)]
    assert ex.reason is ExitReason.HLT
    assert env.entry(G2, 0) == (0, SeptState.MAPPED, hpa)


# -- 6 --------------------------------------------------------------------------------------------------------
def test_ex06_remove_mapped_without_block_not_blocked(env: Env) -> None:
    """Ex.6 tdh_mem_page_remove L0 on MAPPED in RUNNABLE: GPA_RANGE_NOT_BLOCKED|RCX 0xC0000B0600000001, RDX 0x400."""
    hpa = build_ex5(env)
    before = env.chldcnt()
    r = env.call(SC.TDH_MEM_PAGE_REMOVE, G1 | 0)
    assert (r.rax, r.rcx, r.rdx) == (GPA_RANGE_NOT_BLOCKED_RCX, 0x8000000000000000 | hpa | 0x4F7, 0x400)
    assert env.entry(G1, 0) == (0, SeptState.MAPPED, hpa)
    assert env.chldcnt() == before


def assert_page_removed(env: Env, hpa: int) -> None:
    """TDH.MEM.PAGE.REMOVE of G1 at 4K succeeds: RCX = the page's HPA, entry FREE, PAMT PT_NDA, CHLDCNT - 1."""
    before = env.chldcnt()
    r = env.call(SC.TDH_MEM_PAGE_REMOVE, G1 | 0)
    assert (r.rax, r.rcx, r.rdx) == (SUCCESS, hpa, 0)
    assert env.entry(G1, 0)[:2] == (0, SeptState.FREE)
    assert env.pamt(hpa).page_type is PageType.PT_NDA
    assert env.chldcnt() == before - 1


def test_ex06_remove_in_initialized_needs_no_block(env_init: Env) -> None:
    """Ex.6 tdh_mem_page_remove in OP_STATE INITIALIZED: SUCCESS without BLOCK/TRACK (tlb_tracking_required = 0);
    RCX = page HPA, entry FREE, PAMT PT_NDA, CHLDCNT-1. The MAPPED page is built with PAGE.ADD (build time)."""
    env = env_init
    env.sept_add(0, 3)
    env.sept_add(G, 2)
    env.sept_add(G, 1)
    hpa, src = env.page(), env.page()
    env.ok(SC.TDH_MEM_PAGE_ADD, G1, r8=hpa, r9=src)
    assert env.state(G1, 0) is SeptState.MAPPED
    assert_page_removed(env, hpa)


# -- 7 --------------------------------------------------------------------------------------------------------
def test_ex07_block_remove_unblock_track_remove(env: Env) -> None:
    """Ex.7 tdh_mem_range_block -> BLOCKED (public 1), BEPOCH = E; REMOVE -> TLB_TRACKING_NOT_DONE|RCX (no details);
    UNBLOCK -> TLB_TRACKING_NOT_DONE|SEPT_TREE 0xC0000B0800000092; TRACK -> E+1; REMOVE -> SUCCESS, RCX = HPA,
    FREE, PT_NDA, CHLDCNT-1."""
    hpa = build_ex5(env)
    e = env.epoch()
    assert e == 1  # TDH.MNG.INIT (tdh_mng_init.c) sets td_epoch = 1
    r = env.call(SC.TDH_MEM_RANGE_BLOCK, G1 | 0)
    assert (r.rax, r.rcx, r.rdx) == (SUCCESS, 0, 0)
    assert env.state(G1, 0) is SeptState.BLOCKED
    assert env.pamt(hpa).bepoch == e
    r = env.call(SC.TDH_MEM_PAGE_REMOVE, G1 | 0)
    assert (r.rax, r.rcx, r.rdx) == (TLB_TRACKING_NOT_DONE_RCX, 0, 0)
    r = env.call(SC.TDH_MEM_RANGE_UNBLOCK, G1 | 0)
    assert (r.rax, r.rcx, r.rdx) == (TLB_TRACKING_NOT_DONE_SEPT_TREE, 0, 0)
    assert env.state(G1, 0) is SeptState.BLOCKED
    r = env.call(SC.TDH_MEM_TRACK, env.tdr_pa)
    assert (r.rax, r.rcx, r.rdx) == (SUCCESS, 0, 0)
    assert env.epoch() == e + 1
    assert_page_removed(env, hpa)


def test_ex07_unblock_after_track_restores_mapped(env: Env) -> None:
    """Ex.7 / T8 tdh_mem_range_unblock after TRACK: SUCCESS and BLOCKED -> MAPPED with the same HPA."""
    hpa = build_ex5(env)
    env.block(G1)
    env.track()
    r = env.call(SC.TDH_MEM_RANGE_UNBLOCK, G1 | 0)
    assert (r.rax, r.rcx, r.rdx) == (SUCCESS, 0, 0)
    assert env.entry(G1, 0) == (0, SeptState.MAPPED, hpa)


# -- 8 --------------------------------------------------------------------------------------------------------
def test_ex08_block_blocked_already_blocked_success_class(env: Env) -> None:
    """Ex.8 tdh_mem_range_block on BLOCKED: GPA_RANGE_ALREADY_BLOCKED|RCX 0x00000B0700000001 (bit 63 clear),
    RDX 0x100, RCX = the blocked leaf; BEPOCH not restamped."""
    hpa = build_ex5(env)
    env.block(G1)
    env.track()
    r = env.call(SC.TDH_MEM_RANGE_BLOCK, G1 | 0)
    assert (r.rax, r.rcx, r.rdx) == (GPA_RANGE_ALREADY_BLOCKED_RCX, 0x8000000000000000 | hpa | 0xF0, 0x100)
    assert r.ok
    assert env.pamt(hpa).bepoch == 1
    assert env.state(G1, 0) is SeptState.BLOCKED


# -- 9 --------------------------------------------------------------------------------------------------------
def test_ex09_sept_remove_not_blocked_not_free_and_walk_through_nl_blocked(env: Env) -> None:
    """Ex.9 tdh_mem_sept_remove L1 with PTE[1] MAPPED: unblocked -> GPA_RANGE_NOT_BLOCKED|RCX, RDX 0x8401,
    RCX = NL_MAPPED arch value (0x407); after BLOCK L1 + TRACK -> EPT_PAGE_NOT_FREE|RCX (RDX 0x8101); AUG L0 at
    0x80003000 under the NL_BLOCKED PDE -> EPT_WALK_FAILED|RCX, RDX 0x8101."""
    build_ex5(env)
    r = env.call(SC.TDH_MEM_SEPT_REMOVE, G | 1)
    assert (r.rax, r.rcx, r.rdx) == (GPA_RANGE_NOT_BLOCKED_RCX, ARCH_NL_MAPPED, 0x8401)
    env.block(G, 1)
    assert env.state(G, 1) is SeptState.NL_BLOCKED
    env.track()
    before = env.chldcnt()
    r = env.call(SC.TDH_MEM_SEPT_REMOVE, G | 1)
    assert (r.rax, r.rcx, r.rdx) == (EPT_PAGE_NOT_FREE_RCX, ARCH_NL_BLOCKED, 0x8101)
    assert env.state(G, 1) is SeptState.NL_BLOCKED
    assert env.chldcnt() == before
    page = env.page()
    r = env.call(SC.TDH_MEM_PAGE_AUG, G3 | 0, r8=page)
    assert (r.rax, r.rcx, r.rdx) == (EPT_WALK_FAILED_RCX, ARCH_NL_BLOCKED, 0x8101)
    assert env.pamt(page).page_type is PageType.PT_NDA


def test_ex09_sept_remove_empty_table_success(env: Env) -> None:
    """T10 tdh_mem_sept_remove on an empty NL_BLOCKED + tracked table: SUCCESS, RCX = table HPA, entry FREE,
    table page PT_NDA, CHLDCNT-1."""
    env.sept_add(0, 3)
    env.sept_add(G, 2)
    table = env.sept_add(G, 1)
    env.block(G, 1)
    assert env.pamt(table).bepoch == 1      # BEPOCH goes on the child S-EPT page (tdh_mem_range_block.c)
    env.track()
    before = env.chldcnt()
    r = env.call(SC.TDH_MEM_SEPT_REMOVE, G | 1)
    assert (r.rax, r.rcx, r.rdx) == (SUCCESS, table, 0)
    assert env.entry(G, 1)[:2] == (1, SeptState.FREE)
    assert env.pamt(table).page_type is PageType.PT_NDA
    assert env.chldcnt() == before - 1


# -- 10 -------------------------------------------------------------------------------------------------------
def test_ex10_track_previous_epoch_busy_until_vcpu_exits(env: Env) -> None:
    """Ex.10 tdh_mem_track: vCPU A in the guest since epoch E; TRACK -> SUCCESS (E+1); TRACK again ->
    PREVIOUS_TLB_EPOCH_BUSY 0x8000020100000000; after A exits, TRACK -> SUCCESS (E+2)."""
    build_ex5(env)
    v, _ = env.vcpu([insn.read(G1)])
    results: list = []

    def host():
        for _ in range(3):
            results.append((yield from env.tdx.seamcall(SC.TDH_MEM_TRACK, rcx=env.tdr_pa)))

    rt = Runtime(env.world, [Task("vcpu0", v.enter()), Task("host", host())], ScheduleSpec())
    rt.step(forced="vcpu0")                    # TD_ENTRY: A counted in REFCOUNT[E & 1]
    assert v.in_guest and env.refcount() == (0, 1)
    rt.step(forced="host")
    assert regs(rt.step(forced="host")) == (SUCCESS, 0, 0)
    assert env.epoch() == 2
    rt.step(forced="host")
    assert regs(rt.step(forced="host")) == (PREVIOUS_TLB_EPOCH_BUSY, 0, 0)
    assert env.epoch() == 2
    while not rt.task("vcpu0").finished:
        rt.step(forced="vcpu0")
    assert not v.in_guest and env.refcount() == (0, 0)
    rt.step(forced="host")
    assert regs(rt.step(forced="host")) == (SUCCESS, 0, 0)
    assert env.epoch() == 3
    rt.step(forced="host")
    assert [r.rax for r in results] == [SUCCESS, PREVIOUS_TLB_EPOCH_BUSY, SUCCESS]


# -- 11 -------------------------------------------------------------------------------------------------------
def test_ex11_tree_lock_block_vs_aug_busy_sept_tree(env: Env) -> None:
    """Ex.11 tree lock: AUG holds the S-EPT tree shared; BLOCK (tree exclusive) arriving second gets
    OPERAND_BUSY|SEPT_TREE 0x8000020000000092 with RCX = RDX = 0 (no details for tree-lock BUSY); AUG completes."""
    hpa = build_ex5(env)
    aug_page = env.page()
    tasks = [Task("aug", env.tdx.seamcall(SC.TDH_MEM_PAGE_AUG, rcx=G2, rdx=env.tdr_pa, r8=aug_page)),
             Task("block", env.tdx.seamcall(SC.TDH_MEM_RANGE_BLOCK, rcx=G1, rdx=env.tdr_pa))]
    rt = Runtime(env.world, tasks, ScheduleSpec())
    rt.step(forced="aug")                     # AUG: tree shared, walk, entry lock
    rt.step(forced="block")
    assert regs(rt.step(forced="block")) == (BUSY_SEPT_TREE, 0, 0)
    assert regs(rt.step(forced="aug")) == (SUCCESS, 0, 0)
    assert env.entry(G1, 0) == (0, SeptState.MAPPED, hpa)
    assert env.state(G2, 0) is SeptState.PENDING


def test_ex11_tree_lock_aug_vs_block_busy_sept_tree(env: Env) -> None:
    """Ex.11 tree lock, other order: BLOCK holds the tree exclusive; AUG (tree shared) gets 0x8000020000000092."""
    build_ex5(env)
    aug_page = env.page()
    tasks = [Task("aug", env.tdx.seamcall(SC.TDH_MEM_PAGE_AUG, rcx=G2, rdx=env.tdr_pa, r8=aug_page)),
             Task("block", env.tdx.seamcall(SC.TDH_MEM_RANGE_BLOCK, rcx=G1, rdx=env.tdr_pa))]
    rt = Runtime(env.world, tasks, ScheduleSpec())
    rt.step(forced="block")
    rt.step(forced="aug")
    assert regs(rt.step(forced="aug")) == (BUSY_SEPT_TREE, 0, 0)
    assert regs(rt.step(forced="block")) == (SUCCESS, 0, 0)
    assert env.entry(G2, 0)[:2] == (0, SeptState.FREE)
    assert env.pamt(aug_page).page_type is PageType.PT_NDA
    assert env.state(G1, 0) is SeptState.BLOCKED


def test_ex11_entry_lock_block_vs_accept_then_host_priority(env: Env) -> None:
    """Ex.11 entry lock: the guest's ACCEPT holds PTE[1]'s TDEL; host BLOCK gets OPERAND_BUSY|RCX
    0x8000020000000001 with RCX = PENDING leaf, RDX = 0x200, and sets HP; ACCEPT finishes (MAPPED); the guest's next
    ACCEPT on the entry gets OPERAND_BUSY_HOST_PRIORITY|RCX 0x8000020400000001; the host's retry then succeeds."""
    hpa = build_ex4(env)
    v, _ = env.vcpu([accept(G1), accept(G1)])

    def host():
        for _ in range(2):
            yield from env.tdx.seamcall(SC.TDH_MEM_RANGE_BLOCK, rcx=G1, rdx=env.tdr_pa)

    rt = Runtime(env.world, [Task("vcpu0", v.enter()), Task("host", host())], ScheduleSpec())
    rt.step(forced="vcpu0")      # TD entry
    rt.step(forced="vcpu0")      # ACCEPT step 1: walk + guest entry lock
    rt.step(forced="host")
    assert regs(rt.step(forced="host")) == (BUSY_RCX, 0x8000000000000000 | hpa | 0xF0, 0x200)
    assert env.state(G1, 0) is SeptState.PENDING
    assert tdcall_rax(rt.step(forced="vcpu0")) == SUCCESS     # ACCEPT step 2: zero, MAPPED, release
    assert env.state(G1, 0) is SeptState.MAPPED
    rt.step(forced="vcpu0")      # second ACCEPT step 1: HP is set
    assert tdcall_rax(rt.step(forced="vcpu0")) == BUSY_HOST_PRIORITY_RCX
    rt.step(forced="host")
    assert regs(rt.step(forced="host")) == (SUCCESS, 0, 0)
    assert env.state(G1, 0) is SeptState.BLOCKED


# -- 12 -------------------------------------------------------------------------------------------------------
def test_ex12_zero_step_refusal_and_tree_busy(env: Env) -> None:
    """Ex.12 zero-step (td_entry_stepping_filter): 7 private EPT exits at one RIP on FREE G record G; the next
    TDH.VP.ENTER does not enter and returns exit 48 with R8 = G; while a BLOCK holds the tree the same VP.ENTER
    returns OPERAND_BUSY|SEPT_TREE 0x8000020000000092; once G is AUGed and accepted (by another vCPU), it enters."""
    build_ex5(env)
    v, results = env.vcpu([insn.read(G2)])
    for _ in range(7):
        ex = env.enter(v)
        assert ex.entered and ex.reason is ExitReason.EPT_VIOLATION and ex.gpa == G2
    assert env.epf_gpas(v) == (G2,)
    ex = env.enter(v)
    assert (ex.rax, ex.gpa, ex.entered) == (48, G2, False)
    assert env.refcount() == (0, 0)        # the refused entry's refcount increment was reverted

    tasks = [Task("block", env.tdx.seamcall(SC.TDH_MEM_RANGE_BLOCK, rcx=G1, rdx=env.tdr_pa)),
             Task("vp", v.enter())]
    rt = Runtime(env.world, tasks, ScheduleSpec())
    rt.step(forced="block")                  # BLOCK holds the tree exclusive
    f = rt.step(forced="vp")
    # A VP.ENTER that fails returns as a SEAMCALL (not a TD exit): the TD was not entered.
    assert (f.step.kind, f.step.get("rax")) == (TdxStep.SEAMCALL_RETURN, BUSY_SEPT_TREE)
    assert env.refcount() == (0, 0)
    rt.step(forced="vp")
    assert rt.task("vp").result.rax == BUSY_SEPT_TREE
    assert regs(rt.step(forced="block")) == (SUCCESS, 0, 0)

    hpa = env.aug(G2)
    assert env.enter(v).rax == 48              # PENDING still faults (SVE set: not convertible)
    assert env.guest_accept(G2) == TdcallResult(SUCCESS)
    ex = env.enter(v)
    assert ex.entered and ex.reason is ExitReason.HLT
    assert results == [0]
    assert env.entry(G2, 0) == (0, SeptState.MAPPED, hpa)


# -- 13 -------------------------------------------------------------------------------------------------------
def test_ex13_pending_access_sept_ve_disabled_td_exit_type6(env: Env) -> None:
    """Ex.13 guest read of a PENDING page, SEPT_VE_DISABLE = 1: TD exit 48, EEQ type 6 (PENDING_EPT_VIOLATION),
    exit qualification bits 3-5 = 0, R8 = GPA."""
    build_ex4(env)
    results, ex = env.run_guest([insn.read(G1 + 8)])
    assert results == []
    assert (ex.rax, ex.gpa, ex.ext_qual) == (48, G1, 6)
    assert ex.exit_qual & 0x38 == 0
    assert ex.exit_qual & 0x1 == 1


def test_ex13_pending_access_sept_ve_enabled_injects_ve() -> None:
    """Ex.13 guest read of a PENDING page, SEPT_VE_DISABLE = 0: the module injects #VE into the guest, no TD exit."""
    env = Env(attributes=TdAttr(0))
    build_ex4(env)
    results, ex = env.run_guest([insn.read(G1 + 8)])
    assert len(results) == 1
    ve = results[0]
    assert isinstance(ve, insn.VirtualizationException)
    assert ve.pending and ve.gpa == G1 + 8
    assert ex.reason is ExitReason.HLT


# -- 14 -------------------------------------------------------------------------------------------------------
def test_ex14_teardown_reclaim_sequence(env: Env) -> None:
    """Ex.14 tdh_phymem_page_reclaim: after VPFLUSHDONE (TD_BLOCKED), RECLAIM of an S-EPT page ->
    LIFECYCLE_STATE_INCORRECT 0xC000060700000000; in tdh_phymem_page_reclaim.c the outputs (RCX = 8, RDX = TDR PA,
    R8 = 0) are
    written before the lifecycle check, so they are returned on the failure too .
    After CACHE.WB + KEY.FREEID: SUCCESS RCX = 8 (PT_EPT), RDX = TDR PA, R8 = 0. TDR with children ->
    TD_ASSOCIATED_PAGES_EXIST 0xC000040000000000; once every child is reclaimed the TDR is reclaimed."""
    pml4_child = env.sept_add(0, 3)
    r = env.call(SC.TDH_MNG_VPFLUSHDONE, env.tdr_pa)
    assert r.rax == SUCCESS
    assert env.tdx.lifecycle(env.tdr) is Lifecycle.TD_BLOCKED
    r = env.call(SC.TDH_PHYMEM_PAGE_RECLAIM, pml4_child)
    assert (r.rax, r.rcx, r.rdx, r.r8) == (LIFECYCLE_STATE_INCORRECT, 8, env.tdr_pa, 0)
    assert env.pamt(pml4_child).page_type is PageType.PT_EPT
    assert env.call(SC.TDH_PHYMEM_CACHE_WB, 0).rax == SUCCESS
    assert env.call(SC.TDH_MNG_KEY_FREEID, env.tdr_pa).rax == SUCCESS
    assert env.tdx.lifecycle(env.tdr) is Lifecycle.TD_TEARDOWN
    before = env.chldcnt()
    r = env.call(SC.TDH_PHYMEM_PAGE_RECLAIM, pml4_child)
    assert (r.rax, r.rcx, r.rdx, r.r8) == (SUCCESS, 8, env.tdr_pa, 0)
    assert env.pamt(pml4_child).page_type is PageType.PT_NDA
    assert env.chldcnt() == before - 1
    r = env.call(SC.TDH_PHYMEM_PAGE_RECLAIM, env.tdr_pa)
    assert (r.rax, r.rcx, r.rdx, r.r8) == (TD_ASSOCIATED_PAGES_EXIST, 4, env.tdr_pa, 0)
    for tdcs in env.tdx.config(env.tdr).tdcs:
        r = env.call(SC.TDH_PHYMEM_PAGE_RECLAIM, tdcs << 12)
        assert (r.rax, r.rcx, r.rdx, r.r8) == (SUCCESS, 5, env.tdr_pa, 0)
    assert env.chldcnt() == 0
    r = env.call(SC.TDH_PHYMEM_PAGE_RECLAIM, env.tdr_pa)
    assert (r.rax, r.rcx, r.rdx, r.r8) == (SUCCESS, 4, env.tdr_pa, 0)
    assert env.pamt(env.tdr_pa).page_type is PageType.PT_NDA


def test_ex14_reclaim_free_page_metadata_incorrect(env: Env) -> None:
    """tdh_phymem_page_reclaim on a PT_NDA page: PAGE_METADATA_INCORRECT|RCX 0xC000030000000001."""
    r = env.call(SC.TDH_PHYMEM_PAGE_RECLAIM, env.page())
    assert r.rax == 0xC000030000000001


def test_ex14_reclaim_while_keys_configured_lifecycle_incorrect(env: Env) -> None:
    """tdh_phymem_page_reclaim before VPFLUSHDONE (TD_KEYS_CONFIGURED): LIFECYCLE_STATE_INCORRECT, page kept."""
    page = env.sept_add(0, 3)
    r = env.call(SC.TDH_PHYMEM_PAGE_RECLAIM, page)
    assert (r.rax, r.rcx, r.rdx, r.r8) == (LIFECYCLE_STATE_INCORRECT, 8, env.tdr_pa, 0)
    assert env.state(0, 3) is SeptState.NL_MAPPED


def test_arch_free_constant_matches_the_architectural_value() -> None:
    """A FREE entry is reported as SVE only."""
    assert ARCH_FREE == 0x8000000000000000
    assert arch_entry(SeptState.PENDING, 0x1000) == 0x80000000000010F0


def test_vp_enter_in_initialized_op_state_incorrect(env_init: Env) -> None:
    """tdh_vp_enter is allowed only in RUNNABLE/LIVE_* (op_state_lookup row 0): INITIALIZED ->
    TDX_OP_STATE_INCORRECT 0xC000060800000000, not entered."""
    v, _ = env_init.vcpu([insn.read(0)])
    ex = env_init.enter(v)
    assert (ex.rax, ex.entered) == (0xC000060800000000, False)
    assert drive(v.enter(), env_init.world, "v").rax == 0xC000060800000000
    assert env_init.tdx.op_state(env_init.tdr) is OpState.INITIALIZED
    assert env_init.refcount() == (0, 0)
