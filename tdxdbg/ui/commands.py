"""Command palette provider: every debugger action, plus parameterised commands typed in the palette, named
"category: verb" ("frame: go to 42", "break: on TDH.MEM.PAGE.AUG error", "break: on function kvm_tdp_mmu_map",
"watch: gfn 0x1", "task: run vcpu1")."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

from textual.command import DiscoveryHit, Hit, Hits, Provider

from tdxdbg.session import Seamcall

if TYPE_CHECKING:
    from tdxdbg.ui.app import TdxdbgApp

STATIC_COMMANDS = [
    ("step: into", "step_into", "next frame of the followed task"),
    ("step: over", "step_over", "run until the followed task is back at this depth"),
    ("step: out", "step_out", "run until the followed task returns from this function"),
    ("run: continue", "continue", "run to the next breakpoint, violation or the end"),
    ("run: reverse step", "reverse_step", "previous frame of the followed task"),
    ("run: reverse continue", "reverse_continue", "back to the previous breakpoint hit"),
    ("frame: go to…", "goto", "jump to a frame number"),
    ("frame: next fault", "next_event('fault', True)", ""),
    ("frame: previous fault", "next_event('fault', False)", ""),
    ("frame: next SEAMCALL", "next_event('seamcall', True)", ""),
    ("frame: next freeze", "next_event('freeze', True)", ""),
    ("frame: next violation", "next_event('violation', True)", ""),
    ("frame: last write of the selected entry", "last_write", ""),
    ("task: choose the task that runs next", "choose_task", "forks the timeline when not at the end"),
    ("task: follow the next task", "switch_task", ""),
    ("break: on the current function", "break_function", ""),
    ("break: on a SEAMCALL leaf or status…", "break_seamcall", ""),
    ("watch: a gfn…", "watch_gfn", ""),
    ("mark: toggle a bookmark here", "bookmark", ""),
    ("log: search…", "search", ""),
    ("scenario: reload", "reload", "re-read the scenario file"),
    ("help: keys", "help", ""),
]


class DebuggerCommands(Provider):
    @property
    def dbg(self) -> TdxdbgApp:
        return self.app  # type: ignore[return-value]

    async def discover(self) -> Hits:
        for name, action, help_text in STATIC_COMMANDS:
            yield DiscoveryHit(name, partial(self.dbg.run_action, action), help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, action, help_text in STATIC_COMMANDS:
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), partial(self.dbg.run_action, action), help=help_text)
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
            if gfn is not None:
                add(f"watch: gfn {gfn:#x}", partial(app.add_gfn_breakpoint, gfn))
        if low and low[0] in ("task:", "task") and len(words) >= 3 and low[1] == "run":
            add(f"task: run {words[2]} next here", partial(app.choose_task_named, words[2]))
        return hits
