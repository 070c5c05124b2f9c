"""Random SEAMCALL / ACCEPT sequences never break the module's bookkeeping (PAMT owners and CHLDCNT).

After every operation:
  * CHLDCNT == number of 4K pages whose PAMT owner is the TD (excluding the TDR itself);
  * every S-EPT non-leaf points to a PT_EPT page owned by the TD, every leaf at level L maps 512^L PT_REG pages
    owned by the TD (head PAMT size = L), and every TD-owned PT_REG / PT_EPT page is referenced by exactly one
    entry (no page is referenced twice, none is leaked);
  * no module lock (tree, epoch, TDR, PAMT, S-EPT entry TDEL) is left held between calls.
"""

from __future__ import annotations

from conftest import SC, Env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tdxdbg.hw.machine import drive
from tdxdbg.hw.tdx.guest_calls import tdg_mem_page_accept
from tdxdbg.hw.tdx.pamt import PageType
from tdxdbg.hw.tdx.sept import SeptState
from tdxdbg.hw.tdx.td import OpState

# A small GPA set inside one 1G region plus one in another, so that tables, 2M leaves and 4K leaves mix.
GPAS = (0x0, 0x1000, 0x2000, 0x200000, 0x201000, 0x400000, 0x40000000)
OPS = ("sept_add", "aug", "block", "unblock", "track", "remove", "sept_remove", "promote", "demote", "accept",
       "zap", "aug", "accept", "block_track")
LEVELS = {
    "sept_add": (1, 2, 3), "aug": (0, 1), "block": (0, 1, 2), "unblock": (0, 1, 2), "remove": (0, 1),
    "sept_remove": (1, 2), "promote": (1,), "demote": (1,), "accept": (0, 1), "track": (0,),
    "zap": (0, 1, 2), "block_track": (0, 1, 2),
}
LEAF_OF = {
    "sept_add": SC.TDH_MEM_SEPT_ADD, "aug": SC.TDH_MEM_PAGE_AUG, "block": SC.TDH_MEM_RANGE_BLOCK,
    "unblock": SC.TDH_MEM_RANGE_UNBLOCK, "remove": SC.TDH_MEM_PAGE_REMOVE, "sept_remove": SC.TDH_MEM_SEPT_REMOVE,
    "promote": SC.TDH_MEM_PAGE_PROMOTE, "demote": SC.TDH_MEM_PAGE_DEMOTE,
}
NON_LEAF = (SeptState.NL_MAPPED, SeptState.NL_BLOCKED)

op_strategy = st.tuples(st.sampled_from(OPS), st.sampled_from(GPAS), st.integers(0, 2))


def walk_tree(env: Env) -> list[tuple[int, int, SeptState, int]]:
    """Every non-FREE S-EPT entry as (level, index path id, state, pfn), read from the World."""
    cfg = env.tdx.config(env.tdr)
    out = []

    def visit(table: int, level: int) -> None:
        for i in range(512):
            e = env.world.peek(("sept", table, i))
            if e is None or e.state is SeptState.FREE:
                continue
            out.append((level, table, e.state, e.pfn))
            if e.state in NON_LEAF:
                visit(e.pfn, level - 1)

    visit(cfg.sept_root, cfg.root_level)
    return out


def check_invariants(env: Env) -> None:
    tdr = env.tdr
    owned = {}
    for key, p in env.world.items():
        if isinstance(key, tuple) and key[0] == "pamt" and p.owner == tdr and key[1] != tdr:
            owned[key[1]] = p
    assert env.chldcnt() == len(owned)
    referenced: dict[int, int] = {}
    for level, _table, state, pfn in walk_tree(env):
        if state in NON_LEAF:
            pages, want = [pfn], PageType.PT_EPT
        else:
            pages, want = range(pfn, pfn + 512 ** level), PageType.PT_REG
            assert owned[pfn].level == level, (level, state, hex(pfn))
        for p in pages:
            assert p in owned and owned[p].page_type is want, (level, state, hex(p))
            referenced[p] = referenced.get(p, 0) + 1
    assert all(n == 1 for n in referenced.values())
    leaked = [hex(p) for p, e in owned.items()
              if e.page_type in (PageType.PT_REG, PageType.PT_EPT) and p not in referenced]
    assert not leaked
    for key, value in env.world.items():
        if isinstance(key, tuple) and key[0] in ("tdx.tree_lock", "tdx.epoch_lock", "tdx.tdr_lock",
                                                  "tdx.pamt_lock"):
            raise AssertionError(f"lock left held: {key} {value}")
        if isinstance(key, tuple) and key[0] == "tdx.tdel":
            assert value.holder is None, key


def run_op(env: Env, tdvpr: int, op: str, gpa: int, pick: int) -> None:
    levels = LEVELS[op]
    level = levels[pick % len(levels)]
    gpa &= ~((1 << (12 + 9 * level)) - 1)
    if op == "track":
        env.call(SC.TDH_MEM_TRACK, env.tdr_pa)
    elif op in ("zap", "block_track"):
        # KVM's zap sequence (tdx_sept_remove_private_spte): BLOCK, TRACK, then REMOVE (a leaf) or SEPT.REMOVE (a
        # table).
        env.call(SC.TDH_MEM_RANGE_BLOCK, gpa | level)
        env.call(SC.TDH_MEM_TRACK, env.tdr_pa)
        if op == "zap":
            _, state, _ = env.entry(gpa, level)
            leaf = SC.TDH_MEM_SEPT_REMOVE if state in NON_LEAF else SC.TDH_MEM_PAGE_REMOVE
            env.call(leaf, gpa | level)
    elif op == "accept":
        drive(tdg_mem_page_accept(env.tdx, tdvpr, gpa | level), env.world, "vcpu")
    else:
        r8 = 0
        if op in ("sept_add", "demote"):
            r8 = env.page()
        elif op == "aug":
            r8 = env.page() if level == 0 else env.range_2m()
        env.call(LEAF_OF[op], gpa | level, r8=r8)


def scaffold(env: Env) -> None:
    """Tables so that most random ops reach their entry: PML4E[0], PDPTE[0] and [1], PDE[0]."""
    for gpa, level in ((0, 3), (0, 2), (0x40000000, 2), (0, 1)):
        env.sept_add(gpa, level)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(runnable=st.booleans(), ops=st.lists(op_strategy, min_size=1, max_size=40))
def test_random_sequences_keep_pamt_chldcnt_and_sept_consistent(runnable: bool, ops) -> None:
    """CHLDCNT, PAMT type/owner and S-EPT references stay consistent under any SEAMCALL sequence."""
    env = Env(op_state=OpState.RUNNABLE if runnable else OpState.INITIALIZED)
    tdvpr = env.tdx.create_vcpu(env.tdr, 0)
    scaffold(env)
    check_invariants(env)
    for op, gpa, pick in ops:
        run_op(env, tdvpr, op, gpa, pick)
        check_invariants(env)


def test_demote_then_promote_round_trip() -> None:
    """T11 + T12: DEMOTE of a 2M PENDING leaf gives 512 contiguous PENDING 4K leaves in a new PT_EPT page; BLOCK +
    TRACK + PROMOTE merges them back (RCX = the freed S-EPT page, PAMT PT_NDA, CHLDCNT back), invariants hold."""
    env = Env()
    env.tables_for(0x200000, 1)
    hpa = env.aug(0x200000, 1)
    env.block(0x200000, 1)
    env.track()
    before = env.chldcnt()
    table = env.page()
    assert env.call(SC.TDH_MEM_PAGE_DEMOTE, 0x200000 | 1, r8=table).rax == 0
    assert env.chldcnt() == before + 1
    assert env.entry(0x200000, 1) == (1, SeptState.NL_MAPPED, table)
    assert env.entry(0x3FF000, 0) == (0, SeptState.PENDING, hpa + 511 * 0x1000)
    check_invariants(env)
    env.block(0x200000, 1)
    r = env.call(SC.TDH_MEM_PAGE_PROMOTE, 0x200000 | 1)
    assert r.rax == 0xC0000B0800000001          # not tracked yet
    env.track()
    r = env.call(SC.TDH_MEM_PAGE_PROMOTE, 0x200000 | 1)
    assert (r.rax, r.rcx, r.rdx) == (0, table, 0)
    assert env.entry(0x200000, 1) == (1, SeptState.PENDING, hpa)
    assert env.pamt(table).page_type is PageType.PT_NDA
    assert env.chldcnt() == before
    check_invariants(env)
