"""Breakpoints: what makes `continue` stop, as plain values with ids, and the per-frame matchers behind them.

Kinds: function (on entry), function:line (on arrival at the line), gfn touched, SEAMCALL leaf / error / status,
SPTE watch (a write to one SPTE), RET_PF value and invariant violation. Matching a frame only looks at the frame,
the previous frame of the same task (for "entry"), and its step payload, effects and footprint: no world state.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from typing import Any

import attrs

from tdxdbg.engine.gmem import GMEM_PFN
from tdxdbg.engine.spte import (
    FROZEN_SPTE,
    VMX_EPT_ACCESS_BIT,
    VMX_EPT_DIRTY_BIT,
    is_last_spte,
    is_shadow_present_pte,
    kvm_pages_per_hpage,
)
from tdxdbg.engine.steps import EngineStep, HookCall, SpteChange
from tdxdbg.hw.memory import pte_key
from tdxdbg.hw.tdx.leaves import Seamcall
from tdxdbg.hw.tdx.seamcall import SeamcallEntry, SeamcallReturn, TdxStep, leaf_info, parse_leaf
from tdxdbg.hw.tdx.status import describe, is_error, parse_status, status_name
from tdxdbg.runtime.frame import Frame


class GfnWatch(enum.Enum):
    """When a gfn breakpoint stops."""

    ANY = "any"            # any frame about the gfn (SPTE, walk, hook, SEAMCALL, fault, guest access, gmem)
    WRITES = "writes"      # a frame that writes an SPTE or S-EPT entry mapping the gfn
    STATE = "state"        # a frame that changes such an entry's state (present/frozen/leaf; S-EPT state)


class BreakpointKind(enum.Enum):
    FUNCTION = "function"
    FUNCTION_LINE = "function:line"
    GFN = "gfn"
    SEAMCALL = "seamcall"
    SPTE_WATCH = "watch"
    RET_PF = "ret_pf"
    VIOLATION = "violation"


@attrs.frozen(slots=True)
class Breakpoint:
    """One breakpoint as the UI lists it. Fields not used by `kind` are None / False."""

    id: int
    kind: BreakpointKind
    description: str
    enabled: bool = True
    hits: int = 0
    task: str | None = None            # only frames of this task
    function: str | None = None
    line: int | None = None
    gfn: int | None = None
    leaf: Seamcall | None = None
    errors_only: bool = False
    status: str | None = None
    key: tuple | None = None           # SPTE watch: ("pte", table pfn, index), when resolved
    root_kind: str | None = None       # SPTE watch by position: "mirror" / "direct", gfn, KVM level
    level: int | None = None
    ret_pf: str | None = None
    invariant: str | None = None
    watch: GfnWatch = GfnWatch.ANY     # gfn breakpoints: when they stop


Matcher = Callable[[Frame, Frame | None], bool]


def short_name(qualname: str) -> str:
    """The kernel name of a function: `TdpMmuOps.kvm_tdp_mmu_map` -> `kvm_tdp_mmu_map`."""
    return qualname.rpartition(".")[2]


# Recorded stacks are interned tuples, so a few hundred distinct objects serve millions of frames: cache their
# short names by id, keeping the stack itself so a reused id is never mistaken for it.
_NAMES: dict[int, tuple[tuple, tuple[str, ...]]] = {}


def stack_names(stack: tuple) -> tuple[str, ...]:
    """Kernel names of a stack's functions, outermost first."""
    hit = _NAMES.get(id(stack))
    if hit is None or hit[0] is not stack:
        hit = _NAMES[id(stack)] = (stack, tuple(short_name(e.function) for e in stack))
    return hit[1]


def _entered(frame: Frame, prev: Frame | None, depth: int) -> bool:
    """Whether the activation at `depth` of `frame` is new since `prev` (the same task's previous frame): a
    different function there, or a different chain of callers (call sites included) above it."""
    if prev is None:
        return True
    ps, fs = prev.stack, frame.stack
    return len(ps) <= depth or ps[depth].function != fs[depth].function or ps[:depth] != fs[:depth]


def _function_matcher(name: str) -> Matcher:
    full = "." in name

    def match(frame: Frame, prev: Frame | None) -> bool:
        stack = frame.stack
        if full:
            depths = [d for d, e in enumerate(stack) if e.function == name]
        else:
            names = stack_names(stack)
            if name not in names:
                return False
            depths = [d for d, n in enumerate(names) if n == name]
        return any(_entered(frame, prev, d) for d in depths)

    return match


def _line_matcher(name: str, line: int) -> Matcher:
    full = "." in name

    def match(frame: Frame, prev: Frame | None) -> bool:
        stack = frame.stack
        names = stack_names(stack)
        for d, e in enumerate(stack):
            if e.line != line or (e.function != name if full else names[d] != name):
                continue
            if prev is None or len(prev.stack) <= d or prev.stack[: d + 1] != stack[: d + 1]:
                return True
        return False

    return match


_PAGE_HOOKS = frozenset({"set_external_spte", "remove_external_spte", "remove_external_spte_hook"})


def step_gfn_range(step: Any, gfn_mask: int) -> tuple[int, int] | None:
    """The gfns [start, end) a step's payload is about (shared bit masked off), or None."""
    p = step.payload
    t = type(p)
    if t is SpteChange:
        level = p.level
        huge = level > 1 and any(is_shadow_present_pte(v) and is_last_spte(v, level) for v in (p.old, p.new))
        start = p.gfn & gfn_mask
        return start, start + (kvm_pages_per_hpage(level) if huge else 1)
    if t is SeamcallEntry or t is SeamcallReturn:
        start = (p.gpa >> 12) & gfn_mask
        # A leaf declared with a page operand (Arg.PAGE_RANGE): a huge-level call covers every gfn of the range.
        info = leaf_info(p.leaf)
        n = kvm_pages_per_hpage(p.level + 1) if info is not None and info.maps_range else 1
        return start, start + n
    if t is HookCall:
        start = p.gfn & gfn_mask
        return start, start + (kvm_pages_per_hpage(p.level) if p.name in _PAGE_HOOKS else 1)
    gfn = step.get("gfn")
    if gfn is None:
        gpa = step.get("gpa")
        if not isinstance(gpa, int):
            return None
        gfn = gpa >> 12
    if not isinstance(gfn, int):
        return None
    gfn &= gfn_mask
    return gfn, gfn + 1


def _gfn_matcher(gfn: int, gfn_mask: int) -> Matcher:
    gfn &= gfn_mask

    def match(frame: Frame, prev: Frame | None) -> bool:
        r = step_gfn_range(frame.step, gfn_mask)
        if r is not None and r[0] <= gfn < r[1]:
            return True
        # guest_memfd pages looked up or allocated for the gfn: ("gmem.pfn", slot, gfn)
        for key in frame.reads:
            if type(key) is tuple and key[0] == GMEM_PFN and key[2] == gfn:
                return True
        return any(type(k) is tuple and k[0] == GMEM_PFN and k[2] == gfn for k, _o, _n in frame.effects)

    return match


# The accessed and dirty bits change as the CPU uses a mapping; a state-change watch ignores them.
ACCESS_DIRTY_BITS = VMX_EPT_ACCESS_BIT | VMX_EPT_DIRTY_BIT


def _spte_state(value: int) -> tuple[bool, bool, int]:
    """What a state-change watch compares: present, frozen, and the rest of the value but accessed/dirty."""
    return is_shadow_present_pte(value), value == FROZEN_SPTE, value & ~ACCESS_DIRTY_BITS


def _gfn_write_matcher(gfn: int, gfn_mask: int, state_only: bool) -> Matcher:
    """Frames that write (or, with `state_only`, change the state of) an SPTE or S-EPT entry mapping `gfn`."""
    gfn &= gfn_mask

    def match(frame: Frame, prev: Frame | None) -> bool:
        if not frame.effects:
            return False
        r = step_gfn_range(frame.step, gfn_mask)
        if r is None or not r[0] <= gfn < r[1]:
            return False
        p = frame.step.payload
        if type(p) is SpteChange:
            if not p.ok or frame.step.kind not in (EngineStep.SPTE_CMPXCHG, EngineStep.SPTE_WRITE):
                return False
            return not state_only or _spte_state(p.old) != _spte_state(p.new)
        return any(type(k) is tuple and k and k[0] == "sept"
                   and (not state_only or getattr(old, "state", None) != getattr(new, "state", None))
                   for k, old, new in frame.effects)

    return match


def _seamcall_matcher(leaf: Seamcall | None, errors_only: bool, status: str | None) -> Matcher:
    if not errors_only and status is None:
        def match(frame: Frame, prev: Frame | None) -> bool:
            step = frame.step
            return step.kind is TdxStep.SEAMCALL and (leaf is None or step.payload.leaf is leaf)
        return match
    wanted = status.upper() if status else None

    def match_ret(frame: Frame, prev: Frame | None) -> bool:
        step = frame.step
        if step.kind is not TdxStep.SEAMCALL_RETURN:
            return False
        p = step.payload
        if leaf is not None and p.leaf is not leaf:
            return False
        rax = int(p.rax)
        if wanted is not None:
            return wanted in (status_name(rax), describe(rax))
        return is_error(rax)

    return match_ret


def _watch_matcher(key: tuple | None, root_kind: str | None, gfn: int | None, level: int | None) -> Matcher:
    def match(frame: Frame, prev: Frame | None) -> bool:
        if key is not None:
            for k, _old, _new in frame.effects:
                if k == key:
                    return True
        if root_kind is not None:
            p = frame.step.payload
            if type(p) is SpteChange and p.ok and p.root == root_kind and p.level == level and p.gfn == gfn:
                return frame.step.kind in (EngineStep.SPTE_CMPXCHG, EngineStep.SPTE_WRITE)
        return False

    return match


def _ret_pf_matcher(name: str) -> Matcher:
    def match(frame: Frame, prev: Frame | None) -> bool:
        step = frame.step
        return step.kind is EngineStep.RET_PF and step.get("ret") == name

    return match


def _violation_matcher(invariant: str | None) -> Matcher:
    def match(frame: Frame, prev: Frame | None) -> bool:
        vs = frame.violations
        if not vs:
            return False
        return invariant is None or any(v.invariant == invariant for v in vs)

    return match


def normalize_ret_pf(name: str) -> str:
    name = name.strip().upper()
    return name if name.startswith("RET_PF_") else f"RET_PF_{name}"


class BreakpointError(ValueError):
    """A breakpoint the user described cannot be made (the message says why)."""


class Breakpoints:
    """The session's breakpoints: add / enable / disable / delete, and which of them a frame hits."""

    def __init__(self, gfn_mask: int = -1) -> None:
        self._gfn_mask = gfn_mask
        self._next_id = 1
        self._bps: dict[int, Breakpoint] = {}
        self._matchers: dict[int, Matcher] = {}
        self._active: list[tuple[int, str | None, Matcher]] = []

    # -- listing ---------------------------------------------------------------------------------------------
    def __iter__(self):
        return iter(list(self._bps.values()))

    def __len__(self) -> int:
        return len(self._bps)

    def get(self, bp_id: int) -> Breakpoint | None:
        return self._bps.get(bp_id)

    @property
    def active(self) -> bool:
        return bool(self._active)

    # -- adding ---------------------------------------------------------------------------------------------
    def _add(self, matcher: Matcher, **fields: Any) -> Breakpoint:
        for old in self._bps.values():
            if old.description == fields.get("description") and old.task == fields.get("task"):
                raise BreakpointError(f"breakpoint {old.id} is already {old.description}"
                                      + ("" if old.enabled else " (disabled: enable it)"))
        bp = Breakpoint(id=self._next_id, **fields)
        self._next_id += 1
        self._bps[bp.id] = bp
        self._matchers[bp.id] = matcher
        self._refresh()
        return bp

    def add_function(self, function: str, task: str | None = None) -> Breakpoint:
        """Stop on entry to `function` (kernel name, or a full qualname with a dot) in any task or in `task`."""
        function = function.strip()
        if not function:
            raise BreakpointError("empty function name")
        return self._add(_function_matcher(function), kind=BreakpointKind.FUNCTION, function=function, task=task,
                         description=f"function {function}")

    def add_function_line(self, function: str, line: int, task: str | None = None) -> Breakpoint:
        """Stop when `function` arrives at source line `line` (absolute line number in its file)."""
        function = function.strip()
        if not function or line <= 0:
            raise BreakpointError(f"bad function:line {function}:{line}")
        return self._add(_line_matcher(function, line), kind=BreakpointKind.FUNCTION_LINE, function=function,
                         line=line, task=task, description=f"{function}:{line}")

    def add_gfn(self, gfn: int, task: str | None = None, watch: GfnWatch = GfnWatch.ANY) -> Breakpoint:
        """Stop on a frame whose step is about `gfn` (SPTE, walk, hook, SEAMCALL, fault, guest access) or that
        looks up its guest_memfd page; with `watch`, only on a write of an entry mapping it, or only on a change
        of such an entry's state. The shared bit is ignored, so both aliases match."""
        if gfn < 0:
            raise BreakpointError(f"bad gfn {gfn}")
        if watch is GfnWatch.ANY:
            matcher = _gfn_matcher(gfn, self._gfn_mask)
        else:
            matcher = _gfn_write_matcher(gfn, self._gfn_mask, watch is GfnWatch.STATE)
        what = {GfnWatch.ANY: "", GfnWatch.WRITES: " writes", GfnWatch.STATE: " state changes"}[watch]
        return self._add(matcher, kind=BreakpointKind.GFN, gfn=gfn, task=task, watch=watch,
                         description=f"gfn {gfn:#x}{what}")

    def add_seamcall(self, leaf: Seamcall | str | None = None, errors_only: bool = False,
                     status: str | None = None, task: str | None = None) -> Breakpoint:
        """Stop at a SEAMCALL of `leaf` (any leaf when None); with `errors_only` or `status`, at its return
        when the status is an error / has that name (e.g. "TDX_OPERAND_BUSY" or "TDX_OPERAND_BUSY|SEPT_TREE")."""
        if isinstance(leaf, str):
            try:
                leaf = parse_leaf(leaf)
            except ValueError as exc:
                raise BreakpointError(str(exc)) from None
        if status:
            try:
                parse_status(status.upper())
            except ValueError as exc:
                raise BreakpointError(f"{exc} (e.g. TDX_OPERAND_BUSY or TDX_OPERAND_BUSY|SEPT_TREE)") from None
        what = leaf.dotted if leaf is not None else "any SEAMCALL"
        if status:
            what += f" = {status}"
        elif errors_only:
            what += " error"
        return self._add(_seamcall_matcher(leaf, errors_only, status), kind=BreakpointKind.SEAMCALL, leaf=leaf,
                         errors_only=errors_only, status=status, task=task, description=f"seamcall {what}")

    def add_spte_watch(self, table: int, index: int) -> Breakpoint:
        """Stop when a frame writes the SPTE at (table pfn, index)."""
        if not 0 <= index < 512:
            raise BreakpointError(f"SPTE index {index} outside 0..511")
        key = pte_key(table, index)
        return self._add(_watch_matcher(key, None, None, None), kind=BreakpointKind.SPTE_WATCH, key=key,
                         description=f"watch SPTE {table:#x}[{index}]")

    def add_spte_watch_at(self, root_kind: str, gfn: int, level: int, key: tuple | None) -> Breakpoint:
        """Stop when the `root_kind` SPTE mapping `gfn` at KVM `level` is written: by its key (when the table
        exists, resolved by the session) and by any SPTE step at that position (tables created later)."""
        if root_kind not in ("mirror", "direct"):
            raise BreakpointError(f"root kind must be mirror or direct, not {root_kind!r}")
        if not 1 <= level <= 5:
            raise BreakpointError(f"bad level {level}")
        gfn = (gfn & self._gfn_mask) & -kvm_pages_per_hpage(level)
        return self._add(_watch_matcher(key, root_kind, gfn, level), kind=BreakpointKind.SPTE_WATCH, key=key,
                         root_kind=root_kind, gfn=gfn, level=level,
                         description=f"watch {root_kind} SPTE gfn {gfn:#x} level {level}")

    def add_ret_pf(self, name: str, task: str | None = None) -> Breakpoint:
        name = normalize_ret_pf(name)
        return self._add(_ret_pf_matcher(name), kind=BreakpointKind.RET_PF, ret_pf=name, task=task,
                         description=f"ret_pf {name}")

    def add_violation(self, invariant: str | None = None) -> Breakpoint:
        return self._add(_violation_matcher(invariant), kind=BreakpointKind.VIOLATION, invariant=invariant,
                         description=f"violation {invariant or '(any)'}")

    # -- changing ---------------------------------------------------------------------------------------------
    def enable(self, bp_id: int, enabled: bool = True) -> Breakpoint:
        bp = self._bps.get(bp_id)
        if bp is None:
            raise BreakpointError(f"no breakpoint {bp_id}")
        bp = self._bps[bp_id] = attrs.evolve(bp, enabled=enabled)
        self._refresh()
        return bp

    def disable(self, bp_id: int) -> Breakpoint:
        return self.enable(bp_id, False)

    def delete(self, bp_id: int) -> Breakpoint:
        bp = self._bps.pop(bp_id, None)
        if bp is None:
            raise BreakpointError(f"no breakpoint {bp_id}")
        del self._matchers[bp_id]
        self._refresh()
        return bp

    def clear(self) -> None:
        self._bps.clear()
        self._matchers.clear()
        self._refresh()

    def count_hits(self, ids: Iterable[int]) -> None:
        for i in ids:
            bp = self._bps.get(i)
            if bp is not None:
                self._bps[i] = attrs.evolve(bp, hits=bp.hits + 1)

    def _refresh(self) -> None:
        self._active = [(i, bp.task, self._matchers[i]) for i, bp in self._bps.items() if bp.enabled]

    # -- matching ----------------------------------------------------------------------------------------------
    def hits(self, frame: Frame, prev: Frame | None) -> tuple[int, ...]:
        """Ids of the enabled breakpoints `frame` hits; `prev` is the previous frame of the same task."""
        if not self._active:
            return ()
        task = frame.task
        return tuple(i for i, only, m in self._active if (only is None or only == task) and m(frame, prev))
