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

    def __init__(self, bindings: list[Binding]) -> None:
        super().__init__()
        self.bindings = bindings

    def compose(self) -> ComposeResult:
        t = Text()
        t.append("tdxdbg keys\n\n", style="bold")
        for b in self.bindings:
            t.append(f"  {b.key:<14}", style="bold cyan")
            t.append(f"{b.description:<18}", style="")
            t.append(f"{b.id}\n", style="grey50")
        t.append("\n  In the page tables and the log: up/down/pgup/pgdn, Enter on a log line goes to its frame.\n")
        t.append("  Click the timeline strip to seek. Ctrl+P opens the command palette.\n")
        t.append("  Key ids can be remapped with a keymap (Textual App.set_keymap).\n", style="grey50")
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
