"""The built-in invariants, checked after every frame: each broken invariant becomes a Violation (a red frame),
never an exception.

Each invariant is one class registered with `tdxdbg.engine.invariants.register`: its name (what scenario files
write as `violation = "name"`), its description, and what it watches (World key tags, step kinds). They are
incremental: a frame is judged from its step, its writes and the few World entries those touch, plus running
indexes an invariant keeps (reverse maps of what maps each page, per-TD PAMT counts, freezes per task,
BLOCK/TRACK per TD), seeded from the World when the checks are made. So make fresh checks for a fresh run (a
replay builds a new World anyway). `make_checks(kvm)` returns the checks for one VM; `invariant_names()` every
name a scenario may expect. To add an invariant: one class here (or anywhere imported before the checks are
made) with `@register`.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, NamedTuple

from tdxdbg.engine.gmem import K_MEMSLOTS
from tdxdbg.engine.invariants import (
    CHECKER_ERROR,
    REGISTRY,
    Checker,
    Invariant,
    Write,
    invariant_names,
    register,
)
from tdxdbg.engine.kvm import FREE_MMU_LOCK, K_MMU_LOCK, K_TD_STATE, TdState
from tdxdbg.engine.mmu_page import K_ROOTS, KVM_SP, KvmMmuPage, sp_key
from tdxdbg.engine.spte import (
    EPT_SPTE_HOST_WRITABLE,
    EPT_SPTE_MMU_WRITABLE,
    FROZEN_SPTE,
    PT_WRITABLE_MASK,
    is_ept_ve_possible,
    is_last_spte,
    is_mmio_spte,
    is_shadow_present_pte,
    kvm_pages_per_hpage,
    spte_to_pfn,
)
from tdxdbg.engine.steps import EngineStep, SpteChange
from tdxdbg.engine.tdp_iter import walk_spte
from tdxdbg.hw.memory import MEM_OWNER, PTE, fill_key, pte_key
from tdxdbg.hw.tdx.leaves import Seamcall
from tdxdbg.hw.tdx.module import walk_sept
from tdxdbg.hw.tdx.pamt import PAMT, PageType, pamt_key
from tdxdbg.hw.tdx.seamcall import TdxStep
from tdxdbg.hw.tdx.sept import SEPT, SeptState
from tdxdbg.hw.tdx.status import OperandId, TdxStatus, describe, is_error, status_base
from tdxdbg.hw.tdx.td import CHLDCNT, Lifecycle, chldcnt_key, lifecycle_key, op_state_key, td_key
from tdxdbg.runtime.frame import Violation
from tdxdbg.runtime.step import Step, StepKind
from tdxdbg.runtime.world import MISSING, World

__all__ = ["CHECKER_ERROR", "INVARIANTS", "invariant_names", "make_checks"]

_GPA_MASK = 0x000F_FFFF_FFFF_F000
_LEAF_OK = frozenset({SeptState.PENDING, SeptState.MAPPED})
_LEAF_OK_BLOCKED = frozenset({SeptState.BLOCKED, SeptState.PENDING_BLOCKED})
_BUSY = TdxStatus.TDX_OPERAND_BUSY
# Leaves whose BUSY KVM turns into -EBUSY (the fault path retries, or userspace does).
_BUSY_HANDLED = frozenset({Seamcall.TDH_MEM_SEPT_ADD, Seamcall.TDH_MEM_PAGE_AUG, Seamcall.TDH_MEM_PAGE_ADD,
                           Seamcall.TDH_MR_FINALIZE})
# Leaves KVM issues through tdh_do_no_vcpus: BUSY once, then the retry with vCPUs kept out must succeed.
_RETRY_ONCE = frozenset({Seamcall.TDH_MEM_RANGE_BLOCK, Seamcall.TDH_MEM_PAGE_REMOVE, Seamcall.TDH_MEM_TRACK})
_ENGINE_MARKERS = ("tdxdbg/engine/tdx.py", "tdxdbg/engine/variants/")
_SPTE_STEPS = frozenset({EngineStep.SPTE_CMPXCHG, EngineStep.SPTE_WRITE})
_TASK_END = frozenset({StepKind.TASK_DONE, StepKind.TASK_ERROR})
_SEAMCALL_STEPS = frozenset({TdxStep.SEAMCALL, TdxStep.SEAMCALL_RETURN})

# Whether a stack passes through KVM's TDX glue, per stack. Stacks are interned by the runtime (a few hundred
# distinct ones), so this is keyed by identity; the value keeps the stack alive so its id is never reused.
_FROM_KVM: dict[int, tuple[tuple, bool]] = {}


def _from_kvm(stack: tuple) -> bool:
    """Whether a step's call stack passes through KVM's TDX glue (or a variant of it). No stack (a check called
    directly, e.g. by a test): assume KVM."""
    if not stack:
        return True
    hit = _FROM_KVM.get(id(stack))
    if hit is not None and hit[0] is stack:
        return hit[1]
    found = any(m in entry.filename.replace("\\", "/") for entry in stack for m in _ENGINE_MARKERS)
    _FROM_KVM[id(stack)] = (stack, found)
    return found


def _premaps(kvm: Any) -> bool:
    """Eras whose KVM_TDX_INIT_MEM_REGION premaps (v6.16): a present mirror leaf may wait for its PAGE.ADD."""
    return bool(getattr(kvm, "tdx_premaps_init_mem_region", False))


def _writer(world: World, task: str) -> bool:
    return world.peek(K_MMU_LOCK, FREE_MMU_LOCK).writer == task


class _SpteAt(NamedTuple):
    """Where an SPTE is, for violation messages: formatted only when a message is built (this is per write)."""

    kind: str
    gfn: int
    level: int
    table: int
    index: int

    def __str__(self) -> str:
        return f"{self.kind} SPTE gfn {self.gfn:#x} level {self.level} ({self.table:#x}[{self.index}])"


class _KvmSpte(NamedTuple):
    """A write to an entry of a KVM page table, as the checks read it (absent entries read as the fill)."""

    sp: KvmMmuPage
    table: int
    index: int
    old: int
    new: int


def _kvm_spte(world: World, key: tuple, old: Any, new: Any) -> _KvmSpte | None:
    """The write (key, old, new) as an SPTE write of a KVM page table; None for another key or a page that is
    not (or no longer) a KVM page table."""
    if key[0] != PTE:
        return None
    table = key[1]
    sp = world.peek(sp_key(table))
    if sp is None:
        return None
    if old is MISSING or new is MISSING:
        fill = world.peek(fill_key(table), 0)
        if old is MISSING:
            old = fill
        if new is MISSING:
            new = fill
    return _KvmSpte(sp, table, key[2], old, new)


def _present_leaf_at(w: _KvmSpte, gfn_direct_bits: int) -> tuple[int, int, bool, _SpteAt]:
    """(level, gfn, leaf, where) of a present SPTE write."""
    level = w.sp.role.level
    gfn = (w.sp.gfn + w.index * kvm_pages_per_hpage(level)) & ~gfn_direct_bits
    return level, gfn, is_last_spte(w.new, level), _SpteAt(w.sp.kind, gfn, level, w.table, w.index)


class PfnRefs:
    """Which pfn each mapping (keyed by where it lives) points at, and how many mappings point at each pfn."""

    __slots__ = ("by_place", "refs")

    def __init__(self) -> None:
        self.by_place: dict[Hashable, int] = {}
        self.refs: dict[int, int] = {}

    def ref(self, place: Hashable, pfn: int) -> None:
        self.by_place[place] = pfn
        self.refs[pfn] = self.refs.get(pfn, 0) + 1

    def unref(self, place: Hashable) -> None:
        pfn = self.by_place.pop(place, None)
        if pfn is not None:
            n = self.refs[pfn] - 1
            if n:
                self.refs[pfn] = n
            else:
                del self.refs[pfn]

    def count(self, pfn: int) -> int:
        return self.refs.get(pfn, 0)


# -- invariants, in the order a frame's violations are reported -------------------------------------------------
@register
class SpteInvariants(Invariant):
    name = "spte-invariants"
    description = ("A present leaf SPTE replaced by a present leaf with another pfn (handle_changed_spte BUG); a "
                   "written SPTE that is #VE-possible (is_ept_ve_possible, MMIO SPTEs excepted); W without "
                   "MMU-writable or MMU-writable without Host-writable (check_spte_writable_invariants).")
    tags = frozenset({PTE})

    def writes(self, world: World, writes: list[Write], out: list[Violation]) -> None:
        for key, old, new in writes:
            w = _kvm_spte(world, key, old, new) if key.__class__ is tuple else None
            if w is None:
                continue
            new = w.new
            if not is_shadow_present_pte(new):
                if not is_mmio_spte(new) and is_ept_ve_possible(new):
                    out.append(Violation(self.name, f"#VE-possible SPTE {new:#x} written at "
                                                    f"{w.table:#x}[{w.index}]"))
                continue
            level, _gfn, leaf, where = _present_leaf_at(w, self.kvm.gfn_direct_bits)
            if is_ept_ve_possible(new):
                out.append(Violation(self.name, f"#VE-possible SPTE {new:#x}: {where}"))
            if not leaf:
                continue
            old, pfn = w.old, spte_to_pfn(new)
            if is_shadow_present_pte(old) and is_last_spte(old, level) and spte_to_pfn(old) != pfn:
                out.append(Violation(self.name, f"present leaf replaced by another pfn {spte_to_pfn(old):#x} -> "
                                                f"{pfn:#x}: {where}"))
            if new & PT_WRITABLE_MASK and not new & EPT_SPTE_MMU_WRITABLE:
                out.append(Violation(self.name, f"writable without MMU-writable: {where}"))
            if new & EPT_SPTE_MMU_WRITABLE and not new & EPT_SPTE_HOST_WRITABLE:
                out.append(Violation(self.name, f"MMU-writable without Host-writable: {where}"))


@register
class SpteOutsideMemslot(Invariant):
    name = "spte-outside-memslot"
    description = ("A present leaf SPTE (any root) maps a gfn range not wholly inside one memslot of the published "
                   "array (KVM_MEMSLOT_INVALID slots still count: their SPTEs are zapped before the slot goes). "
                   "Checked when a leaf is written and when the memslots change. Kernel: kvm_invalidate_memslot "
                   "waits for SRCU readers (in-flight faults) before kvm_arch_flush_shadow_memslot; "
                   "kvm_mmu_faultin_pfn retries on an invalid slot (commit e0c378684b65).")
    tags = frozenset({PTE, K_MEMSLOTS[0]})

    def __init__(self, kvm: Any) -> None:
        super().__init__(kvm)
        # Where the present SPTEs of KVM page tables are: (table, index), in the order they became present.
        self.present: dict[tuple[int, int], None] = {}
        self._world = kvm.world

    def seed(self, key: tuple, value: Any) -> None:
        if (key[0] == PTE and is_shadow_present_pte(value)
                and self._world.peek(sp_key(key[1])) is not None):
            self.present[(key[1], key[2])] = None

    def writes(self, world: World, writes: list[Write], out: list[Violation]) -> None:
        slots_changed = False
        for key, old, new in writes:
            if key.__class__ is not tuple:
                continue
            if key == K_MEMSLOTS:
                slots_changed = True
                continue
            if key[0] != PTE:
                continue
            self.present.pop((key[1], key[2]), None)
            w = _kvm_spte(world, key, old, new)
            if w is None or not is_shadow_present_pte(w.new):
                continue
            self.present[(w.table, w.index)] = None
            level, gfn, leaf, where = _present_leaf_at(w, self.kvm.gfn_direct_bits)
            if leaf:
                self._in_memslots(world, gfn, level, where, out)
        if slots_changed:
            self._all_leaves_in_memslots(world, out)

    def _in_memslots(self, world: World, gfn: int, level: int, where: _SpteAt, out: list[Violation]) -> None:
        end = gfn + kvm_pages_per_hpage(level)
        for slot in world.peek(K_MEMSLOTS, ()):
            if slot.base_gfn <= gfn and end <= slot.base_gfn + slot.npages:
                return
        out.append(Violation(self.name, f"{where} maps gfns [{gfn:#x}, {end:#x}) outside every memslot"))

    def _all_leaves_in_memslots(self, world: World, out: list[Violation]) -> None:
        """The memslots changed: every present leaf must still lie in one."""
        peek = world.peek
        for table, index in list(self.present):
            sp = peek(sp_key(table))
            if sp is None:
                continue
            v = peek(pte_key(table, index))
            level = sp.role.level
            if v is None or not is_shadow_present_pte(v) or not is_last_spte(v, level):
                continue
            gfn = (sp.gfn + index * kvm_pages_per_hpage(level)) & ~self.kvm.gfn_direct_bits
            self._in_memslots(world, gfn, level, _SpteAt(sp.kind, gfn, level, table, index), out)


@register
class MirrorPresentWithoutSept(Invariant):
    name = "mirror-present-without-sept"
    description = ("A mirror SPTE became present but the S-EPT (TDX module) does not agree: a leaf needs a PENDING "
                   "or MAPPED S-EPT leaf (BLOCKED / PENDING_BLOCKED only while someone holds mmu_lock for write) "
                   "at gpa = gfn << 12, TDX level = KVM level - 1, same pfn; a non-leaf needs an NL_MAPPED entry "
                   "whose page is the child SP's external_spt. Kernel: set_external_spte_present (freeze, hook, "
                   "then publish).")
    tags = frozenset({PTE})

    def writes(self, world: World, writes: list[Write], out: list[Violation]) -> None:
        for key, old, new in writes:
            w = _kvm_spte(world, key, old, new) if key.__class__ is tuple else None
            if w is None or not w.sp.role.is_mirror or not is_shadow_present_pte(w.new):
                continue
            self._check(world, w, out)

    def _check(self, world: World, w: _KvmSpte, out: list[Violation]) -> None:
        level, gfn, leaf, where = _present_leaf_at(w, self.kvm.gfn_direct_bits)
        new = w.new
        tdr = self.kvm.tdr
        cfg = world.peek(td_key(tdr))
        if cfg is None:
            out.append(Violation(self.name, f"{where} present but the TD does not exist"))
            return
        tdx_level = level - 1
        reached, _table, _idx, entry = walk_sept(world.peek, cfg, gfn << 12, tdx_level)
        state = entry.state
        if (_premaps(self.kvm) and leaf and state is SeptState.FREE
                and world.peek(K_TD_STATE) is not TdState.TD_STATE_RUNNABLE):
            # v6.16: before finalize a mirror leaf is premapped (tdx_mem_page_record_premap_cnt): the page reaches
            # the S-EPT only with the TDH.MEM.PAGE.ADD that KVM_TDX_INIT_MEM_REGION issues right after. Newer
            # trees PAGE.ADD while the leaf is frozen, so there a FREE entry is a violation like any other.
            return
        if reached != tdx_level:
            out.append(Violation(self.name, f"{where} present but the S-EPT walk stops at level {reached} "
                                            f"({state.name})"))
            return
        if leaf:
            ok = state in _LEAF_OK or (state in _LEAF_OK_BLOCKED
                                       and world.peek(K_MMU_LOCK, FREE_MMU_LOCK).writer is not None)
            if not ok:
                out.append(Violation(self.name, f"{where} present but the S-EPT entry is {state.name}"))
            elif entry.pfn != spte_to_pfn(new):
                out.append(Violation(self.name, f"{where} maps pfn {spte_to_pfn(new):#x} but the S-EPT maps "
                                                f"{entry.pfn:#x}"))
            return
        child = world.peek(sp_key(spte_to_pfn(new)))
        if state is not SeptState.NL_MAPPED:
            out.append(Violation(self.name, f"{where} present non-leaf but the S-EPT entry is {state.name}"))
        elif child is None or not child.external_spt or entry.pfn != child.external_spt:
            ext = child.external_spt if child is not None else 0
            out.append(Violation(self.name, f"{where} points to a child whose external_spt is {ext:#x} but the "
                                            f"S-EPT table is {entry.pfn:#x}"))


@register
class FrozenSpteLeaked(Invariant):
    name = "frozen-spte-leaked"
    description = ("A task that froze an SPTE (SpteChange.freezes: FROZEN_SPTE written over another value, "
                   "whatever the write's SpteWrite label) reached its next RET_PF, mmu_lock release or end without "
                   "writing it back (UNFREEZE/RESTORE or any non-FROZEN value). "
                   "Children of a table handed to handle_removed_pt stay FROZEN until RCU frees the table, by "
                   "design, and are excluded. Kernel: the tdp_mmu.c freeze protocol (FROZEN_SPTE).")
    tags = frozenset({PTE, KVM_SP})
    kinds = frozenset({*_SPTE_STEPS, EngineStep.SP_FREE, EngineStep.RET_PF, EngineStep.LOCK, *_TASK_END})

    def __init__(self, kvm: Any) -> None:
        super().__init__(kvm)
        # Freezes per task: task -> {(table, index)}.
        self.frozen: dict[str, set[tuple[int, int]]] = {}

    def writes(self, world: World, writes: list[Write], out: list[Violation]) -> None:
        for key, old, new in writes:
            if key.__class__ is not tuple:
                continue
            if key[0] == KVM_SP:
                if new is MISSING:
                    self._table_gone(key[1])
                continue
            w = _kvm_spte(world, key, old, new)
            if w is not None and w.new != FROZEN_SPTE:
                pos = (w.table, w.index)
                for frozen in self.frozen.values():
                    frozen.discard(pos)

    def step(self, world: World, task: str, step: Step, out: list[Violation]) -> None:
        kind = step.kind
        if kind in _SPTE_STEPS:
            c = step.payload
            # By value, not by label: a variant's freeze labelled otherwise is still one.
            if isinstance(c, SpteChange) and c.freezes:
                self.frozen.setdefault(task, set()).add((c.table, c.index))
        elif kind is EngineStep.SP_FREE:
            table = step.payload.get("table")
            if table is not None:
                self._table_gone(table)  # its children stay FROZEN until RCU frees it, by design
        elif kind is EngineStep.RET_PF:
            self._leave_critical(task, "RET_PF", out)
        elif kind is EngineStep.LOCK:
            p = step.payload
            if getattr(p, "lock", None) == "mmu_lock" and getattr(p, "action", None) == "release":
                self._leave_critical(task, "mmu_lock release", out)
        elif kind in _TASK_END:
            self._leave_critical(task, "task end", out)

    def _table_gone(self, table: int) -> None:
        for frozen in self.frozen.values():
            if frozen:
                for pos in [p for p in frozen if p[0] == table]:
                    frozen.discard(pos)

    def _leave_critical(self, task: str, where: str, out: list[Violation]) -> None:
        frozen = self.frozen.get(task)
        if not frozen:
            return
        for table, index in sorted(frozen):
            out.append(Violation(self.name, f"SPTE {table:#x}[{index}] frozen by {task} still FROZEN at its "
                                            f"{where}"))
        frozen.clear()


@register
class MirrorZapWithoutWriteLock(Invariant):
    name = "mirror-zap-without-write-lock"
    description = ("remove_external_spte (HOOK), TDH.MEM.RANGE.BLOCK / PAGE.REMOVE issued by KVM, or "
                   "handle_removed_pt of a mirror SP (its freeze of a present child, its SP_FREE, or a "
                   "handle_changed_spte with shared=true that removes a mirror table) while the task does not "
                   "hold mmu_lock for write. Kernel: remove_external_spte lockdep assert, handle_removed_pt "
                   "KVM_BUG_ON(shared).")
    kinds = frozenset({*_SPTE_STEPS, EngineStep.HOOK, EngineStep.HANDLE_CHANGED, EngineStep.SP_FREE,
                       TdxStep.SEAMCALL})

    def __init__(self, kvm: Any) -> None:
        super().__init__(kvm)
        # The last SpteChange per task (for the handle_changed_spte that follows it).
        self.last_change: dict[str, SpteChange] = {}

    def step(self, world: World, task: str, step: Step, out: list[Violation]) -> None:
        kind = step.kind
        if kind in _SPTE_STEPS:
            c = step.payload
            if not isinstance(c, SpteChange):
                return
            self.last_change[task] = c
            if (c.ok and kind is EngineStep.SPTE_WRITE and c.root == "mirror" and is_shadow_present_pte(c.old)
                    and not is_shadow_present_pte(c.new) and c.new == FROZEN_SPTE and not _writer(world, task)):
                out.append(Violation(self.name, f"present mirror SPTE gfn {c.gfn:#x} level {c.level} frozen for "
                                                f"removal without mmu_lock write"))
        elif kind is EngineStep.HOOK:
            if step.get("name") == "remove_external_spte" and not _writer(world, task):
                out.append(Violation(self.name, f"remove_external_spte(gfn {step.get('gfn', 0):#x}, level "
                                                f"{step.get('level')}) without mmu_lock held for write"))
        elif kind is EngineStep.HANDLE_CHANGED:
            self._handle_changed(world, task, step.payload, out)
        elif kind is EngineStep.SP_FREE:
            p = step.payload
            if p.get("kind") == "mirror" and not _writer(world, task):
                out.append(Violation(self.name, f"handle_removed_pt freed mirror table {p.get('table'):#x} "
                                                f"without mmu_lock write"))
        elif kind is TdxStep.SEAMCALL:
            leaf = step.get("leaf")
            if (leaf in (Seamcall.TDH_MEM_RANGE_BLOCK, Seamcall.TDH_MEM_PAGE_REMOVE) and _from_kvm(world.call_stack())
                    and not _writer(world, task)):
                out.append(Violation(self.name, f"{leaf.dotted}({step.payload.rcx & _GPA_MASK:#x}) issued "
                                                f"without mmu_lock write"))

    def _handle_changed(self, world: World, task: str, p: Any, out: list[Violation]) -> None:
        last = self.last_change.get(task)
        if last is None or last.root != "mirror":
            return
        gfn, level, old, new = p.get("gfn"), p.get("level"), p.get("old"), p.get("new")
        if last.gfn != gfn or last.level != level:
            return
        removes_table = (is_shadow_present_pte(old) and not is_last_spte(old, level)
                         and (not is_shadow_present_pte(new) or is_last_spte(new, level)
                              or spte_to_pfn(old) != spte_to_pfn(new)))
        if removes_table and (p.get("shared") or not _writer(world, task)):
            out.append(Violation(self.name, f"mirror table under gfn {gfn:#x} level {level} removed with "
                                            f"shared={p.get('shared')} (needs mmu_lock write)"))


@register
class AtomicMirrorZap(Invariant):
    name = "atomic-mirror-zap"
    description = ("A mirror SPTE went from present to non-present (FROZEN included) through a cmpxchg, i.e. the "
                   "atomic path. Kernel: __tdp_mmu_set_spte_atomic \"Users of atomic zapping don't operate on "
                   "mirror roots\".")
    kinds = frozenset({EngineStep.SPTE_CMPXCHG})

    def step(self, world: World, task: str, step: Step, out: list[Violation]) -> None:
        c = step.payload
        if (step.kind is EngineStep.SPTE_CMPXCHG and isinstance(c, SpteChange) and c.ok and c.root == "mirror"
                and is_shadow_present_pte(c.old) and not is_shadow_present_pte(c.new)):
            out.append(Violation(self.name, f"mirror SPTE gfn {c.gfn:#x} level {c.level} zapped by cmpxchg "
                                            f"({c.old:#x} -> {c.new:#x})"))


class _KvmSeamcalls(Invariant):
    """Base of the invariants that follow the SEAMCALLs KVM issues: the entry step of each task's SEAMCALL in
    flight (raw SEAMCALLs of host scenario ops and TDH.VP.ENTER are not followed)."""

    kinds = frozenset({*_SEAMCALL_STEPS, *_TASK_END})

    def __init__(self, kvm: Any) -> None:
        super().__init__(kvm)
        self.inflight: dict[str, Any] = {}

    def step(self, world: World, task: str, step: Step, out: list[Violation]) -> None:
        kind = step.kind
        if kind is TdxStep.SEAMCALL:
            leaf = step.get("leaf")
            if leaf is Seamcall.TDH_VP_ENTER or not _from_kvm(world.call_stack()):
                self.inflight.pop(task, None)
                return
            self.inflight[task] = step.payload
            self.issued(world, task, leaf, step.payload, out)
        elif kind is TdxStep.SEAMCALL_RETURN:
            entry = self.inflight.pop(task, None)
            leaf = step.get("leaf")
            if entry is not None and leaf is not Seamcall.TDH_VP_ENTER:
                self.returned(world, task, leaf, step.get("rax"), entry, out)
        elif kind in _TASK_END:
            self.inflight.pop(task, None)
            self.task_end(task)

    def issued(self, world: World, task: str, leaf: Seamcall, p: Any, out: list[Violation]) -> None:
        """KVM issued `leaf` with the registers `p`."""

    def returned(self, world: World, task: str, leaf: Seamcall, rax: int, entry: Any,
                 out: list[Violation]) -> None:
        """A SEAMCALL KVM issued (`entry`: its entry payload) returned `rax`."""

    def task_end(self, task: str) -> None:
        """`task` finished."""


@register
class SeptRemovalWithoutTrack(_KvmSeamcalls):
    name = "sept-removal-without-track"
    description = ("KVM issued TDH.MEM.PAGE.REMOVE for a gpa of a running TD whose RANGE.BLOCK was not followed by "
                   "a successful TDH.MEM.TRACK of that TD (or was never blocked). Kernel: "
                   "tdx_sept_remove_private_spte \"TDX requires TLB tracking before dropping private page\"; TDX "
                   "module: TDH.MEM.PAGE.REMOVE's TLB tracking check.")

    def __init__(self, kvm: Any) -> None:
        super().__init__(kvm)
        # (tdr, gpa) -> TRACK count at its BLOCK; tdr -> number of successful TRACKs.
        self.blocked: dict[tuple[int, int], int] = {}
        self.tracks: dict[int, int] = {}

    def issued(self, world: World, task: str, leaf: Seamcall, p: Any, out: list[Violation]) -> None:
        if leaf is not Seamcall.TDH_MEM_PAGE_REMOVE:
            return
        tdr = p.rdx >> 12
        op = world.peek(op_state_key(tdr))
        if op is None or not op.tlb_tracking_required:
            return
        gpa = p.rcx & _GPA_MASK
        at = self.blocked.get((tdr, gpa))
        if at is None:
            out.append(Violation(self.name, f"TDH.MEM.PAGE.REMOVE({gpa:#x}) without a preceding "
                                            f"TDH.MEM.RANGE.BLOCK"))
        elif self.tracks.get(tdr, 0) <= at:
            out.append(Violation(self.name, f"TDH.MEM.PAGE.REMOVE({gpa:#x}) without a successful TDH.MEM.TRACK "
                                            f"since its BLOCK"))

    def returned(self, world: World, task: str, leaf: Seamcall, rax: int, entry: Any,
                 out: list[Violation]) -> None:
        if is_error(rax):
            return
        if leaf is Seamcall.TDH_MEM_RANGE_BLOCK:
            self.blocked[(entry.rdx >> 12, entry.rcx & _GPA_MASK)] = self.tracks.get(entry.rdx >> 12, 0)
        elif leaf is Seamcall.TDH_MEM_TRACK:
            tdr = entry.rcx >> 12
            self.tracks[tdr] = self.tracks.get(tdr, 0) + 1
        elif leaf is Seamcall.TDH_MEM_PAGE_REMOVE:
            self.blocked.pop((entry.rdx >> 12, entry.rcx & _GPA_MASK), None)


@register
class UnexpectedTdxStatus(_KvmSeamcalls):
    name = "unexpected-tdx-status"
    description = ("A SEAMCALL issued by KVM (its stack passes through tdxdbg/engine/tdx.py or a variant) returned "
                   "an error KVM does not handle there: SEPT.ADD, PAGE.AUG, PAGE.ADD, MR.FINALIZE may be BUSY; "
                   "RANGE.BLOCK, PAGE.REMOVE, TRACK may be BUSY once (the no-vCPUs retry must succeed); "
                   "RANGE.BLOCK may be EPT_ENTRY_STATE_INCORRECT|RCX on a not-yet-runnable TD (premapped page); "
                   "VP.FLUSH may be VCPU_NOT_ASSOCIATED; CACHE.WB may be INTERRUPTED_RESUMABLE. Raw SEAMCALLs of "
                   "host scenario ops are results, not violations. Kernel: arch/x86/kvm/vmx/tdx.c error handling.")

    def __init__(self, kvm: Any) -> None:
        super().__init__(kvm)
        # The leaf that was BUSY once per task, whose retry must succeed.
        self.busy_once: dict[str, Seamcall] = {}

    def returned(self, world: World, task: str, leaf: Seamcall, rax: int, entry: Any,
                 out: list[Violation]) -> None:
        retried = self.busy_once.pop(task, None) is leaf
        if not is_error(rax):
            return
        why = self._unexpected(world, leaf, rax, retried, entry)
        if why is None:
            if leaf in _RETRY_ONCE and status_base(rax) == _BUSY:
                self.busy_once[task] = leaf
        else:
            out.append(Violation(self.name, f"{leaf.dotted} = {describe(rax)}: {why}"))

    def task_end(self, task: str) -> None:
        self.busy_once.pop(task, None)

    def _unexpected(self, world: World, leaf: Seamcall, rax: int, retried: bool, entry: Any) -> str | None:
        """None when KVM handles this error at this call site, else why it does not."""
        base = status_base(rax)
        if leaf in _BUSY_HANDLED and base == _BUSY:
            return None
        if leaf in _RETRY_ONCE and base == _BUSY:
            return "BUSY again on the retry with vCPUs kept out" if retried else None
        if (_premaps(self.kvm) and leaf is Seamcall.TDH_MEM_RANGE_BLOCK
                and rax == TdxStatus.TDX_EPT_ENTRY_STATE_INCORRECT | OperandId.RCX):
            op = world.peek(op_state_key(entry.rdx >> 12))
            if op is not None and not op.tlb_tracking_required:
                return None  # a premapped page that never got PAGE.ADD
        if leaf is Seamcall.TDH_VP_FLUSH and base == TdxStatus.TDX_VCPU_NOT_ASSOCIATED:
            return None
        if leaf is Seamcall.TDH_PHYMEM_CACHE_WB and base == TdxStatus.TDX_INTERRUPTED_RESUMABLE:
            return None
        return "not handled by KVM at this call site"


@register
class KvmBug(Invariant):
    name = "kvm-bug"
    description = ("A KVM_BUG step: KVM_BUG_ON fired and the VM is dead. (kvm_vm_dead for guest misbehaviour, "
                   "payload bug=False, is not a KVM bug and is not reported.)")
    kinds = frozenset({EngineStep.KVM_BUG})

    def step(self, world: World, task: str, step: Step, out: list[Violation]) -> None:
        if step.kind is EngineStep.KVM_BUG and step.payload.get("bug", True):
            out.append(Violation(self.name, f"KVM_BUG_ON: {step.payload.get('message', '')}"))


@register
class AliasMappedTwice(Invariant):
    name = "alias-mapped-twice"
    description = ("A gfn has a present leaf in the (valid) mirror root and in the (valid) direct root at once: "
                   "private and shared alias both mapped. KVM keeps the two exclusive through memory attributes "
                   "(kvm_mem_is_private).")
    tags = frozenset({PTE})

    def writes(self, world: World, writes: list[Write], out: list[Violation]) -> None:
        for key, old, new in writes:
            w = _kvm_spte(world, key, old, new) if key.__class__ is tuple else None
            if w is None or w.sp.role.invalid or not is_shadow_present_pte(w.new):
                continue
            _level, gfn, leaf, where = _present_leaf_at(w, self.kvm.gfn_direct_bits)
            if leaf:
                self._alias(world, gfn, "direct" if w.sp.role.is_mirror else "mirror", where, out)

    def _alias(self, world: World, gfn: int, other: str, where: _SpteAt, out: list[Violation]) -> None:
        peek = world.peek
        for root in peek(K_ROOTS, ()):
            sp = peek(sp_key(root))
            if sp is None or sp.role.invalid or sp.kind != other:
                continue
            v = self._lookup(world, root, gfn)
            if v is not None:
                out.append(Violation(self.name, f"{where} present while the {other} root maps gfn {gfn:#x} to pfn "
                                                f"{spte_to_pfn(v):#x}"))
                return

    def _lookup(self, world: World, root: int, gfn: int) -> int | None:
        """The present leaf SPTE mapping gfn under `root`, or None."""
        peek = world.peek
        sp = peek(sp_key(root))
        if sp is None:
            return None
        index_gfn = gfn if sp.role.is_mirror else gfn | self.kvm.gfn_direct_bits
        level, _table, _index, v = walk_spte(peek, root, sp.role.level, index_gfn)
        return v if is_shadow_present_pte(v) and is_last_spte(v, level) else None


@register
class PageFreedWhileMapped(Invariant):
    name = "page-freed-while-mapped"
    description = ("A host page was freed ((\"mem.owner\", pfn) deleted) while an S-EPT entry or a present SPTE "
                   "still points to it, or while its PAMT type is PT_REG or PT_EPT. TDX module: a page given to "
                   "the TD is not freed while mapped.")
    tags = frozenset({PTE, SEPT, MEM_OWNER})

    def __init__(self, kvm: Any) -> None:
        super().__init__(kvm)
        # Who maps each pfn: present SPTEs of KVM page tables by (table, index), non-FREE S-EPT entries by key.
        self.sptes = PfnRefs()
        self.sept_entries = PfnRefs()
        self._world = kvm.world

    def seed(self, key: tuple, value: Any) -> None:
        tag = key[0]
        if tag == PTE:
            if is_shadow_present_pte(value) and self._world.peek(sp_key(key[1])) is not None:
                self.sptes.ref((key[1], key[2]), spte_to_pfn(value))
        elif tag == SEPT and value.state is not SeptState.FREE:
            self.sept_entries.ref(key, value.pfn)

    def writes(self, world: World, writes: list[Write], out: list[Violation]) -> None:
        freed: list[int] = []
        for key, old, new in writes:
            if key.__class__ is not tuple:
                continue
            tag = key[0]
            if tag == PTE:
                self.sptes.unref((key[1], key[2]))
                w = _kvm_spte(world, key, old, new)
                if w is not None and is_shadow_present_pte(w.new):
                    self.sptes.ref((w.table, w.index), spte_to_pfn(w.new))
            elif tag == SEPT:
                self.sept_entries.unref(key)
                if new is not MISSING and new.state is not SeptState.FREE:
                    self.sept_entries.ref(key, new.pfn)
            elif tag == MEM_OWNER and new is MISSING:
                freed.append(key[1])
        for pfn in freed:
            self._freed(world, pfn, out)

    def _freed(self, world: World, pfn: int, out: list[Violation]) -> None:
        pamt = world.peek(pamt_key(pfn))
        if pamt is not None and pamt.page_type in (PageType.PT_REG, PageType.PT_EPT):
            out.append(Violation(self.name, f"pfn {pfn:#x} freed while its PAMT type is {pamt.page_type.name} "
                                            f"(owner {pamt.owner:#x})"))
        n = self.sept_entries.count(pfn)
        # After KEY.FREEID the S-EPT tree is dead (RECLAIM leaves its entries behind): only PAMT counts then.
        if n and world.peek(lifecycle_key(self.kvm.tdr)) is not Lifecycle.TD_TEARDOWN:
            out.append(Violation(self.name, f"pfn {pfn:#x} freed while {n} S-EPT entr"
                                            f"{'y maps' if n == 1 else 'ies map'} it"))
        n = self.sptes.count(pfn)
        if n:
            out.append(Violation(self.name, f"pfn {pfn:#x} freed while {n} present SPTE"
                                            f"{' maps' if n == 1 else 's map'} it"))


@register
class ChldcntMismatch(Invariant):
    name = "chldcnt-mismatch"
    description = ("On a frame that changes a TD's CHLDCNT or PAMT entries, CHLDCNT differs from the number of 4K "
                   "pages whose PAMT owner is that TD (the TDR itself excluded). TDX module: TDR.CHLDCNT counts "
                   "the TD's private and control pages.")
    tags = frozenset({PAMT, CHLDCNT})

    def __init__(self, kvm: Any) -> None:
        super().__init__(kvm)
        # tdr -> number of PAMT entries owned by it (TDR excluded).
        self.owned: dict[int, int] = {}

    def seed(self, key: tuple, value: Any) -> None:
        if key[0] == PAMT and value.page_type is not PageType.PT_NDA and value.owner != key[1]:
            self.owned[value.owner] = self.owned.get(value.owner, 0) + 1

    def writes(self, world: World, writes: list[Write], out: list[Violation]) -> None:
        pamt_tds: set[int] = set()
        chld_tds: set[int] = set()
        owned = self.owned
        for key, old, new in writes:
            if key.__class__ is not tuple:
                continue
            tag = key[0]
            if tag == PAMT:
                pfn = key[1]
                if old is not MISSING and old.page_type is not PageType.PT_NDA and old.owner != pfn:
                    owned[old.owner] = owned.get(old.owner, 0) - 1
                    pamt_tds.add(old.owner)
                if new is not MISSING and new.page_type is not PageType.PT_NDA and new.owner != pfn:
                    owned[new.owner] = owned.get(new.owner, 0) + 1
                    pamt_tds.add(new.owner)
            elif tag == CHLDCNT:
                chld_tds.add(key[1])
        for tdr in pamt_tds | chld_tds:
            cnt = world.peek(chldcnt_key(tdr))
            if cnt is None:
                continue
            n = owned.get(tdr, 0)
            if cnt != n:
                out.append(Violation(self.name, f"TD {tdr:#x}: CHLDCNT {cnt} but {n} pages owned in the PAMT"))


# The built-in invariant names, in report order (stable: scenario files use them as `violation = "name"`).
INVARIANTS = (*REGISTRY, CHECKER_ERROR)


def make_checks(kvm: Any, prefilter: bool = True) -> list[Checker]:
    """The invariant checks for the VM `kvm` (an engine variant instance), ready for Runtime(checks=...): every
    registered invariant. `prefilter=False` hands every invariant every frame (the reference for tests)."""
    return [Checker(kvm, prefilter=prefilter)]
