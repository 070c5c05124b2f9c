"""Pilot tests of navigation: tab follows the next task, . steps any task, clicks select rows, search with
next/previous, history, regex and case, the breakpoint manager and gfn watch conditions, one command table for
keys, palette and help, and reload keeping the frame."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from textual.widgets import Input, OptionList, Static
from ui_helpers import settle

from tdxdbg.scenario.loader import scenarios_dir
from tdxdbg.session import GfnWatch
from tdxdbg.ui.app import TdxdbgApp
from tdxdbg.ui.commands import COMMANDS, DebuggerCommands
from tdxdbg.ui.lines import LineList
from tdxdbg.ui.screens import BreakpointsScreen, HelpScreen, SearchScreen

SIZE = (160, 48)


def header(app: TdxdbgApp) -> str:
    return app.query_one("#header").content.plain


def test_tab_follows_the_next_task_and_full_stop_steps_any_task() -> None:
    async def go() -> None:
        app = TdxdbgApp("demo")
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot, app)
            await pilot.press("s")
            assert "following vcpu0" in header(app)
            await pilot.press("tab")
            assert app.session.current_task == "vcpu1" and "following vcpu1" in header(app)
            pos = app.session.position
            await pilot.press("full_stop")
            assert app.session.position == pos + 1
            await pilot.press("comma")
            assert app.session.position == pos
    asyncio.run(go())


def test_click_selects_a_log_line_and_enter_goes_there() -> None:
    async def go() -> None:
        app = TdxdbgApp("demo")
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot, app)
            log = app.query_one("#log", LineList)
            await pilot.click("#log", offset=(10, 3))        # border row, then the third line
            assert app.focused is log and log.cursor == log.scroll_offset.y + 2
            want = app.event_index.entries[log.cursor].frame
            await pilot.press("enter")
            await settle(pilot, app)
            assert app.session.frame.index == want
            tables = app.query_one("#tables", LineList)
            await pilot.click("#tables", offset=(10, 2))
            assert app.focused is tables and tables.cursor == 1
    asyncio.run(go())


async def search(pilot, app: TdxdbgApp, text: str, *toggles: str) -> None:
    await pilot.press("slash")
    await pilot.pause()
    assert isinstance(app.screen, SearchScreen)
    for t in toggles:
        await pilot.press(t)
    app.screen.query_one(Input).value = text
    await pilot.press("enter")
    await settle(pilot, app)


def test_search_next_previous_regex_case_and_history() -> None:
    async def go() -> None:
        app = TdxdbgApp("demo")
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot, app)
            freezes = [e.frame for e in app.event_index.entries if "freeze mirror" in e.text.lower()]
            await search(pilot, app, "FREEZE mirror")
            assert app.session.frame.index == freezes[0]
            await pilot.press("right_square_bracket")
            await settle(pilot, app)
            assert app.session.frame.index == freezes[1]
            await pilot.press("left_square_bracket")
            await settle(pilot, app)
            assert app.session.frame.index == freezes[0]
            await search(pilot, app, "FREEZE mirror", "ctrl+t")          # case sensitive: no match
            assert app.notices[-1] == "'FREEZE mirror' not found in the log"
            await search(pilot, app, r"SEPT\.ADD\(gpa=0x0, level=[12]\)", "ctrl+t", "ctrl+r")
            sept_adds = [e.frame for e in app.event_index.entries if "SEPT.ADD(gpa=0x0, level=2)" in e.text]
            assert app.session.frame.index == sept_adds[0]
            await search(pilot, app, "(unclosed")
            assert app.notices[-1].startswith("not a regular expression")
            await pilot.press("slash")
            await pilot.pause()
            await pilot.press("up", "up")
            assert app.screen.query_one(Input).value == r"SEPT\.ADD\(gpa=0x0, level=[12]\)"
            await pilot.press("escape")
    asyncio.run(go())


def test_breakpoint_manager_lists_toggles_deletes_and_refuses_duplicates() -> None:
    async def go() -> None:
        app = TdxdbgApp("demo")
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot, app)
            bps = app.session.breakpoints
            app.add_gfn_breakpoint(1, GfnWatch.WRITES)
            app.add_gfn_breakpoint(1, GfnWatch.WRITES)
            assert len(bps) == 1 and "already gfn 0x1 writes" in app.notices[-1]
            app.add_seamcall_breakpoint("TDH.MEM.TRACK", False, None)
            await pilot.press("k")
            await pilot.pause()
            assert isinstance(app.screen, BreakpointsScreen)
            listed = [str(o.prompt) for o in app.screen.query_one(OptionList).options]
            assert listed == ["[x]   1  gfn 0x1 writes  hits 0", "[x]   2  seamcall TDH.MEM.TRACK  hits 0"]
            await pilot.press("space")
            assert not bps.get(1).enabled
            await pilot.press("down", "delete")
            assert [bp.id for bp in bps] == [1]
            await pilot.press("a")
            await pilot.pause()
            app.screen.query_one(Input).value = "gfn 0x1 state"
            await pilot.press("enter")
            await pilot.pause()
            assert [bp.description for bp in bps] == ["gfn 0x1 writes", "gfn 0x1 state changes"]
            await pilot.press("a")
            await pilot.pause()
            app.screen.query_one(Input).value = "gfn zz"
            await pilot.press("enter")
            await pilot.pause()
            assert "not a gfn" in str(app.screen.query_one("#bps-message", Static).content)
            await pilot.press("escape")
            assert not isinstance(app.screen, BreakpointsScreen)
    asyncio.run(go())


def test_gfn_watch_on_writes_and_on_state_changes() -> None:
    """A writes watch on gfn 0x1 stops at every frame that writes an SPTE or S-EPT entry mapping it; a state
    watch stops at a subset of those: the ones that change the entry's state."""
    async def stops(app: TdxdbgApp, pilot, watch: GfnWatch) -> list[int]:
        app.session.breakpoints.clear()
        app.goto_frame(0)
        await settle(pilot, app)
        app.add_gfn_breakpoint(1, watch)
        out = []
        for _ in range(60):
            await pilot.press("c")
            await settle(pilot, app)
            if "breakpoint" not in app.status_text:
                break
            out.append(app.session.frame.index)
        return out

    async def go() -> None:
        app = TdxdbgApp("demo")
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot, app)
            writes = await stops(app, pilot, GfnWatch.WRITES)
            state = await stops(app, pilot, GfnWatch.STATE)
            frames = app.session.frames
            assert len(writes) >= 4 and all(frames[i].effects for i in writes)
            assert state and set(state) <= set(writes)
    asyncio.run(go())


def test_one_command_table_for_keys_palette_and_help() -> None:
    """Every navigation command is in the palette both ways, the keys are the table's, and help shows keys as
    typed (/ and ?), not binding names."""
    async def go() -> None:
        app = TdxdbgApp("demo")
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot, app)
            names = {c.palette for c in COMMANDS}
            for what in ("SEAMCALL", "freeze", "violation", "fault"):
                assert f"frame: next {what}" in names and f"frame: previous {what}" in names
            assert {"step: back", "run: reverse continue", "log: previous match"} <= names
            assert [b.key for b in app.BINDINGS] == [c.key for c in COMMANDS]
            provider = DebuggerCommands(app.screen)
            found = [str(h.text) async for h in provider.search("previous SEAMCALL")]
            assert any("frame: previous SEAMCALL  (E)" in f for f in found)
            await pilot.press("question_mark")
            await pilot.pause()
            assert isinstance(app.screen, HelpScreen)
            shown = app.screen.query_one(Static).content.plain
            assert "  /       log: search…" in shown and "  ?       help: keys" in shown
            assert "slash" not in shown and "question_mark" not in shown
    asyncio.run(go())


def test_reload_keeps_the_frame(tmp_path: Path) -> None:
    async def go() -> None:
        path = tmp_path / "s.toml"
        shutil.copy(scenarios_dir() / "demo.toml", path)
        app = TdxdbgApp(str(path))
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot, app)
            app.goto_frame(120)
            await settle(pilot, app)
            await pilot.press("r")
            await settle(pilot, app)
            assert app.session.frame.index == 120 and "frame 120/" in header(app)
    asyncio.run(go())


def test_palette_watch_with_a_condition() -> None:
    """`watch: gfn 0x1 writes` typed in the palette offers that watch; choosing it adds it."""
    async def go() -> None:
        app = TdxdbgApp("demo")
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot, app)
            provider = DebuggerCommands(app.screen)
            hits = [h async for h in provider.search("watch gfn 0x1 writes")]
            hit = next(h for h in hits if str(h.text) == "watch: gfn 0x1 writes")
            hit.command()
            assert [bp.description for bp in app.session.breakpoints] == ["gfn 0x1 writes"]
    asyncio.run(go())
