"""The Textual debugger: panes over one Session, key bindings, a command palette and background runs.

The app holds no engine state of its own: every pane is drawn from the session's views at the cursor. Long
runs (continue, reverse-continue, recording ahead) go to a worker thread that the user can interrupt.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer

from tdxdbg.session import FROZEN_SPTE
from tdxdbg.session.events import StopEvent, StopReason
from tdxdbg.session.log import Category, EventIndex
from tdxdbg.session.session import Session
from tdxdbg.ui import panes
from tdxdbg.ui.commands import DebuggerCommands
from tdxdbg.ui.lines import LineList, Pane
from tdxdbg.ui.loading import DEMO, Opened, open_scenario
from tdxdbg.ui.screens import ErrorScreen, HelpScreen, PromptScreen, TaskChoiceScreen
from tdxdbg.ui.strip import TimelineStrip
from tdxdbg.ui.tables import Marks, TableLine, all_lines, max_width, render

# Frames the app records ahead in the background after opening, so the timeline strip shows a whole run.
RECORD_AHEAD = 200_000
# Seconds between header updates (frames recorded so far) while a run goes on in the background.
PROGRESS_INTERVAL = 0.25


class TdxdbgApp(App[int]):
    """tdxdbg: step a TDX page fault frame by frame."""

    CSS_PATH = str(Path(__file__).with_name("tdxdbg.tcss"))
    TITLE = "tdxdbg"
    ENABLE_COMMAND_PALETTE = True
    COMMANDS = App.COMMANDS | {DebuggerCommands}

    BINDINGS = [
        Binding("s", "step_into", "Step", id="step_into"),
        Binding("n", "step_over", "Over", id="step_over"),
        Binding("o", "step_out", "Out", id="step_out"),
        Binding("c", "continue", "Continue", id="continue"),
        Binding("S", "reverse_step", "Back", id="reverse_step"),
        Binding("C", "reverse_continue", "Rev-cont", id="reverse_continue"),
        Binding("g", "goto", "Go to", id="goto"),
        Binding("f", "next_event('fault', True)", "Next fault", show=False, id="next_fault"),
        Binding("F", "next_event('fault', False)", "Prev fault", show=False, id="prev_fault"),
        Binding("e", "next_event('seamcall', True)", "Next SEAMCALL", show=False, id="next_seamcall"),
        Binding("E", "next_event('seamcall', False)", "Prev SEAMCALL", show=False, id="prev_seamcall"),
        Binding("z", "next_event('freeze', True)", "Next freeze", show=False, id="next_freeze"),
        Binding("Z", "next_event('freeze', False)", "Prev freeze", show=False, id="prev_freeze"),
        Binding("v", "next_event('violation', True)", "Next violation", show=False, id="next_violation"),
        Binding("V", "next_event('violation', False)", "Prev violation", show=False, id="prev_violation"),
        Binding("t", "choose_task", "Run task", id="choose_task"),
        Binding("b", "break_function", "Break fn", id="break_function"),
        Binding("B", "break_seamcall", "Break SEAMCALL", show=False, id="break_seamcall"),
        Binding("w", "watch_gfn", "Watch gfn", show=False, id="watch_gfn"),
        Binding("m", "bookmark", "Mark", show=False, id="bookmark"),
        Binding("tab", "switch_task", "Task", id="switch_task"),
        Binding("u", "activation(-1)", "Up frame", show=False, id="stack_up"),
        Binding("d", "activation(1)", "Down frame", show=False, id="stack_down"),
        Binding("l", "last_write", "Last write", show=False, id="last_write"),
        Binding("slash", "search", "Search", show=False, id="search"),
        Binding("r", "reload", "Reload", id="reload"),
        Binding("escape", "interrupt", "Stop run", show=False, id="interrupt"),
        Binding("question_mark", "help", "Help", id="help"),
        Binding("q", "quit", "Quit", id="quit"),
    ]

    def __init__(self, spec: str = DEMO, variant: str | None = None, schedule: str | None = None,
                 record_ahead: int = RECORD_AHEAD) -> None:
        super().__init__()
        self.spec = spec
        self.variant_override = variant
        self.schedule_override = schedule
        self.record_ahead = record_ahead
        self.session: Session | None = None
        self.opened: Opened | None = None
        self.event_index = EventIndex()
        self.bookmarks: set[int] = set()
        self.breakpoint_hits: set[int] = set()
        self.activation = -1
        self.table_lines: list[TableLine] = []
        self.search_text = ""
        self._lock = threading.Lock()
        self._progress: Any = None
        self._after_recording: Callable[[], None] | None = None
        self._run_label = ""
        self.status_text = ""

    # -- layout ------------------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Pane(id="header")
        with Horizontal(id="top"):
            yield LineList(id="tables")
            with Vertical(id="middle"):
                yield Pane(id="walk")
                yield Pane(id="inspector")
            with Vertical(id="right"):
                yield Pane(id="stack")
                yield Pane(id="source")
        yield LineList(id="log")
        yield TimelineStrip(id="timeline")
        yield Pane(id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#tables").border_title = "page tables"
        self.query_one("#walk").border_title = "walk"
        self.query_one("#inspector").border_title = "inspector"
        self.query_one("#stack").border_title = "tasks · stack · locals"
        self.query_one("#source").border_title = "source"
        self.query_one("#log").border_title = "callbacks · SEAMCALLs · faults (Enter: go to frame)"
        self.load(self.spec)

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
        self.bookmarks.clear()
        self.breakpoint_hits.clear()
        self.activation = -1
        if keep_position:
            self.session.goto(min(keep_position, len(self.session.frames)))
        self.refresh_all()
        self.focus_tables()
        self.record_ahead_worker()

    def focus_tables(self) -> None:
        self.query_one("#tables", LineList).focus()

    # -- refreshing ---------------------------------------------------------------------------------------------
    def refresh_all(self) -> None:
        with self.batch_update():
            self._refresh_header()
            if self.session is None:
                return
            s = self.session
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
            self.query_one("#walk", Pane).update(panes.walk_text(path, task))
            self._refresh_inspector()
            self._refresh_stack(view.tasks, task)
            self._refresh_log()
            strip = self.query_one("#timeline", TimelineStrip)
            strip.update_from(self.event_index, s.position, len(s.frames), self.bookmarks, self.breakpoint_hits)
            self.query_one("#status", Pane).update(Text(self.status_text, style="grey70"))

    def _refresh_header(self) -> None:
        header = self.query_one("#header", Pane)
        if self.session is None:
            title = self.opened.spec if self.opened else self.spec
            header.update(Text(f" tdxdbg  {title}: cannot open (see the error screen; r reloads)",
                               style="bold white on red"))
            return
        s = self.session
        kv = s.kvm()
        vm_state = "dead" if kv.vm_dead else "running"
        title = self.opened.scenario.title if self.opened and self.opened.scenario else self.spec
        header.update(panes.header_text(title, s.variant, s.position, len(s.frames), s.current_task, vm_state,
                                        self._run_label))

    def _marks(self, view: Any, path: tuple[Any, ...]) -> Marks:
        """`path` is the followed task's walk (Session.walk_path)."""
        s = self.session
        assert s is not None
        frame = s.frame
        changed = frozenset(k for k, _o, _n in frame.effects) if frame is not None else frozenset()
        iter_key = ("pte", path[-1].table, path[-1].index) if path else None
        frozen_by: dict = {}
        for root in (view.mirror, view.direct):
            if root is None:
                continue
            for table in root.tree.walk():
                for e in table.entries:
                    if e.value == FROZEN_SPTE:
                        key = ("pte", e.table, e.index)
                        i = s.last_write(key)
                        if i is not None:
                            frozen_by[key] = s.frames[i].task
        return Marks(iter_key, changed, frozen_by)

    def _auto_select(self, tables: LineList, marks: Marks) -> None:
        """Put the table cursor on what this frame is about: an entry it changed, else the iterator's."""
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
        line = self._selected_line()
        sept = None
        last = None
        if s is not None and line is not None and line.key is not None:
            if line.key[0] == "sept" or line.kind == "mirror":
                sept = s.sept_entry_at(line.gfn << 12, line.level - 1)
            last = s.last_write(line.key)
        self.query_one("#inspector", Pane).update(panes.inspector_text(line, sept, last))

    def _refresh_stack(self, tasks: Any, task: str | None) -> None:
        tv = next((x for x in tasks if x.name == task), None)
        depth = len(tv.stack) if tv is not None else 0
        act = panes.clamp_activation(self.activation, depth)
        self.query_one("#stack", Pane).update(panes.stack_text(tasks, task, act))
        if tv is not None and tv.stack:
            a = tv.stack[act]
            self.query_one("#source", Pane).update(panes.source_text(a.filename, a.line))
        else:
            self.query_one("#source", Pane).update(panes.source_text(None, None))

    def _refresh_log(self) -> None:
        log = self.query_one("#log", LineList)
        entries = self.event_index.entries

        def line(i: int) -> Text:
            e = entries[i]
            t = Text()
            t.append(f"{e.frame:7d} ", style="grey50")
            t.append(f"{e.task:<7} ", style="magenta")
            style = "bold red" if e.error else {Category.SEAMCALL: "yellow", Category.FREEZE: "cyan",
                                                Category.FAULT: "green"}.get(e.category, "")
            t.append(e.text, style=style)
            return t

        log.set_lines(len(entries), line, 160)
        s = self.session
        if s is not None and s.frame is not None:
            at = self.event_index.entry_at_or_before(s.frame.index)
            if at is not None:
                log.move_to(at)

    # -- running commands ------------------------------------------------------------------------------------
    def run_command(self, fn: Callable[[], StopEvent], background: bool = False, label: str = "") -> None:
        if self.session is None:
            return
        if self._run_label:
            self.notify("a run is in progress (Esc stops it)", severity="warning")
            return
        if background:
            self._run_label = label or "running"
            self._start_progress()
            self._run_in_worker(fn, self._run_label)
            return
        with self._lock:
            event = fn()
        self.after_stop(event)

    def _start_progress(self) -> None:
        """While a run goes on in the worker, the header shows how many frames are recorded so far."""
        self._refresh_header()
        if self._progress is None:
            self._progress = self.set_interval(PROGRESS_INTERVAL, self._refresh_header)

    def _stop_progress(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def after_stop(self, event: StopEvent | None) -> None:
        self._stop_progress()
        if event is not None:
            if event.reason is StopReason.BREAKPOINT and event.frame_index is not None:
                self.breakpoint_hits.add(event.frame_index)
            if event.reason is StopReason.ERROR:
                self.notify(event.message or "cannot do that here", severity="error")
            self.status_text = str(event)
        self.activation = -1
        self.refresh_all()

    @work(thread=True, exclusive=True, group="run")
    def _run_in_worker(self, fn: Callable[[], StopEvent], label: str) -> None:
        try:
            with self._lock:
                event = fn()
        finally:
            self._run_label = ""
        self.call_from_thread(self.after_stop, event)

    @work(thread=True, exclusive=True, group="run")
    def record_ahead_worker(self) -> None:
        """Record the rest of the run (up to RECORD_AHEAD frames) without moving the cursor."""
        s = self.session
        if s is None or self.record_ahead <= 0:
            return
        self._run_label = "recording…"
        self.call_from_thread(self._start_progress)
        try:
            with self._lock:
                pos = s.position
                s.run_to_end(max_frames=self.record_ahead)
                s.goto(pos)
        finally:
            self._run_label = ""
        self.call_from_thread(self._recording_done)

    def _recording_done(self) -> None:
        self._stop_progress()
        self.refresh_all()
        then, self._after_recording = self._after_recording, None
        if then is not None:
            then()

    def _busy(self, then: Callable[[], None] | None = None) -> bool:
        """True when a run owns the session. Recording ahead gives way: it is interrupted and `then` (the
        command the user asked for) runs as soon as the recording worker has let go of the session."""
        if not self._run_label:
            return False
        s = self.session
        if s is not None and self._run_label.startswith("recording") and then is not None:
            self._after_recording = then
            s.interrupt()
            return True
        self.notify("a run is in progress (Esc stops it)", severity="warning")
        return True

    def action_step_into(self) -> None:
        if not self._busy(self.action_step_into):
            self.run_command(lambda: self.session.step_into())

    def action_step_over(self) -> None:
        if not self._busy(self.action_step_over):
            self.run_command(lambda: self.session.step_over(), background=True, label="step over…")

    def action_step_out(self) -> None:
        if not self._busy(self.action_step_out):
            self.run_command(lambda: self.session.step_out(), background=True, label="step out…")

    def action_continue(self) -> None:
        if not self._busy(self.action_continue):
            self.run_command(lambda: self.session.continue_(), background=True, label="continuing…")

    def action_reverse_step(self) -> None:
        if not self._busy(self.action_reverse_step):
            self.run_command(lambda: self.session.reverse_step())

    def action_reverse_continue(self) -> None:
        if not self._busy(self.action_reverse_continue):
            self.run_command(lambda: self.session.reverse_continue(), background=True, label="reverse…")

    def action_interrupt(self) -> None:
        if self.session is not None and self._run_label:
            self.session.interrupt()

    def goto_frame(self, index: int) -> None:
        if self.session is not None and not self._busy(lambda: self.goto_frame(index)):
            self.run_command(lambda: self.session.goto_frame(index), background=index >= len(self.session.frames),
                             label="running to frame…")

    def action_goto(self) -> None:
        def done(value: str | None) -> None:
            if value is None:
                return
            try:
                index = int(value.strip(), 0)
            except ValueError:
                self.notify(f"not a frame number: {value!r}", severity="error")
                return
            if index < 0:
                self.notify("frame numbers start at 0", severity="error")
                return
            self.goto_frame(index)

        self.push_screen(PromptScreen("Go to frame", "frame number (e.g. 42 or 0x2a)"), done)

    def action_next_event(self, what: str, forward: bool) -> None:
        s = self.session
        if s is None or self._busy():
            return
        cats = {"fault": {Category.FAULT}, "seamcall": {Category.SEAMCALL, Category.ERROR},
                "freeze": {Category.FREEZE}, "violation": {Category.VIOLATION}}[what]
        here = s.frame.index if s.frame is not None else -1
        target = self.event_index.next_frame(here, cats, forward)
        if target is None:
            self.notify(f"no {'next' if forward else 'previous'} {what} in the recorded frames")
            return
        self.goto_frame(target)

    def action_choose_task(self) -> None:
        s = self.session
        if s is None or self._busy():
            return
        runnable = s.runnable_tasks()
        if not runnable:
            self.notify("no task can run here", severity="warning")
            return

        def done(name: str | None) -> None:
            if name:
                self.run_command(lambda: self.session.choose_task(name))

        self.push_screen(TaskChoiceScreen(runnable), done)

    def action_switch_task(self) -> None:
        s = self.session
        if s is None:
            return
        names = [t.name for t in s.tasks]
        cur = s.current_task
        nxt = names[(names.index(cur) + 1) % len(names)] if cur in names else names[0]
        s.select_task(nxt)
        self.activation = -1
        self.status_text = f"following {nxt}"
        self.refresh_all()

    def action_activation(self, delta: int) -> None:
        s = self.session
        if s is None or s.current_task is None:
            return
        tasks = s.task_views()
        tv = next((x for x in tasks if x.name == s.current_task), None)
        if tv is None or not tv.stack:
            return
        cur = panes.clamp_activation(self.activation, len(tv.stack))
        self.activation = max(0, min(len(tv.stack) - 1, cur + delta))
        self._refresh_stack(tasks, s.current_task)

    def action_break_function(self) -> None:
        s = self.session
        if s is None or s.current_task is None:
            return
        tv = s.task_view(s.current_task)
        if tv is None or not tv.stack:
            self.notify("no function here to break on", severity="warning")
            return
        act = tv.stack[panes.clamp_activation(self.activation, len(tv.stack))]
        bp = s.breakpoints.add_function(act.function)
        self.notify(f"breakpoint {bp.id}: {bp.description}")

    def action_break_seamcall(self) -> None:
        def done(value: str | None) -> None:
            if not value or self.session is None:
                return
            words = value.split()
            leaf = words[0] if words[0].lower() != "any" else None
            rest = " ".join(words[1:])
            errors = rest.lower() == "error"
            self.add_seamcall_breakpoint(leaf, errors, rest if rest and not errors else None)

        self.push_screen(PromptScreen("Break on SEAMCALL",
                                      "LEAF [error|STATUS]  e.g. TDH.MEM.PAGE.AUG error  /  any TDX_OPERAND_BUSY"),
                         done)

    def action_watch_gfn(self) -> None:
        def done(value: str | None) -> None:
            if value:
                self._added(lambda: self.session.breakpoints.add_gfn(int(value.strip(), 0)),
                            lambda exc: f"not a gfn: {value!r} ({exc})")

        self.push_screen(PromptScreen("Watch gfn", "gfn, e.g. 0x1 (the shared bit is ignored)"), done)

    def action_bookmark(self) -> None:
        s = self.session
        if s is None or s.frame is None:
            return
        i = s.frame.index
        if i in self.bookmarks:
            self.bookmarks.discard(i)
            self.notify(f"bookmark at frame {i} removed")
        else:
            self.bookmarks.add(i)
            self.notify(f"bookmark at frame {i}")
        self.refresh_all()

    def action_last_write(self) -> None:
        s = self.session
        line = self._selected_line()
        if s is None or line is None or line.key is None:
            self.notify("select an entry first", severity="warning")
            return
        i = s.last_write(line.key)
        if i is None:
            self.notify("no recorded frame wrote this entry")
            return
        self.goto_frame(i)

    def action_search(self) -> None:
        def done(value: str | None) -> None:
            if not value:
                return
            self.search_text = value
            self._search_next()

        self.push_screen(PromptScreen("Search the log", "text, e.g. PAGE.AUG or BUSY"), done)

    def _search_next(self) -> None:
        log = self.query_one("#log", LineList)
        entries = self.event_index.entries
        needle = self.search_text.lower()
        n = len(entries)
        for k in range(1, n + 1):
            i = (log.cursor + k) % n
            if needle in entries[i].text.lower():
                self.goto_frame(entries[i].frame)
                return
        self.notify(f"{self.search_text!r} not found in the log")

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
    def _added(self, add: Callable[[], Any], failed: Callable[[Exception], str] = str) -> None:
        """Add a breakpoint with `add()` and say so; if it raises, show `failed(exception)`."""
        if self.session is None:
            return
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

    def add_gfn_breakpoint(self, gfn: int) -> None:
        self._added(lambda: self.session.breakpoints.add_gfn(gfn))

    def choose_task_named(self, name: str) -> None:
        if self.session is not None and not self._busy():
            self.run_command(lambda: self.session.choose_task(name))

    async def action_quit(self) -> None:
        """Quit; a scenario that never opened is a failed run (exit status 2), as for the headless commands."""
        self.exit(2 if self.session is None else 0)

    def action_help(self) -> None:
        self.push_screen(HelpScreen(self.BINDINGS))

    # -- widget messages -------------------------------------------------------------------------------------
    @on(LineList.Chosen, "#log")
    def _log_chosen(self, message: LineList.Chosen) -> None:
        if 0 <= message.index < len(self.event_index.entries):
            self.goto_frame(self.event_index.entries[message.index].frame)

    @on(LineList.Moved, "#tables")
    def _table_moved(self, message: LineList.Moved) -> None:
        self._refresh_inspector()

    @on(TimelineStrip.Seek)
    def _seek(self, message: TimelineStrip.Seek) -> None:
        self.goto_frame(message.frame)
