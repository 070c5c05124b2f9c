"""The timeline strip: every recorded frame folded into the terminal width, one glyph a column for the most
important thing in it (fault, SEAMCALL, freeze, error, violation), with the cursor, bookmarks and breakpoint
hits marked underneath. Clicking a column seeks there."""

from __future__ import annotations

from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.message import Message
from textual.strip import Strip
from textual.widget import Widget

from tdxdbg.session.log import Category, EventIndex

# How each category is drawn in the strip.
GLYPH = {Category.NONE: "·", Category.FAULT: "f", Category.SEAMCALL: "|", Category.FREEZE: "*",
         Category.ERROR: "x", Category.VIOLATION: "!"}
STYLE = {Category.NONE: "grey37", Category.FAULT: "green", Category.SEAMCALL: "yellow",
         Category.FREEZE: "cyan", Category.ERROR: "bold red", Category.VIOLATION: "bold white on red"}


class TimelineStrip(Widget):
    DEFAULT_CSS = """
    TimelineStrip { height: 3; }
    """

    class Seek(Message):
        def __init__(self, frame: int) -> None:
            super().__init__()
            self.frame = frame

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._columns: list[Category] = []
        self._total = 0
        self._position = 0
        self._marks: set[int] = set()
        self._hits: set[int] = set()
        self._index: EventIndex | None = None
        self._forks: tuple[int, ...] = ()

    def update_from(self, index: EventIndex, position: int, total: int, bookmarks: set[int],
                    hits: set[int], forks: tuple[int, ...] = ()) -> None:
        self._forks = tuple(forks)
        self._index = index
        self._position = position
        self._total = total
        self._marks = set(bookmarks)
        self._hits = set(hits)
        self._recompute()
        self.refresh()

    def on_resize(self) -> None:
        self._recompute()

    def _width(self) -> int:
        return max(1, self.size.width - 2)

    def _recompute(self) -> None:
        if self._index is None:
            self._columns = []
            return
        self._columns = self._index.column_categories(self._width(), self._total)

    def _column_of(self, frame: int) -> int:
        w = self._width()
        return min(w - 1, frame * w // max(self._total, 1))

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        w = self._width()
        if y == 0:
            text = (f" frames 0..{max(self._total - 1, 0)}  f fault  | SEAMCALL  * freeze  x error  ! violation"
                    "   ^ here  b breakpoint  m mark  Y branch")
            return Strip([Segment(text[:width].ljust(width), Style(color="grey50"))])
        if y == 1:
            segs = [Segment(" ", Style())]
            for c in self._columns[:w]:
                segs.append(Segment(GLYPH[c], Style.parse(STYLE[c])))
            return Strip(segs).extend_cell_length(width, Style())
        if y == 2:
            row = [" "] * w
            styles = [Style()] * w
            for m in self._marks:
                col = self._column_of(m)
                row[col], styles[col] = "m", Style(color="blue", bold=True)
            for h in self._hits:
                col = self._column_of(h)
                row[col], styles[col] = "b", Style(color="red", bold=True)
            for p in self._forks:       # another branch leaves this timeline after its last common frame
                col = self._column_of(max(p - 1, 0))
                row[col], styles[col] = "Y", Style(color="magenta", bold=True)
            if self._total:
                col = self._column_of(max(self._position - 1, 0))
                row[col], styles[col] = "^", Style(color="yellow", bold=True)
            segs = [Segment(" ", Style())] + [Segment(ch, st) for ch, st in zip(row, styles, strict=True)]
            return Strip(segs).extend_cell_length(width, Style())
        return Strip.blank(width, Style())

    def on_click(self, event: events.Click) -> None:
        if not self._total:
            return
        col = max(0, min(event.x - 1, self._width() - 1))
        frame = col * self._total // self._width()
        self.post_message(self.Seek(frame))
