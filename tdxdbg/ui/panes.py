"""The text of the small panes (header, walk, inspector, stack, source): pure functions over session views,
so they are tested without a terminal."""

from __future__ import annotations

import enum
import linecache
import re
from pathlib import Path
from typing import Any

from rich.text import Text

from tdxdbg.session.decode import decode_spte, describe_spte
from tdxdbg.session.views import ActivationView, TaskView

ENGINE_ROOT = Path(__file__).resolve().parent.parent
# Activations listed in the stack pane (innermost first); the rest are summarised.
STACK_SHOWN = 7


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


def inspector_text(line: Any, sept: Any, last_write: int | None) -> Text:
    """The selected SPTE bit by bit, beside the S-EPT entry for the same GPA."""
    t = Text(no_wrap=True, overflow="ellipsis")
    if line is None or line.key is None:
        t.append("Inspector\n", style="bold")
        t.append("  select an entry in the page tables (up/down)", style="grey50")
        return t
    if line.key[0] == "sept":
        t.append(f"S-EPT entry gpa {line.gfn << 12:#x} TDX level {line.level - 1}\n", style="bold")
        if sept is not None:
            t.append(f"  state {sept.state.name} (public {sept.state.public})  page {sept.pfn:#x}\n")
            t.append(f"  architectural value {sept.arch_value:#018x}\n", style="grey70")
        if last_write is not None:
            t.append(f"  last written by frame {last_write} (l: go there)\n", style="grey70")
        return t
    bits = decode_spte(line.value)
    t.append(f"SPTE {line.value:#018x}  gfn {line.gfn:#x} L{line.level}\n", style="bold")
    row = Text("  ")
    for f in bits.fields:
        on = bool(f.value)
        label = f"{f.name}={f.value:#x}" if f.name in ("memtype", "pfn") else f.name
        row.append(label + " ", style="bold green" if on else "grey42")
    t.append_text(row)
    t.append("\n")
    t.append(f"  {bits.summary}\n", style="grey70")
    if sept is not None:
        t.append(f"S-EPT for gpa {sept.gpa:#x}: ", style="bold")
        t.append(f"{sept.state.name} L{sept.level} page {sept.pfn:#x}\n")
    elif line.kind == "mirror":
        t.append("S-EPT for this gpa: FREE / not reached\n", style="grey50")
    if last_write is not None:
        t.append(f"  last written by frame {last_write} (l: go there)\n", style="grey70")
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
    # Show the innermost activations (and the selected one): outer ones are the vCPU loop and rarely matter.
    first = max(0, min(sel, len(tv.stack) - STACK_SHOWN))
    if first:
        t.append(f"  … {first} outer frames\n", style="grey50")
    for i, a in enumerate(tv.stack):
        if i < first:
            continue
        style = "reverse" if i == sel else ""
        t.append(f"  {a.function} ", style=style + " bold" if style else "bold")
        t.append(f"{where(a, relative)}\n", style=style or "grey62")
    a = tv.stack[sel]
    t.append(f"locals of {a.function}\n", style="bold")
    if not a.locals:
        t.append("  (none recorded)\n", style="grey50")
    for name, value in a.locals[:14]:
        t.append(f"  {name} = ", style="cyan")
        t.append(local_value_text(value)[:70] + "\n")
    return t


def local_value_text(value: Any) -> str:
    """A local's value as the locals pane shows it: enum members by name (a leaf, a level, a state), other
    ints in hex (addresses, gfns, SPTEs), anything else by its repr."""
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:#x}"
    return repr(value)


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
