"""What the TDX module and KVM hold VM-wide at a position, for the debugger's "TD state" block: the TLB epoch and
its refcounts, each TD vCPU inside or outside the guest with the epoch it entered in, BLOCKED S-EPT entries with
the epoch TDH.MEM.RANGE.BLOCK stamped (and whether TDH.MEM.TRACK has made them tracked), who holds mmu_lock, and
every TDX lock held (the S-EPT tree lock, TDR lock, PAMT locks, S-EPT entry locks)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from tdxdbg.engine.kvm import FREE_MMU_LOCK, K_MMU_LOCK, MmuLock
from tdxdbg.hw.tdx.epoch import EpochState, epoch_key, is_tracked
from tdxdbg.hw.tdx.locks import EntryLock, Sharex
from tdxdbg.hw.tdx.pamt import NDA, pamt_key
from tdxdbg.hw.tdx.sept import SEPT, SeptState
from tdxdbg.hw.tdx.td import VcpuState

# S-EPT states a TDH.MEM.RANGE.BLOCK leaves (tdx-module `sept_state_is_any_blocked`).
BLOCKED_STATES = frozenset({SeptState.BLOCKED, SeptState.PENDING_BLOCKED, SeptState.NL_BLOCKED})


@attrs.frozen(slots=True)
class VcpuEpoch:
    """A TD vCPU (by TDVPR page) as the module's TLB tracking sees it."""

    tdvpr: int
    index: int
    in_guest: bool
    epoch: int          # the TD epoch sampled at its last TD entry (meaningful while in_guest)


@attrs.frozen(slots=True)
class BlockedEntry:
    """A BLOCKED S-EPT entry: the page it maps, the epoch BLOCK stamped in its PAMT entry, and whether
    `is_tlb_tracked` holds for it now (TRACK advanced the epoch and every vCPU of that epoch left)."""

    table: int
    index: int
    state: SeptState
    pfn: int
    bepoch: int
    tracked: bool


@attrs.frozen(slots=True)
class LockHeld:
    name: str            # "S-EPT tree", "TDR", "PAMT 0x1234", "S-EPT entry 0x10004[3]"
    holders: str         # "exclusive vcpu0" / "shared vcpu0, vcpu1" / "vcpu1 (host priority)"


@attrs.frozen(slots=True)
class TdxStateView:
    td_epoch: int
    refcount: tuple[int, int]
    vcpus: tuple[VcpuEpoch, ...]
    blocked: tuple[BlockedEntry, ...]
    mmu_lock_writer: str | None
    mmu_lock_readers: tuple[str, ...]
    locks: tuple[LockHeld, ...]


_LOCK_NAMES = {"tdx.tree_lock": "S-EPT tree", "tdx.tdr_lock": "TDR", "tdx.pamt_lock": "PAMT",
               "tdx.epoch_lock": "epoch"}


def _lock_name(key: Any) -> str:
    kind = key[0] if isinstance(key, tuple) and key else key
    if kind == "tdx.tdel":
        return f"S-EPT entry {key[1]:#x}[{key[2]}]"
    name = _LOCK_NAMES.get(kind, str(kind))
    return f"{name} {key[1]:#x}" if kind == "tdx.pamt_lock" else name


def tdx_state(state: Mapping[Any, Any], tdr: int) -> TdxStateView:
    ep: EpochState = state.get(epoch_key(tdr), EpochState())
    vcpus: list[VcpuEpoch] = []
    blocked: list[BlockedEntry] = []
    locks: list[LockHeld] = []
    for key, value in state.items():
        if isinstance(value, VcpuState) and value.tdr == tdr:
            vcpus.append(VcpuEpoch(key[1], value.index, value.in_guest, value.vcpu_epoch))
        elif isinstance(value, Sharex) and not value.free:
            who = f"exclusive {value.exclusive}" if value.exclusive else f"shared {', '.join(value.shared)}"
            locks.append(LockHeld(_lock_name(key), who))
        elif isinstance(value, EntryLock) and value.holder is not None:
            locks.append(LockHeld(_lock_name(key), value.holder + (" (host priority)" if value.host_priority
                                                                    else "")))
        elif (isinstance(key, tuple) and key and key[0] == SEPT and getattr(value, "state", None)
              in BLOCKED_STATES):
            bepoch = state.get(pamt_key(value.pfn), NDA).bepoch
            blocked.append(BlockedEntry(key[1], key[2], value.state, value.pfn, bepoch, is_tracked(ep, bepoch)))
    lk: MmuLock = state.get(K_MMU_LOCK, FREE_MMU_LOCK)
    return TdxStateView(ep.td_epoch, tuple(ep.refcount), tuple(sorted(vcpus, key=lambda v: v.index)),
                        tuple(sorted(blocked, key=lambda b: (b.table, b.index))), lk.writer, tuple(lk.readers),
                        tuple(sorted(locks, key=lambda x: x.name)))
