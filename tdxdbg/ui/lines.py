"""A scrolling list of rich Text lines drawn with Textual's line API: only visible lines are rendered, so
a million entries cost what a hundred do. Used for the log and the page-table trees."""

from __future__ import annotations

from collections.abc import Callable

from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.widget import Widget

CURSOR_STYLE = Style(reverse=True)
PLAIN = Style()


class LineList(ScrollView, can_focus=True):
    """`count` lines produced by `line(i)`; a cursor row the user moves; Enter posts `Chosen`."""

    BINDINGS = [
        Binding("up", "cursor(-1)", "Up", show=False, id="lines.up"),
        Binding("down", "cursor(1)", "Down", show=False, id="lines.down"),
        Binding("pageup", "page(-1)", "Page up", show=False, id="lines.pageup"),
        Binding("pagedown", "page(1)", "Page down", show=False, id="lines.pagedown"),
        Binding("home", "jump(0)", "First", show=False, id="lines.home"),
        Binding("end", "jump(-1)", "Last", show=False, id="lines.end"),
        Binding("enter", "choose", "Go to frame", show=False, id="lines.choose"),
    ]

    cursor: reactive[int] = reactive(0)

    class _LineMessage(Message):
        def __init__(self, lines: LineList, index: int) -> None:
            super().__init__()
            self.lines = lines
            self.index = index

        @property
        def control(self) -> LineList:
            return self.lines

    class Chosen(_LineMessage):
        """Enter on a line."""

    class Moved(_LineMessage):
        """The cursor moved to a line."""

    # Draw the cursor row underlined when the list does not have focus (the log and the page tables: the row is
    # the current entry); text panes show their cursor only while focused.
    mark_unfocused = True
    # Scroll the cursor to the middle rather than just into view (the source pane's current line).
    center_cursor = False

    def __init__(self, *, name: str | None = None, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self._count = 0
        self._line: Callable[[int], Text] = lambda i: Text("")
        self._width = 0

    def set_lines(self, count: int, line: Callable[[int], Text], width: int = 0, keep_cursor: bool = True) -> None:
        self._count = count
        self._line = line
        self._width = max(width, self._width if keep_cursor else 0)
        size = Size(max(self._width, self.size.width), count)
        if size != self.virtual_size:
            self.virtual_size = size
            # Scrolling is clamped to the scrollbars' last layout: scroll to the cursor again after the next one.
            self.call_after_refresh(self.scroll_to_cursor)
        if not keep_cursor or self.cursor >= count:
            self.cursor = max(0, count - 1) if count and self.cursor >= count else 0
        self.refresh()

    @property
    def count(self) -> int:
        return self._count

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        i = scroll_y + y
        width = self.size.width
        if i >= self._count:
            return Strip.blank(width, self.rich_style)
        text = self._line(i)
        if i == self.cursor and self.has_focus:
            text = text.copy()
            text.stylize(CURSOR_STYLE)
        elif i == self.cursor and self.mark_unfocused:
            text = text.copy()
            text.stylize(Style(underline=True))
        # Every segment gets a style: Textual's monochrome filter (NO_COLOR) reads the colour of each one.
        segments = [Segment(t, st or PLAIN, c) for t, st, c in text.render(self.app.console, end="")]
        strip = Strip(segments, text.cell_len).crop(scroll_x, scroll_x + width)
        return strip.extend_cell_length(width, self.rich_style)

    def watch_cursor(self, old: int, new: int) -> None:
        self.scroll_to_cursor()
        self.refresh()

    def scroll_to_cursor(self) -> None:
        # The region lines are drawn in: without a horizontal scrollbar's row (it would hide the cursor row).
        height = self.scrollable_content_region.height or 1
        top = self.scroll_offset.y
        if self.center_cursor:
            self.scroll_to(y=max(0, self.cursor - height // 2), animate=False, immediate=True)
            return
        # immediate: a deferred scroll would land after the next refresh, at a time that depends on load.
        if self.cursor < top:
            self.scroll_to(y=self.cursor, animate=False, immediate=True)
        elif self.cursor >= top + height:
            self.scroll_to(y=self.cursor - height + 1, animate=False, immediate=True)

    def move_to(self, index: int, notify: bool = False, center: bool = False) -> None:
        """Put the cursor on line `index` and scroll it into view (with `center`, to the middle)."""
        if self._count == 0:
            return
        self.cursor = max(0, min(index, self._count - 1))
        self.center_cursor = center
        self.scroll_to_cursor()
        if notify:
            self.post_message(self.Moved(self, self.cursor))

    def action_cursor(self, delta: int) -> None:
        self.move_to(self.cursor + delta, notify=True)

    def action_page(self, direction: int) -> None:
        self.move_to(self.cursor + direction * max(1, self.size.height - 1), notify=True)

    def action_jump(self, where: int) -> None:
        self.move_to(self._count - 1 if where < 0 else where, notify=True)

    def action_choose(self) -> None:
        if self._count:
            self.post_message(self.Chosen(self, self.cursor))

    def line_text(self, index: int) -> str:
        """The plain text of line `index` ("" outside the list)."""
        return self._line(index).plain if 0 <= index < self._count else ""

    def on_click(self, event: events.Click) -> None:
        """A click selects the row under the mouse (Moved); a double click also chooses it (Chosen)."""
        offset = event.get_content_offset(self)
        if offset is None or not self._count:
            return
        index = self.scroll_offset.y + offset.y
        if 0 <= index < self._count:
            self.focus()
            self.move_to(index, notify=True)
            if event.chain >= 2:
                self.post_message(self.Chosen(self, index))

    def on_resize(self) -> None:
        """Keep the cursor row in view at any size (the log's current line must stay visible)."""
        self.call_after_refresh(self.scroll_to_cursor)

    def on_focus(self) -> None:
        self.refresh()

    def on_blur(self) -> None:
        self.refresh()


class TextPane(LineList):
    """A pane of rich Text that can be focused, scrolled both ways and copied from (`y` copies the cursor line);
    the text is split into lines drawn with the line API, so nothing is cut: what does not fit scrolls."""

    mark_unfocused = False

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._content = Text("")
        self._lines: list[Text] = []

    @property
    def content(self) -> Text:
        return self._content

    def update(self, content: Text) -> None:
        self._content = content
        lines = content.split("\n", allow_blank=True)
        if lines and not lines[-1].plain:
            lines.pop()
        self._lines = lines
        width = max((ln.cell_len for ln in lines), default=0)
        self._width = 0
        self.set_lines(len(lines), lambda i: self._lines[i], width)


class Pane(Widget):
    """A fixed-size text pane. Updating it repaints without a layout pass (Static.update re-lays out the
    screen, which costs tens of milliseconds a step)."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._content: Text = Text("")

    @property
    def content(self) -> Text:
        return self._content

    def update(self, content: Text) -> None:
        self._content = content
        self.refresh()

    def render(self) -> Text:
        return self._content
