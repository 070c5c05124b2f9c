"""The Secure EPT: entry states, which leaf is allowed in which state, and the architectural entry value.

States and public values from the TDX module's include/auto_gen/sept_state_lookup.c; the allowed-state matrix
from its `seamcall_sept_state_lookup`. Only the states a non-migrating TD reaches are modelled.
"""

from __future__ import annotations

import enum
from typing import Any

import attrs

from tdxdbg.hw.ept import EPT_RWX, MEMTYPE_SHIFT, PAGE_SHIFT, EptBit, MemType
from tdxdbg.hw.tdx.leaves import Seamcall


class SeptState(enum.Enum):
    """S-EPT entry state; `public` is the value the module reports in RDX bits 15:8."""

    FREE = 0
    NL_MAPPED = 132
    NL_BLOCKED = 129
    MAPPED = 4
    BLOCKED = 1
    PENDING = 2
    PENDING_BLOCKED = 3

    @property
    def public(self) -> int:
        return self.value

    @property
    def is_leaf(self) -> bool:
        """Every leaf state has PS = 1, even at 4K (`SEPT_STATE_ENC_TO_MASK`)."""
        return self in _LEAF

    @property
    def is_present(self) -> bool:
        """Hardware presence: RWX set. FREE, PENDING and the blocked states have RWX = 0."""
        return self in (SeptState.MAPPED, SeptState.NL_MAPPED)

    @property
    def is_blocked(self) -> bool:
        return self in (SeptState.BLOCKED, SeptState.NL_BLOCKED, SeptState.PENDING_BLOCKED)

    @property
    def tlb_tracking_required(self) -> bool:
        """Per-state flag of `sept_state_lookup`: every non-FREE state here needs block + track before removal."""
        return self is not SeptState.FREE

    @property
    def guest_accessible(self) -> bool:
        return self is SeptState.MAPPED


_LEAF = frozenset({SeptState.MAPPED, SeptState.BLOCKED, SeptState.PENDING, SeptState.PENDING_BLOCKED})

# RANGE.BLOCK and RANGE.UNBLOCK move between these pairs (transitions T5-T8).
BLOCKED_FORM = {
    SeptState.MAPPED: SeptState.BLOCKED,
    SeptState.PENDING: SeptState.PENDING_BLOCKED,
    SeptState.NL_MAPPED: SeptState.NL_BLOCKED,
}
UNBLOCKED_FORM = {v: k for k, v in BLOCKED_FORM.items()}

_S = SeptState
# seamcall_sept_state_lookup, restricted to the modelled states (migration states never arise here).
ALLOWED_STATES: dict[Seamcall, frozenset[SeptState]] = {
    Seamcall.TDH_MEM_PAGE_ADD: frozenset({_S.FREE}),
    Seamcall.TDH_MEM_SEPT_ADD: frozenset({_S.FREE, _S.NL_MAPPED}),
    Seamcall.TDH_MEM_PAGE_AUG: frozenset({_S.FREE}),
    Seamcall.TDH_MEM_RANGE_BLOCK: frozenset({_S.NL_MAPPED, _S.MAPPED, _S.PENDING}),
    Seamcall.TDH_MEM_PAGE_DEMOTE: frozenset({_S.MAPPED, _S.BLOCKED, _S.PENDING, _S.PENDING_BLOCKED}),
    Seamcall.TDH_MR_EXTEND: frozenset({_S.MAPPED}),
    Seamcall.TDH_MEM_PAGE_PROMOTE: frozenset({_S.NL_MAPPED, _S.NL_BLOCKED}),
    Seamcall.TDH_MEM_SEPT_RD: frozenset(SeptState),
    Seamcall.TDH_MEM_PAGE_REMOVE: frozenset({_S.MAPPED, _S.BLOCKED, _S.PENDING, _S.PENDING_BLOCKED}),
    Seamcall.TDH_MEM_SEPT_REMOVE: frozenset({_S.NL_MAPPED, _S.NL_BLOCKED}),
    Seamcall.TDH_MEM_RANGE_UNBLOCK: frozenset({_S.NL_BLOCKED, _S.BLOCKED, _S.PENDING_BLOCKED}),
}
# TDG.MEM.PAGE.ACCEPT (a TDCALL, see guest_calls) is allowed on PENDING (and PENDING_EXPORTED_DIRTY, a migration
# state).


@attrs.frozen(slots=True)
class SeptEntry:
    """One S-EPT entry: its state and, when not FREE, the page it maps (leaf) or points to (non-leaf)."""

    state: SeptState = SeptState.FREE
    pfn: int = 0

    @property
    def is_leaf(self) -> bool:
        return self.state.is_leaf

    def arch_value(self) -> int:
        """The entry as `set_arch_septe_details_in_vmm_regs` reports it in RCX (HKID bits cleared).

        FREE: only SVE. Leaf: R/W/Xs/Xu as the state has them, WB memory type, IPAT, PS, HPA and SVE.
        Non-leaf: R/W/Xs/Xu only (no HPA, PS clear).
        """
        state = self.state
        if state is SeptState.FREE:
            return EptBit.SUPPRESS_VE
        rwx = (EPT_RWX | EptBit.EXEC_USER) if state.is_present else 0
        if state.is_leaf:
            return (EptBit.SUPPRESS_VE | (self.pfn << PAGE_SHIFT) | EptBit.PAGE_SIZE | EptBit.IPAT
                    | (MemType.WB << MEMTYPE_SHIFT) | rwx)
        return rwx


FREE_ENTRY = SeptEntry()
SEPT = "sept"           # the tag of sept_key: ("sept", table pfn, index)


def sept_key(table: int, index: int) -> tuple[str, int, int]:
    """An S-EPT entry in the World: absent means FREE."""
    return (SEPT, table, index)


def sept_entry(get: Any, table: int, index: int) -> SeptEntry:
    """The S-EPT entry at (table, index) read through `get` (World.get / peek, a state mapping's get)."""
    return get(sept_key(table, index), FREE_ENTRY)


def arch_info(level: int, state: SeptState) -> int:
    """RDX of an S-EPT error (`sept_entry_arch_info_t`): level in bits 2:0, public state in bits 15:8."""
    return level | (state.public << 8)
