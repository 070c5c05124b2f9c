"""What the debugger's log and timeline strip show, computed from the session's frames (no Textual here: the UI
draws it).

The index grows incrementally as the timeline grows (only new frames are looked at), and keeps one small
category code per frame so the strip over a million frames is a few C-level max() calls per column.
"""

from __future__ import annotations

import enum
from array import array
from typing import Any, NamedTuple

from tdxdbg.engine.spte import FROZEN_SPTE
from tdxdbg.engine.steps import EngineStep, SpteWrite
from tdxdbg.hw.tdx.leaves import Seamcall, Tdcall
from tdxdbg.hw.tdx.seamcall import SeamcallEntry, TdxStep, leaf_info
from tdxdbg.hw.tdx.status import describe, is_error
from tdxdbg.runtime.step import Step, StepKind


class Category(enum.IntEnum):
    """Per-frame importance for the strip; higher wins within a column."""

    NONE = 0
    FAULT = 1
    SEAMCALL = 2
    FREEZE = 3
    ERROR = 4
    VIOLATION = 5


class LogEntry(NamedTuple):
    frame: int
    task: str
    text: str
    error: bool
    category: Category


def _leaf_name(leaf: Any) -> str:
    if isinstance(leaf, (Seamcall, Tdcall)):
        return leaf.dotted
    return str(leaf)


def seamcall_text(leaf: Seamcall, entry: SeamcallEntry | None, ret: Any) -> str:
    """`TDH.MEM.PAGE.AUG(gpa=0x1000, level=0) = TDX_SUCCESS`: the operands the leaf's handler declares, from
    the registers it was called with (`entry`), then the status, then on success the outputs it declares."""
    info = leaf_info(leaf)
    rax = int(ret.rax or 0)
    operands = (f"gpa={ret.gpa:#x}, level={ret.level}" if info is None or entry is None
                else info.shown_operands(entry))
    text = f"{_leaf_name(leaf)}({operands}) = {describe(rax)}"
    if info is not None and info.returns and not is_error(rax):
        text += f" -> {info.shown_returns(ret)}"
    return text


def describe_frame(kind: Any, get: Any, entry: SeamcallEntry | None = None) -> tuple[str, bool, Category] | None:
    """(log text, is error, category) for a frame worth a log line, or None. `get(name, default=None)` reads a
    field of the step's payload (Step.get); for a SEAMCALL_RETURN, `entry` is the task's SEAMCALL entry it
    returns from (its input registers)."""
    if kind is TdxStep.SEAMCALL_RETURN:
        leaf = get("leaf")
        if leaf is Seamcall.TDH_VP_ENTER:
            return None
        rax = get("rax") or 0
        err = is_error(rax)
        text = seamcall_text(leaf, entry, _Regs(get))
        if get("injected"):
            text += "  [injected]"
        return text, err, Category.ERROR if err else Category.SEAMCALL
    if kind is TdxStep.TDCALL_RETURN:
        status = get("status", "")
        return (f"guest {_leaf_name(get('leaf'))}(gpa={get('gpa', 0):#x}, level={get('level', 0)}) = {status}",
                False, Category.NONE)
    if kind is EngineStep.HOOK:
        return (f"{get('name')}(gfn={get('gfn', 0):#x}, level={get('level', 0)}"
                + (f", pfn={get('pfn'):#x})" if get("pfn") else ")"), False, Category.NONE)
    if kind is EngineStep.HOOK_RETURN:
        ret = get("ret")
        return f"{get('name')} -> {ret}", bool(ret), Category.ERROR if ret else Category.NONE
    if kind is EngineStep.RET_PF:
        return (f"{get('ret')} ({get('value')}) for gpa {get('gpa', 0):#x}"
                + (" private" if get("private") else " shared"), False, Category.FAULT)
    if kind is EngineStep.FAULT:
        return (f"EPT violation gpa {get('gpa', 0):#x} " + ("private" if get("private") else "shared"),
                False, Category.FAULT)
    if kind is EngineStep.SPTE_CMPXCHG:
        if get("new") == FROZEN_SPTE and get("ok"):
            return (f"freeze {get('root')} SPTE gfn {get('gfn', 0):#x} L{get('level')}", False, Category.FREEZE)
        if not get("ok"):
            found = get("old", 0)
            # Named, so a search for FROZEN finds the vCPU that ran into another's freeze.
            what = f"FROZEN_SPTE {found:#x}" if found == FROZEN_SPTE else f"{found:#x}"
            return (f"cmpxchg failed on {get('root')} SPTE gfn {get('gfn', 0):#x} L{get('level')} "
                    f"(found {what})", False, Category.NONE)
        return None
    if kind is EngineStep.SPTE_WRITE:
        what = get("what")
        if what is SpteWrite.UNFREEZE or what is SpteWrite.RESTORE:
            return (f"{what.value} {get('root')} SPTE gfn {get('gfn', 0):#x} L{get('level')} = {get('new', 0):#x}",
                    False, Category.FREEZE if what is SpteWrite.UNFREEZE else Category.NONE)
        if what is SpteWrite.ZAP:
            return f"zap {get('root')} SPTE gfn {get('gfn', 0):#x} L{get('level')}", False, Category.NONE
        return None
    if kind is EngineStep.KVM_BUG:
        return f"KVM_BUG: {get('message')}", True, Category.ERROR
    if kind is EngineStep.WARN:
        return f"WARN: {get('message')}", True, Category.ERROR
    if kind is EngineStep.USER_EXIT:
        gpa = get("gpa")
        return (f"exit to userspace: {get('reason')}" + (f" gpa {gpa:#x}" if gpa is not None else ""), False,
                Category.NONE)
    if kind is TdxStep.GUEST_INTERRUPT:
        vectors = ", ".join(f"{v:#x}" for v in get("vectors", ()))
        return f"guest vCPU {get('vcpu')} takes posted interrupt {vectors}", False, Category.NONE
    if kind is EngineStep.HOST_OP:
        return f"host: {get('op')}", False, Category.NONE
    if kind is StepKind.TASK_ERROR:
        return f"task failed: {get('error')}", True, Category.ERROR
    return None


class _Regs:
    """A SEAMCALL_RETURN payload's fields by attribute (rax, rcx, ..., gpa, level), read through `get`."""

    __slots__ = ("_get",)

    def __init__(self, get: Any) -> None:
        self._get = get

    def __getattr__(self, name: str) -> Any:
        return self._get(name, 0)


class EventIndex:
    """Log entries and per-frame categories, extended as frames are recorded."""

    def __init__(self) -> None:
        self.entries: list[LogEntry] = []
        self.categories = bytearray()
        self.entry_frames = array("q")
        self._calls: dict[str, SeamcallEntry] = {}    # each task's SEAMCALL in flight (its input registers)

    def reset(self) -> None:
        self.__init__()

    def update(self, frames: Any) -> None:
        """Index frames not seen yet. `frames` is the session's FramesView (read column by column: no Frame
        is built)."""
        start = len(self.categories)
        n = len(frames)
        if n < start:        # the timeline was forked shorter: start over
            self.reset()
            start = 0
        calls = self._calls
        for i in range(start, n):
            kind = frames.kind_of(i)
            payload = frames.payload_of(i)
            entry = None
            if kind is TdxStep.SEAMCALL:
                calls[frames.task_of(i)] = payload
            elif kind is TdxStep.SEAMCALL_RETURN:
                entry = calls.pop(frames.task_of(i), None)
            found = describe_frame(kind, Step(kind, payload).get, entry)
            violations = frames.violations_of(i)
            if found is None and not violations:
                self.categories.append(Category.NONE)
                continue
            task = frames.task_of(i)
            cat = Category.NONE
            if found is not None:
                text, error, cat = found
                self.entries.append(LogEntry(i, task, text, error, cat))
                self.entry_frames.append(i)
            if violations:
                cat = Category.VIOLATION
                for v in violations:
                    self.entries.append(LogEntry(i, task, f"VIOLATION {v.invariant}: {v.message}", True,
                                                 Category.VIOLATION))
                    self.entry_frames.append(i)
            self.categories.append(cat)

    def column_categories(self, width: int, length: int | None = None) -> list[Category]:
        """The most important category in each of `width` equal slices of the recorded frames."""
        cats = self.categories
        n = len(cats) if length is None else min(length, len(cats))
        if n == 0 or width <= 0:
            return [Category.NONE] * max(width, 0)
        out = []
        for col in range(width):
            a = col * n // width
            b = max(a + 1, (col + 1) * n // width)
            if a >= n:
                out.append(Category.NONE)
            else:
                out.append(Category(max(cats[a:min(b, n)])))
        return out

    def entry_at_or_before(self, frame: int) -> int | None:
        """Index of the last log entry whose frame is <= `frame`."""
        import bisect

        i = bisect.bisect_right(self.entry_frames, frame) - 1
        return i if i >= 0 else None

    def next_frame(self, frame: int, categories: set[Category], forward: bool) -> int | None:
        """The next (or previous) frame after (before) `frame` whose category is in `categories`."""
        cats = self.categories
        codes = bytes(sorted(int(c) for c in categories))
        if forward:
            for i in range(frame + 1, len(cats)):
                if cats[i] in codes:
                    return i
        else:
            for i in range(min(frame, len(cats)) - 1, -1, -1):
                if cats[i] in codes:
                    return i
        return None
