"""Invariant checks run after every frame: each broken invariant becomes a Violation (a red frame), never an
exception.

`make_checks(kvm)` returns the checks for one VM. They are incremental: a frame is judged from its step, its
effects ((key, old, new) World writes) and the few World entries those touch, plus running indexes the checker
keeps (reverse maps of what maps each page, per-TD PAMT counts, freezes per task, BLOCK/TRACK per TD). Those
indexes are seeded by one scan of the World when the checks are made, so make fresh checks for a fresh run (a
replay builds a new World anyway). A bug inside a check becomes a Violation named "checker-error".

Invariant names (stable: scenario files use them as `violation = "name"`):

  mirror-present-without-sept   A mirror SPTE became present but the S-EPT (TDX module) does not agree: a leaf
                                needs a PENDING or MAPPED S-EPT leaf (BLOCKED / PENDING_BLOCKED only while
                                someone holds mmu_lock for write) at gpa = gfn << 12, TDX level = KVM level - 1,
                                same pfn; a non-leaf needs an NL_MAPPED entry whose page is the child SP's
                                external_spt. Kernel: set_external_spte_present (freeze, hook, then publish);
                                reference kernel-tdp-mmu.md I8, I9; DESIGN "Checks".
  frozen-spte-leaked            A task that froze an SPTE (SpteChange.freezes: FROZEN_SPTE written over another
                                value, whatever the write's SpteWrite label) reached its next RET_PF,
                                mmu_lock release or end without writing it back (UNFREEZE/RESTORE or any
                                non-FROZEN value). Children of a table handed to handle_removed_pt stay FROZEN
                                until RCU frees the table, by design, and are excluded. Kernel: tdp_mmu.c freeze
                                protocol (§4.1, §4.4); DESIGN "no frozen SPTE outlives its critical section".
  mirror-zap-without-write-lock remove_external_spte (HOOK), TDH.MEM.RANGE.BLOCK / PAGE.REMOVE issued by KVM,
                                or handle_removed_pt of a mirror SP (its freeze of a present child, its SP_FREE,
                                or a handle_changed_spte with shared=true that removes a mirror table) while the
                                task does not hold mmu_lock for write. Kernel: remove_external_spte lockdep
                                assert, handle_removed_pt KVM_BUG_ON(shared) (I11, I12).
  atomic-mirror-zap             A mirror SPTE went from present to non-present (FROZEN included) through a
                                cmpxchg, i.e. the atomic path. Kernel: __tdp_mmu_set_spte_atomic "Users of atomic
                                zapping don't operate on mirror roots" (I6).
  sept-removal-without-track    KVM issued TDH.MEM.PAGE.REMOVE for a gpa of a running TD whose RANGE.BLOCK was not
                                followed by a successful TDH.MEM.TRACK of that TD (or was never blocked). Kernel:
                                tdx_sept_remove_private_spte "TDX requires TLB tracking before dropping private
                                page" (I28); TDX module I4.
  unexpected-tdx-status         A SEAMCALL issued by KVM (its stack passes through tdxdbg/engine/tdx.py or a
                                variant) returned an error KVM does not handle there: SEPT.ADD, PAGE.AUG, PAGE.ADD,
                                MR.FINALIZE may be BUSY; RANGE.BLOCK, PAGE.REMOVE, TRACK may be BUSY once (the
                                no-vCPUs retry must succeed); RANGE.BLOCK may be EPT_ENTRY_STATE_INCORRECT|RCX on a
                                not-yet-runnable TD (premapped page); VP.FLUSH may be VCPU_NOT_ASSOCIATED;
                                CACHE.WB may be INTERRUPTED_RESUMABLE. Raw SEAMCALLs of host scenario ops are
                                results, not violations. Kernel: tdx.c error handling (§5.2, §5.3).
  kvm-bug                       A KVM_BUG step: KVM_BUG_ON fired and the VM is dead. (kvm_vm_dead for guest
                                misbehaviour, payload bug=False, is not a KVM bug and is not reported.)
  alias-mapped-twice            A gfn has a present leaf in the (valid) mirror root and in the (valid) direct
                                root at once: private and shared alias both mapped. DESIGN "Checks"; KVM keeps
                                the two exclusive through memory attributes (§6.2).
  page-freed-while-mapped       A host page was freed (("mem.owner", pfn) deleted) while an S-EPT entry or a
                                present SPTE still points to it, or while its PAMT type is PT_REG or PT_EPT.
                                TDX module I9; DESIGN "a page given to the TD is not freed while mapped".
  chldcnt-mismatch              On a frame that changes a TD's CHLDCNT or PAMT entries, CHLDCNT differs from the
                                number of 4K pages whose PAMT owner is that TD (the TDR itself excluded).
                                TDX module I16.
  spte-invariants               A present leaf SPTE replaced by a present leaf with another pfn (handle_changed_spte
                                BUG, I1); a written SPTE that is #VE-possible (is_ept_ve_possible, MMIO SPTEs
                                excepted, I19/I20); W without MMU-writable or MMU-writable without Host-writable
                                (check_spte_writable_invariants, I21).
  spte-outside-memslot          A present leaf SPTE (any root) maps a gfn range not wholly inside one memslot of the
                                published array (KVM_MEMSLOT_INVALID slots still count: their SPTEs are zapped
                                before the slot goes). Checked when a leaf is written and when the memslots
                                change. Kernel: kvm_invalidate_memslot waits for SRCU readers (in-flight faults)
                                before kvm_arch_flush_shadow_memslot; kvm_mmu_faultin_pfn retries on an invalid
                                slot (commit e0c378684b65).
  checker-error                 A check itself raised: reported, never a traceback.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import Any, NamedTuple

from tdxdbg.engine.gmem import K_MEMSLOTS
from tdxdbg.engine.kvm import FREE_MMU_LOCK, K_MMU_LOCK, K_TD_STATE, TdState
from tdxdbg.engine.mmu_page import K_ROOTS, KvmMmuPage
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
    spte_index,
    spte_to_pfn,
)
from tdxdbg.engine.steps import EngineStep, SpteChange
from tdxdbg.hw.tdx.leaves import Seamcall
from tdxdbg.hw.tdx.module import walk_sept
from tdxdbg.hw.tdx.pamt import PageType
from tdxdbg.hw.tdx.seamcall import TdxStep
from tdxdbg.hw.tdx.sept import SeptState
from tdxdbg.hw.tdx.status import OperandId, TdxStatus, describe, is_error, status_base
from tdxdbg.hw.tdx.td import Lifecycle
from tdxdbg.runtime.frame import Violation
from tdxdbg.runtime.step import Step, StepKind
from tdxdbg.runtime.world import MISSING, World

Check = Callable[[World, Step, tuple, tuple], Iterable[Violation]]

MIRROR_PRESENT_WITHOUT_SEPT = "mirror-present-without-sept"
FROZEN_SPTE_LEAKED = "frozen-spte-leaked"
MIRROR_ZAP_WITHOUT_WRITE_LOCK = "mirror-zap-without-write-lock"
ATOMIC_MIRROR_ZAP = "atomic-mirror-zap"
SEPT_REMOVAL_WITHOUT_TRACK = "sept-removal-without-track"
UNEXPECTED_TDX_STATUS = "unexpected-tdx-status"
KVM_BUG = "kvm-bug"
ALIAS_MAPPED_TWICE = "alias-mapped-twice"
PAGE_FREED_WHILE_MAPPED = "page-freed-while-mapped"
CHLDCNT_MISMATCH = "chldcnt-mismatch"
SPTE_INVARIANTS = "spte-invariants"
SPTE_OUTSIDE_MEMSLOT = "spte-outside-memslot"
CHECKER_ERROR = "checker-error"

INVARIANTS = (MIRROR_PRESENT_WITHOUT_SEPT, FROZEN_SPTE_LEAKED, MIRROR_ZAP_WITHOUT_WRITE_LOCK, ATOMIC_MIRROR_ZAP,
              SEPT_REMOVAL_WITHOUT_TRACK, UNEXPECTED_TDX_STATUS, KVM_BUG, ALIAS_MAPPED_TWICE,
              PAGE_FREED_WHILE_MAPPED, CHLDCNT_MISMATCH, SPTE_INVARIANTS, SPTE_OUTSIDE_MEMSLOT, CHECKER_ERROR)

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


# World keys (their first element) `Checker._effects` looks at.
_EFFECT_TAGS = frozenset({"pte", "sept", "pamt", "tdx.chldcnt", "mem.owner", "kvm.sp", K_MEMSLOTS[0]})
# Step kinds `Checker._step` looks at.
_STEP_KINDS = frozenset({EngineStep.SPTE_CMPXCHG, EngineStep.SPTE_WRITE, TdxStep.SEAMCALL, TdxStep.SEAMCALL_RETURN,
                         EngineStep.HOOK, EngineStep.HANDLE_CHANGED, EngineStep.SP_FREE, EngineStep.RET_PF,
                         EngineStep.LOCK, EngineStep.KVM_BUG, StepKind.TASK_DONE, StepKind.TASK_ERROR})
# The same, by identity: an enum member hashes in Python, and this test runs after every frame. Members are
# singletons kept alive by _STEP_KINDS, so their ids are stable.
_STEP_KIND_IDS = frozenset(map(id, _STEP_KINDS))


def _from_kvm(stack: tuple) -> bool:
    """Whether a step's call stack passes through KVM's TDX glue (or a variant of it). No stack (a check called
    directly, e.g. by a test): assume KVM."""
    if not stack:
        return True
    for entry in stack:
        name = entry.filename.replace("\\", "/")
        if any(m in name for m in _ENGINE_MARKERS):
            return True
    return False


class _SpteAt(NamedTuple):
    """Where an SPTE is, for violation messages: formatted only when a message is built (this is per write)."""

    kind: str
    gfn: int
    level: int
    table: int
    index: int

    def __str__(self) -> str:
        return f"{self.kind} SPTE gfn {self.gfn:#x} level {self.level} ({self.table:#x}[{self.index}])"


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


class Checker:
    """All invariants of one VM; call it as a check. State: the running indexes described in the module doc."""

    def __init__(self, kvm: Any) -> None:
        self.kvm = kvm
        self.tdr: int = kvm.tdr
        self.gfn_direct_bits: int = kvm.gfn_direct_bits
        # Eras whose KVM_TDX_INIT_MEM_REGION premaps (v6.16): a present mirror leaf may wait for its PAGE.ADD.
        self.premaps: bool = bool(getattr(kvm, "tdx_premaps_init_mem_region", False))
        # Who maps each pfn: present SPTEs of KVM page tables by (table, index), non-FREE S-EPT entries by key.
        self.sptes = PfnRefs()
        self.sept_entries = PfnRefs()
        # tdr -> number of PAMT entries owned by it (TDR excluded).
        self.owned: dict[int, int] = {}
        # Freezes per task: task -> {(table, index)}; tables handed to handle_removed_pt.
        self.frozen: dict[str, set[tuple[int, int]]] = {}
        # BLOCK/TRACK bookkeeping per TD: (tdr, gpa) -> TRACK count at BLOCK; tdr -> TRACK count.
        self.blocked: dict[tuple[int, int], int] = {}
        self.tracks: dict[int, int] = {}
        # SEAMCALL in flight per task (entry payload) and the no-vCPUs retry state per task.
        self.inflight: dict[str, Any] = {}
        self.busy_once: dict[str, Seamcall] = {}
        # The last SpteChange per task (for the handle_changed_spte that follows it).
        self.last_change: dict[str, SpteChange] = {}
        self._seed(kvm.world)

    # -- seeding (once) ----------------------------------------------------------------------------------------
    def _seed(self, world: World) -> None:
        for key, value in world.items():
            if type(key) is not tuple or not key:
                continue
            tag = key[0]
            if tag == "pte":
                if is_shadow_present_pte(value) and world.peek(("kvm.sp", key[1])) is not None:
                    self.sptes.ref((key[1], key[2]), spte_to_pfn(value))
            elif tag == "sept":
                if value.state is not SeptState.FREE:
                    self.sept_entries.ref(key, value.pfn)
            elif tag == "pamt" and value.page_type is not PageType.PT_NDA and value.owner != key[1]:
                self.owned[value.owner] = self.owned.get(value.owner, 0) + 1

    # -- the check ---------------------------------------------------------------------------------------------
    def __call__(self, world: World, step: Step, effects: tuple, reads: tuple) -> list[Violation] | tuple:
        interesting = id(step.kind) in _STEP_KIND_IDS
        if not effects and not interesting:
            return ()  # the common case: a frame that wrote nothing and whose step no check looks at
        out: list[Violation] = []
        if effects:
            try:
                self._effects(world, effects, out)
            except Exception as exc:  # a checker bug is a red frame, never a traceback
                out.append(Violation(CHECKER_ERROR, f"effects: {type(exc).__name__}: {exc}"))
        if interesting:
            try:
                self._step(world, step, out)
            except Exception as exc:
                out.append(Violation(CHECKER_ERROR, f"{getattr(step.kind, 'name', step.kind)}: "
                                                    f"{type(exc).__name__}: {exc}"))
        return out

    # -- effects -----------------------------------------------------------------------------------------------
    def _effects(self, world: World, effects: tuple, out: list[Violation]) -> None:
        peek = world.peek
        freed: list[int] = []
        pamt_tds: set[int] = set()
        chld_tds: set[int] = set()
        written: list[tuple[int, int, Any, Any]] = []
        slots_changed = False
        tags = _EFFECT_TAGS
        for key, old, new in effects:
            tag = key[0] if key.__class__ is tuple else None
            if tag not in tags:
                continue
            if tag == "pte":
                written.append((key[1], key[2], old, new))
            elif tag == "sept":
                self.sept_entries.unref(key)
                if new is not MISSING and new.state is not SeptState.FREE:
                    self.sept_entries.ref(key, new.pfn)
            elif tag == "pamt":
                pfn = key[1]
                if old is not MISSING and old.page_type is not PageType.PT_NDA and old.owner != pfn:
                    self.owned[old.owner] = self.owned.get(old.owner, 0) - 1
                    pamt_tds.add(old.owner)
                if new is not MISSING and new.page_type is not PageType.PT_NDA and new.owner != pfn:
                    self.owned[new.owner] = self.owned.get(new.owner, 0) + 1
                    pamt_tds.add(new.owner)
            elif tag == "tdx.chldcnt":
                chld_tds.add(key[1])
            elif tag == "mem.owner":
                if new is MISSING:
                    freed.append(key[1])
            elif tag == "kvm.sp" and new is MISSING:
                self._table_gone(key[1])
            elif tag == K_MEMSLOTS[0]:
                slots_changed = True
        for table, index, old, new in written:
            self._pte(world, table, index, old, new, out)
        if slots_changed:
            self._all_leaves_in_memslots(world, out)
        if not (pamt_tds or chld_tds or written or freed):
            return
        for tdr in pamt_tds | chld_tds:
            cnt = peek(("tdx.chldcnt", tdr))
            if cnt is None:
                continue
            owned = self.owned.get(tdr, 0)
            if cnt != owned:
                out.append(Violation(CHLDCNT_MISMATCH, f"TD {tdr:#x}: CHLDCNT {cnt} but {owned} pages owned "
                                                       f"in the PAMT"))
        for pfn in freed:
            self._freed(world, pfn, out)

    def _table_gone(self, table: int) -> None:
        for frozen in self.frozen.values():
            if frozen:
                for pos in [p for p in frozen if p[0] == table]:
                    frozen.discard(pos)

    def _pte(self, world: World, table: int, index: int, old: Any, new: Any, out: list[Violation]) -> None:
        pos = (table, index)
        self.sptes.unref(pos)
        sp: KvmMmuPage | None = world.peek(("kvm.sp", table))
        if sp is None:
            return  # not a KVM page table, or one being freed
        if old is MISSING or new is MISSING:
            fill = world.peek(("mem.fill", table), 0)
            if old is MISSING:
                old = fill
            if new is MISSING:
                new = fill
        if new != FROZEN_SPTE:
            for frozen in self.frozen.values():
                frozen.discard(pos)
        if not is_shadow_present_pte(new):
            if not is_mmio_spte(new) and is_ept_ve_possible(new):
                out.append(Violation(SPTE_INVARIANTS, f"#VE-possible SPTE {new:#x} written at {table:#x}[{index}]"))
            return
        pfn = spte_to_pfn(new)
        self.sptes.ref(pos, pfn)
        level = sp.role.level
        gfn = (sp.gfn + index * kvm_pages_per_hpage(level)) & ~self.gfn_direct_bits
        leaf = is_last_spte(new, level)
        where = _SpteAt(sp.kind, gfn, level, table, index)
        if is_ept_ve_possible(new):
            out.append(Violation(SPTE_INVARIANTS, f"#VE-possible SPTE {new:#x}: {where}"))
        if leaf:
            self._in_memslots(world, gfn, level, where, out)
            if is_shadow_present_pte(old) and is_last_spte(old, level) and spte_to_pfn(old) != pfn:
                out.append(Violation(SPTE_INVARIANTS, f"present leaf replaced by another pfn "
                                                      f"{spte_to_pfn(old):#x} -> {pfn:#x}: {where}"))
            if new & PT_WRITABLE_MASK and not new & EPT_SPTE_MMU_WRITABLE:
                out.append(Violation(SPTE_INVARIANTS, f"writable without MMU-writable: {where}"))
            if new & EPT_SPTE_MMU_WRITABLE and not new & EPT_SPTE_HOST_WRITABLE:
                out.append(Violation(SPTE_INVARIANTS, f"MMU-writable without Host-writable: {where}"))
        if sp.role.is_mirror:
            self._mirror_present(world, sp, gfn, level, new, leaf, where, out)
            if leaf and not sp.role.invalid:
                self._alias(world, gfn, "direct", where, out)
        elif leaf and not sp.role.invalid:
            self._alias(world, gfn, "mirror", where, out)

    @staticmethod
    def _in_memslots(world: World, gfn: int, level: int, where: _SpteAt, out: list[Violation]) -> None:
        end = gfn + kvm_pages_per_hpage(level)
        for slot in world.peek(K_MEMSLOTS, ()):
            if slot.base_gfn <= gfn and end <= slot.base_gfn + slot.npages:
                return
        out.append(Violation(SPTE_OUTSIDE_MEMSLOT, f"{where} maps gfns [{gfn:#x}, {end:#x}) outside every "
                                                   f"memslot"))

    def _all_leaves_in_memslots(self, world: World, out: list[Violation]) -> None:
        """The memslots changed: every present leaf must still lie in one."""
        peek = world.peek
        for table, index in list(self.sptes.by_place):
            sp = peek(("kvm.sp", table))
            if sp is None:
                continue
            v = peek(("pte", table, index))
            level = sp.role.level
            if v is None or not is_shadow_present_pte(v) or not is_last_spte(v, level):
                continue
            gfn = (sp.gfn + index * kvm_pages_per_hpage(level)) & ~self.gfn_direct_bits
            self._in_memslots(world, gfn, level, _SpteAt(sp.kind, gfn, level, table, index), out)

    def _mirror_present(self, world: World, sp: KvmMmuPage, gfn: int, level: int, new: int, leaf: bool,
                        where: _SpteAt, out: list[Violation]) -> None:
        cfg = world.peek(("tdx.td", self.tdr))
        if cfg is None:
            out.append(Violation(MIRROR_PRESENT_WITHOUT_SEPT, f"{where} present but the TD does not exist"))
            return
        tdx_level = level - 1
        reached, _table, _idx, entry = walk_sept(world.peek, cfg, gfn << 12, tdx_level)
        state = entry.state
        if (self.premaps and leaf and state is SeptState.FREE
                and world.peek(K_TD_STATE) is not TdState.TD_STATE_RUNNABLE):
            # v6.16: before finalize a mirror leaf is premapped (tdx_mem_page_record_premap_cnt): the page reaches
            # the S-EPT only with the TDH.MEM.PAGE.ADD that KVM_TDX_INIT_MEM_REGION issues right after. Newer
            # trees PAGE.ADD while the leaf is frozen, so there a FREE entry is a violation like any other.
            return
        if reached != tdx_level:
            out.append(Violation(MIRROR_PRESENT_WITHOUT_SEPT, f"{where} present but the S-EPT walk stops at "
                                                              f"level {reached} ({state.name})"))
            return
        if leaf:
            ok = state in _LEAF_OK or (state in _LEAF_OK_BLOCKED
                                       and world.peek(K_MMU_LOCK, FREE_MMU_LOCK).writer is not None)
            if not ok:
                out.append(Violation(MIRROR_PRESENT_WITHOUT_SEPT, f"{where} present but the S-EPT entry is "
                                                                  f"{state.name}"))
            elif entry.pfn != spte_to_pfn(new):
                out.append(Violation(MIRROR_PRESENT_WITHOUT_SEPT, f"{where} maps pfn {spte_to_pfn(new):#x} but "
                                                                  f"the S-EPT maps {entry.pfn:#x}"))
            return
        child = world.peek(("kvm.sp", spte_to_pfn(new)))
        if state is not SeptState.NL_MAPPED:
            out.append(Violation(MIRROR_PRESENT_WITHOUT_SEPT, f"{where} present non-leaf but the S-EPT entry is "
                                                              f"{state.name}"))
        elif child is None or not child.external_spt or entry.pfn != child.external_spt:
            ext = child.external_spt if child is not None else 0
            out.append(Violation(MIRROR_PRESENT_WITHOUT_SEPT, f"{where} points to a child whose external_spt is "
                                                              f"{ext:#x} but the S-EPT table is {entry.pfn:#x}"))

    def _lookup(self, world: World, root: int, gfn: int) -> int | None:
        """The present leaf SPTE mapping gfn under `root`, or None."""
        peek = world.peek
        sp = peek(("kvm.sp", root))
        if sp is None:
            return None
        level = sp.role.level
        addr = (gfn if sp.role.is_mirror else gfn | self.gfn_direct_bits) << 12
        table = root
        while level >= 1:
            idx = spte_index(addr, level)
            v = peek(("pte", table, idx))
            if v is None:
                v = peek(("mem.fill", table), 0)
            if not is_shadow_present_pte(v):
                return None
            if is_last_spte(v, level):
                return v
            table = spte_to_pfn(v)
            level -= 1
        return None

    def _alias(self, world: World, gfn: int, other: str, where: _SpteAt, out: list[Violation]) -> None:
        peek = world.peek
        for root in peek(K_ROOTS, ()):
            sp = peek(("kvm.sp", root))
            if sp is None or sp.role.invalid or sp.kind != other:
                continue
            v = self._lookup(world, root, gfn)
            if v is not None:
                out.append(Violation(ALIAS_MAPPED_TWICE, f"{where} present while the {other} root maps gfn "
                                                         f"{gfn:#x} to pfn {spte_to_pfn(v):#x}"))
                return

    def _freed(self, world: World, pfn: int, out: list[Violation]) -> None:
        pamt = world.peek(("pamt", pfn))
        if pamt is not None and pamt.page_type in (PageType.PT_REG, PageType.PT_EPT):
            out.append(Violation(PAGE_FREED_WHILE_MAPPED, f"pfn {pfn:#x} freed while its PAMT type is "
                                                          f"{pamt.page_type.name} (owner {pamt.owner:#x})"))
        n = self.sept_entries.count(pfn)
        # After KEY.FREEID the S-EPT tree is dead (RECLAIM leaves its entries behind): only PAMT counts then.
        if n and world.peek(("tdx.lifecycle", self.tdr)) is not Lifecycle.TD_TEARDOWN:
            out.append(Violation(PAGE_FREED_WHILE_MAPPED, f"pfn {pfn:#x} freed while {n} S-EPT entr"
                                                          f"{'y maps' if n == 1 else 'ies map'} it"))
        n = self.sptes.count(pfn)
        if n:
            out.append(Violation(PAGE_FREED_WHILE_MAPPED, f"pfn {pfn:#x} freed while {n} present SPTE"
                                                          f"{' maps' if n == 1 else 's map'} it"))

    # -- steps -------------------------------------------------------------------------------------------------
    def _step(self, world: World, step: Step, out: list[Violation]) -> None:
        kind = step.kind
        task = world.task
        if kind is EngineStep.SPTE_CMPXCHG or kind is EngineStep.SPTE_WRITE:
            self._spte_step(world, task, kind, step.payload, out)
        elif kind is TdxStep.SEAMCALL:
            self._seamcall(world, task, step, out)
        elif kind is TdxStep.SEAMCALL_RETURN:
            self._seamcall_return(world, task, step, out)
        elif kind is EngineStep.HOOK:
            if step.get("name") == "remove_external_spte" and not self._writer(world, task):
                out.append(Violation(MIRROR_ZAP_WITHOUT_WRITE_LOCK,
                                     f"remove_external_spte(gfn {step.get('gfn', 0):#x}, level {step.get('level')}) "
                                     "without mmu_lock held for write"))
        elif kind is EngineStep.HANDLE_CHANGED:
            self._handle_changed(world, task, step.payload, out)
        elif kind is EngineStep.SP_FREE:
            p = step.payload
            table = p.get("table")
            if p.get("kind") == "mirror" and not self._writer(world, task):
                out.append(Violation(MIRROR_ZAP_WITHOUT_WRITE_LOCK, f"handle_removed_pt freed mirror table "
                                                                    f"{table:#x} without mmu_lock write"))
            if table is not None:
                self._table_gone(table)  # its children stay FROZEN until RCU frees it, by design
        elif kind is EngineStep.RET_PF:
            self._leave_critical(task, "RET_PF", out)
        elif kind is EngineStep.LOCK:
            p = step.payload
            if getattr(p, "lock", None) == "mmu_lock" and getattr(p, "action", None) == "release":
                self._leave_critical(task, "mmu_lock release", out)
        elif kind is EngineStep.KVM_BUG:
            p = step.payload
            if p.get("bug", True):
                out.append(Violation(KVM_BUG, f"KVM_BUG_ON: {p.get('message', '')}"))
        elif kind is StepKind.TASK_DONE or kind is StepKind.TASK_ERROR:
            self._leave_critical(task, "task end", out)
            self.inflight.pop(task, None)
            self.busy_once.pop(task, None)

    @staticmethod
    def _writer(world: World, task: str) -> bool:
        return world.peek(K_MMU_LOCK, FREE_MMU_LOCK).writer == task

    def _spte_step(self, world: World, task: str, kind: Any, c: Any, out: list[Violation]) -> None:
        if not isinstance(c, SpteChange):
            return
        self.last_change[task] = c
        if not c.ok:
            return
        if c.freezes:   # by value, not by label: a variant's freeze labelled otherwise is still one
            self.frozen.setdefault(task, set()).add((c.table, c.index))
        if c.root == "mirror" and is_shadow_present_pte(c.old) and not is_shadow_present_pte(c.new):
            if kind is EngineStep.SPTE_CMPXCHG:
                out.append(Violation(ATOMIC_MIRROR_ZAP, f"mirror SPTE gfn {c.gfn:#x} level {c.level} zapped by "
                                                        f"cmpxchg ({c.old:#x} -> {c.new:#x})"))
            elif c.new == FROZEN_SPTE and not self._writer(world, task):
                out.append(Violation(MIRROR_ZAP_WITHOUT_WRITE_LOCK, f"present mirror SPTE gfn {c.gfn:#x} level "
                                                                    f"{c.level} frozen for removal without "
                                                                    f"mmu_lock write"))

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
        if removes_table and (p.get("shared") or not self._writer(world, task)):
            out.append(Violation(MIRROR_ZAP_WITHOUT_WRITE_LOCK, f"mirror table under gfn {gfn:#x} level {level} "
                                                                f"removed with shared={p.get('shared')} (needs "
                                                                f"mmu_lock write)"))

    def _leave_critical(self, task: str, where: str, out: list[Violation]) -> None:
        frozen = self.frozen.get(task)
        if not frozen:
            return
        for table, index in sorted(frozen):
            out.append(Violation(FROZEN_SPTE_LEAKED, f"SPTE {table:#x}[{index}] frozen by {task} still FROZEN at "
                                                     f"its {where}"))
        frozen.clear()

    def _seamcall(self, world: World, task: str, step: Step, out: list[Violation]) -> None:
        leaf = step.get("leaf")
        if leaf is Seamcall.TDH_VP_ENTER or not _from_kvm(world.stack):
            self.inflight.pop(task, None)
            return
        p = step.payload
        self.inflight[task] = p
        if leaf in (Seamcall.TDH_MEM_RANGE_BLOCK, Seamcall.TDH_MEM_PAGE_REMOVE) and not self._writer(world, task):
            out.append(Violation(MIRROR_ZAP_WITHOUT_WRITE_LOCK, f"{leaf.dotted}({p.rcx & _GPA_MASK:#x}) "
                                                                f"issued without mmu_lock write"))
        if leaf is Seamcall.TDH_MEM_PAGE_REMOVE:
            tdr = p.rdx >> 12
            op = world.peek(("tdx.op_state", tdr))
            if op is None or not op.tlb_tracking_required:
                return
            gpa = p.rcx & _GPA_MASK
            at = self.blocked.get((tdr, gpa))
            if at is None:
                out.append(Violation(SEPT_REMOVAL_WITHOUT_TRACK, f"TDH.MEM.PAGE.REMOVE({gpa:#x}) without a "
                                                                 f"preceding TDH.MEM.RANGE.BLOCK"))
            elif self.tracks.get(tdr, 0) <= at:
                out.append(Violation(SEPT_REMOVAL_WITHOUT_TRACK, f"TDH.MEM.PAGE.REMOVE({gpa:#x}) without a "
                                                                 f"successful TDH.MEM.TRACK since its BLOCK"))

    def _seamcall_return(self, world: World, task: str, step: Step, out: list[Violation]) -> None:
        entry = self.inflight.pop(task, None)
        leaf = step.get("leaf")
        if entry is None or leaf is Seamcall.TDH_VP_ENTER:
            return
        rax = step.get("rax")
        ok = not is_error(rax)
        if leaf is Seamcall.TDH_MEM_RANGE_BLOCK:
            if ok:
                self.blocked[(entry.rdx >> 12, entry.rcx & _GPA_MASK)] = self.tracks.get(entry.rdx >> 12, 0)
        elif leaf is Seamcall.TDH_MEM_TRACK:
            if ok:
                tdr = entry.rcx >> 12
                self.tracks[tdr] = self.tracks.get(tdr, 0) + 1
        elif leaf is Seamcall.TDH_MEM_PAGE_REMOVE and ok:
            self.blocked.pop((entry.rdx >> 12, entry.rcx & _GPA_MASK), None)
        retried = self.busy_once.pop(task, None) is leaf
        if not ok:
            why = self._unexpected(world, leaf, rax, retried, entry)
            if why is None:
                if leaf in _RETRY_ONCE and status_base(rax) == _BUSY:
                    self.busy_once[task] = leaf
            else:
                out.append(Violation(UNEXPECTED_TDX_STATUS, f"{leaf.dotted} = {describe(rax)}: {why}"))

    def _unexpected(self, world: World, leaf: Seamcall, rax: int, retried: bool, entry: Any) -> str | None:
        """None when KVM handles this error at this call site, else why it does not."""
        base = status_base(rax)
        if leaf in _BUSY_HANDLED and base == _BUSY:
            return None
        if leaf in _RETRY_ONCE and base == _BUSY:
            return "BUSY again on the retry with vCPUs kept out" if retried else None
        if (self.premaps and leaf is Seamcall.TDH_MEM_RANGE_BLOCK
                and rax == TdxStatus.TDX_EPT_ENTRY_STATE_INCORRECT | OperandId.RCX):
            op = world.peek(("tdx.op_state", entry.rdx >> 12))
            if op is not None and not op.tlb_tracking_required:
                return None  # a premapped page that never got PAGE.ADD
        if leaf is Seamcall.TDH_VP_FLUSH and base == TdxStatus.TDX_VCPU_NOT_ASSOCIATED:
            return None
        if leaf is Seamcall.TDH_PHYMEM_CACHE_WB and base == TdxStatus.TDX_INTERRUPTED_RESUMABLE:
            return None
        return "not handled by KVM at this call site"


def make_checks(kvm: Any) -> list[Check]:
    """The invariant checks for the VM `kvm` (an engine variant instance), ready for Runtime(checks=...)."""
    return [Checker(kvm)]
