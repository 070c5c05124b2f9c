"""The page-table pane's lines: the mirror root, the direct root and the TDX module's S-EPT as indented trees
of table pages with their populated entries. Pure functions over session views.

A tree can hold thousands of entries and is rebuilt on every step, so a line is a small value and its rich
Text is made only when the line is drawn (the LineList asks for visible lines only).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, NamedTuple

from rich.text import Text

from tdxdbg.session import SeptState, describe_spte, pte_key, sept_key
from tdxdbg.session.views import RootView, SeptTableView, StateView, TableView


class Marks(NamedTuple):
    """What to point out: the entry the current task's iterator is at, the keys this frame wrote, and who
    froze each FROZEN SPTE."""

    iter_key: Hashable | None = None
    changed: frozenset = frozenset()
    frozen_by: dict | None = None


class TableLine(NamedTuple):
    key: Hashable | None        # ("pte", table, index) or ("sept", table, index); None for headers
    kind: str                   # "mirror" / "direct" / "sept"
    gfn: int = 0
    level: int = 0              # KVM level (S-EPT lines: TDX level + 1)
    value: int = 0              # SPTE value, or the S-EPT entry's architectural value
    depth: int = 0
    item: Any = None            # the SpteView / SeptEntryView (or a header Text)


SEPT_STYLE = {
    SeptState.MAPPED: "green", SeptState.PENDING: "yellow", SeptState.BLOCKED: "red",
    SeptState.PENDING_BLOCKED: "red", SeptState.NL_MAPPED: "cyan", SeptState.NL_BLOCKED: "red",
}


def render(line: TableLine, marks: Marks) -> Text:
    """The rich Text of one line (called only for lines on screen)."""
    item = line.item
    if line.key is None:
        return item
    t = Text(no_wrap=True)
    if line.kind == "sept":
        e = item
        t.append("  ")
        t.append("  " * line.depth)
        t.append(f"[{e.index:3d}] ", style="grey62")
        t.append(f"gpa {e.gpa:#x} L{e.level} ")
        t.append(f"{e.state.name}", style=SEPT_STYLE.get(e.state, ""))
        if e.state.is_leaf:
            t.append(f" page {e.pfn:#x}", style="grey70")
        elif e.state is not SeptState.FREE:
            t.append(f" -> S-EPT page {e.pfn:#x}", style="grey70")
    else:
        e = item
        t.append("► " if line.key == marks.iter_key else "  ", style="bold magenta")
        t.append("  " * line.depth)
        t.append(f"[{e.index:3d}] ", style="grey62")
        t.append(f"L{e.level} gfn {e.gfn:#x} ")
        if e.frozen:
            who = (marks.frozen_by or {}).get(line.key)
            t.append("FROZEN" + (f" by {who}" if who else ""), style="bold white on red")
            t.append(f" {e.value:#018x}", style="grey70")
        elif e.leaf:
            t.append(f"leaf {e.value:#018x} ", style="green")
            t.append(describe_spte(e.value), style="grey70")
        elif e.child is not None:
            t.append(f"-> table {e.child.pfn:#x} ", style="cyan")
            t.append(f"{e.value:#018x}", style="grey70")
        else:
            t.append(f"{e.value:#018x} {describe_spte(e.value)}", style="grey70")
    if line.key in marks.changed:
        t.stylize("on dark_goldenrod")
    return t


def _table_lines(table: TableView, depth: int, out: list[TableLine], kind: str) -> None:
    for e in table.entries:
        out.append(TableLine(pte_key(e.table, e.index), kind, e.gfn, e.level, e.value, depth, e))
        if e.child is not None:
            _table_lines(e.child, depth + 1, out, kind)


def _header(text: Text, kind: str) -> TableLine:
    return TableLine(None, kind, item=text)


def root_lines(root: RootView | None, title: str, kind: str) -> list[TableLine]:
    if root is None:
        return [_header(Text(f"{title}: not allocated", style="bold grey50"), kind)]
    head = Text(no_wrap=True)
    head.append(f"{title} ", style="bold")
    head.append(f"L{root.level} table {root.pfn:#x}  refcount {root.refcount}", style="grey70")
    if root.invalid:
        head.append("  INVALID", style="bold red")
    out = [_header(head, kind)]
    if not root.tree.entries:
        out.append(_header(Text("      (empty)", style="grey50"), kind))
    _table_lines(root.tree, 1, out, kind)
    return out


def _sept_lines(table: SeptTableView, depth: int, out: list[TableLine]) -> None:
    for node in table.entries:
        e = node.entry
        out.append(TableLine(sept_key(e.table, e.index), "sept", e.gpa >> 12, e.level + 1, 0, depth, e))
        if node.child is not None:
            _sept_lines(node.child, depth + 1, out)


def sept_lines(sept: SeptTableView | None) -> list[TableLine]:
    if sept is None:
        return [_header(Text("S-EPT (TDX module): TD not created", style="grey50"), "sept")]
    head = Text(no_wrap=True)
    head.append("S-EPT (TDX module) ", style="bold")
    head.append(f"root (TDCS page) {sept.pfn:#x}  TDX level {sept.level}", style="grey70")
    out = [_header(head, "sept")]
    if not sept.entries:
        out.append(_header(Text("      (all FREE)", style="grey50"), "sept"))
    _sept_lines(sept, 1, out)
    return out


def all_lines(view: StateView) -> list[TableLine]:
    lines = root_lines(view.mirror, "mirror root (private)", "mirror")
    lines += root_lines(view.direct, "direct root (shared)", "direct")
    for r in view.roots:
        if r is not view.mirror and r is not view.direct:
            lines += root_lines(r, f"{r.kind} root {r.pfn:#x}", r.kind)
    lines += sept_lines(view.sept)
    return lines


def max_width(lines: list[TableLine]) -> int:
    """A width that fits every line, estimated without rendering them."""
    return max((48 + 2 * ln.depth for ln in lines), default=0)
