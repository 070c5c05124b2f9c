"""Lock contention inside the module (TDX module include/tdx_locks.h), driven through the runtime.

A SEAMCALL is two steps (checks + locks, then work + release); a TDCALL ACCEPT is two steps (walk + guest entry
lock, then state change + release). Forcing the picks puts one caller between the other's two steps.
"""

from __future__ import annotations

import pytest
from conftest import (
    BUSY_HOST_PRIORITY_RCX,
    BUSY_RCX,
    BUSY_SEPT_TREE,
    OPERAND_INVALID_RCX,
    SC,
    SUCCESS,
    Env,
    accept,
    regs,
    tdcall_rax,
)

from tdxdbg.hw.tdx.guest_calls import TdcallResult
from tdxdbg.hw.tdx.sept import SeptState
from tdxdbg.runtime import Runtime, Task
from tdxdbg.runtime.scheduler import ScheduleSpec

G = 0x80000000
G1 = 0x80001000
G2 = 0x80002000
PENDING_LEAF = 0x80000000000000F0


def host_calls(env: Env, calls):
    for leaf, rcx, r8 in calls:
        yield from env.tdx.seamcall(leaf, rcx=rcx, rdx=env.tdr_pa, r8=r8)


def test_guest_accept_vs_host_block_busy_then_host_priority(env: Env) -> None:
    """sept_lock_acquire_host / _guest: ACCEPT holds TDEL; BLOCK -> OPERAND_BUSY|RCX with RCX = PENDING leaf,
    RDX = 0x200 and sets HP; the guest's next ACCEPT attempt on that entry -> OPERAND_BUSY_HOST_PRIORITY|RCX
    0x8000020400000001 (entry untouched); the host's retry acquires the lock, clears HP and blocks; after that a
    guest ACCEPT is no longer turned away with HOST_PRIORITY (it reaches the state check: BLOCKED -> TD exit)."""
    env.tables_for(G, 0)
    hpa = env.aug(G1)
    hpa2 = env.aug(G2)
    v, _ = env.vcpu([accept(G1), accept(G1), accept(G1)])
    rt = Runtime(env.world, [Task("vcpu0", v.enter()),
                             Task("host", host_calls(env, [(SC.TDH_MEM_RANGE_BLOCK, G1, 0)] * 2))],
                 ScheduleSpec())
    rt.step(forced="vcpu0")
    rt.step(forced="vcpu0")
    rt.step(forced="host")
    assert regs(rt.step(forced="host")) == (BUSY_RCX, PENDING_LEAF | hpa, 0x200)
    assert tdcall_rax(rt.step(forced="vcpu0")) == SUCCESS
    rt.step(forced="vcpu0")
    assert tdcall_rax(rt.step(forced="vcpu0")) == BUSY_HOST_PRIORITY_RCX
    rt.step(forced="vcpu0")
    assert tdcall_rax(rt.step(forced="vcpu0")) == BUSY_HOST_PRIORITY_RCX   # still HP: the host has not retried
    rt.step(forced="host")
    assert regs(rt.step(forced="host")) == (SUCCESS, 0, 0)
    assert env.state(G1, 0) is SeptState.BLOCKED
    # HP was cleared by the host's successful acquire: an ACCEPT on another vCPU reaches the state check.
    r = env.guest_accept(G1)
    assert (r.rax, r.gpa, r.ext_qual & 0xF) == (48, G1, 1)
    # Entries other than the contended one never saw HP.
    assert env.guest_accept(G2) == TdcallResult(SUCCESS)
    assert env.entry(G2, 0)[2] == hpa2


def test_host_holds_entry_guest_accept_busy(env: Env) -> None:
    """sept_lock_acquire_guest: the host (AUG's sibling: BLOCK) holds TDEL between its steps; the guest ACCEPT
    gets OPERAND_BUSY|RCX 0x8000020000000001 (no HP involved), and the entry is not accepted."""
    env.tables_for(G, 0)
    env.aug(G1)
    v, _ = env.vcpu([accept(G1)])
    rt = Runtime(env.world, [Task("vcpu0", v.enter()),
                             Task("host", host_calls(env, [(SC.TDH_MEM_RANGE_BLOCK, G1, 0)]))], ScheduleSpec())
    rt.step(forced="vcpu0")          # TD entry
    rt.step(forced="host")           # BLOCK: tree + entry lock held
    rt.step(forced="vcpu0")
    assert tdcall_rax(rt.step(forced="vcpu0")) == BUSY_RCX
    assert regs(rt.step(forced="host")) == (SUCCESS, 0, 0)
    assert env.state(G1, 0) is SeptState.PENDING_BLOCKED


def test_two_hosts_same_entry_busy_rcx_with_details(env: Env) -> None:
    """Shared+shared tree users collide on the same entry: AUG holds PTE[1]'s TDEL; REMOVE (tree shared) on the
    same GPA -> OPERAND_BUSY|RCX 0x8000020000000001 with RCX = the entry as walked (FREE: SVE only), RDX = 0."""
    env.tables_for(G, 0)
    page = env.page()
    rt = Runtime(env.world, [Task("aug", host_calls(env, [(SC.TDH_MEM_PAGE_AUG, G1, page)])),
                             Task("rm", host_calls(env, [(SC.TDH_MEM_PAGE_REMOVE, G1, 0)]))], ScheduleSpec())
    rt.step(forced="aug")
    rt.step(forced="rm")
    assert regs(rt.step(forced="rm")) == (BUSY_RCX, 0x8000000000000000, 0x0)
    assert regs(rt.step(forced="aug")) == (SUCCESS, 0, 0)
    assert env.entry(G1, 0) == (0, SeptState.PENDING, page)


def test_two_augs_different_entries_share_the_tree(env: Env) -> None:
    """AUG ∥ AUG on different entries both hold the tree shared and both succeed."""
    env.tables_for(G, 0)
    p1, p2 = env.page(), env.page()
    rt = Runtime(env.world, [Task("a", host_calls(env, [(SC.TDH_MEM_PAGE_AUG, G1, p1)])),
                             Task("b", host_calls(env, [(SC.TDH_MEM_PAGE_AUG, G2, p2)]))], ScheduleSpec())
    rt.step(forced="a")
    rt.step(forced="b")
    assert regs(rt.step(forced="b")) == (SUCCESS, 0, 0)
    assert regs(rt.step(forced="a")) == (SUCCESS, 0, 0)


@pytest.mark.parametrize("first,second", [
    (SC.TDH_MEM_RANGE_BLOCK, SC.TDH_MEM_SEPT_ADD),
    (SC.TDH_MEM_SEPT_REMOVE, SC.TDH_MEM_PAGE_AUG),
    (SC.TDH_MEM_RANGE_UNBLOCK, SC.TDH_MEM_PAGE_REMOVE),
    (SC.TDH_MEM_PAGE_AUG, SC.TDH_MEM_RANGE_UNBLOCK),
    (SC.TDH_MEM_SEPT_ADD, SC.TDH_MEM_SEPT_REMOVE),
], ids=lambda leaf: leaf.name)
def test_exclusive_tree_users_conflict_busy_sept_tree(env: Env, first: SC, second: SC) -> None:
    """BLOCK, UNBLOCK and SEPT.REMOVE take the tree exclusive; any overlap with another tree user makes the
    later one fail with OPERAND_BUSY|SEPT_TREE 0x8000020000000092 and RCX = RDX = 0."""
    env.tables_for(0x40000000, 1)
    env.tables_for(G, 0)
    env.aug(G1)
    gpa = {SC.TDH_MEM_RANGE_BLOCK: G1, SC.TDH_MEM_SEPT_ADD: 0x40000000 | 1, SC.TDH_MEM_SEPT_REMOVE: 0x40000000 | 1,
           SC.TDH_MEM_PAGE_AUG: G2, SC.TDH_MEM_RANGE_UNBLOCK: G1, SC.TDH_MEM_PAGE_REMOVE: G1}
    r8 = {SC.TDH_MEM_SEPT_ADD: env.page(), SC.TDH_MEM_PAGE_AUG: env.page()}
    rt = Runtime(env.world, [Task("one", host_calls(env, [(first, gpa[first], r8.get(first, 0))])),
                             Task("two", host_calls(env, [(second, gpa[second], r8.get(second, 0))]))],
                 ScheduleSpec())
    rt.step(forced="one")
    rt.step(forced="two")
    assert regs(rt.step(forced="two")) == (BUSY_SEPT_TREE, 0, 0)
    rt.step(forced="one")


def test_operand_check_before_any_lock(env: Env) -> None:
    """Operand checks run before the tree lock is taken: while BLOCK holds the tree exclusive, an AUG with
    the shared bit set gets OPERAND_INVALID|RCX, not OPERAND_BUSY|SEPT_TREE."""
    env.tables_for(G, 0)
    env.aug(G1)
    bad = G2 | (1 << 47)
    rt = Runtime(env.world, [Task("block", host_calls(env, [(SC.TDH_MEM_RANGE_BLOCK, G1, 0)])),
                             Task("aug", host_calls(env, [(SC.TDH_MEM_PAGE_AUG, bad, env.page())]))],
                 ScheduleSpec())
    rt.step(forced="block")
    rt.step(forced="aug")
    assert regs(rt.step(forced="aug")) == (OPERAND_INVALID_RCX, 0, 0)
    assert regs(rt.step(forced="block")) == (SUCCESS, 0, 0)
