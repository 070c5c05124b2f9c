"""One SEAMCALL as the debugger's SEAMCALL panel shows it: the leaf, its input registers decoded by the leaf's
operand layout, the output registers, the completion status decoded (class, operand id, details) and the S-EPT
entries the call changed, before -> after.

The operand layouts are the TDX module ABI's (Intel TDX Module ABI specification, per-leaf input/output
operand tables; Linux `arch/x86/virt/vmx/tdx/tdx.c` builds the same registers in tdh_mem_*()). This is the one
place the debugger decodes them.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from tdxdbg.hw.tdx.leaves import Seamcall
from tdxdbg.hw.tdx.seamcall import TdxStep
from tdxdbg.hw.tdx.sept import FREE_ENTRY, SeptEntry
from tdxdbg.hw.tdx.status import (
    OPERAND_MASK,
    STATUS_MASK,
    TDX_ERROR_BIT,
    TDX_NON_RECOVERABLE_BIT,
    OperandId,
    status_name,
)

# EPT mapping information (RCX of the S-EPT leaves): GPA in bits 51:12, TDX level in bits 2:0.
GPA_MASK = 0x000F_FFFF_FFFF_F000
LEVEL_MASK = 0x7
PAGE_MASK = ~0xFFF

_MAPPING = ("RCX", "EPT mapping: GPA | level")
_TDR = ("RDX", "TDR page (the TD)")
# Input operands per leaf, beyond RAX (the leaf number).
OPERANDS: dict[Seamcall, tuple[tuple[str, str], ...]] = {
    Seamcall.TDH_MEM_SEPT_ADD: (_MAPPING, _TDR, ("R8", "new S-EPT page (HPA)")),
    Seamcall.TDH_MEM_PAGE_AUG: (_MAPPING, _TDR, ("R8", "page to map (HPA)")),
    Seamcall.TDH_MEM_PAGE_ADD: (_MAPPING, _TDR, ("R8", "page to map (HPA)"), ("R9", "source page (HPA)")),
    Seamcall.TDH_MEM_RANGE_BLOCK: (_MAPPING, _TDR),
    Seamcall.TDH_MEM_RANGE_UNBLOCK: (_MAPPING, _TDR),
    Seamcall.TDH_MEM_PAGE_REMOVE: (_MAPPING, _TDR),
    Seamcall.TDH_MEM_SEPT_REMOVE: (_MAPPING, _TDR),
    Seamcall.TDH_MEM_SEPT_RD: (_MAPPING, _TDR),
    Seamcall.TDH_MEM_PAGE_DEMOTE: (_MAPPING, _TDR, ("R8", "new S-EPT page (HPA)")),
    Seamcall.TDH_MEM_PAGE_PROMOTE: (_MAPPING, _TDR),
    Seamcall.TDH_MEM_TRACK: (("RCX", "TDR page (the TD)"),),
    Seamcall.TDH_PHYMEM_PAGE_WBINVD: (("RCX", "page (HPA)"),),
    Seamcall.TDH_PHYMEM_PAGE_RECLAIM: (("RCX", "page (HPA)"),),
    Seamcall.TDH_VP_ENTER: (("RCX", "TDVPR page (the vCPU)"),),
}
# Output registers of the S-EPT leaves on an EPT-entry error (TDX_EPT_ENTRY_STATE_INCORRECT and friends carry
# "details"): RCX the entry's architectural value, RDX its level info. tdh_mem_page_aug() and friends return
# them as `ext_err1`/`ext_err2`.
OUTPUTS = (("RCX", "S-EPT entry (arch value) / output"), ("RDX", "S-EPT entry level info / output"),
           ("R8", "output"))


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


def _decode_input(name: str, value: int) -> str:
    if name == "RCX" and _MAPPING[0] == name:
        return f"gpa {value & GPA_MASK:#x} level {value & LEVEL_MASK}"
    return ""


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
    layout = OPERANDS.get(e.leaf, (_MAPPING, _TDR, ("R8", ""), ("R9", "")))
    regs = {"RCX": e.rcx, "RDX": e.rdx, "R8": e.r8, "R9": e.r9}
    inputs = tuple(Register(n, regs[n], m, _decode_input(n, regs[n]) if m == _MAPPING[1] else "")
                   for n, m in layout)
    outputs: tuple[Register, ...] = ()
    status = None
    if ret is not None:
        r = ret.step.payload
        out = {"RCX": r.rcx, "RDX": r.rdx, "R8": r.r8}
        outputs = tuple(Register(n, out[n], m) for n, m in OUTPUTS)
        status = decode_status(int(r.rax))
    sept = []
    for key, (old, new) in changes.items():
        where = table_gpa(key[1])
        gpa = where[0] + key[2] * where[1] if where is not None else None
        # A key the call created or deleted reads as FREE on that side (the World's MISSING / a deleted key).
        sept.append(SeptChange(gpa, key[1], key[2], old if isinstance(old, SeptEntry) else FREE_ENTRY,
                               new if isinstance(new, SeptEntry) else FREE_ENTRY))
    return SeamcallView(e.leaf, entry.task, entry.index, ret.index if ret is not None else None, inputs, outputs,
                        status, tuple(sept), tuple(e.locks), bool(e.injected))
