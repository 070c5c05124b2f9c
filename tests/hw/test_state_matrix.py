"""The allowed-state matrix (TDX module `seamcall_sept_state_lookup`), restricted to the modelled states.

Every (leaf, state) pair is built for real (SEPT.ADD / AUG / guest ACCEPT / BLOCK) at level 1 (a 2M entry, the
only level where all seven states exist), then the leaf is called on that entry.

OP_STATE: the matrix is checked in INITIALIZED, because in RUNNABLE the block-and-track rule (a running TD's
removal needs the entry blocked and TLB-tracked) turns every allowed REMOVE / SEPT.REMOVE / PROMOTE / DEMOTE /
UNBLOCK into GPA_RANGE_NOT_BLOCKED or
TLB_TRACKING_NOT_DONE and would mask whether the state itself was allowed. RUNNABLE (with and without a TRACK
after the block) is checked too, with those exact masking results. Since only a running guest can ACCEPT, the
TD is built RUNNABLE and its OP_STATE is then set to the tested value directly in the World.

Disallowed pairs must return exactly EPT_ENTRY_STATE_INCORRECT|RCX = 0xC0000B0D00000001 with RCX = the
architectural entry and RDX = level | public state << 8, and leave the entry unchanged; BLOCK on an already
blocked entry returns GPA_RANGE_ALREADY_BLOCKED|RCX = 0x00000B0700000001 instead.
SEPT.ADD on NL_MAPPED: the matrix row lists NL_MAPPED, but tdh_mem_sept_add.c (process_l1_page, v0 with a page
in R8 and allow_existing = 0) returns EPT_ENTRY_STATE_INCORRECT|RCX; the facts win, so it is expected here.
"""

from __future__ import annotations

import pytest
from conftest import (
    EPT_ENTRY_STATE_INCORRECT_RCX,
    EPT_INVALID_PROMOTE_CONDITIONS_RCX,
    GPA_RANGE_ALREADY_BLOCKED_RCX,
    GPA_RANGE_NOT_BLOCKED_RCX,
    OP_STATE_INCORRECT,
    SC,
    SUCCESS,
    TLB_TRACKING_NOT_DONE_RCX,
    TLB_TRACKING_NOT_DONE_SEPT_TREE,
    Env,
    arch_entry,
    arch_info,
)

from tdxdbg.hw.cpu import TdExit
from tdxdbg.hw.ept import ExitReason
from tdxdbg.hw.tdx.guest_calls import TdcallResult
from tdxdbg.hw.tdx.pamt import PageType
from tdxdbg.hw.tdx.sept import SeptState
from tdxdbg.hw.tdx.td import OpState

S = SeptState
ALL = (S.FREE, S.NL_MAPPED, S.NL_BLOCKED, S.MAPPED, S.BLOCKED, S.PENDING, S.PENDING_BLOCKED)
LEAF = (S.MAPPED, S.BLOCKED, S.PENDING, S.PENDING_BLOCKED)
BLOCKED = (S.NL_BLOCKED, S.BLOCKED, S.PENDING_BLOCKED)
G = 0x80000000
SI = EPT_ENTRY_STATE_INCORRECT_RCX

# Allowed states per leaf (seamcall_sept_state_lookup restricted to the modelled states; SEPT.ADD per
# tdh_mem_sept_add.c).
ALLOWED = {
    SC.TDH_MEM_SEPT_ADD: {S.FREE},
    SC.TDH_MEM_PAGE_AUG: {S.FREE},
    SC.TDH_MEM_RANGE_BLOCK: {S.NL_MAPPED, S.MAPPED, S.PENDING},
    SC.TDH_MEM_RANGE_UNBLOCK: set(BLOCKED),
    SC.TDH_MEM_PAGE_REMOVE: set(LEAF),
    SC.TDH_MEM_SEPT_REMOVE: {S.NL_MAPPED, S.NL_BLOCKED},
    SC.TDH_MEM_PAGE_PROMOTE: {S.NL_MAPPED, S.NL_BLOCKED},
    SC.TDH_MEM_PAGE_DEMOTE: set(LEAF),
    SC.TDH_MEM_SEPT_RD: set(ALL),
}
LEAVES = tuple(ALLOWED)

UNBLOCKED_OF = {S.NL_BLOCKED: S.NL_MAPPED, S.BLOCKED: S.MAPPED, S.PENDING_BLOCKED: S.PENDING}
BLOCKED_OF = {v: k for k, v in UNBLOCKED_OF.items()}


def build(env: Env, state: SeptState, gpa: int = G, level: int = 1) -> int:
    """Bring the entry at (gpa, level) into `state` (TD RUNNABLE); return the HPA it maps or points to."""
    env.tables_for(gpa, level)
    hpa = 0
    if state in (S.NL_MAPPED, S.NL_BLOCKED):
        hpa = env.sept_add(gpa, level)
    elif state in LEAF:
        hpa = env.aug(gpa, level)
        if state in (S.MAPPED, S.BLOCKED):
            assert env.guest_accept(gpa, level) == TdcallResult(SUCCESS)
    if state in BLOCKED:
        env.block(gpa, level)
    assert env.entry(gpa, level) == (level, state, hpa)
    return hpa


def expected(leaf: SC, state: SeptState, mode: str) -> int:
    """RAX for `leaf` on `state` in `mode` ("initialized", "runnable", "runnable_tracked")."""
    if state not in ALLOWED[leaf]:
        if leaf is SC.TDH_MEM_RANGE_BLOCK and state in BLOCKED:
            return GPA_RANGE_ALREADY_BLOCKED_RCX
        return SI
    tracking = mode != "initialized" and leaf in (SC.TDH_MEM_PAGE_REMOVE, SC.TDH_MEM_SEPT_REMOVE,
                                                  SC.TDH_MEM_PAGE_PROMOTE, SC.TDH_MEM_PAGE_DEMOTE,
                                                  SC.TDH_MEM_RANGE_UNBLOCK)
    if tracking and state not in BLOCKED:
        return GPA_RANGE_NOT_BLOCKED_RCX
    if tracking and mode == "runnable":
        return TLB_TRACKING_NOT_DONE_SEPT_TREE if leaf is SC.TDH_MEM_RANGE_UNBLOCK else TLB_TRACKING_NOT_DONE_RCX
    if leaf is SC.TDH_MEM_PAGE_PROMOTE:
        return EPT_INVALID_PROMOTE_CONDITIONS_RCX      # the 512 children are FREE
    return SUCCESS


def after(leaf: SC, state: SeptState) -> SeptState:
    """Entry state after a successful call (transitions T1-T12)."""
    return {
        SC.TDH_MEM_SEPT_ADD: S.NL_MAPPED,
        SC.TDH_MEM_PAGE_AUG: S.PENDING,
        SC.TDH_MEM_RANGE_BLOCK: BLOCKED_OF.get(state, state),
        SC.TDH_MEM_RANGE_UNBLOCK: UNBLOCKED_OF.get(state, state),
        SC.TDH_MEM_PAGE_REMOVE: S.FREE,
        SC.TDH_MEM_SEPT_REMOVE: S.FREE,
        SC.TDH_MEM_PAGE_DEMOTE: S.NL_MAPPED,
        SC.TDH_MEM_SEPT_RD: state,
    }[leaf]


def call_leaf(env: Env, leaf: SC, level: int = 1):
    r8 = 0
    if leaf in (SC.TDH_MEM_SEPT_ADD, SC.TDH_MEM_PAGE_DEMOTE):
        r8 = env.page()
    elif leaf is SC.TDH_MEM_PAGE_AUG:
        r8 = env.range_2m()
    return env.call(leaf, G | level, r8=r8), r8


@pytest.mark.parametrize("mode", ["initialized", "runnable", "runnable_tracked"])
@pytest.mark.parametrize("state", ALL, ids=lambda s: s.name)
@pytest.mark.parametrize("leaf", LEAVES, ids=lambda leaf: leaf.name)
def test_sept_state_matrix(leaf: SC, state: SeptState, mode: str) -> None:
    """seamcall_sept_state_lookup: allowed -> never EPT_ENTRY_STATE_INCORRECT (exact result per OP_STATE),
    disallowed -> exactly 0xC0000B0D00000001 with entry details, BLOCK on blocked -> GPA_RANGE_ALREADY_BLOCKED."""
    env = Env()
    hpa = build(env, state)
    if mode == "runnable_tracked":
        env.track()
    elif mode == "initialized":
        env.set_op_state(OpState.INITIALIZED)
    before = env.chldcnt()
    r, r8 = call_leaf(env, leaf)
    want = expected(leaf, state, mode)
    assert r.rax == want, f"{r.rax:#018x} != {want:#018x}"
    if state in ALLOWED[leaf]:
        assert r.rax != SI
    if want in (SI, GPA_RANGE_ALREADY_BLOCKED_RCX, GPA_RANGE_NOT_BLOCKED_RCX):
        # Details are filled for these: RCX = architectural entry, RDX = level | public state << 8.
        assert (r.rcx, r.rdx) == (arch_entry(state, hpa), arch_info(1, state))
    if want != SUCCESS:
        assert env.entry(G, 1) == (1, state, hpa)
        assert env.chldcnt() == before
        if r8:
            assert env.pamt(r8).page_type is PageType.PT_NDA
        return
    # Success: the transition and its outputs.
    assert env.state(G, 1) is after(leaf, state)
    if leaf is SC.TDH_MEM_SEPT_RD:
        assert (r.rcx, r.rdx) == (arch_entry(state, hpa), arch_info(1, state))
    elif leaf is SC.TDH_MEM_PAGE_REMOVE:
        assert (r.rcx, r.rdx) == (hpa, 0)
        assert env.chldcnt() == before - 512
        assert all(env.pamt(hpa + (i << 12)).page_type is PageType.PT_NDA for i in range(512))
    elif leaf is SC.TDH_MEM_SEPT_REMOVE:
        assert (r.rcx, r.rdx) == (hpa, 0)
        assert env.chldcnt() == before - 1
        assert env.pamt(hpa).page_type is PageType.PT_NDA
    elif leaf is SC.TDH_MEM_PAGE_DEMOTE:
        assert (r.rcx, r.rdx) == (0, 0)
        assert env.chldcnt() == before + 1
        assert env.pamt(r8).page_type is PageType.PT_EPT
        child = UNBLOCKED_OF.get(state, state)
        for i in (0, 1, 511):
            assert env.entry(G + (i << 12), 0) == (0, child, hpa + (i << 12))
    elif leaf is SC.TDH_MEM_SEPT_ADD:
        assert env.entry(G, 1) == (1, S.NL_MAPPED, r8)
        assert env.chldcnt() == before + 1
    elif leaf is SC.TDH_MEM_PAGE_AUG:
        assert env.entry(G, 1) == (1, S.PENDING, r8)
        assert env.chldcnt() == before + 512
    else:
        assert (r.rcx, r.rdx) == (0, 0)
        assert env.entry(G, 1)[2] == hpa


@pytest.mark.parametrize("state", (S.FREE, S.MAPPED, S.BLOCKED, S.PENDING, S.PENDING_BLOCKED), ids=lambda s: s.name)
def test_page_add_matrix_level0(state: SeptState) -> None:
    """tdh_mem_page_add (level 0 only, so no non-leaf states exist at its level): allowed only on FREE; other
    states -> exactly 0xC0000B0D00000001 with RDX = public state << 8. OP_STATE INITIALIZED (PAGE.ADD's only one)."""
    env = Env()
    gpa = G + 0x5000
    hpa = build(env, state, gpa, 0)
    env.set_op_state(OpState.INITIALIZED)
    target, src = env.page(), env.page()
    r = env.call(SC.TDH_MEM_PAGE_ADD, gpa, r8=target, r9=src)
    if state is S.FREE:
        assert (r.rax, r.rcx, r.rdx) == (SUCCESS, 0, 0)
        assert env.entry(gpa, 0) == (0, S.MAPPED, target)
    else:
        assert (r.rax, r.rcx, r.rdx) == (SI, arch_entry(state, hpa), arch_info(0, state))
        assert env.entry(gpa, 0) == (0, state, hpa)
        assert env.pamt(target).page_type is PageType.PT_NDA


def test_page_add_in_runnable_op_state_incorrect() -> None:
    """tdh_mem_page_add in RUNNABLE: op_state_lookup allows INITIALIZED only -> TDX_OP_STATE_INCORRECT (no operand)."""
    env = Env()
    env.tables_for(G, 0)
    r = env.call(SC.TDH_MEM_PAGE_ADD, G, r8=env.page(), r9=env.page())
    assert (r.rax, r.rcx, r.rdx) == (OP_STATE_INCORRECT, 0, 0)


ACCEPT_EXPECTED = {
    S.FREE: "exit",
    S.NL_MAPPED: 0xC0000B0B00000001,       # PAGE_SIZE_MISMATCH|1: non-free non-leaf at the requested level
    S.NL_BLOCKED: 0xC0000B0B00000001,
    S.MAPPED: 0x00000B0A00000001,          # PAGE_ALREADY_ACCEPTED|1
    S.BLOCKED: "exit",
    S.PENDING: SUCCESS,
    S.PENDING_BLOCKED: "exit",
}


@pytest.mark.parametrize("state", ALL, ids=lambda s: s.name)
def test_accept_matrix_2m(state: SeptState) -> None:
    """tdg_mem_page_accept (tdg_mem_page_accept.c) at 2M on each state: PENDING -> SUCCESS + MAPPED; MAPPED ->
    PAGE_ALREADY_ACCEPTED|1; non-leaf -> PAGE_SIZE_MISMATCH|1; FREE / BLOCKED / PENDING_BLOCKED -> async
    EPT-violation TD exit with EEQ type 1 (ACCEPT) and R8 = GPA, entry unchanged."""
    env = Env()
    hpa = build(env, state)
    r = env.guest_accept(G, 1)
    want = ACCEPT_EXPECTED[state]
    if want == "exit":
        assert isinstance(r, TdExit)
        assert (r.rax, r.reason, r.gpa, r.ext_qual & 0xF) == (48, ExitReason.EPT_VIOLATION, G, 1)
        assert env.entry(G, 1) == (1, state, hpa)
        return
    assert r == TdcallResult(want)
    assert env.entry(G, 1) == (1, S.MAPPED if state is S.PENDING else state, hpa)


def test_accept_4k_under_2m_pending_exits_and_under_2m_mapped_already_accepted() -> None:
    """tdg_mem_page_accept 4K under a 2M leaf (tdg_mem_page_accept.c): walk stops at level 1; PENDING 2M ->
    async TD exit (the VMM must DEMOTE); MAPPED 2M -> PAGE_ALREADY_ACCEPTED|1 (level where the walk stopped)."""
    env = Env()
    build(env, S.PENDING)
    r = env.guest_accept(G + 0x3000, 0)
    assert isinstance(r, TdExit) and (r.rax, r.gpa, r.ext_qual & 0xF) == (48, G + 0x3000, 1)
    assert env.guest_accept(G, 1) == TdcallResult(SUCCESS)
    assert env.guest_accept(G + 0x3000, 0) == TdcallResult(0x00000B0A00000001)
