"""Read-only views of the machine and KVM state at one position, built from `Timeline.state_at` (a dict the
timeline owns: read, never mutated, never kept). Every view is a frozen value holding plain data."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from tdxdbg.engine.gmem import K_ATTRS, K_INVALIDATE, K_MEMSLOTS, Memslot, MmuInvalidate
from tdxdbg.engine.kvm import FREE_MMU_LOCK, K_MMU_LOCK, K_VM_BUGGED, K_VM_DEAD, MmuLock
from tdxdbg.engine.mmu_page import K_ROOTS, KvmMmuPage, root_ref_key, sp_key
from tdxdbg.engine.spte import (
    FROZEN_SPTE,
    SPTE_ENT_PER_PAGE,
    is_last_spte,
    is_shadow_present_pte,
    kvm_pages_per_hpage,
    spte_to_pfn,
)
from tdxdbg.engine.tdp_iter import walk_spte
from tdxdbg.hw.ept import level_size
from tdxdbg.hw.memory import fill_key, pte_key
from tdxdbg.hw.tdx.epoch import EpochState, epoch_key
from tdxdbg.hw.tdx.module import walk_sept
from tdxdbg.hw.tdx.sept import FREE_ENTRY, SeptEntry, SeptState, sept_key
from tdxdbg.hw.tdx.td import Lifecycle, OpState, TdConfig, chldcnt_key, lifecycle_key, op_state_key, td_key
from tdxdbg.session.decode import SeptEntryView, SpteBits, decode_sept, decode_spte

State = Mapping[Any, Any]


@attrs.frozen(slots=True)
class VmContext:
    """What views need to know about the VM that is fixed for its life (taken from the built VM)."""

    tdr: int
    gfn_direct_bits: int      # the shared bit as a gfn bit
    kvm_root_level: int       # KVM levels: 4 for GPAW 48
    variant: str = "upstream"


# -- the TDP MMU roots ----------------------------------------------------------------------------------------
@attrs.frozen(slots=True)
class SpteView:
    """An SPTE that is present, frozen or otherwise not the table's default (SHADOW_NONPRESENT_VALUE)."""

    table: int                 # pfn of the page-table page holding it
    index: int
    level: int                 # KVM level: 1 = 4K
    gfn: int                   # first gfn mapped, shared bit excluded (as tdp_iter reports it)
    gpa: int                   # first GPA mapped, shared bit included for the direct root
    value: int
    leaf: bool
    frozen: bool
    child: TableView | None = None

    @property
    def bits(self) -> SpteBits:
        """Decoded on demand: a tree of thousands of entries is built on every step."""
        return decode_spte(self.value)

    @property
    def key(self) -> tuple[str, int, int]:
        """World key of the SPTE (for watches and last_write)."""
        return pte_key(self.table, self.index)


@attrs.frozen(slots=True)
class TableView:
    """One page-table page of a root: its pfn, level, the gfns it covers and its non-default entries."""

    pfn: int
    level: int
    kind: str                  # "mirror" / "direct"
    gfn_start: int
    gfn_end: int
    external_spt: int
    entries: tuple[SpteView, ...]

    def walk(self):
        """Every table of the tree under (and including) this one, pre-order."""
        yield self
        for e in self.entries:
            if e.child is not None:
                yield from e.child.walk()

    def leaves(self) -> tuple[SpteView, ...]:
        return tuple(e for t in self.walk() for e in t.entries if e.leaf)


@attrs.frozen(slots=True)
class RootView:
    kind: str
    pfn: int
    level: int
    invalid: bool
    refcount: int
    tree: TableView

    @property
    def depth(self) -> int:
        """Number of table levels reachable under the root (1 when the root table is empty)."""
        def d(t: TableView) -> int:
            return 1 + max((d(e.child) for e in t.entries if e.child is not None), default=0)
        return d(self.tree)


class TreeCache:
    """Table views kept between positions, so a step rebuilds only the tables whose entries changed (and
    their ancestors). `parent` maps a table pfn to the table pointing at it."""

    def __init__(self) -> None:
        self.position: int | None = None
        # table pfn -> {(kind, level, base, bits): view}; a pfn's views go as soon as its entries change, even
        # while the table is unreachable, so a table that reappears later is never served stale.
        self.tables: dict[int, dict[tuple, Any]] = {}
        self.parent: dict[int, int] = {}

    def clear(self) -> None:
        self.tables.clear()
        self.parent.clear()

    def get(self, pfn: int, key: tuple) -> Any:
        views = self.tables.get(pfn)
        return None if views is None else views.get(key)

    def put(self, pfn: int, key: tuple, view: Any) -> None:
        self.tables.setdefault(pfn, {})[key] = view

    def invalidate(self, dirty: set[int]) -> set[int]:
        """Drop the views of the dirty tables and of every ancestor (their child references change too);
        returns that set."""
        out = set()
        for pfn in dirty:
            while pfn not in out:
                out.add(pfn)
                up = self.parent.get(pfn)
                if up is None:
                    break
                pfn = up
        for pfn in out:
            self.tables.pop(pfn, None)
        return out


def _table(state: State, pfn: int, level: int, kind: str, gfn_base: int, gfn_bits: int,
           cache: TreeCache | None = None) -> TableView:
    """`gfn_base` includes the root's gfn bits (the index space); reported gfns have them masked off."""
    key = (level, kind, gfn_base, gfn_bits)
    if cache is not None:
        hit = cache.get(pfn, key)
        if hit is not None:
            return hit
    sp: KvmMmuPage | None = state.get(sp_key(pfn))
    fill = state.get(fill_key(pfn), 0)
    per = kvm_pages_per_hpage(level)
    entries = []
    get = state.get
    for i in range(SPTE_ENT_PER_PAGE):
        v = get(pte_key(pfn, i))
        if v is None or v == fill:
            continue
        gfn = gfn_base + i * per
        leaf = is_shadow_present_pte(v) and is_last_spte(v, level)
        child = None
        if is_shadow_present_pte(v) and not leaf and level > 1:
            child_pfn = spte_to_pfn(v)
            if cache is not None:
                cache.parent[child_pfn] = pfn
            child = _table(state, child_pfn, level - 1, kind, gfn, gfn_bits, cache)
        entries.append(SpteView(pfn, i, level, gfn & ~gfn_bits, gfn << 12, v, leaf, v == FROZEN_SPTE, child))
    view = TableView(pfn, level, kind, (gfn_base & ~gfn_bits), (gfn_base & ~gfn_bits) + per * SPTE_ENT_PER_PAGE,
                     sp.external_spt if sp is not None else 0, tuple(entries))
    if cache is not None:
        cache.put(pfn, key, view)
    return view


def roots(state: State, ctx: VmContext, cache: TreeCache | None = None) -> tuple[RootView, ...]:
    """Every root in kvm->arch.tdp_mmu_roots order, with its tree."""
    out = []
    for root in state.get(K_ROOTS, ()):
        sp: KvmMmuPage | None = state.get(sp_key(root))
        if sp is None:
            continue
        kind = sp.kind
        out.append(RootView(kind, root, sp.role.level, sp.role.invalid, state.get(root_ref_key(root), 0),
                            _table(state, root, sp.role.level, kind, 0, 0 if sp.role.is_mirror
                                   else ctx.gfn_direct_bits, cache)))
    return tuple(out)


def root_pfn(state: State, kind: str) -> int | None:
    """The valid root of `kind` ("mirror" / "direct"), else the newest invalid one, else None."""
    found = None
    for root in state.get(K_ROOTS, ()):
        sp: KvmMmuPage | None = state.get(sp_key(root))
        if sp is None or sp.kind != kind:
            continue
        if not sp.role.invalid:
            return root
        found = root
    return found


def root_view(state: State, ctx: VmContext, kind: str) -> RootView | None:
    pfn = root_pfn(state, kind)
    if pfn is None:
        return None
    for r in roots(state, ctx):
        if r.pfn == pfn:
            return r
    return None


@attrs.frozen(slots=True)
class SpteLocation:
    """Where a walk of one root for one gfn ends: the SPTE at `level` (or higher, if the walk stopped there)."""

    kind: str
    root: int
    gfn: int
    level: int
    table: int
    index: int
    value: int
    bits: SpteBits

    @property
    def key(self) -> tuple[str, int, int]:
        return pte_key(self.table, self.index)


def spte_at(state: State, ctx: VmContext, kind: str, gfn: int, level: int = 1) -> SpteLocation | None:
    """Walk the `kind` root towards `gfn` down to KVM `level`; stop early at a non-present or leaf SPTE."""
    root = root_pfn(state, kind)
    if root is None:
        return None
    sp: KvmMmuPage = state[sp_key(root)]
    bits = 0 if sp.role.is_mirror else ctx.gfn_direct_bits
    addr = ((gfn & ~ctx.gfn_direct_bits) | bits) << 12
    lvl, table, idx, v = walk_spte(state.get, root, sp.role.level, addr >> 12, level)
    return SpteLocation(kind, root, gfn & ~ctx.gfn_direct_bits, lvl, table, idx, v, decode_spte(v))


# -- the S-EPT -------------------------------------------------------------------------------------------------
@attrs.frozen(slots=True)
class SeptNode:
    entry: SeptEntryView
    child: SeptTableView | None = None


@attrs.frozen(slots=True)
class SeptTableView:
    pfn: int
    level: int                 # TDX level: 0 = 4K
    gpa_start: int
    gpa_end: int
    entries: tuple[SeptNode, ...]

    def walk(self):
        yield self
        for n in self.entries:
            if n.child is not None:
                yield from n.child.walk()

    def leaves(self) -> tuple[SeptEntryView, ...]:
        return tuple(n.entry for t in self.walk() for n in t.entries if n.entry.is_leaf)


def td_config(state: State, ctx: VmContext) -> TdConfig | None:
    return state.get(td_key(ctx.tdr))


def _sept_table(state: State, pfn: int, level: int, gpa_base: int,
                cache: TreeCache | None = None) -> SeptTableView:
    key = ("sept table view", level, gpa_base)   # a TreeCache key, not a World key
    if cache is not None:
        hit = cache.get(pfn, key)
        if hit is not None:
            return hit
    entries = []
    size = level_size(level)
    get = state.get
    for i in range(512):
        e: SeptEntry | None = get(sept_key(pfn, i))
        if e is None or e.state is SeptState.FREE:
            continue
        gpa = gpa_base + i * size
        child = None
        if not e.state.is_leaf and level > 0:
            if cache is not None:
                cache.parent[e.pfn] = pfn
            child = _sept_table(state, e.pfn, level - 1, gpa, cache)
        entries.append(SeptNode(decode_sept(e, gpa, level, pfn, i), child))
    view = SeptTableView(pfn, level, gpa_base, gpa_base + size * 512, tuple(entries))
    if cache is not None:
        cache.put(pfn, key, view)
    return view


def sept_tree(state: State, ctx: VmContext, cache: TreeCache | None = None) -> SeptTableView | None:
    """The Secure EPT from the TD's root (TDCS page 3): entries that are not FREE, with their sub-tables."""
    cfg = td_config(state, ctx)
    if cfg is None:
        return None
    return _sept_table(state, cfg.sept_root, cfg.root_level, 0, cache)


def sept_entry_at(state: State, ctx: VmContext, gpa: int, level: int = 0) -> SeptEntryView | None:
    """The S-EPT entry a walk for `gpa` down to TDX `level` reaches (it stops at a non-present entry or leaf)."""
    cfg = td_config(state, ctx)
    if cfg is None:
        return None
    gpa &= ~cfg.shared_bit
    lvl, table, idx, e = walk_sept(state.get, cfg, gpa, level)
    base = gpa & ~(level_size(lvl) - 1)
    return decode_sept(e if e is not None else FREE_ENTRY, base, lvl, table, idx)


# -- VM-wide state ----------------------------------------------------------------------------------------------
@attrs.frozen(slots=True)
class TdView:
    tdr: int
    op_state: OpState | None
    lifecycle: Lifecycle | None
    chldcnt: int
    td_epoch: int
    epoch_refcount: tuple[int, int]
    sept_root: int
    gpaw: int


def td_view(state: State, ctx: VmContext) -> TdView:
    cfg = td_config(state, ctx)
    ep: EpochState = state.get(epoch_key(ctx.tdr), EpochState())
    return TdView(ctx.tdr, state.get(op_state_key(ctx.tdr)), state.get(lifecycle_key(ctx.tdr)),
                  state.get(chldcnt_key(ctx.tdr), 0), ep.td_epoch, tuple(ep.refcount),
                  cfg.sept_root if cfg is not None else 0, int(cfg.gpaw) if cfg is not None else 0)


@attrs.frozen(slots=True)
class KvmView:
    """VM-wide KVM state: mmu_lock holders, mmu_invalidate, dead/bugged."""

    mmu_lock_writer: str | None
    mmu_lock_readers: tuple[str, ...]
    invalidate: MmuInvalidate
    vm_dead: str | None
    vm_bugged: str | None


def kvm_view(state: State) -> KvmView:
    lk: MmuLock = state.get(K_MMU_LOCK, FREE_MMU_LOCK)
    dead = state.get(K_VM_DEAD)
    bugged = state.get(K_VM_BUGGED)
    return KvmView(lk.writer, tuple(lk.readers), state.get(K_INVALIDATE, MmuInvalidate()),
                   dead if isinstance(dead, str) else ("dead" if dead else None),
                   bugged if isinstance(bugged, str) else ("bugged" if bugged else None))


def memslots(state: State) -> tuple[Memslot, ...]:
    return tuple(state.get(K_MEMSLOTS, ()))


def private_ranges(state: State) -> tuple[tuple[int, int], ...]:
    """Memory attributes: the gfn ranges [start, end) that are private; everything else is shared."""
    return tuple(state.get(K_ATTRS, ()))


# -- tasks -------------------------------------------------------------------------------------------------------
@attrs.frozen(slots=True)
class ActivationView:
    """One activation of a task's call stack: kernel function name, qualname, file, line and its locals."""

    function: str
    qualname: str
    filename: str
    line: int
    locals: tuple[tuple[str, Any], ...]


@attrs.frozen(slots=True)
class TaskView:
    """A task at a position: its state and its call stack (outermost first) as of its latest frame."""

    name: str
    kind: str
    state: str                 # "not started", "ready", "waiting", "runnable" (wait satisfied), "done", "failed"
    frame_index: int | None    # its latest frame at or before the position
    stack: tuple[ActivationView, ...]
    step: str = ""             # kind of its latest step
    locals_error: str = ""     # why its locals could not be rebuilt (a replay mismatch is an engine bug)

    @property
    def depth(self) -> int:
        return len(self.stack)


@attrs.frozen(slots=True)
class TaskLocals:
    """A task's local variables after one of its frames, per activation of its call stack (outermost first), as
    they were then; or why they could not be rebuilt (`error`)."""

    task: str
    frame_index: int | None
    scopes: tuple[tuple[tuple[str, Any], ...], ...] = ()
    error: str = ""


@attrs.frozen(slots=True)
class StateView:
    """Everything at one position, eagerly built (the state dict is not kept)."""

    position: int
    mirror: RootView | None
    direct: RootView | None
    roots: tuple[RootView, ...]
    sept: SeptTableView | None
    private_ranges: tuple[tuple[int, int], ...]
    memslots: tuple[Memslot, ...]
    td: TdView
    kvm: KvmView
    tasks: tuple[TaskView, ...]


class PeekState:
    """A state dict behind the `World.peek` interface, for evaluating a task's wait predicate on a view."""

    __slots__ = ("_state",)

    def __init__(self, state: State) -> None:
        self._state = state

    def peek(self, key: Any, default: Any = None) -> Any:
        return self._state.get(key, default)

    def get(self, key: Any, default: Any = None) -> Any:
        return self._state.get(key, default)

    def __contains__(self, key: Any) -> bool:
        return key in self._state
