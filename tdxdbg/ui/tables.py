"""The page-table pane's lines: the mirror root, the direct root and the TDX module's S-EPT as indented trees
of table pages with their populated entries. Pure functions over session views."""

from __future__ import annotations

from collections.abc import Hashable
from typing import NamedTuple

from rich.text import Text

from tdxdbg.engine.spte import describe_spte
from tdxdbg.hw.tdx.sept import SeptState
from tdxdbg.session.views import RootView, SeptTableView, SpteView, StateView, TableView

# Which entry the iterator of the current task points at, which keys this frame wrote, and who froze what.


class Marks(NamedTuple):
    iter_key: Hashable | None = None
    changed: frozenset = frozenset()
    frozen_by: dict | None = None


class TableLine(NamedTuple):
    text: Text
    key: Hashable | None        # ("pte", table, index) or ("sept", table, index)
    kind: str                   # "mirror" / "direct" / "sept" / "" for headers
    gfn: int = 0
    level: int = 0
    value: int = 0


SEPT_STYLE = {
    SeptState.MAPPED: "green", SeptState.PENDING: "yellow", SeptState.BLOCKED: "red",
    SeptState.PENDING_BLOCKED: "red", SeptState.NL_MAPPED: "cyan", SeptState.NL_BLOCKED: "red",
}


def _flags(e: SpteView) -> str:
    if e.frozen:
        return "FROZEN"
    return describe_spte(e.value)


def _spte_line(e: SpteView, depth: int, marks: Marks) -> TableLine:
    key = ("pte", e.table, e.index)
    t = Text()
    pointer = "► " if key == marks.iter_key else "  "
    t.append(pointer, style="bold magenta")
    t.append("  " * depth)
    t.append(f"[{e.index:3d}] ", style="grey62")
    t.append(f"gfn {e.gfn:#x} L{e.level} ")
    if e.frozen:
        who = (marks.frozen_by or {}).get(key)
        t.append(f"{e.value:#018x} FROZEN" + (f" by {who}" if who else ""), style="bold white on red")
    elif e.leaf:
        t.append(f"{e.value:#018x} ", style="green")
        t.append(f"leaf {_flags(e)}", style="grey70")
    elif e.child is not None:
        t.append(f"{e.value:#018x} ", style="cyan")
        t.append(f"-> table {e.child.pfn:#x}", style="grey70")
    else:
        t.append(f"{e.value:#018x} {_flags(e)}", style="grey70")
    if key in marks.changed:
        t.stylize("on dark_goldenrod")
    return TableLine(t, key, "", e.gfn, e.level, e.value)


def _table_lines(table: TableView, depth: int, marks: Marks, out: list[TableLine], kind: str) -> None:
    for e in table.entries:
        line = _spte_line(e, depth, marks)
        out.append(line._replace(kind=kind))
        if e.child is not None:
            _table_lines(e.child, depth + 1, marks, out, kind)


def root_lines(root: RootView | None, title: str, kind: str, marks: Marks) -> list[TableLine]:
    if root is None:
        head = Text(f"{title}: not allocated", style="bold grey50")
        return [TableLine(head, None, kind)]
    head = Text()
    head.append(f"{title} ", style="bold")
    head.append(f"L{root.level} table {root.pfn:#x}  refcount {root.refcount}", style="grey70")
    if root.invalid:
        head.append("  INVALID", style="bold red")
    out = [TableLine(head, None, kind)]
    if not root.tree.entries:
        out.append(TableLine(Text("      (empty)", style="grey50"), None, kind))
    _table_lines(root.tree, 1, marks, out, kind)
    return out


def _sept_lines(table: SeptTableView, depth: int, marks: Marks, out: list[TableLine]) -> None:
    for node in table.entries:
        e = node.entry
        key = ("sept", e.table, e.index)
        t = Text("  ")
        t.append("  " * depth)
        t.append(f"[{e.index:3d}] ", style="grey62")
        t.append(f"gpa {e.gpa:#x} L{e.level} ")
        t.append(f"{e.state.name}", style=SEPT_STYLE.get(e.state, ""))
        if e.state.is_leaf:
            t.append(f" page {e.pfn:#x}", style="grey70")
        elif node.child is not None:
            t.append(f" -> S-EPT page {e.pfn:#x}", style="grey70")
        if key in marks.changed:
            t.stylize("on dark_goldenrod")
        out.append(TableLine(t, key, "sept", e.gpa >> 12, e.level + 1, e.arch_value))
        if node.child is not None:
            _sept_lines(node.child, depth + 1, marks, out)


def sept_lines(sept: SeptTableView | None, marks: Marks) -> list[TableLine]:
    if sept is None:
        return [TableLine(Text("S-EPT (TDX module): TD not created", style="grey50"), None, "sept")]
    head = Text()
    head.append("S-EPT (TDX module) ", style="bold")
    head.append(f"root (TDCS page) {sept.pfn:#x}  TDX level {sept.level}", style="grey70")
    out = [TableLine(head, None, "sept")]
    if not sept.entries:
        out.append(TableLine(Text("      (all FREE)", style="grey50"), None, "sept"))
    _sept_lines(sept, 1, marks, out)
    return out


def all_lines(view: StateView, marks: Marks) -> list[TableLine]:
    lines = root_lines(view.mirror, "mirror root (private)", "mirror", marks)
    lines += root_lines(view.direct, "direct root (shared)", "direct", marks)
    for r in view.roots:
        if r is not view.mirror and r is not view.direct:
            lines += root_lines(r, f"{r.kind} root {r.pfn:#x}", r.kind, marks)
    lines += sept_lines(view.sept, marks)
    return lines
