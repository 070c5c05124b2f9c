"""Command palette provider: every debugger action, plus parameterised commands typed in the palette, named
"category: verb" ("frame: go to 42", "break: on TDH.MEM.PAGE.AUG error", "break: on function kvm_tdp_mmu_map",
"watch: gfn 0x1 writes", "task: run vcpu1")."""

from __future__ import annotations

import re
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

from textual.binding import Binding
from textual.command import DiscoveryHit, Hit, Hits, Provider

from tdxdbg.session import GfnWatch, Seamcall

if TYPE_CHECKING:
    from tdxdbg.ui.app import TdxdbgApp

class Command(NamedTuple):
    """One debugger command: its key (Textual's key name), action, footer label, palette name and help."""

    key: str
    action: str
    label: str
    palette: str = ""        # "" keeps it out of the palette (pane digits)
    help: str = ""
    show: bool = False       # in the footer
    priority: bool = False


# The one table of commands: the app's key bindings, the palette and the help screen are all made from it.
COMMANDS: tuple[Command, ...] = (
    Command("s", "step_into", "Step", "step: into", "next frame of the followed task", show=True),
    Command("n", "step_over", "Over", "step: over", "run until the followed task is back at this depth", show=True),
    Command("o", "step_out", "Out", "step: out", "run until the followed task returns from this function",
            show=True),
    Command("S", "reverse_step", "Back", "step: back", "previous frame of the followed task", show=True),
    Command("full_stop", "any_frame(1)", "Next frame", "step: next frame of any task", "whichever task runs it"),
    Command("comma", "any_frame(-1)", "Prev frame", "step: previous frame of any task", ""),
    Command("c", "continue", "Continue", "run: continue", "to the next breakpoint, violation or the end",
            show=True),
    Command("C", "reverse_continue", "Rev-cont", "run: reverse continue", "back to the previous breakpoint hit",
            show=True),
    Command("escape", "interrupt", "Stop run", "run: stop the running command", ""),
    Command("g", "goto", "Go to", "frame: go to…", "a frame number", show=True),
    Command("f", "next_event('fault', True)", "Next fault", "frame: next fault", ""),
    Command("F", "next_event('fault', False)", "Prev fault", "frame: previous fault", ""),
    Command("e", "next_event('seamcall', True)", "Next SEAMCALL", "frame: next SEAMCALL", ""),
    Command("E", "next_event('seamcall', False)", "Prev SEAMCALL", "frame: previous SEAMCALL", ""),
    Command("z", "next_event('freeze', True)", "Next freeze", "frame: next freeze", ""),
    Command("Z", "next_event('freeze', False)", "Prev freeze", "frame: previous freeze", ""),
    Command("v", "next_event('violation', True)", "Next violation", "frame: next violation", ""),
    Command("V", "next_event('violation', False)", "Prev violation", "frame: previous violation", ""),
    Command("l", "last_write", "Last write", "frame: last write of the selected entry", ""),
    Command("m", "bookmark", "Mark", "frame: toggle a bookmark here", ""),
    Command("tab", "switch_task", "Task", "task: follow the next task", "", show=True, priority=True),
    Command("t", "choose_task", "Run task", "task: choose the task that runs next here",
            "keeps the old future as a branch when not at the end", show=True),
    Command("a", "branches", "Branches", "branch: list, switch, delete, diff", "the timelines t kept"),
    Command("D", "diff", "Diff", "diff: two frames, or this frame on another branch…",
            "SPTEs, S-EPT entries, locks, task positions"),
    Command("u", "activation(-1)", "Up frame", "stack: up (outer activation)", ""),
    Command("d", "activation(1)", "Down frame", "stack: down (inner activation)", ""),
    Command("b", "break_function", "Break fn", "break: on the current function", "", show=True),
    Command("B", "break_seamcall", "Break SEAMCALL", "break: on a SEAMCALL leaf or status…", ""),
    Command("w", "watch_gfn", "Watch gfn", "watch: a gfn…", "any frame, writes only, or state changes"),
    Command("k", "breakpoints", "Breakpoints", "break: manage breakpoints", "list, enable/disable, delete, add"),
    Command("slash", "search", "Search", "log: search…", "text or regex, case (toolong-style)"),
    Command("right_square_bracket", "search_next(1)", "Next match", "log: next match", ""),
    Command("left_square_bracket", "search_next(-1)", "Prev match", "log: previous match", ""),
    Command("y", "copy", "Copy", "copy: the value or line under the cursor", "to the clipboard"),
    Command("x", "follow_frame", "Follow frame", "tables: follow each frame's changes again",
            "drop the kept page-table selection"),
    *(Command(str(n), f"pane({n})", f"Pane {n}") for n in range(1, 9)),
    Command("r", "reload", "Reload", "scenario: reload", "re-read the scenario file, keep the frame", show=True),
    Command("question_mark", "help", "Help", "help: keys", "", show=True),
    Command("q", "quit", "Quit", "quit", "", show=True),
)

# How keys are typed (Textual names some keys by the character's name).
KEY_AS_TYPED = {"slash": "/", "question_mark": "?", "full_stop": ".", "comma": ",", "escape": "Esc",
                "right_square_bracket": "]", "left_square_bracket": "[", "tab": "Tab"}


def key_as_typed(key: str) -> str:
    return KEY_AS_TYPED.get(key, key)


def binding_id(action: str) -> str:
    """A keymap id for an action: `next_event('fault', False)` -> `next_event_fault_back`."""
    action = action.replace("(-1)", "_back").replace(", False)", "_back").replace(", True)", "")
    return re.sub(r"_+", "_", re.sub(r"\W+", "_", action)).strip("_")


def bindings() -> list[Binding]:
    return [Binding(c.key, c.action, c.label, show=c.show, priority=c.priority, id=binding_id(c.action),
                    key_display=key_as_typed(c.key))
            for c in COMMANDS]


class DebuggerCommands(Provider):
    @property
    def dbg(self) -> TdxdbgApp:
        return self.app  # type: ignore[return-value]

    async def discover(self) -> Hits:
        for c in COMMANDS:
            if c.palette:
                yield DiscoveryHit(f"{c.palette}  ({key_as_typed(c.key)})", partial(self.dbg.run_action, c.action),
                                   help=c.help)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for c in COMMANDS:
            if not c.palette:
                continue
            name = f"{c.palette}  ({key_as_typed(c.key)})"
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), partial(self.dbg.run_action, c.action), help=c.help)
        for hit in self._parameterised(query.strip()):
            yield hit

    def _parameterised(self, query: str) -> list[Hit]:
        """Commands with an argument typed in the palette itself."""
        words = query.split()
        hits: list[Hit] = []
        low = [w.lower() for w in words]
        app = self.dbg

        def add(text: str, fn: Any) -> None:
            hits.append(Hit(1.0, text, fn, text=text))

        if len(words) >= 1 and low[0] in ("frame:", "frame", "goto", "go"):
            for w in words[1:]:
                try:
                    n = int(w, 0)
                except ValueError:
                    continue
                add(f"frame: go to {n}", partial(app.goto_frame, n))
        if low and low[0] in ("break:", "break", "b"):
            rest = [w for w in words[1:] if w.lower() not in ("on",)]
            if rest:
                target = rest[0]
                try:
                    leaf = Seamcall.parse(target)
                except ValueError:
                    leaf = None
                if leaf is not None:
                    errors = len(rest) > 1 and rest[1].lower() == "error"
                    status = rest[1] if len(rest) > 1 and not errors else None
                    label = f"break: on {leaf.dotted}" + (" error" if errors else f" {status}" if status else "")
                    add(label, partial(app.add_seamcall_breakpoint, leaf.dotted, errors, status))
                elif target.lower() == "function" and len(rest) > 1:
                    add(f"break: on function {rest[1]}", partial(app.add_function_breakpoint, rest[1]))
                elif target.upper().startswith("RET_PF"):
                    add(f"break: on {target.upper()}", partial(app.add_ret_pf_breakpoint, target))
                elif target.lower() == "violation":
                    name = rest[1] if len(rest) > 1 else None
                    add(f"break: on violation {name or '(any)'}", partial(app.add_violation_breakpoint, name))
        if low and low[0] in ("watch:", "watch") and len(words) >= 3 and low[1] == "gfn":
            try:
                gfn = int(words[2], 0)
            except ValueError:
                gfn = None
            modes = [GfnWatch(low[3])] if len(words) > 3 and low[3] in ("writes", "state") else list(GfnWatch)
            if gfn is not None and gfn >= 0:
                for mode in modes:
                    what = "" if mode is GfnWatch.ANY else f" {mode.value}"
                    add(f"watch: gfn {gfn:#x}{what}", partial(app.add_gfn_breakpoint, gfn, mode))
        if low and low[0] in ("task:", "task") and len(words) >= 3 and low[1] == "run":
            add(f"task: run {words[2]} next here", partial(app.choose_task_named, words[2]))
        return hits
