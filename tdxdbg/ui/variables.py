"""The locals pane: a task activation's variables, one a row, each expandable in place (pudb's variables pane):
Enter on a row shows its fields (attrs classes, named tuples), items (dicts, lists, tuples, sets), attributes
(other objects) or, for a long scalar, its whole text over several rows. Expanded rows stay expanded while
stepping, so a value can be watched as it changes."""

from __future__ import annotations

import enum
from typing import Any, NamedTuple

import attrs
from rich.text import Text

from tdxdbg.ui.lines import LineList

# Children listed under an expanded value; the rest are counted.
CHILDREN_SHOWN = 200
# Characters of a value shown on its row; Enter shows the rest.
ROW_CHARS = 160
# Characters per row when a long value is shown whole.
WRAP = 100


def value_text(value: Any) -> str:
    """A value as the pane shows it: enum members by name, ints in hex (addresses, gfns, SPTEs), else repr."""
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:#x}"
    try:
        return repr(value)
    except Exception as exc:  # a repr that raises must not take the pane down
        return f"<repr failed: {type(exc).__name__}>"


def children(value: Any) -> list[tuple[str, Any]] | None:
    """The parts of a value one level down, or None when it has none to show."""
    if isinstance(value, (str, bytes, int, float, bool, enum.Enum)) or value is None:
        return None
    if attrs.has(type(value)):
        return [(f.name, getattr(value, f.name, None)) for f in attrs.fields(type(value))]
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return list(zip(value._fields, value, strict=False))
    if isinstance(value, dict):
        return [(value_text(k), v) for k, v in list(value.items())[:CHILDREN_SHOWN + 1]]
    if isinstance(value, (list, tuple)):
        return [(f"[{i}]", v) for i, v in enumerate(value[:CHILDREN_SHOWN + 1])]
    if isinstance(value, (set, frozenset)):
        return [("·", v) for v in sorted(value, key=repr)[:CHILDREN_SHOWN + 1]]
    d = getattr(value, "__dict__", None)
    if isinstance(d, dict) and d:
        return [(k, v) for k, v in list(d.items())[:CHILDREN_SHOWN + 1]]
    return None


class Row(NamedTuple):
    path: tuple[str, ...]      # names from the activation down: the key of its expanded state
    depth: int
    name: str
    value: Any
    kind: str                  # "value" / "more" (a continuation line of a long value) / "note"
    text: str = ""


def rows(scope: tuple[str, ...], variables: tuple[tuple[str, Any], ...], expanded: set[tuple[str, ...]]) -> list[Row]:
    out: list[Row] = []

    def add(path: tuple[str, ...], depth: int, name: str, value: Any) -> None:
        out.append(Row(path, depth, name, value, "value"))
        if path not in expanded:
            return
        kids = children(value)
        if kids is None:
            text = value_text(value)
            for i in range(0, len(text), WRAP):
                out.append(Row(path, depth + 1, "", None, "more", text[i:i + WRAP]))
            return
        for k, v in kids[:CHILDREN_SHOWN]:
            add((*path, k), depth + 1, k, v)
        if len(kids) > CHILDREN_SHOWN:
            out.append(Row(path, depth + 1, "", None, "note", f"… more than {CHILDREN_SHOWN}"))

    for name, value in variables:
        add((*scope, name), 0, name, value)
    return out


def expandable(row: Row) -> bool:
    return row.kind == "value" and (children(row.value) is not None or len(value_text(row.value)) > ROW_CHARS)


def render_row(row: Row, expanded: set[tuple[str, ...]]) -> Text:
    t = Text(no_wrap=True)
    t.append("  " * row.depth)
    if row.kind != "value":
        t.append("  " + row.text, style="grey70" if row.kind == "more" else "grey50")
        return t
    t.append(("▾ " if row.path in expanded else "▸ ") if expandable(row) else "  ", style="grey50")
    t.append(f"{row.name} = ", style="cyan")
    text = value_text(row.value)
    t.append(text[:ROW_CHARS] + ("…" if len(text) > ROW_CHARS else ""))
    return t


class LocalsPane(LineList):
    """The variables of the selected activation; Enter expands or folds the value under the cursor."""

    mark_unfocused = False

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.expanded: set[tuple[str, ...]] = set()
        self._rows: list[Row] = []
        self._scope: tuple[str, ...] = ()
        self._variables: tuple[tuple[str, Any], ...] = ()
        self._title = Text("")

    @property
    def content(self) -> Text:
        """The pane's text, as tests and copy read it."""
        t = self._title.copy()
        for i in range(len(self._rows)):
            t.append("\n")
            t.append_text(render_row(self._rows[i], self.expanded))
        return t

    def show(self, title: Text, scope: tuple[str, ...], variables: tuple[tuple[str, Any], ...]) -> None:
        self._title = title
        self._scope = scope
        self._variables = variables
        self._rebuild()

    def _rebuild(self) -> None:
        self._rows = rows(self._scope, self._variables, self.expanded)
        rows_ = self._rows
        title = self._title
        width = max((len(r.text) + 2 * r.depth + 4 if r.kind != "value" else
                     min(len(value_text(r.value)), ROW_CHARS) + len(r.name) + 2 * r.depth + 8 for r in rows_),
                    default=0)
        self._width = 0
        self.set_lines(len(rows_) + 1, lambda i: title if i == 0 else render_row(rows_[i - 1], self.expanded),
                       max(width, title.cell_len))

    def row_at_cursor(self) -> Row | None:
        i = self.cursor - 1
        return self._rows[i] if 0 <= i < len(self._rows) else None

    def value_at_cursor(self) -> str | None:
        """The whole text of the value under the cursor (what `y` copies)."""
        row = self.row_at_cursor()
        if row is None or row.kind != "value":
            return None
        return value_text(row.value)

    def action_choose(self) -> None:
        row = self.row_at_cursor()
        if row is None or row.kind != "value" or not expandable(row):
            return
        if row.path in self.expanded:
            self.expanded.discard(row.path)
        else:
            self.expanded.add(row.path)
        self._rebuild()
