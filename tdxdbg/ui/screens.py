"""Modal screens: help, a one-line prompt, choosing the task that runs next, and scenario errors."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Input, OptionList, Static


class PromptScreen(ModalScreen[str | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel", id="prompt.cancel")]

    def __init__(self, title: str, placeholder: str) -> None:
        super().__init__()
        self.title_text = title
        self.placeholder = placeholder

    def compose(self) -> ComposeResult:
        with Vertical(id="prompt"):
            yield Static(Text(self.title_text, style="bold"))
            yield Input(placeholder=self.placeholder, id="prompt-input")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)

    def action_cancel(self) -> None:
        self.dismiss(None)


class SearchScreen(ModalScreen["tuple[str, bool, bool] | None"]):
    """The log search prompt (toolong's model): up/down recall earlier searches, ctrl+r toggles a regular
    expression, ctrl+t case sensitivity. Dismisses with (text, regex, case sensitive)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel", id="search.cancel"),
                Binding("up", "history(-1)", "Older", id="search.older"),
                Binding("down", "history(1)", "Newer", id="search.newer"),
                Binding("ctrl+r", "toggle('regex')", "Regex", id="search.regex"),
                Binding("ctrl+t", "toggle('case')", "Case", id="search.case")]

    def __init__(self, history: list[str], regex: bool, case: bool) -> None:
        super().__init__()
        self.history = history
        self.at = len(history)
        self.regex = regex
        self.case = case

    def compose(self) -> ComposeResult:
        with Vertical(id="prompt"):
            yield Static(Text("Search the log", style="bold"))
            yield Input(placeholder="text, e.g. PAGE.AUG or FROZEN_SPTE", id="prompt-input")
            yield Static(self._options(), id="search-options")

    def _options(self) -> Text:
        return Text(f"regex {'on' if self.regex else 'off'} (ctrl+r) · "
                    f"{'case sensitive' if self.case else 'any case'} (ctrl+t) · up/down: history · "
                    "] / [ next / previous match", style="grey62")

    def action_toggle(self, what: str) -> None:
        setattr(self, what, not getattr(self, what))
        self.query_one("#search-options", Static).update(self._options())

    def action_history(self, delta: int) -> None:
        if not self.history:
            return
        self.at = max(0, min(len(self.history), self.at + delta))
        field = self.query_one(Input)
        field.value = self.history[self.at] if self.at < len(self.history) else ""
        field.cursor_position = len(field.value)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss((event.value, self.regex, self.case))

    def action_cancel(self) -> None:
        self.dismiss(None)


class BreakpointsScreen(ModalScreen[None]):
    """The breakpoint manager: every breakpoint with its hits; space enables/disables, delete removes, a adds
    one typed as `gfn 0x1 writes`, `seamcall TDH.MEM.PAGE.AUG error`, `function kvm_tdp_mmu_map`,
    `ret_pf RET_PF_RETRY` or `violation [name]`."""

    BINDINGS = [Binding("escape,k,q", "close", "Close", id="bps.close"),
                Binding("space", "toggle", "Enable/disable", id="bps.toggle"),
                Binding("delete,backspace,x", "delete", "Delete", id="bps.delete"),
                Binding("a", "add", "Add", id="bps.add")]

    def __init__(self, breakpoints: Any, add: Any) -> None:
        super().__init__()
        self.breakpoints = breakpoints
        self.add = add

    def compose(self) -> ComposeResult:
        with Vertical(id="bps"):
            yield Static(Text("Breakpoints  (space: enable/disable · delete: remove · a: add · Esc: close)",
                              style="bold"))
            yield OptionList(id="bps-list")
            yield Static(id="bps-message")

    def on_mount(self) -> None:
        self.refresh_list()

    def refresh_list(self, keep: int | None = None) -> None:
        lst = self.query_one(OptionList)
        at = lst.highlighted if keep is None else keep
        lst.clear_options()
        bps = list(self.breakpoints)
        for bp in bps:
            lst.add_option(Text(f"[{'x' if bp.enabled else ' '}] {bp.id:3d}  {bp.description}"
                                + (f"  (task {bp.task})" if bp.task else "") + f"  hits {bp.hits}"))
        if not bps:
            lst.add_option(Text("(no breakpoints: a adds one, or b / B / w in the debugger)", style="grey50"))
        if bps:
            lst.highlighted = min(at or 0, len(bps) - 1)

    def _selected(self) -> Any:
        bps = list(self.breakpoints)
        i = self.query_one(OptionList).highlighted
        return bps[i] if i is not None and 0 <= i < len(bps) else None

    def say(self, text: str) -> None:
        self.query_one("#bps-message", Static).update(Text(text, style="yellow"))

    def action_toggle(self) -> None:
        bp = self._selected()
        if bp is not None:
            self.breakpoints.enable(bp.id, not bp.enabled)
            self.say(f"breakpoint {bp.id} {'disabled' if bp.enabled else 'enabled'}")
            self.refresh_list()

    def action_delete(self) -> None:
        bp = self._selected()
        if bp is not None:
            self.breakpoints.delete(bp.id)
            self.say(f"breakpoint {bp.id} deleted")
            self.refresh_list()

    def action_add(self) -> None:
        def done(value: str | None) -> None:
            if value is None:
                return
            message = self.add(value)
            self.say(message)
            self.refresh_list(keep=len(list(self.breakpoints)) - 1)

        self.app.push_screen(PromptScreen("Add a breakpoint", "gfn 0x1 [writes|state] · seamcall LEAF [error|STATUS]"
                                          " · function NAME · ret_pf NAME · violation [NAME]"), done)

    def action_close(self) -> None:
        self.dismiss(None)


class BranchesScreen(ModalScreen["tuple[str, int] | None"]):
    """The kept timelines: Enter switches to one, delete removes one, D compares the current frame with the
    same position of the highlighted branch. Dismisses with (what, branch id)."""

    BINDINGS = [Binding("escape,a,q", "close", "Close", id="branches.close"),
                Binding("delete,backspace,x", "pick('delete')", "Delete", id="branches.delete"),
                Binding("D", "pick('diff')", "Diff", id="branches.diff")]

    def __init__(self, branches: Any, current: int, fork_points: Any) -> None:
        super().__init__()
        self.branches = list(branches)
        self.current = current
        self.fork_points = fork_points

    def compose(self) -> ComposeResult:
        with Vertical(id="bps"):
            yield Static(Text("Branches  (Enter: switch · delete: remove · D: diff with the current frame · Esc)",
                              style="bold"))
            opts = []
            for b in self.branches:
                mark = "*" if b.id == self.current else " "
                fork = f"forked at position {b.fork_position}" if b.parent is not None else "the first timeline"
                opts.append(Text(f"{mark} {b.id:3d}  {b.name:<28} {len(b.picks):>8,} frames  {fork}"))
            yield OptionList(*opts, id="branches-list")

    def _highlighted_branch(self) -> int | None:
        i = self.query_one(OptionList).highlighted
        return self.branches[i].id if i is not None and 0 <= i < len(self.branches) else None

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(("switch", self.branches[event.option_index].id))

    def action_pick(self, what: str) -> None:
        bid = self._highlighted_branch()
        if bid is not None:
            self.dismiss((what, bid))

    def action_close(self) -> None:
        self.dismiss(None)


class DiffScreen(ModalScreen[None]):
    """Two points side by side: every SPTE, S-EPT entry, lock and task position that differs."""

    BINDINGS = [Binding("escape,q,D", "close", "Close", id="diff.close")]

    def __init__(self, left: str, right: str, rows: Any) -> None:
        super().__init__()
        self.left = left
        self.right = right
        self.rows = rows

    def compose(self) -> ComposeResult:
        t = Text(no_wrap=True)
        what = max([len(r.what) for r in self.rows] + [10])
        left = max([len(r.left) for r in self.rows] + [len(self.left)])
        t.append(f"{'':<6} {'':<{what}}  {self.left:<{left}}  {self.right}\n", style="bold")
        if not self.rows:
            t.append("  no difference in SPTEs, S-EPT entries, locks, vCPUs or task positions\n", style="grey62")
        for r in self.rows:
            t.append(f"{r.category:<6} ", style="bold cyan")
            t.append(f"{r.what:<{what}}  ")
            t.append(f"{r.left:<{left}}  ", style="red")
            t.append(f"{r.right}\n", style="green")
        with VerticalScroll(id="help"):
            yield Static(t)

    def action_close(self) -> None:
        self.dismiss(None)


class TaskChoiceScreen(ModalScreen[str | None]):
    """Pick the task that runs the next step here; if the cursor is in the past this forks the timeline."""

    BINDINGS = [Binding("escape", "cancel", "Cancel", id="choose.cancel")]

    def __init__(self, tasks: tuple[str, ...]) -> None:
        super().__init__()
        self.tasks = tasks

    def compose(self) -> ComposeResult:
        with Vertical(id="choose"):
            yield Static(Text("Run which task next? (forks the timeline when not at the end)", style="bold"))
            yield OptionList(*self.tasks, id="choose-list")

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self.tasks[event.option_index])

    def action_cancel(self) -> None:
        self.dismiss(None)


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,question_mark,q", "close", "Close", id="help.close")]

    def __init__(self, commands: Any) -> None:
        super().__init__()
        self.commands = commands

    def compose(self) -> ComposeResult:
        from tdxdbg.ui.commands import key_as_typed

        t = Text()
        t.append("tdxdbg keys\n\n", style="bold")
        for c in self.commands:
            if not c.palette:
                continue
            t.append(f"  {key_as_typed(c.key):<8}", style="bold cyan")
            t.append(f"{c.palette:<50}")
            t.append(f"{c.help}\n", style="grey50")
        t.append("  1 … 8   focus a pane (on a small terminal: show it)\n", style="")
        t.append("\n  In a pane: up/down/pgup/pgdn/home/end, left/right scroll; Enter on a log line goes to its\n")
        t.append("  frame, on a local expands it. Click a row to select it, the timeline strip to seek.\n")
        t.append("  Ctrl+P opens the command palette (every command above, and `frame: go to 42`,\n")
        t.append("  `break: on TDH.MEM.PAGE.AUG error`, `watch: gfn 0x1 writes`, `task: run vcpu1`).\n")
        with VerticalScroll(id="help"):
            yield Static(t)

    def action_close(self) -> None:
        self.dismiss(None)


class ErrorScreen(ModalScreen[None]):
    """A scenario that cannot be opened: every problem, with file, key path and line."""

    BINDINGS = [Binding("r", "app.reload", "Reload", id="error.reload"),
                Binding("q", "app.quit", "Quit", id="error.quit")]

    def __init__(self, opened: Any) -> None:
        super().__init__()
        self.opened = opened

    def compose(self) -> ComposeResult:
        t = Text()
        t.append(f"Cannot open {self.opened.path}\n\n", style="bold red")
        for p in self.opened.problems:
            t.append(f"  {p}\n")
        if self.opened.error:
            t.append(f"  {self.opened.error}\n")
        t.append("\n  Fix the file and press r to reload, or q to quit.", style="grey70")
        with VerticalScroll(id="error"):
            yield Static(t)
