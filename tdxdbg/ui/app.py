"""The Textual debugger: panes over one Session, key bindings, a command palette and background runs.

The app holds no engine state of its own: every pane is drawn from the session's views at the cursor. Long
runs (continue, reverse-continue, recording ahead) go to a worker thread that the user can interrupt.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import events, on, work
from textual.app import App, ComposeResult
from textual.containers import Container
from textual.message import Message
from textual.widgets import Footer

from tdxdbg.session import FROZEN_SPTE, SEPT, BreakpointError, GfnWatch, pte_key
from tdxdbg.session.events import StopEvent, StopReason
from tdxdbg.session.log import Category, EventIndex
from tdxdbg.session.session import Session
from tdxdbg.ui import panes
from tdxdbg.ui.commands import COMMANDS, DebuggerCommands, bindings
from tdxdbg.ui.lines import LineList, Pane, TextPane
from tdxdbg.ui.loading import DEMO, Opened, open_scenario
from tdxdbg.ui.screens import (
    BranchesScreen,
    BreakpointsScreen,
    DiffScreen,
    ErrorScreen,
    HelpScreen,
    PromptScreen,
    SearchScreen,
    TaskChoiceScreen,
)
from tdxdbg.ui.strip import TimelineStrip
from tdxdbg.ui.tables import Marks, TableLine, all_lines, max_width, render
from tdxdbg.ui.variables import LocalsPane

# Frames the app records ahead in the background after opening, so the timeline strip shows a whole run.
RECORD_AHEAD = 200_000
# The panes, in the order of their digit keys (1..8) and of the pane bar on a small terminal.
PANES = (("tables", "page tables"), ("source", "source"), ("stack", "tasks · stack"), ("locals", "locals"),
         ("inspector", "inspector"), ("walk", "walk · TD"), ("seamcall", "SEAMCALL"),
         ("log", "log (Enter: go to frame)"))
# Below this size the panes are shown one at a time (digits switch), instead of a grid that would cut them.
NARROW_WIDTH = 120
NARROW_HEIGHT = 36
# Searches remembered for the search prompt's history.
SEARCH_HISTORY = 50
# Notifications the app remembers (App.notices).
NOTICES_KEPT = 20


def guarded(method: Callable[..., Any]) -> Callable[..., Any]:
    """An action that reads the session: nothing without one; while a worker owns it, queued behind recording
    ahead or refused with a message during the user's own run (see TdxdbgApp._busy)."""
    @functools.wraps(method)
    def wrapper(self: TdxdbgApp, *args: Any) -> Any:
        if self.session is None or self._busy(lambda: wrapper(self, *args)):
            return None
        return method(self, *args)
    return wrapper


class TdxdbgApp(App[int]):
    """tdxdbg: step a TDX page fault frame by frame."""

    CSS_PATH = str(Path(__file__).with_name("tdxdbg.tcss"))
    TITLE = "tdxdbg"
    ENABLE_COMMAND_PALETTE = True
    COMMANDS = App.COMMANDS | {DebuggerCommands}

    BINDINGS = bindings()

    def __init__(self, spec: str = DEMO, variant: str | None = None, schedule: str | None = None,
                 record_ahead: int = RECORD_AHEAD, relative_lines: bool = False) -> None:
        """`relative_lines`: number source lines from their function's `def` (function+offset) instead of the
        file's line numbers (snapshot tests use it so edits elsewhere in the engine do not move them)."""
        super().__init__()
        self.relative_lines = relative_lines
        self.spec = spec
        self.variant_override = variant
        self.schedule_override = schedule
        self.record_ahead = record_ahead
        self.session: Session | None = None
        self.opened: Opened | None = None
        self.event_index = EventIndex()
        self._index_branch = 1
        self.bookmarks: set[int] = set()
        self.breakpoint_hits: set[int] = set()
        self.activation = -1
        self.table_lines: list[TableLine] = []
        self.search_text = ""
        self.search_regex = False
        self.search_case = False
        self.search_history: list[str] = []
        self._progress_frames = 0
        self.narrow = False
        self.shown_pane = "tables"
        self._pinned: tuple[str, int, int] | None = None     # the page-table selection the user made
        self._pinned_missing = False
        self.selected_call: int | None = None                # a SEAMCALL frame picked in the log
        self.notices: list[str] = []      # the latest notifications, newest last (tests read them)
        self._header_state: tuple | None = None
        self._queued: list[Callable[[], None]] = []
        self._run_label = ""
        self.status_text = ""

    # -- layout ------------------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Pane(id="header")
        yield Pane(id="panebar")
        with Container(id="main"):
            yield LineList(id="tables")
            yield TextPane(id="source")
            yield TextPane(id="stack")
            yield LocalsPane(id="locals")
            yield TextPane(id="inspector")
            yield TextPane(id="walk")
            yield TextPane(id="seamcall")
        yield LineList(id="log")
        yield TimelineStrip(id="timeline")
        yield Pane(id="status")
        yield Footer()

    def on_mount(self) -> None:
        for n, (pane_id, title) in enumerate(PANES, 1):
            self.query_one(f"#{pane_id}").border_title = f"{n} {title}"
        self._apply_layout(self.size.width, self.size.height)
        self.load(self.spec)

    # -- layout: a grid of panes, or one pane at a time on a small terminal ---------------------------------------
    def on_resize(self, event: events.Resize) -> None:
        self._apply_layout(event.size.width, event.size.height)

    def _apply_layout(self, width: int, height: int) -> None:
        narrow = width < NARROW_WIDTH or height < NARROW_HEIGHT
        for wid in ("#main", "#log", "#panebar"):
            self.query_one(wid).set_class(narrow, "-narrow")
        self.narrow = narrow
        self._show_pane(self.shown_pane, focus=False)

    def _show_pane(self, pane_id: str, focus: bool = True) -> None:
        self.shown_pane = pane_id
        for wid, _title in PANES:
            if wid != "log":
                self.query_one(f"#{wid}").set_class(wid == pane_id, "-shown")
        bar = Text(no_wrap=True, overflow="ellipsis")
        for n, (wid, title) in enumerate(PANES, 1):
            bar.append(f" {n} {title.split(' ')[0]} ", style="bold reverse" if wid == pane_id else "grey62")
        self.query_one("#panebar", Pane).update(bar)
        if focus:
            self.query_one(f"#{pane_id}").focus()

    def action_pane(self, n: int) -> None:
        """Digit keys: show (on a small terminal) and focus pane `n` (PANES)."""
        if 1 <= n <= len(PANES):
            self._show_pane(PANES[n - 1][0])

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """The app's priority keys (tab) belong to the prompt or list when a modal screen is open."""
        return not (action == "switch_task" and len(self.screen_stack) > 1)

    def notify(self, message: str, *, markup: bool = False, **kwargs: Any) -> None:
        """A toast. Never markup by default: messages quote what the user typed (a `[` must not raise)."""
        self.notices.append(message)
        del self.notices[:-NOTICES_KEPT]
        super().notify(message, markup=markup, **kwargs)

    # -- opening and reloading -------------------------------------------------------------------------------
    def load(self, spec: str, keep_position: int = 0) -> None:
        opened = open_scenario(spec, self.variant_override, self.schedule_override)
        self.opened = opened
        if opened.session is None:
            self.session = None
            self.push_screen(ErrorScreen(opened))
            self.refresh_all()
            return
        self.session = opened.session
        self.event_index = EventIndex()
        self._index_branch = opened.session.branch
        self.bookmarks.clear()
        self.breakpoint_hits.clear()
        self.activation = -1
        if keep_position:
            # Back to the same frame when the (edited) scenario still reaches it: goto runs the new timeline that
            # far; a shorter run stops at its end, and says so.
            ev = self.session.goto(keep_position)
            if self.session.position < keep_position:
                self.notify(f"the reloaded scenario ends before frame {keep_position - 1}: at its end ({ev})",
                            severity="warning")
        self.refresh_all()
        self.focus_tables()
        self.record_ahead_worker()

    def focus_tables(self) -> None:
        self._show_pane("tables")

    # -- refreshing ---------------------------------------------------------------------------------------------
    def refresh_all(self) -> None:
        if self._run_label:     # a worker owns the session: RunDone refreshes everything
            return
        with self.batch_update():
            self._header_state = None
            self._refresh_header()
            if self.session is None:
                return
            s = self.session
            if s.branch != self._index_branch:      # another timeline: its frames differ after the fork
                self.event_index = EventIndex()
                self._index_branch = s.branch
            self.event_index.update(s.frames)
            view = s.view()
            task = s.current_task
            path = s.walk_path(task) if task else ()
            marks = self._marks(view, path)
            self.table_lines = all_lines(view)
            tables = self.query_one("#tables", LineList)
            lines = self.table_lines
            tables.set_lines(len(lines), lambda i: render(lines[i], marks), max_width(lines))
            self._auto_select(tables, marks)
            walk = panes.walk_text(path, task)
            walk.append("\n")
            walk.append_text(panes.td_state_text(s.tdx_state(), self._sept_gpas()))
            self.query_one("#walk", TextPane).update(walk)
            self._refresh_inspector()
            self._refresh_stack(view.tasks, task)
            self._refresh_log()
            self._refresh_seamcall()
            strip = self.query_one("#timeline", TimelineStrip)
            strip.update_from(self.event_index, s.position, len(s.frames), self.bookmarks, self.breakpoint_hits,
                              s.fork_points())
            self.query_one("#status", Pane).update(Text(self.status_text, style="grey70"))

    def _refresh_header(self) -> None:
        header = self.query_one("#header", Pane)
        if self.session is None:
            title = self.opened.spec if self.opened else self.spec
            header.update(Text(f" tdxdbg  {title}: cannot open (see the error screen; r reloads)",
                               style="bold white on red"))
            return
        if not self._run_label or self._header_state is None:
            # Only read the session when no worker owns it (the first header is drawn before any worker runs).
            s = self.session
            kv = s.kvm()
            frame = s.frame
            self._header_state = (s.variant, s.position, len(s.frames), s.current_task,
                                  frame.task if frame is not None else None,
                                  "dead" if kv.vm_dead else "running")
        variant, position, total, following, ran_by, vm_state = self._header_state
        title = self.opened.scenario.title if self.opened and self.opened.scenario else self.spec
        if self._run_label:
            total = self._progress_frames
        header.update(panes.header_text(title, variant, position, total, following, vm_state, self._run_label,
                                        ran_by))

    def _marks(self, view: Any, path: tuple[Any, ...]) -> Marks:
        """`path` is the followed task's walk (Session.walk_path)."""
        s = self.session
        assert s is not None
        frame = s.frame
        changed = frozenset(k for k, _o, _n in frame.effects) if frame is not None else frozenset()
        iter_key = pte_key(path[-1].table, path[-1].index) if path else None
        frozen_by: dict = {}
        for root in (view.mirror, view.direct):
            if root is None:
                continue
            for table in root.tree.walk():
                for e in table.entries:
                    if e.value == FROZEN_SPTE:
                        key = pte_key(e.table, e.index)
                        i = s.last_write(key)
                        if i is not None:
                            frozen_by[key] = s.frames[i].task
        return Marks(iter_key, changed, frozen_by)

    def _auto_select(self, tables: LineList, marks: Marks) -> None:
        """Keep the user's selection on its entry (by root, gfn and level); without one, put the cursor on what
        this frame is about: an entry it changed, else the iterator's."""
        self._pinned_missing = False
        if self._pinned is not None:
            for i, line in enumerate(self.table_lines):
                if line.key is not None and (line.kind, line.gfn, line.level) == self._pinned:
                    tables.move_to(i)
                    return
            self._pinned_missing = True
            return
        for want in (marks.changed, {marks.iter_key}):
            for i, line in enumerate(self.table_lines):
                if line.key is not None and line.key in want:
                    tables.move_to(i)
                    return

    def _selected_line(self) -> TableLine | None:
        tables = self.query_one("#tables", LineList)
        if 0 <= tables.cursor < len(self.table_lines):
            return self.table_lines[tables.cursor]
        return None

    def _refresh_inspector(self) -> None:
        s = self.session
        assert s is not None
        inspector = self.query_one("#inspector", TextPane)
        if self._pinned_missing and self._pinned is not None:
            kind, gfn, level = self._pinned
            sept = s.sept_entry_at(gfn << 12, level - 1) if kind in ("sept", "mirror") else None
            inspector.update(panes.inspector_text(None, sept, None, pinned=self._pinned))
            return
        line = self._selected_line()
        sept = None
        last = None
        if line is not None and line.key is not None:
            if line.key[0] == SEPT or line.kind == "mirror":
                sept = s.sept_entry_at(line.gfn << 12, line.level - 1)
            last = s.last_write(line.key)
        inspector.update(panes.inspector_text(line, sept, last))

    def _refresh_stack(self, tasks: Any, task: str | None) -> None:
        s = self.session
        assert s is not None
        tv = next((x for x in tasks if x.name == task), None)
        depth = len(tv.stack) if tv is not None else 0
        act = panes.clamp_activation(self.activation, depth)
        text = panes.stack_text(tasks, task, act, self.relative_lines)
        stack_at = 0
        stack = self.query_one("#stack", TextPane)
        stack.update(text)
        source = self.query_one("#source", TextPane)
        locals_pane = self.query_one("#locals", LocalsPane)
        if tv is not None and tv.stack:
            a = tv.stack[act]
            lines = text.plain.splitlines()
            head = next((i for i in range(stack_at, len(lines)) if lines[i].startswith("call stack")), 0)
            stack.move_to(head + 1 + act)     # scrolls the selected activation into view
            src = panes.source_text(a.filename, a.line, a.qualname, self.relative_lines)
            source.update(src)
            source.move_to(next((i for i, ln in enumerate(src.plain.splitlines()) if ln.startswith("→")), 0),
                           center=True)
            source.border_subtitle = src.plain.split("\n", 1)[0]     # the file and line, even when scrolled
            title = Text(f"locals of {a.function} (Enter expands, y copies)", style="bold")
            if tv.locals_error:   # a replay that did not reproduce the record: an engine bug, never data
                title = Text(f"locals of {a.function}: ", style="bold")
                title.append(tv.locals_error, style="bold red")
            locals_pane.show(title, (task or "", str(act), a.qualname), a.locals)
        else:
            source.update(panes.source_text(None, None))
            source.border_subtitle = ""
            locals_pane.show(Text("(no activation)", style="grey50"), (), ())

    def _sept_gpas(self) -> dict[tuple[int, int], int]:
        """(S-EPT table pfn, index) -> GPA of every S-EPT entry on screen (to name BLOCKED entries)."""
        out: dict[tuple[int, int], int] = {}
        for line in self.table_lines:
            if line.kind == "sept" and line.key is not None:
                out[(line.key[1], line.key[2])] = line.gfn << 12
        return out

    def _refresh_seamcall(self) -> None:
        s = self.session
        assert s is not None
        view = None
        if self.selected_call is not None:
            view = s.seamcall_at(self.selected_call)
        if view is None and s.current_task is not None:
            view = s.last_seamcall(s.current_task)
        self.query_one("#seamcall", TextPane).update(panes.seamcall_text(view))

    def _refresh_log(self) -> None:
        log = self.query_one("#log", LineList)
        entries = self.event_index.entries
        s = self.session
        current = None
        if s is not None and s.frame is not None:
            current = self.event_index.entry_at_or_before(s.frame.index)
        here = s.frame.index if s is not None and s.frame is not None else -1

        def line(i: int) -> Text:
            e = entries[i]
            t = Text(no_wrap=True, overflow="ellipsis")
            # ► marks the log line of the frame at the cursor (or the last one before it): visible without colour.
            t.append("►" if i == current and e.frame == here else "▸" if i == current else " ", style="bold yellow")
            t.append(f"{e.frame:7d} ", style="grey50")
            t.append(f"{e.task:<7} ", style="magenta")
            style = "bold red" if e.error else {Category.SEAMCALL: "yellow", Category.FREEZE: "cyan",
                                                Category.FAULT: "green"}.get(e.category, "")
            t.append(e.text, style=style)
            return t

        # No horizontal scrolling: a scrollbar row would hide the last line; long lines end in an ellipsis and
        # y copies the whole line.
        log.set_lines(len(entries), line, 0)
        if current is not None:
            log.move_to(current)

    # -- running commands ------------------------------------------------------------------------------------
    # A long command runs in a worker thread. The busy state (`_run_label`) is set here, on the UI thread, before
    # the worker starts, and cleared when its RunDone message arrives: while it is set the UI never reads the
    # session (the worker owns it); the worker only posts immutable RunProgress / RunDone messages.
    class RunProgress(Message):
        """Frames recorded so far by the running command (posted from the worker)."""

        def __init__(self, frames: int) -> None:
            super().__init__()
            self.frames = frames

    class RunDone(Message):
        """The running command stopped; `event` says where and why."""

        def __init__(self, event: StopEvent | None, recording: bool) -> None:
            super().__init__()
            self.event = event
            self.recording = recording

    def run_command(self, fn: Callable[[], StopEvent], background: bool = False, label: str = "") -> None:
        if self.session is None or self._busy():
            return
        if background:
            self._start_worker(label or "running", fn, recording=False)
            return
        self.after_stop(fn())

    def _start_worker(self, label: str, fn: Callable[[], StopEvent | None], recording: bool) -> None:
        """Mark the app busy (UI thread), then hand the session to a worker thread."""
        assert self.session is not None
        self._run_label = label
        self._progress_frames = len(self.session.frames)
        self._refresh_header()
        self._run_in_worker(fn, recording)

    @work(thread=True, exclusive=True, group="run")
    def _run_in_worker(self, fn: Callable[[], StopEvent | None], recording: bool) -> None:
        s = self.session
        assert s is not None
        s.progress = lambda frames: self.post_message(self.RunProgress(frames))
        event: StopEvent | None
        try:
            event = fn()
        except Exception as exc:  # an engine bug must not leave the app busy forever: say what happened
            event = StopEvent(StopReason.ERROR, s.position, f"{type(exc).__name__}: {exc}")
        finally:
            s.progress = None
        self.post_message(self.RunDone(event, recording))

    @on(RunProgress)
    def _on_progress(self, message: RunProgress) -> None:
        if self._run_label:
            self._progress_frames = message.frames
            self._refresh_header()

    @on(RunDone)
    def _on_run_done(self, message: RunDone) -> None:
        self._run_label = ""
        if message.recording:
            if message.event is not None and message.event.reason is StopReason.ERROR:
                self.notify(message.event.message, severity="error")
            self.refresh_all()
        else:
            self.after_stop(message.event)
        self._run_queued()

    def _run_queued(self) -> None:
        """Commands typed while the app recorded ahead run now, in order, until one starts a run of its own."""
        while self._queued and not self._run_label:
            self._queued.pop(0)()

    def after_stop(self, event: StopEvent | None) -> None:
        if event is not None:
            if event.reason is StopReason.BREAKPOINT and event.frame_index is not None:
                self.breakpoint_hits.add(event.frame_index)
            if event.reason is StopReason.ERROR:
                self.notify(event.message or "cannot do that here", severity="error")
            self.status_text = self._describe_stop(event)
        self.activation = -1
        self.refresh_all()

    def _describe_stop(self, event: StopEvent) -> str:
        """The status line: the frame at the cursor (as the header numbers it) and why the command stopped."""
        where = f"frame {event.frame_index}" if event.frame_index is not None else "before frame 0"
        text = f"{event.reason.value} at {where}"
        if event.breakpoints:
            text += f" (breakpoint {', '.join(map(str, event.breakpoints))})"
        if event.message:
            text += f": {event.message}"
        return text

    def record_ahead_worker(self) -> None:
        """Record the rest of the run (up to record_ahead frames) in the background, without moving the cursor."""
        s = self.session
        if s is None or self.record_ahead <= 0 or self._run_label:
            return
        limit = self.record_ahead

        def record() -> None:
            pos = s.position
            s.run_to_end(max_frames=limit)
            s.goto(pos)

        self._start_worker("recording…", record, recording=True)

    def _busy(self, then: Callable[[], None] | None = None) -> bool:
        """True when a run owns the session. Recording ahead gives way: it is interrupted and `then` (the
        command the user asked for) is queued to run as soon as the worker has let go of the session. A user's
        own run (continue, step over…) refuses other commands with a message."""
        if not self._run_label:
            return False
        s = self.session
        if s is not None and self._run_label.startswith("recording") and then is not None:
            self._queued.append(then)
            s.interrupt()
            return True
        self.notify(f"{self._run_label.rstrip('…')} is in progress: Esc stops it", severity="warning")
        return True

    @guarded
    def action_step_into(self) -> None:
        self.run_command(lambda: self.session.step_into())

    @guarded
    def action_step_over(self) -> None:
        self.run_command(lambda: self.session.step_over(), background=True, label="step over…")

    @guarded
    def action_step_out(self) -> None:
        self.run_command(lambda: self.session.step_out(), background=True, label="step out…")

    @guarded
    def action_continue(self) -> None:
        self.run_command(lambda: self.session.continue_(), background=True, label="continuing…")

    @guarded
    def action_reverse_step(self) -> None:
        self.run_command(lambda: self.session.reverse_step())

    @guarded
    def action_any_frame(self, delta: int) -> None:
        """. / , : one frame forward or back, whichever task runs it."""
        s = self.session
        self.run_command(s.step_frame if delta > 0 else s.reverse_step_frame)

    @guarded
    def action_reverse_continue(self) -> None:
        self.run_command(lambda: self.session.reverse_continue(), background=True, label="reverse…")

    def action_interrupt(self) -> None:
        if self.session is not None and self._run_label:
            self.session.interrupt()

    @guarded
    def goto_frame(self, index: int) -> None:
        self.run_command(lambda: self.session.goto_frame(index), background=index >= len(self.session.frames),
                         label="running to frame…")

    def action_goto(self) -> None:
        def done(value: str | None) -> None:
            if value is None:
                return
            try:
                index = parse_number(value, "frame number")
            except ValueError as exc:
                self.notify(str(exc), severity="error")
                return
            self.goto_frame(index)

        self.push_screen(PromptScreen("Go to frame", "frame number (e.g. 42 or 0x2a)"), done)

    @guarded
    def action_next_event(self, what: str, forward: bool) -> None:
        s = self.session
        cats = {"fault": {Category.FAULT}, "seamcall": {Category.SEAMCALL, Category.ERROR},
                "freeze": {Category.FREEZE}, "violation": {Category.VIOLATION}}[what]
        here = s.frame.index if s.frame is not None else -1
        target = self.event_index.next_frame(here, cats, forward)
        if target is None:
            self.notify(f"no {'next' if forward else 'previous'} {what} in the recorded frames")
            return
        self.goto_frame(target)

    @guarded
    def action_choose_task(self) -> None:
        s = self.session
        runnable = s.runnable_tasks()
        if not runnable:
            self.notify("no task can run here", severity="warning")
            return

        def done(name: str | None) -> None:
            if name:
                self.choose_task_named(name)

        self.push_screen(TaskChoiceScreen(runnable), done)

    @guarded
    def action_switch_task(self) -> None:
        s = self.session
        names = [t.name for t in s.tasks]
        cur = s.current_task
        nxt = names[(names.index(cur) + 1) % len(names)] if cur in names else names[0]
        s.select_task(nxt)
        self.activation = -1
        self.status_text = f"following {nxt}"
        self.refresh_all()

    @guarded
    def action_activation(self, delta: int) -> None:
        s = self.session
        if s.current_task is None:
            return
        tasks = s.task_views()
        tv = next((x for x in tasks if x.name == s.current_task), None)
        if tv is None or not tv.stack:
            return
        cur = panes.clamp_activation(self.activation, len(tv.stack))
        self.activation = max(0, min(len(tv.stack) - 1, cur + delta))
        self._refresh_stack(tasks, s.current_task)

    @guarded
    def action_break_function(self) -> None:
        s = self.session
        if s.current_task is None:
            self.notify("no function here to break on", severity="warning")
            return
        tv = s.task_view(s.current_task)
        if tv is None or not tv.stack:
            self.notify("no function here to break on", severity="warning")
            return
        act = tv.stack[panes.clamp_activation(self.activation, len(tv.stack))]
        self.add_function_breakpoint(act.function)

    def action_break_seamcall(self) -> None:
        def done(value: str | None) -> None:
            if value is None:
                return
            try:
                leaf, errors, status = parse_seamcall_breakpoint(value)
            except ValueError as exc:
                self.notify(str(exc), severity="error")
                return
            self.add_seamcall_breakpoint(leaf, errors, status)

        self.push_screen(PromptScreen("Break on SEAMCALL",
                                      "LEAF [error|STATUS]  e.g. TDH.MEM.PAGE.AUG error  /  any TDX_OPERAND_BUSY"),
                         done)

    def action_watch_gfn(self) -> None:
        def done(value: str | None) -> None:
            if value is None:
                return
            try:
                gfn, watch = parse_gfn_watch(value)
            except ValueError as exc:
                self.notify(str(exc), severity="error")
                return
            self.add_gfn_breakpoint(gfn, watch)

        self.push_screen(PromptScreen("Watch gfn", "GFN [writes|state]  e.g. 0x1, or 0x1 writes (the shared bit is "
                                      "ignored)"), done)

    @guarded
    def action_bookmark(self) -> None:
        s = self.session
        if s.frame is None:
            self.notify("no frame here yet to bookmark", severity="warning")
            return
        i = s.frame.index
        if i in self.bookmarks:
            self.bookmarks.discard(i)
            self.notify(f"bookmark at frame {i} removed")
        else:
            self.bookmarks.add(i)
            self.notify(f"bookmark at frame {i}")
        self.refresh_all()

    @guarded
    def action_last_write(self) -> None:
        s = self.session
        line = self._selected_line()
        if line is None or line.key is None:
            self.notify("select an entry first", severity="warning")
            return
        i = s.last_write(line.key)
        if i is None:
            self.notify("no recorded frame wrote this entry")
            return
        self.goto_frame(i)

    def action_search(self) -> None:
        def done(value: tuple[str, bool, bool] | None) -> None:
            if value is None:
                return
            text, regex, case = value
            if not text.strip():
                self.notify("type something to search for", severity="error")
                return
            self.search_regex, self.search_case = regex, case
            if text in self.search_history:
                self.search_history.remove(text)
            self.search_history.append(text)
            del self.search_history[:-SEARCH_HISTORY]
            self.search_text = text
            self.action_search_next(1)

        self.push_screen(SearchScreen(self.search_history, self.search_regex, self.search_case), done)

    def _search_pattern(self) -> re.Pattern[str] | None:
        flags = 0 if self.search_case else re.IGNORECASE
        try:
            return re.compile(self.search_text if self.search_regex else re.escape(self.search_text), flags)
        except re.error as exc:
            self.notify(f"not a regular expression: {exc}", severity="error")
            return None

    def action_search_next(self, direction: int) -> None:
        """] / [ : the next / previous log line matching the search, wrapping around; goes to its frame."""
        if not self.search_text:
            self.notify("no search yet: / searches the log", severity="warning")
            return
        pattern = self._search_pattern()
        if pattern is None:
            return
        log = self.query_one("#log", LineList)
        entries = self.event_index.entries
        n = len(entries)
        matches = [i for i in range(n) if pattern.search(entries[i].text)]
        if not matches:
            self.notify(f"{self.search_text!r} not found in the log")
            return
        if direction > 0:
            at = next((i for i in matches if i > log.cursor), matches[0])
        else:
            at = next((i for i in reversed(matches) if i < log.cursor), matches[-1])
        self.notify(f"match {matches.index(at) + 1} of {len(matches)}: frame {entries[at].frame}")
        log.move_to(at)
        self.goto_frame(entries[at].frame)

    @guarded
    def action_breakpoints(self) -> None:
        self.push_screen(BreakpointsScreen(self.session.breakpoints, self.add_breakpoint_text),
                         lambda _=None: self.refresh_all())

    def add_breakpoint_text(self, text: str) -> str:
        """Add the breakpoint typed as text (the manager's `a`); returns what happened, as a message."""
        if self.session is None or self._run_label:
            return "a run owns the session: try again when it stops"
        try:
            bp = parse_breakpoint(text, self.session.breakpoints)
        except (ValueError, BreakpointError) as exc:
            return str(exc)
        return f"breakpoint {bp.id}: {bp.description}"

    def action_reload(self) -> None:
        if self._busy(self.action_reload):
            return
        pos = self.session.position if self.session is not None else 0
        spec = self.opened.path if self.opened is not None else self.spec
        while len(self.screen_stack) > 1:
            self.pop_screen()
        self.load(spec, keep_position=pos)
        if self.session is not None:
            self.notify(f"reloaded {spec}")

    # -- breakpoints from the palette ---------------------------------------------------------------------------
    @guarded
    def _added(self, add: Callable[[], Any], failed: Callable[[Exception], str] = str) -> None:
        """Add a breakpoint with `add()` and say so; if it raises, show `failed(exception)`."""
        try:
            bp = add()
        except Exception as exc:
            self.notify(failed(exc), severity="error")
            return
        self.notify(f"breakpoint {bp.id}: {bp.description}")

    def add_seamcall_breakpoint(self, leaf: str | None, errors: bool, status: str | None) -> None:
        self._added(lambda: self.session.breakpoints.add_seamcall(leaf, errors_only=errors, status=status))

    def add_function_breakpoint(self, name: str) -> None:
        self._added(lambda: self.session.breakpoints.add_function(name))

    def add_ret_pf_breakpoint(self, name: str) -> None:
        self._added(lambda: self.session.breakpoints.add_ret_pf(name))

    def add_violation_breakpoint(self, name: str | None) -> None:
        self._added(lambda: self.session.breakpoints.add_violation(name))

    def add_gfn_breakpoint(self, gfn: int, watch: GfnWatch = GfnWatch.ANY) -> None:
        self._added(lambda: self.session.breakpoints.add_gfn(gfn, watch=watch))

    @guarded
    def choose_task_named(self, name: str) -> None:
        s = self.session
        before = s.branch
        self.run_command(lambda: s.choose_task(name))
        if s.branch != before:
            self.notify(f"forked: the old future is kept as branch {before}, this is branch {s.branch} "
                        "(a: branches)")
            self.record_ahead_worker()      # the new future, so the strip shows it whole

    @guarded
    def action_branches(self) -> None:
        s = self.session

        def done(choice: tuple[str, int] | None) -> None:
            if choice is None or self.session is None:
                return
            what, bid = choice
            if what == "switch":
                self.run_command(lambda: self.session.switch_branch(bid))
            elif what == "delete":
                self.after_stop(self.session.delete_branch(bid))
            else:
                self.show_diff(self.session.position, self.session.position, bid)

        self.push_screen(BranchesScreen(s.branches(), s.branch, s.fork_points()), done)

    @guarded
    def action_diff(self) -> None:
        def done(value: str | None) -> None:
            if value is None or self.session is None:
                return
            try:
                left, right, branch = parse_diff(value, self.session.position)
            except ValueError as exc:
                self.notify(str(exc), severity="error")
                return
            self.show_diff(left, right, branch)

        self.push_screen(PromptScreen("Diff", "FRAME [FRAME] (against this frame when one) · branch N (this frame "
                                      "on branch N)"), done)

    @guarded
    def show_diff(self, left: int, right: int, branch: int | None) -> None:
        """Positions `left` (this timeline) and `right` (of `branch`, or this one) side by side."""
        s = self.session
        try:
            rows = s.compare(left, right, branch)
        except (IndexError, KeyError) as exc:
            self.notify(f"cannot compare: {exc.args[0] if exc.args else exc}", severity="error")
            return

        def name(pos: int, b: int | None) -> str:
            where = f"frame {pos - 1}" if pos else "before frame 0"
            return where + (f" (branch {b})" if b is not None and b != s.branch else f" (branch {s.branch})")

        self.push_screen(DiffScreen(name(left, s.branch), name(right, branch), rows))

    async def action_quit(self) -> None:
        """Quit; a scenario that never opened is a failed run (exit status 2), as for the headless commands."""
        self.exit(2 if self.session is None else 0)

    def action_help(self) -> None:
        self.push_screen(HelpScreen(COMMANDS))

    # -- widget messages -------------------------------------------------------------------------------------
    @on(LineList.Chosen, "#log")
    def _log_chosen(self, message: LineList.Chosen) -> None:
        if 0 <= message.index < len(self.event_index.entries):
            self.goto_frame(self.event_index.entries[message.index].frame)

    @on(LineList.Moved, "#tables")
    def _table_moved(self, message: LineList.Moved) -> None:
        """The user moved the page-table cursor: that entry stays selected while stepping."""
        line = self._selected_line()
        if line is not None and line.key is not None:
            self._pinned = (line.kind, line.gfn, line.level)
        self._pinned_missing = False
        if self.session is not None and not self._run_label:   # after a run, RunDone refreshes it
            self._refresh_inspector()

    @on(LineList.Moved, "#log")
    def _log_moved(self, message: LineList.Moved) -> None:
        """A SEAMCALL line picked in the log shows in the SEAMCALL pane."""
        entries = self.event_index.entries
        if 0 <= message.index < len(entries) and entries[message.index].category in (Category.SEAMCALL,
                                                                                     Category.ERROR):
            self.selected_call = entries[message.index].frame
            if self.session is not None and not self._run_label:
                self._refresh_seamcall()

    def action_follow_frame(self) -> None:
        """x: the page-table cursor follows what each frame changes again (drops the kept selection)."""
        self._pinned = None
        self.selected_call = None
        self.refresh_all()

    def action_copy(self) -> None:
        """y: copy the value (locals) or line under the cursor of the focused pane to the clipboard."""
        w = self.focused
        text = None
        if isinstance(w, LocalsPane):
            text = w.value_at_cursor()
        elif isinstance(w, LineList):
            text = w.line_text(w.cursor).strip()
            if w.id == "tables":
                line = self._selected_line()
                if line is not None and line.key is not None:
                    text = f"{line.value:#018x}" if line.kind != "sept" else text
        if not text:
            self.notify("nothing to copy here: focus a pane (1-8) and put the cursor on a value", severity="warning")
            return
        self.copy_to_clipboard(text)
        self.notify(f"copied: {text[:60]}{'…' if len(text) > 60 else ''}")

    @on(TimelineStrip.Seek)
    def _seek(self, message: TimelineStrip.Seek) -> None:
        self.goto_frame(message.frame)


def parse_number(text: str, what: str) -> int:
    """A non-negative number typed in a prompt (decimal or 0x hex); ValueError with a message otherwise."""
    word = text.strip()
    if not word:
        raise ValueError(f"type a {what} (e.g. 42 or 0x2a)")
    try:
        n = int(word, 0)
    except ValueError:
        raise ValueError(f"not a {what}: {word[:40]!r} (e.g. 42 or 0x2a)") from None
    if n < 0:
        raise ValueError(f"a {what} is not negative: {word[:40]}")
    return n


def parse_seamcall_breakpoint(text: str) -> tuple[str | None, bool, str | None]:
    """`LEAF [error|STATUS]` or `any [error|STATUS]` -> (leaf or None, errors only, status or None)."""
    words = text.split()
    if not words:
        raise ValueError("type a SEAMCALL leaf (e.g. TDH.MEM.PAGE.AUG) or any, then optionally error or a status")
    if len(words) > 2:
        raise ValueError(f"too many words: {text.strip()[:60]!r} (LEAF [error|STATUS])")
    leaf = None if words[0].lower() == "any" else words[0]
    rest = words[1] if len(words) > 1 else ""
    errors = rest.lower() == "error"
    return leaf, errors, rest if rest and not errors else None


def parse_gfn_watch(text: str) -> tuple[int, GfnWatch]:
    """`GFN [writes|state]` -> (gfn, when it stops)."""
    words = text.split()
    if not words or len(words) > 2:
        raise ValueError("type a gfn, optionally followed by writes or state (e.g. 0x1 writes)")
    gfn = parse_number(words[0], "gfn")
    if len(words) == 1:
        return gfn, GfnWatch.ANY
    try:
        return gfn, GfnWatch(words[1].lower())
    except ValueError:
        raise ValueError(f"after the gfn: writes or state, not {words[1][:30]!r}") from None


def parse_breakpoint(text: str, bps: Any) -> Any:
    """A breakpoint typed in the manager: `gfn 0x1 [writes|state]`, `seamcall LEAF [error|STATUS]`,
    `function NAME`, `ret_pf NAME` or `violation [NAME]`; added to `bps`."""
    words = text.split()
    kinds = "gfn, seamcall, function, ret_pf or violation"
    if not words:
        raise ValueError(f"type a breakpoint: {kinds}, then its argument")
    kind, rest = words[0].lower(), " ".join(words[1:])
    if kind == "gfn":
        gfn, watch = parse_gfn_watch(rest)
        return bps.add_gfn(gfn, watch=watch)
    if kind == "seamcall":
        leaf, errors, status = parse_seamcall_breakpoint(rest)
        return bps.add_seamcall(leaf, errors_only=errors, status=status)
    if kind in ("function", "ret_pf") and len(words) != 2:
        raise ValueError(f"{kind} takes one name")
    if kind == "function":
        return bps.add_function(words[1])
    if kind == "ret_pf":
        return bps.add_ret_pf(words[1])
    if kind == "violation" and len(words) <= 2:
        return bps.add_violation(words[1] if len(words) == 2 else None)
    raise ValueError(f"unknown breakpoint {words[0][:30]!r}: {kinds}")


def parse_diff(text: str, here: int) -> tuple[int, int, int | None]:
    """`FRAME [FRAME]` or `branch N` -> (left position, right position, right branch or None); `here` is the
    cursor's position (a single frame is compared with it)."""
    words = text.split()
    if not words or len(words) > 2:
        raise ValueError("type one or two frame numbers, or branch N")
    if words[0].lower() == "branch":
        if len(words) != 2:
            raise ValueError("branch takes its number (a lists the branches)")
        return here, here, parse_number(words[1], "branch number")
    frames = [parse_number(w, "frame number") for w in words]
    if len(frames) == 1:
        return frames[0] + 1, here, None
    return frames[0] + 1, frames[1] + 1, None
