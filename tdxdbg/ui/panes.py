"""The text of the small panes (header, walk, inspector, stack, source): pure functions over session views,
so they are tested without a terminal."""

from __future__ import annotations

import linecache
import re
from pathlib import Path
from typing import Any

from rich.text import Text

from tdxdbg.session import SEPT
from tdxdbg.session.decode import decode_spte, describe_spte
from tdxdbg.session.views import ActivationView, TaskView

ENGINE_ROOT = Path(__file__).resolve().parent.parent


def header_text(title: str, variant: str, position: int, total: int, task: str | None, vm_state: str,
                running: str = "", ran_by: str | None = None) -> Text:
    """Frame (and the task that ran it), the followed task and VM state first (they change while stepping),
    then variant and scenario title."""
    t = Text(no_wrap=True, overflow="ellipsis")
    t.append(" tdxdbg ", style="bold black on cyan")
    frame = f"frame {position - 1}/{max(total - 1, 0)}" if position else f"frame -/{max(total - 1, 0)}"
    t.append(f" {frame} ", style="bold yellow")
    t.append(f"ran {ran_by} " if ran_by else "not started ", style="yellow")
    t.append(f"· following {task or '-'} ", style="magenta")
    style = "bold white on red" if vm_state != "running" else "green"
    t.append(f" VM {vm_state} ", style=style)
    if running:
        t.append(f" {running} {total:,} frames (Esc stops) ", style="bold cyan")
    t.append(f" · {variant} · ", style="grey70")
    t.append(title, style="bold")
    return t


def walk_text(path: tuple[Any, ...], task: str | None) -> Text:
    t = Text(no_wrap=True, overflow="ellipsis")
    t.append(f"tdp_iter of {task or '-'}\n", style="bold")
    if not path:
        t.append("  (not walking a root)", style="grey50")
        return t
    t.append(f"  {path[0].root} root\n", style="grey70")
    for p in path:
        sptep = (p.table << 12) | (p.index << 3)
        t.append(f"  L{p.level} ", style="bold")
        t.append(f"idx {p.index:3d} gfn {p.gfn:#x} sptep {sptep:#x}\n")
        t.append(f"      old_spte {p.old_spte:#018x} ", style="cyan")
        t.append(describe_spte(p.old_spte) + "\n", style="grey70")
    return t


# SPTE bits shown by name when set and as dots when clear, so they read without colour; three rows that fit the
# inspector at 160 columns: the EPT permission and type bits, KVM's software bits, the page frame.
BIT_ROWS = (("R", "W", "X", "IPAT", "PS", "A", "D"),
            ("MMU-present", "host-writable", "MMU-writable", "suppress-#VE"))


def spte_bits_text(value: int) -> Text:
    bits = decode_spte(value)
    by_name = {f.name: f for f in bits.fields}
    t = Text()
    for row in BIT_ROWS:
        t.append("  ")
        for name in row:
            on = bool(by_name[name].value)
            t.append(name if on else "·" * len(name), style="bold green" if on else "grey42")
            t.append(" ")
        t.append("\n")
    mt = by_name["memtype"]
    t.append(f"  memtype={mt.value} ({mt.meaning})  pfn={bits.pfn:#x}\n")
    return t


def inspector_text(line: Any, sept: Any, last_write: int | None, pinned: Any = None) -> Text:
    """The selected SPTE bit by bit, beside the S-EPT entry for the same GPA. `pinned` (kind, gfn, level) is a
    selection whose entry no longer exists at this frame: shown as FREE at its GPA."""
    t = Text(no_wrap=True, overflow="ellipsis")
    if pinned is not None:
        kind, gfn, level = pinned
        if kind == "sept":
            t.append(f"S-EPT entry gpa {gfn << 12:#x} TDX level {level - 1}\n", style="bold")
            t.append("  FREE: not in the S-EPT at this frame (removed, or not added yet)\n", style="bold")
        else:
            t.append(f"{kind} SPTE gfn {gfn:#x} L{level}\n", style="bold")
            t.append("  not present: its page table is not in this root at this frame\n", style="bold")
        if sept is not None:
            t.append(f"S-EPT for gpa {sept.gpa:#x}: {sept.state.name} L{sept.level}\n")
        if last_write is not None:
            t.append(f"  last written by frame {last_write} (l: go there)\n", style="grey70")
        t.append("  (selection kept on this GPA; move the cursor to select another)\n", style="grey50")
        return t
    if line is None or line.key is None:
        t.append("Inspector\n", style="bold")
        t.append("  select an entry in the page tables (up/down)", style="grey50")
        return t
    if line.key[0] == SEPT:
        t.append(f"S-EPT entry gpa {line.gfn << 12:#x} TDX level {line.level - 1}\n", style="bold")
        if sept is not None:
            t.append(f"  state {sept.state.name} (public {sept.state.public})  page {sept.pfn:#x}\n")
            t.append(f"  architectural value {sept.arch_value:#018x}\n", style="grey70")
        if last_write is not None:
            t.append(f"  last written by frame {last_write} (l: go there)\n", style="grey70")
        return t
    bits = decode_spte(line.value)
    t.append(f"SPTE {line.value:#018x}  gfn {line.gfn:#x} L{line.level}\n", style="bold")
    t.append_text(spte_bits_text(line.value))
    t.append(f"  {bits.summary}\n", style="grey70")
    if sept is not None:
        t.append(f"S-EPT for gpa {sept.gpa:#x}: ", style="bold")
        t.append(f"{sept.state.name} L{sept.level} page {sept.pfn:#x}\n")
    elif line.kind == "mirror":
        t.append("S-EPT for this gpa: FREE / not reached\n", style="grey50")
    if last_write is not None:
        t.append(f"  last written by frame {last_write} (l: go there)\n", style="grey70")
    return t


def td_state_text(st: Any, blocked_gpa: dict[tuple[int, int], int]) -> Text:
    """TLB epoch, vCPUs, BLOCKED entries with their BLOCK epoch, mmu_lock and TDX locks (a TdxStateView)."""
    t = Text(no_wrap=True)
    t.append("TD ", style="bold")
    t.append(f"TLB epoch {st.td_epoch}", style="bold yellow")
    t.append(f" (in guest: {st.refcount[0]} even, {st.refcount[1]} odd)\n", style="grey62")
    for v in st.vcpus:
        where = f"in guest, epoch {v.epoch}" if v.in_guest else "outside the guest"
        t.append(f"  vCPU{v.index} ", style="bold")
        t.append(where + "\n", style="green" if v.in_guest else "grey70")
    if st.mmu_lock_writer:
        lock = f"write {st.mmu_lock_writer}"
    elif st.mmu_lock_readers:
        lock = f"read {', '.join(st.mmu_lock_readers)}"
    else:
        lock = "free"
    t.append("  mmu_lock ", style="bold")
    t.append(lock + "\n", style="bold red" if st.mmu_lock_writer else "")
    t.append("  TDX locks", style="bold")
    t.append(" none held\n" if not st.locks else "\n")
    for x in st.locks:
        t.append(f"    {x.name}: {x.holders}\n")
    for b in st.blocked:
        gpa = blocked_gpa.get((b.table, b.index))
        where = f"gpa {gpa:#x}" if gpa is not None else f"{b.table:#x}[{b.index}]"
        t.append(f"  {b.state.name} ", style="red")
        t.append(f"{where} page {b.pfn:#x} BLOCK epoch {b.bepoch} ")
        t.append("tracked\n" if b.tracked else "not tracked yet\n",
                 style="green" if b.tracked else "yellow")
    return t


def seamcall_text(v: Any) -> Text:
    """The SEAMCALL panel for a SeamcallView (or None)."""
    t = Text(no_wrap=True)
    if v is None:
        t.append("SEAMCALL\n", style="bold")
        t.append("  the followed task has made no SEAMCALL yet (e / E: next / previous one)", style="grey50")
        return t
    t.append(f"{v.leaf.dotted}", style="bold yellow")
    t.append(f" by {v.task}, frame {v.entry_frame}", style="grey70")
    t.append(f" -> {v.return_frame}" if v.return_frame is not None else " (still in the module)", style="grey70")
    t.append("  [injected]\n" if v.injected else "\n", style="bold red")
    t.append("in  ", style="bold")
    t.append(f"RAX {int(v.leaf):#x} leaf {v.leaf.dotted}\n")
    for r in v.inputs:
        t.append(f"    {r.name:<3} {r.value:#018x} ", style="cyan")
        t.append(r.meaning, style="grey70")
        t.append(f": {r.decoded}\n" if r.decoded else "\n")
    if v.locks:
        t.append("    locks " + ", ".join(f"{n} {'excl' if x else 'shared'}" for n, x in v.locks) + "\n",
                 style="grey62")
    if v.status is not None:
        st = v.status
        t.append("out ", style="bold")
        t.append(f"RAX {st.rax:#018x} ", style="cyan")
        t.append(st.name, style="bold red" if st.error else "bold green")
        t.append("\n")
        t.append(f"    class {st.status_class:#04x}  error {int(st.error)}  non-recoverable {int(st.non_recoverable)}"
                 + (f"  operand {st.operand}" if st.operand else f"  details {st.details:#x}") + "\n",
                 style="grey70")
        for r in v.outputs:
            t.append(f"    {r.name:<3} {r.value:#018x} ", style="cyan")
            t.append(r.meaning + "\n", style="grey70")
    t.append("S-EPT touched\n" if v.sept_changes else "S-EPT: no entry changed\n", style="bold")
    for c in v.sept_changes:
        where = f"gpa {c.gpa:#x}" if c.gpa is not None else f"{c.table:#x}[{c.index}]"
        t.append(f"    {where}: ")
        t.append(f"{c.before.state.name} {c.before.pfn:#x}", style="grey70")
        t.append(" -> ")
        t.append(f"{c.after.state.name} {c.after.pfn:#x}\n", style="bold")
    return t


def clamp_activation(activation: int, depth: int) -> int:
    """The selected activation of a stack `depth` deep: `activation` when valid, else the innermost one."""
    return activation if 0 <= activation < depth else depth - 1


def stack_text(tasks: tuple[TaskView, ...], selected: str | None, activation: int, relative: bool = False) -> Text:
    t = Text(no_wrap=True, overflow="ellipsis")
    for tv in tasks:
        mark = "▶ " if tv.name == selected else "  "
        t.append(mark, style="bold magenta")
        t.append(f"{tv.name}", style="bold" if tv.name == selected else "")
        t.append(f" [{tv.state}]", style="grey62")
        if tv.step:
            t.append(f" {tv.step}", style="grey50")
        t.append("\n")
    tv = next((x for x in tasks if x.name == selected), None)
    if tv is None or not tv.stack:
        return t
    t.append("call stack (innermost last; u/d to move)\n", style="bold")
    sel = clamp_activation(activation, len(tv.stack))
    for i, a in enumerate(tv.stack):
        style = "reverse" if i == sel else ""
        t.append(f"  {a.function} ", style=style + " bold" if style else "bold")
        t.append(f"{where(a, relative)}\n", style=style or "grey62")
    return t


def _def_line(filename: str, line: int, name: str) -> tuple[int, int]:
    """The line of `def name` enclosing `line` in `filename`, and its indentation; (line, 0) when not found."""
    pattern = re.compile(rf"^(\s*)(async\s+)?def\s+{re.escape(name)}\b")
    for n in range(line, 0, -1):
        m = pattern.match(linecache.getline(filename, n))
        if m:
            return n, len(m.group(1))
    return line, 0


def offset_in_function(filename: str, line: int, qualname: str) -> int:
    """How many lines `line` is below its function's `def` line (the kernel's `function+offset` idea)."""
    return line - _def_line(filename, line, qualname.rsplit(".", 1)[-1])[0]


def where(a: ActivationView, relative: bool) -> str:
    """`file.py:line`, or `file.py function+offset` with relative line numbers."""
    name = Path(a.filename).name
    if relative:
        return f"{name} +{offset_in_function(a.filename, a.line, a.qualname)}"
    return f"{name}:{a.line}"


_NEW_BLOCK = re.compile(r"^(\s*)(async\s+def|def|class|@)\b")


def source_text(filename: str | None, line: int | None, qualname: str = "", relative: bool = False,
                context: int = 6) -> Text:
    """The lines of the function around `line` (not beyond its `def` or into the next definition). With
    `relative`, lines are numbered from the `def` line, so edits elsewhere in the file do not move them."""
    t = Text(no_wrap=True, overflow="ellipsis")
    if not filename or not line:
        t.append("(no source)", style="grey50")
        return t
    path = Path(filename)
    try:
        shown = path.relative_to(ENGINE_ROOT.parent)
    except ValueError:
        shown = path
    name = qualname.rsplit(".", 1)[-1] if qualname else ""
    start, indent = _def_line(filename, line, name) if name else (max(1, line - context), 0)
    if relative:
        t.append(f"{shown} {name}+{line - start}\n", style="bold")
    else:
        t.append(f"{shown}:{line}" + (f" ({name}+{line - start})" if name else "") + "\n", style="bold")
    for n in range(max(start, line - context), line + context + 1):
        raw = linecache.getline(filename, n)
        src = raw.rstrip("\n")
        if n > line:
            m = _NEW_BLOCK.match(src)
            if not raw or (m and len(m.group(1)) <= indent):     # end of file, or the next definition
                break
        marker = "→" if n == line else " "
        number = f"+{n - start}" if relative else str(n)
        t.append(f"{marker}{number:>5} ", style="bold yellow" if n == line else "grey50")
        t.append(src[:200] + "\n", style="bold" if n == line else "")
    return t
