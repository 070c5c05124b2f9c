"""The TDX module: SEAMCALL dispatch, the checks every TDH.MEM leaf shares, and the S-EPT walk.

A SEAMCALL is two steps. The first runs the operand checks and takes the module's locks (or fails early); the
second does the work, releases the locks and returns the status. Between them is a preemption point, so another
task can run into a held lock exactly as another logical processor could (TDX module include/tdx_locks.h: every
lock is a try-lock that fails with TDX_OPERAND_BUSY).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from tdxdbg.hw.ept import PAGE_SHIFT, PAGE_SIZE, Gpaw, level_size, pt_index
from tdxdbg.hw.memory import HostMemory

# The leaf handlers register themselves in HANDLERS when imported.
from tdxdbg.hw.tdx import epoch, lifecycle_leaves, sept_leaves  # noqa: F401
from tdxdbg.hw.tdx.leaves import Seamcall
from tdxdbg.hw.tdx.locks import (
    LockMode,
    entry_lock_key,
    host_acquire_entry,
    pamt_lock_key,
    release,
    release_entry,
    tdr_lock_key,
    tree_lock_key,
    try_acquire,
)
from tdxdbg.hw.tdx.pamt import PageType, Pamt, get_pamt, set_pamt
from tdxdbg.hw.tdx.seamcall import HANDLERS, Call, SeamcallEntry, SeamcallResult, SeamcallReturn, TdxStep
from tdxdbg.hw.tdx.sept import SeptEntry, SeptState, arch_info, sept_entry, sept_key
from tdxdbg.hw.tdx.status import OperandId, TdxStatus
from tdxdbg.hw.tdx.td import (
    KEYID_MASK,
    TD_HKID,
    TDCS_PAGES,
    Lifecycle,
    OpState,
    TdAttr,
    TdConfig,
    VcpuState,
    add_chldcnt,
    chldcnt_key,
    get_config,
    lifecycle_key,
    op_state_key,
    td_key,
    vcpu_key,
)
from tdxdbg.runtime.step import Step
from tdxdbg.runtime.world import World

# page_info_api_input_t (RCX of the TDH.MEM leaves and of TDG.MEM.PAGE.ACCEPT).
GPA_LEVEL_MASK = 0x7
GPA_RESERVED_LOW = 0xFF8          # bits 11:3
GPA_PAGE_MASK = 0x000F_FFFF_FFFF_F000   # bits 51:12
GPA_RESERVED_HIGH = 0xFFF0_0000_0000_0000  # bits 63:52
# GPAW 48: bits 51:48 of a private GPA must be zero (`check_gpa_validity`).
GPAW48_HIGH_BITS = 0x000F_0000_0000_0000


def calls_key(leaf: Seamcall) -> tuple[str, Seamcall]:
    """How many times `leaf` was called (kept only while fault injection is configured)."""
    return ("tdx.calls", leaf)


def check_private_gpa(cfg: TdConfig, raw: int, max_level: int) -> tuple[int, int] | None:
    """`verify_page_info_input` + `check_gpa_validity` of a page_info RCX: (gpa, level), or None if invalid."""
    level = raw & GPA_LEVEL_MASK
    gpa = raw & GPA_PAGE_MASK
    if (raw & (GPA_RESERVED_LOW | GPA_RESERVED_HIGH) or level > max_level or gpa & (level_size(level) - 1)
            or gpa & cfg.shared_bit or (cfg.gpaw is Gpaw.GPAW_48 and gpa & GPAW48_HIGH_BITS)):
        return None
    return gpa, level


def walk_sept(get: Callable[..., Any], cfg: TdConfig, gpa: int, target: int) -> tuple[int, int, int, SeptEntry]:
    """`secure_ept_walk`: from the root down to `target`, stopping early at a non-present entry or a leaf.

    Returns (level reached, table pfn, index, entry). Host leaves fail when the level is not `target`; the
    guest's ACCEPT walk and hardware translation use the same rule without locks.
    """
    table, level = cfg.sept_root, cfg.root_level
    while True:
        idx = pt_index(gpa, level)
        e = sept_entry(get, table, idx)
        if level == target or not e.state.is_present or e.state.is_leaf:
            return level, table, idx, e
        table, level = e.pfn, level - 1


# What a SEAMCALL's checks took, as shown in its step: a handful of distinct tuples, made once each and shared.
_LOCKS_TAKEN: dict[tuple[tuple[str, bool], ...], tuple[tuple[str, bool], ...]] = {}


def _locks_taken(c: Call) -> tuple[tuple[str, bool], ...]:
    taken = tuple([(kind, mode is LockMode.EXCLUSIVE) for kind, _key, mode in c.locks])
    return _LOCKS_TAKEN.setdefault(taken, taken)


class TdxModule:
    """The emulated TDX module of one platform. Its state lives in the World; this object holds no state
    beyond configuration (fault injection)."""

    def __init__(self, world: World, memory: HostMemory) -> None:
        self.world = world
        self.memory = memory
        # (leaf, occurrence) -> status: that call returns the status without doing anything.
        self.inject: dict[tuple[Seamcall, int], int] = {}

    # -- set-up (TDH.MNG.CREATE, KEY.CONFIG, ADDCX, INIT and VP.CREATE, not stepped) ------------------------
    def create_td(self, gpaw: Gpaw = Gpaw.GPAW_48, attributes: TdAttr = TdAttr.SEPT_VE_DISABLE,
                  op_state: OpState = OpState.RUNNABLE) -> int:
        """Create a TD with keys configured and return its TDR pfn."""
        w, mem = self.world, self.memory
        tdr = mem.alloc("tdx:tdr")
        set_pamt(w, tdr, Pamt(PageType.PT_TDR, owner=tdr))
        tdcs = tuple(mem.alloc("tdx:tdcs") for _ in range(TDCS_PAGES))
        for p in tdcs:
            set_pamt(w, p, Pamt(PageType.PT_TDCX, owner=tdr))
        w.set(td_key(tdr), TdConfig(tdr, gpaw, attributes, TD_HKID, tdcs))
        w.set(chldcnt_key(tdr), len(tdcs))
        w.set(op_state_key(tdr), op_state)
        w.set(lifecycle_key(tdr), Lifecycle.TD_KEYS_CONFIGURED)
        w.set(epoch.epoch_key(tdr), epoch.EpochState())
        return tdr

    def create_vcpu(self, tdr: int, index: int) -> int:
        """TDH.VP.CREATE + TDH.VP.INIT: a TDVPR page owned by the TD; returns its pfn."""
        w = self.world
        tdvpr = self.memory.alloc("tdx:tdvpr")
        set_pamt(w, tdvpr, Pamt(PageType.PT_TDVPR, owner=tdr))
        add_chldcnt(w, tdr, 1)
        w.set(vcpu_key(tdvpr), VcpuState(tdr=tdr, index=index))
        return tdvpr

    # -- queries (unrecorded, for views and tests) -----------------------------------------------------------
    def config(self, tdr: int) -> TdConfig:
        cfg = self.world.peek(td_key(tdr))
        if cfg is None:
            raise KeyError(f"no TD with TDR {tdr:#x}")
        return cfg

    def op_state(self, tdr: int) -> OpState:
        return self.world.peek(op_state_key(tdr))

    def lifecycle(self, tdr: int) -> Lifecycle:
        return self.world.peek(lifecycle_key(tdr))

    def chldcnt(self, tdr: int) -> int:
        return self.world.peek(chldcnt_key(tdr), 0)

    def sept_entry(self, tdr: int, gpa: int, level: int) -> tuple[int, SeptEntry]:
        """The entry a walk to `level` reaches for `gpa`, and the level where it stopped (unrecorded)."""
        lvl, _table, _idx, e = walk_sept(self.world.peek, self.config(tdr), gpa, level)
        return lvl, e

    # -- the SEAMCALL instruction ----------------------------------------------------------------------------
    def seamcall(self, leaf: Seamcall, rcx: int = 0, rdx: int = 0, r8: int = 0,
                 r9: int = 0) -> Generator[Step, None, SeamcallResult]:
        w = self.world
        c = Call(leaf, rcx, rdx, r8, r9, w.task)
        injected = self.count_call(leaf)
        h = HANDLERS.get(leaf)
        result: SeamcallResult | None
        if injected is not None:
            result = SeamcallResult(leaf, injected)
        elif h is None:
            result = SeamcallResult(leaf, TdxStatus.TDX_OPERAND_INVALID | OperandId.RAX)
        else:
            result = h.prepare(self, c)
            if result is not None:
                self.release_all(c)
        yield Step(TdxStep.SEAMCALL, SeamcallEntry(
            leaf, rcx, rdx, r8, r9, c.gpa, c.level,
            _locks_taken(c), injected is not None))
        if result is None:
            assert h is not None
            result = h.execute(self, c)
            self.release_all(c)
        yield Step(TdxStep.SEAMCALL_RETURN, SeamcallReturn(
            leaf, result.rax, result.rcx, result.rdx, result.r8, c.gpa, c.level, injected is not None))
        return result

    def count_call(self, leaf: Seamcall) -> int | None:
        """Count this call of `leaf`; return the status to inject instead of running it, if one is configured.
        Calls are counted (in the World, so rewinding restores the count) only when injection is configured."""
        if not self.inject:
            return None
        key = calls_key(leaf)
        n = self.world.get(key, 0) + 1
        self.world.set(key, n)
        return self.inject.get((leaf, n))

    # -- shared checks --------------------------------------------------------------------------------------
    def fail(self, c: Call, status: int, operand: int = 0, details: bool = False) -> SeamcallResult:
        if details:
            e = c.entry
            return SeamcallResult(c.leaf, status | operand, e.arch_value(), arch_info(c.walk_level, e.state))
        return SeamcallResult(c.leaf, status | operand)

    def check_gpa(self, c: Call, cfg: TdConfig, raw: int, min_level: int, max_level: int,
                  operand: OperandId = OperandId.RCX) -> SeamcallResult | None:
        """`check_private_gpa` plus the leaf's minimum level, before any lock is taken. c.gpa and c.level are
        set even when the operand is invalid (the SEAMCALL step shows them)."""
        c.gpa, c.level = raw & GPA_PAGE_MASK, raw & GPA_LEVEL_MASK
        if check_private_gpa(cfg, raw, max_level) is None or c.level < min_level:
            return self.fail(c, TdxStatus.TDX_OPERAND_INVALID, operand)
        return None

    def check_td(self, c: Call, tdr_pa: int, operand: OperandId, allowed: frozenset[OpState],
                 mode: LockMode = LockMode.SHARED) -> SeamcallResult | None:
        """The explicit TDR operand (`check_td_in_correct_build_state`): a TDR page and its lock, keys
        configured, then OP_STATE allowing the leaf."""
        w = self.world
        tdr = tdr_pa >> PAGE_SHIFT
        if tdr_pa & (PAGE_SIZE - 1) or tdr_pa & KEYID_MASK or get_pamt(w, tdr).page_type is not PageType.PT_TDR:
            return self.fail(c, TdxStatus.TDX_PAGE_METADATA_INCORRECT, operand)
        c.cfg = get_config(w, tdr)
        if not self.lock(c, "tdr", tdr_lock_key(tdr), mode):
            return self.fail(c, TdxStatus.TDX_OPERAND_BUSY, operand)
        # After VPFLUSHDONE or KEY.FREEID every TD-scoped leaf reports the keys as gone.
        if w.get(lifecycle_key(tdr)) is not Lifecycle.TD_KEYS_CONFIGURED:
            return self.fail(c, TdxStatus.TDX_TD_KEYS_NOT_CONFIGURED)
        if w.get(op_state_key(tdr)) not in allowed:
            return self.fail(c, TdxStatus.TDX_OP_STATE_INCORRECT)
        return None

    def lock(self, c: Call, kind: str, key: Any, mode: LockMode) -> bool:
        if not try_acquire(self.world, key, mode, c.caller):
            return False
        c.locks.append((kind, key, mode))
        return True

    def lock_tree(self, c: Call, mode: LockMode) -> SeamcallResult | None:
        assert c.cfg is not None
        if not self.lock(c, "sept_tree", tree_lock_key(c.cfg.tdr), mode):
            return self.fail(c, TdxStatus.TDX_OPERAND_BUSY, OperandId.SEPT_TREE)
        return None

    def walk(self, c: Call) -> SeamcallResult | None:
        """`secure_ept_walk` to c.level: stop at the level, a non-present entry or a leaf."""
        assert c.cfg is not None
        level, table, idx, e = walk_sept(self.world.get, c.cfg, c.gpa, c.level)
        c.table, c.index, c.entry, c.walk_level = table, idx, e, level
        if level != c.level:
            return self.fail(c, TdxStatus.TDX_EPT_WALK_FAILED, OperandId.RCX, details=True)
        return None

    def lock_entry(self, c: Call) -> SeamcallResult | None:
        key = entry_lock_key(c.table, c.index)
        if not host_acquire_entry(self.world, key, c.caller):
            return self.fail(c, TdxStatus.TDX_OPERAND_BUSY, OperandId.RCX, details=True)
        c.locks.append(("sept_entry", key, LockMode.EXCLUSIVE))
        return None

    def check_new_pages(self, c: Call, hpa: int, pages: int, operand: OperandId) -> SeamcallResult | None:
        """A page (range) handed to the module (`check_and_lock_free_range_hpa`): aligned, unkeyed, inside
        memory, lockable and PT_NDA. Checked after the entry state, so a state error wins."""
        w = self.world
        pfn = hpa >> PAGE_SHIFT
        if hpa & ((pages << PAGE_SHIFT) - 1) or hpa & KEYID_MASK:
            return self.fail(c, TdxStatus.TDX_OPERAND_INVALID, operand)
        if pfn + pages > self.memory.limit:
            return self.fail(c, TdxStatus.TDX_OPERAND_ADDR_RANGE_ERROR, operand)
        if not self.lock(c, "pamt", pamt_lock_key(pfn), LockMode.EXCLUSIVE):
            return self.fail(c, TdxStatus.TDX_OPERAND_BUSY, operand)
        for p in range(pfn, pfn + pages):
            if get_pamt(w, p).page_type is not PageType.PT_NDA:
                return self.fail(c, TdxStatus.TDX_PAGE_METADATA_INCORRECT, operand)
        c.page = pfn
        return None

    def reread(self, c: Call) -> SeptEntry:
        """The target entry again, after the preemption point (the lock holder's view)."""
        e = sept_entry(self.world.get, c.table, c.index)
        c.entry = e
        return e

    def write_entry(self, c: Call, entry: SeptEntry) -> None:
        key = sept_key(c.table, c.index)
        if entry.state is SeptState.FREE:
            self.world.delete(key)
        else:
            self.world.set(key, entry)
        c.entry = entry

    def release_all(self, c: Call) -> None:
        w = self.world
        for kind, key, mode in reversed(c.locks):
            if kind == "sept_entry":
                release_entry(w, key, c.caller)
            else:
                release(w, key, mode, c.caller)
        c.locks.clear()

    def is_tracked(self, tdr: int, pfn: int) -> bool:
        return epoch.is_tracked(epoch.get_epoch(self.world, tdr), get_pamt(self.world, pfn).bepoch)

    def tracking_required(self, c: Call) -> bool:
        assert c.cfg is not None
        op: OpState = self.world.get(op_state_key(c.cfg.tdr))
        return op.tlb_tracking_required and c.entry.state.tlb_tracking_required

