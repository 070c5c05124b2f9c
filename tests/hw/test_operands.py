"""Operand checks (the leaves' operand checks run before any lock) and the lifecycle gate after VPFLUSHDONE."""

from __future__ import annotations

import pytest
from conftest import (
    EPT_WALK_FAILED_RCX,
    OPERAND_INVALID_RCX,
    PAGE_METADATA_INCORRECT_R8,
    SC,
    SUCCESS,
    TD_KEYS_NOT_CONFIGURED,
    Env,
)

from tdxdbg.hw import insn
from tdxdbg.hw.ept import Gpaw
from tdxdbg.hw.tdx.guest_calls import TdcallResult
from tdxdbg.hw.tdx.pamt import PageType
from tdxdbg.hw.tdx.sept import SeptState

G = 0x80000000
GPA_LEAVES = (SC.TDH_MEM_SEPT_ADD, SC.TDH_MEM_PAGE_AUG, SC.TDH_MEM_RANGE_BLOCK, SC.TDH_MEM_RANGE_UNBLOCK,
              SC.TDH_MEM_PAGE_REMOVE, SC.TDH_MEM_SEPT_REMOVE, SC.TDH_MEM_PAGE_PROMOTE, SC.TDH_MEM_PAGE_DEMOTE,
              SC.TDH_MEM_SEPT_RD)
# A level every leaf accepts, so that only the tested defect makes the operand invalid.
OK_LEVEL = {SC.TDH_MEM_PAGE_AUG: 1}
# Levels out of range per leaf with GPAW 48 (root level 3), as the TDX module checks them.
BAD_LEVELS = {
    SC.TDH_MEM_SEPT_ADD: (0, 4, 7),
    SC.TDH_MEM_PAGE_AUG: (2, 3, 4),
    SC.TDH_MEM_RANGE_BLOCK: (4, 5),
    SC.TDH_MEM_RANGE_UNBLOCK: (4, 6),
    SC.TDH_MEM_PAGE_REMOVE: (3, 4),
    SC.TDH_MEM_SEPT_REMOVE: (0, 4),
    SC.TDH_MEM_PAGE_PROMOTE: (0, 3, 4),
    SC.TDH_MEM_PAGE_DEMOTE: (0, 3, 4),
    SC.TDH_MEM_SEPT_RD: (4, 7),
}


def level_for(leaf: SC) -> int:
    return OK_LEVEL.get(leaf, 1)


def call(env: Env, leaf: SC, rcx: int):
    return env.call(leaf, rcx, r8=env.range_2m() if leaf is SC.TDH_MEM_PAGE_AUG else env.page())


@pytest.mark.parametrize("leaf", GPA_LEAVES, ids=lambda leaf: leaf.name)
def test_shared_bit_operand_invalid(env: Env, leaf: SC) -> None:
    """check_gpa_validity: the shared bit (bit 47 with GPAW 48) must be 0 -> OPERAND_INVALID|RCX."""
    env.tables_for(G, 1)
    r = call(env, leaf, G | (1 << 47) | level_for(leaf))
    assert (r.rax, r.rcx, r.rdx) == (OPERAND_INVALID_RCX, 0, 0)


@pytest.mark.parametrize("bit", [48, 49, 51])
@pytest.mark.parametrize("leaf", GPA_LEAVES, ids=lambda leaf: leaf.name)
def test_gpaw48_high_bits_operand_invalid(env: Env, leaf: SC, bit: int) -> None:
    """check_gpa_validity: with GPAW 48, GPA bits 51:48 must be 0 -> OPERAND_INVALID|RCX."""
    r = call(env, leaf, G | (1 << bit) | level_for(leaf))
    assert r.rax == OPERAND_INVALID_RCX


def test_gpaw52_bit48_is_a_valid_gpa() -> None:
    """With GPAW 52 bit 48 is an ordinary GPA bit (the shared bit is 51): SEPT.ADD L3 at 1<<48 walks from the
    PML5 root and fails the walk at level 4 (FREE) -> EPT_WALK_FAILED|RCX, RDX = 0x4; bit 51 is the shared bit."""
    env = Env(gpaw=Gpaw.GPAW_52)
    r = env.call(SC.TDH_MEM_SEPT_ADD, (1 << 48) | 3, r8=env.page())
    assert (r.rax, r.rcx, r.rdx) == (EPT_WALK_FAILED_RCX, 0x8000000000000000, 0x4)
    assert env.call(SC.TDH_MEM_SEPT_ADD, (1 << 48) | 4, r8=env.page()).rax == SUCCESS
    assert env.call(SC.TDH_MEM_SEPT_ADD, (1 << 51) | 4, r8=env.page()).rax == OPERAND_INVALID_RCX
    assert env.call(SC.TDH_MEM_SEPT_ADD, (1 << 47) | 3, r8=env.page()).rax == EPT_WALK_FAILED_RCX


@pytest.mark.parametrize("reserved", [1 << 3, 1 << 11, 1 << 52, 1 << 63])
@pytest.mark.parametrize("leaf", GPA_LEAVES, ids=lambda leaf: leaf.name)
def test_reserved_bits_operand_invalid(env: Env, leaf: SC, reserved: int) -> None:
    """page_info_api_input_t: bits 11:3 and 63:52 are reserved and must be 0 -> OPERAND_INVALID|RCX."""
    env.tables_for(G, 1)
    r = call(env, leaf, G | reserved | level_for(leaf))
    assert (r.rax, r.rcx, r.rdx) == (OPERAND_INVALID_RCX, 0, 0)


@pytest.mark.parametrize("leaf,level", [(leaf, lvl) for leaf, lvls in BAD_LEVELS.items() for lvl in lvls],
                         ids=lambda x: x.name if isinstance(x, SC) else str(x))
def test_bad_level_per_leaf_operand_invalid(env: Env, leaf: SC, level: int) -> None:
    """verify_page_info_input: a level outside the leaf's range -> OPERAND_INVALID|RCX (GPA 0 is aligned for all)."""
    env.tables_for(0, 1)
    r = call(env, leaf, 0 | level)
    assert (r.rax, r.rcx, r.rdx) == (OPERAND_INVALID_RCX, 0, 0)


@pytest.mark.parametrize("leaf,level,gpa", [
    (SC.TDH_MEM_PAGE_AUG, 1, G + 0x1000),
    (SC.TDH_MEM_SEPT_ADD, 1, G + 0x1000),
    (SC.TDH_MEM_SEPT_ADD, 3, G),
    (SC.TDH_MEM_RANGE_BLOCK, 2, G + 0x200000),
    (SC.TDH_MEM_PAGE_REMOVE, 1, G + 0x1000),
    (SC.TDH_MEM_PAGE_DEMOTE, 2, G + 0x200000),
], ids=lambda x: x.name if isinstance(x, SC) else hex(x))
def test_misaligned_gpa_operand_invalid(env: Env, leaf: SC, level: int, gpa: int) -> None:
    """is_gpa_aligned: GPA must be aligned to 4K << 9*level -> OPERAND_INVALID|RCX."""
    r = call(env, leaf, gpa | level)
    assert r.rax == OPERAND_INVALID_RCX


@pytest.mark.parametrize("rcx", [G | (1 << 47), G | 2, G | (1 << 48), G | 0x8, G + 0x1000 | 1])
def test_accept_operand_invalid(env: Env, rcx: int) -> None:
    """tdg_mem_page_accept step 1-2: shared bit, level 2 (1G), GPAW-48 bits, reserved bits, misaligned 2M ->
    OPERAND_INVALID|RCX 0xC000010000000001 returned to the guest."""
    env.tables_for(G, 0)
    results, _ = env.run_guest([insn.TdcallInsn(insn.Tdcall.TDG_MEM_PAGE_ACCEPT, rcx=rcx)])
    assert results == [TdcallResult(OPERAND_INVALID_RCX)]


def test_aug_target_in_use_page_metadata_incorrect(env: Env) -> None:
    """Q2 check_and_lock_free_range_hpa: an AUG target that is already PT_REG (AUGed elsewhere) ->
    PAGE_METADATA_INCORRECT|R8 0xC000030000000008; nothing changes. Same for a page in use as an S-EPT page,
    and for a 2M AUG whose range contains a used 4K page."""
    env.tables_for(G, 0)
    hpa = env.aug(G + 0x1000)
    before = env.chldcnt()
    r = env.call(SC.TDH_MEM_PAGE_AUG, G + 0x2000, r8=hpa)
    assert (r.rax, r.rcx, r.rdx) == (PAGE_METADATA_INCORRECT_R8, 0, 0)
    assert env.entry(G + 0x2000, 0)[:2] == (0, SeptState.FREE)
    table = env.entry(G, 1)[2]
    assert env.call(SC.TDH_MEM_PAGE_AUG, G + 0x2000, r8=table).rax == PAGE_METADATA_INCORRECT_R8
    assert env.call(SC.TDH_MEM_SEPT_ADD, 0x40000000 | 2, r8=hpa).rax == PAGE_METADATA_INCORRECT_R8
    rng = env.range_2m()
    env.tables_for(0x40000000, 0)
    assert env.call(SC.TDH_MEM_PAGE_AUG, 0x40000000 | 0, r8=rng + 0x5000).rax == SUCCESS
    assert env.call(SC.TDH_MEM_PAGE_AUG, 0x40200000 | 1, r8=rng).rax == PAGE_METADATA_INCORRECT_R8
    assert env.chldcnt() == before + 1 + 1 + 1   # PDPT and PT tables for 0x40000000, one 4K page
    assert env.pamt(rng).page_type is PageType.PT_NDA


def test_state_error_wins_over_metadata_error(env: Env) -> None:
    """Q2: the PAMT check comes after the S-EPT state check: AUG on a PENDING entry with a used target page ->
    EPT_ENTRY_STATE_INCORRECT|RCX, not PAGE_METADATA_INCORRECT."""
    env.tables_for(G, 0)
    hpa = env.aug(G + 0x1000)
    r = env.call(SC.TDH_MEM_PAGE_AUG, G + 0x1000, r8=hpa)
    assert (r.rax, r.rdx) == (0xC0000B0D00000001, 0x200)


def flushed(env: Env) -> Env:
    assert env.call(SC.TDH_MNG_VPFLUSHDONE, env.tdr_pa).rax == SUCCESS
    return env


@pytest.mark.parametrize("leaf", GPA_LEAVES[:-1], ids=lambda leaf: leaf.name)
def test_mem_leaves_after_vpflushdone_keys_not_configured(env: Env, leaf: SC) -> None:
    """check_td_in_correct_build_state: lifecycle != TD_KEYS_CONFIGURED (after VPFLUSHDONE) ->
    TDX_TD_KEYS_NOT_CONFIGURED 0x8000081000000000, checked before OP_STATE and the GPA."""
    env.tables_for(G, 0)
    env.aug(G + 0x1000)
    flushed(env)
    r = call(env, leaf, G + 0x1000)
    assert (r.rax, r.rcx, r.rdx) == (TD_KEYS_NOT_CONFIGURED, 0, 0)


def test_track_and_vp_enter_after_vpflushdone_keys_not_configured(env: Env) -> None:
    """TDH.MEM.TRACK and TDH.VP.ENTER after VPFLUSHDONE -> TDX_TD_KEYS_NOT_CONFIGURED; after KEY.FREEID too."""
    v, _ = env.vcpu([insn.read(G)])
    flushed(env)
    assert env.call(SC.TDH_MEM_TRACK, env.tdr_pa).rax == TD_KEYS_NOT_CONFIGURED
    ex = env.enter(v)
    assert (ex.rax, ex.entered) == (TD_KEYS_NOT_CONFIGURED, False)
    assert env.call(SC.TDH_PHYMEM_CACHE_WB, 0).rax == SUCCESS
    assert env.call(SC.TDH_MNG_KEY_FREEID, env.tdr_pa).rax == SUCCESS
    assert env.call(SC.TDH_MEM_TRACK, env.tdr_pa).rax == TD_KEYS_NOT_CONFIGURED
    assert env.call(SC.TDH_MEM_PAGE_AUG, G, r8=env.page()).rax == TD_KEYS_NOT_CONFIGURED


def test_vpflushdone_with_associated_vcpu_flushvp_not_done(env: Env) -> None:
    """tdh_mng_vpflushdone: a vCPU still associated (entered once, not VP.FLUSHed) -> TDX_FLUSHVP_NOT_DONE
    0x8000082400000000; after TDH.VP.FLUSH it succeeds."""
    v, _ = env.vcpu([insn.read(G)])
    env.enter(v)
    assert env.call(SC.TDH_MNG_VPFLUSHDONE, env.tdr_pa).rax == 0x8000082400000000
    assert env.call(SC.TDH_VP_FLUSH, v.tdvpr << 12).rax == SUCCESS
    assert env.call(SC.TDH_MNG_VPFLUSHDONE, env.tdr_pa).rax == SUCCESS
