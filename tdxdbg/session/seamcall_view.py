"""One SEAMCALL as the debugger's SEAMCALL panel shows it: the leaf, its input registers decoded by the leaf's
operand layout, the output registers, the completion status decoded (class, operand id, details) and the S-EPT
entries the call changed, before -> after.

The operands and outputs are the ones declared on the leaf's handler (tdxdbg.hw.tdx.seamcall.leaf_info, after
the TDX module ABI's per-leaf operand tables): the log, scenarios and this panel share that one declaration.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from tdxdbg.hw.tdx.leaves import Seamcall
from tdxdbg.hw.tdx.seamcall import PAGE_INFO_LEVEL_MASK, Arg, Reg, TdxStep, leaf_info
from tdxdbg.hw.tdx.sept import FREE_ENTRY, SeptEntry
from tdxdbg.hw.tdx.status import (
    OPERAND_MASK,
    STATUS_MASK,
    TDX_ERROR_BIT,
    TDX_NON_RECOVERABLE_BIT,
    OperandId,
    status_name,
)

# What each kind of operand is, for the panel (the operands themselves are declared on the leaf's handler:
# tdxdbg.hw.tdx.seamcall.leaf_info).
ARG_MEANING = {
    Arg.PAGE_INFO: "page_info: GPA | level of an S-EPT entry",
    Arg.PAGE_RANGE: "page_info: GPA | level of a page",
    Arg.GPA: "GPA",
    Arg.PA: "host physical address",
    Arg.VALUE: "value",
    Arg.TDR: "TDR page (the TD)",
    Arg.TDVPR: "TDVPR page (the vCPU)",
    Arg.NEW_PAGE: "new page for the module (HPA)",
    Arg.NEW_PAGE_AT_LEVEL: "page to map, of the level's size (HPA)",
    Arg.SOURCE_PAGE: "source page (HPA)",
}
PAGE_INFO_GPA_MASK = 0x000F_FFFF_FFFF_F000
# Output registers of a failed S-EPT leaf that reports "details" (TDX_EPT_ENTRY_STATE_INCORRECT and friends):
# RCX the entry's architectural value, RDX its level info (tdh_mem_page_aug()'s ext_err1/ext_err2).
ERROR_OUTPUTS = {Reg.RCX: "S-EPT entry (arch value) on error", Reg.RDX: "S-EPT entry level info on error"}


@attrs.frozen(slots=True)
class Register:
    name: str
    value: int
    meaning: str
    decoded: str = ""


@attrs.frozen(slots=True)
class StatusView:
    rax: int
    name: str
    error: bool
    non_recoverable: bool
    status_class: int          # bits 47:40 of RAX (the class of the status code)
    operand: str               # operand id name (bits 31:0) or ""
    details: int               # bits 31:0 when not an operand id


@attrs.frozen(slots=True)
class SeptChange:
    gpa: int | None            # None when the table's range is unknown at this position
    table: int
    index: int
    before: SeptEntry
    after: SeptEntry


@attrs.frozen(slots=True)
class SeamcallView:
    leaf: Seamcall
    task: str
    entry_frame: int
    return_frame: int | None   # None while the call is still in the module at the position
    inputs: tuple[Register, ...]
    outputs: tuple[Register, ...]
    status: StatusView | None
    sept_changes: tuple[SeptChange, ...]
    locks: tuple[tuple[str, bool], ...]
    injected: bool


def decode_status(rax: int) -> StatusView:
    """RAX bit 63 error, 62 non-recoverable, 47:40 class, 31:0 operand id or details (tdx_error_codes_defs.h)."""
    low = rax & OPERAND_MASK
    try:
        operand = OperandId(low).name if low else ""
    except ValueError:
        operand = ""
    return StatusView(rax, status_name(rax), bool(rax & TDX_ERROR_BIT), bool(rax & TDX_NON_RECOVERABLE_BIT),
                      ((rax & STATUS_MASK) >> 40) & 0xFF, operand, 0 if operand else low)


def _inputs(leaf: Seamcall, regs: dict[Reg, int]) -> tuple[Register, ...]:
    info = leaf_info(leaf)
    if info is None:     # a leaf the module does not implement: the raw registers
        return tuple(Register(r.name, v, "") for r, v in regs.items())
    out = []
    for o in info.operands:
        v = regs[o.reg]
        decoded = (f"gpa {v & PAGE_INFO_GPA_MASK:#x} level {v & PAGE_INFO_LEVEL_MASK}"
                   if o.arg in (Arg.PAGE_INFO, Arg.PAGE_RANGE) else "")
        out.append(Register(o.reg.name, v, f"{o.name}: {ARG_MEANING.get(o.arg, o.arg.value)}", decoded))
    return tuple(out)


def _outputs(leaf: Seamcall, regs: dict[Reg, int], error: bool) -> tuple[Register, ...]:
    info = leaf_info(leaf)
    if error:
        return tuple(Register(r.name, regs[r], m) for r, m in ERROR_OUTPUTS.items())
    if info is None:
        return tuple(Register(r.name, v, "") for r, v in regs.items())
    return tuple(Register(o.reg.name, regs[o.reg], o.name) for o in info.returns)


def seamcall_view(frames: Sequence[Any], task_frames: Sequence[int], frame_index: int,
                  table_gpa: Callable[[int], tuple[int, int] | None]) -> SeamcallView | None:
    """The SEAMCALL that frame `frame_index` belongs to (its entry, its return, or a frame of the same task in
    between), or None. `task_frames` are the frame indices of that frame's task up to the cursor (frames after
    it are not looked at: the view never shows the future); `table_gpa(pfn)` gives an S-EPT table page's (first
    GPA, bytes per entry) for naming changed entries."""
    k = bisect.bisect_right(task_frames, frame_index) - 1
    entry_at = None
    for j in range(k, -1, -1):
        kind = frames[task_frames[j]].step.kind
        if kind is TdxStep.SEAMCALL:
            entry_at = j
            break
        if kind is TdxStep.SEAMCALL_RETURN and task_frames[j] != frame_index:
            return None
    if entry_at is None:
        return None
    entry = frames[task_frames[entry_at]]
    e = entry.step.payload
    ret = None
    changes: dict[tuple, list] = {}
    for j in range(entry_at, len(task_frames)):
        fr = frames[task_frames[j]]
        for key, old, new in fr.effects:
            if isinstance(key, tuple) and key and key[0] == "sept":
                if key in changes:
                    changes[key][1] = new
                else:
                    changes[key] = [old, new]
        if fr.step.kind is TdxStep.SEAMCALL_RETURN:
            ret = fr
            break
        if task_frames[j] > frame_index and j > entry_at and fr.step.kind is TdxStep.SEAMCALL:
            break
    inputs = _inputs(e.leaf, {Reg.RCX: e.rcx, Reg.RDX: e.rdx, Reg.R8: e.r8, Reg.R9: e.r9})
    outputs: tuple[Register, ...] = ()
    status = None
    if ret is not None:
        r = ret.step.payload
        status = decode_status(int(r.rax))
        outputs = _outputs(e.leaf, {Reg.RCX: r.rcx, Reg.RDX: r.rdx, Reg.R8: r.r8}, status.error)
    sept = []
    for key, (old, new) in changes.items():
        where = table_gpa(key[1])
        gpa = where[0] + key[2] * where[1] if where is not None else None
        # A key the call created or deleted reads as FREE on that side (the World's MISSING / a deleted key).
        sept.append(SeptChange(gpa, key[1], key[2], old if isinstance(old, SeptEntry) else FREE_ENTRY,
                               new if isinstance(new, SeptEntry) else FREE_ENTRY))
    return SeamcallView(e.leaf, entry.task, entry.index, ret.index if ret is not None else None, inputs, outputs,
                        status, tuple(sept), tuple(e.locks), bool(e.injected))
