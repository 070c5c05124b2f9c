"""tdp_iter: the TDP MMU's pre-order walk over one root (arch/x86/kvm/mmu/tdp_iter.c).

Every move re-reads the SPTE under the iterator (READ_ONCE) and is a step point carrying level, gfn, index,
sptep and old_spte, so another task can change the entry between the read and whatever the walker does next.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tdxdbg.engine.spte import (
    PAGE_SHIFT,
    PG_LEVEL_4K,
    PT64_ROOT_MAX_LEVEL,
    SPTE_ENT_PER_PAGE,
    gfn_round_for_level,
    is_last_spte,
    is_shadow_present_pte,
    kvm_pages_per_hpage,
    spte_index,
    spte_to_pfn,
)
from tdxdbg.engine.steps import EngineStep, IterPos
from tdxdbg.hw.memory import entry_value
from tdxdbg.runtime.step import Step

if TYPE_CHECKING:
    from tdxdbg.engine.kvm import Gen
    from tdxdbg.hw.memory import HostMemory


def walk_spte(get: Callable[..., Any], root: int, root_level: int, gfn: int,
              target: int = PG_LEVEL_4K) -> tuple[int, int, int, int]:
    """The walk from a root to the SPTE that maps `gfn` (in the root's index space: a direct root's gfn carries
    the shared bit), as hardware and tdp_iter descend: down to KVM level `target`, stopping early at a
    non-present SPTE or a leaf. Returns (level reached, table pfn, index, spte). Pure: it reads through `get`
    (World.get or peek, or a recorded state's get), as walk_sept does for the S-EPT. TdpIter descends the same
    way one step (one READ_ONCE) at a time, since every level it reads is a frame."""
    table, level = root, root_level
    addr = gfn << PAGE_SHIFT
    while True:
        idx = spte_index(addr, level)
        v = entry_value(get, table, idx)
        if level == target or not is_shadow_present_pte(v) or is_last_spte(v, level):
            return level, table, idx, v
        table, level = spte_to_pfn(v), level - 1


# Iterator positions above 4K seen so far (see TdpIter._step); bounded by the upper-level entries and their values.
_UPPER_POSITIONS: dict[IterPos, IterPos] = {}


class TdpIter:
    """struct tdp_iter. `sptep` is (table pfn, index); gfns never include `gfn_bits`."""

    __slots__ = ("as_id", "gfn", "gfn_bits", "index", "level", "memory", "min_level", "next_last_level_gfn",
                 "old_spte", "pt_path", "root_kind", "root_level", "table", "valid", "yielded", "yielded_gfn")

    def __init__(self, memory: HostMemory, root_pfn: int, root_level: int, root_kind: str, min_level: int,
                 next_last_level_gfn: int, gfn_bits: int) -> None:
        self.memory = memory
        self.root_kind = root_kind
        self.root_level = root_level
        self.min_level = min_level
        self.next_last_level_gfn = next_last_level_gfn
        self.yielded_gfn = next_last_level_gfn
        self.gfn_bits = gfn_bits
        self.pt_path = [0] * PT64_ROOT_MAX_LEVEL
        self.pt_path[root_level - 1] = root_pfn
        self.level = root_level
        self.gfn = 0
        self.table = 0
        self.index = 0
        self.old_spte = 0
        self.valid = False
        self.yielded = False
        self.as_id = 0

    # Show the iterator's position in the debugger's locals pane (it is mutable, so as of now).
    __tdxdbg_live_repr__ = True

    def __repr__(self) -> str:
        return (f"tdp_iter({self.root_kind} L{self.level} gfn={self.gfn:#x} idx={self.index} "
                f"old_spte={self.old_spte:#x}{'' if self.valid else ' invalid'})")

    @property
    def sptep(self) -> tuple[int, int]:
        return (self.table, self.index)

    def pos(self) -> IterPos:
        return IterPos(self.root_kind, self.level, self.gfn, self.index, self.table, self.old_spte)

    def _step(self) -> Step:
        pos = self.pos()
        if self.level > PG_LEVEL_4K:
            # Walks from the root pass the same few upper-level entries again and again: share one payload
            # per distinct position (4K positions are nearly all distinct, so they are not worth the look-up).
            pos = _UPPER_POSITIONS.setdefault(pos, pos)
        return Step(EngineStep.ITER, pos)

    def read(self) -> int:
        """READ_ONCE(*iter->sptep)."""
        self.old_spte = self.memory.read_entry(self.table, self.index)
        return self.old_spte

    def _refresh_sptep(self) -> None:
        """tdp_iter_refresh_sptep: point at the entry for (gfn | gfn_bits) and re-read it."""
        self.table = self.pt_path[self.level - 1]
        self.index = spte_index((self.gfn | self.gfn_bits) << PAGE_SHIFT, self.level)
        self.read()

    # -- the walk -------------------------------------------------------------------------------------------
    def start(self) -> Gen:
        """tdp_iter_start; invalid when the target gfn already has gfn_bits (a shared-bit gfn on a direct root)."""
        if self.gfn_bits and self.next_last_level_gfn >= self.gfn_bits:
            self.valid = False
            return
        yield from self.restart()

    def restart(self) -> Gen:
        """tdp_iter_restart: back to the root, heading for next_last_level_gfn."""
        self.yielded = False
        self.yielded_gfn = self.next_last_level_gfn
        self.level = self.root_level
        self.gfn = gfn_round_for_level(self.next_last_level_gfn, self.level)
        self._refresh_sptep()
        self.valid = True
        yield self._step()

    def _try_step_down(self) -> bool:
        if self.level == self.min_level:
            return False
        spte = self.read()   # re-read: the entry may have changed since the iterator reached it
        if not is_shadow_present_pte(spte) or is_last_spte(spte, self.level):
            return False
        self.level -= 1
        self.pt_path[self.level - 1] = spte_to_pfn(spte)
        self.gfn = gfn_round_for_level(self.next_last_level_gfn, self.level)
        self._refresh_sptep()
        return True

    def _try_step_side(self) -> bool:
        if self.index == SPTE_ENT_PER_PAGE - 1:
            return False
        self.gfn += kvm_pages_per_hpage(self.level)
        self.next_last_level_gfn = self.gfn
        self.index += 1
        self.read()
        return True

    def _try_step_up(self) -> bool:
        if self.level == self.root_level:
            return False
        self.level += 1
        self.gfn = gfn_round_for_level(self.gfn, self.level)
        self._refresh_sptep()
        return True

    def next(self) -> Gen:
        """tdp_iter_next: restart after a yield; else down, else side, else up-and-side, else done."""
        if self.yielded:
            yield from self.restart()
            return
        if self._try_step_down():
            yield self._step()
            return
        while True:
            if self._try_step_side():
                yield self._step()
                return
            if not self._try_step_up():
                break
        self.valid = False

    def cond_resched(self) -> None:
        """tdp_mmu_iter_cond_resched after dropping the lock: the next tdp_iter_next restarts from the root."""
        self.yielded = True
