"""Pilot tests of the debugger: stepping, reverse stepping, breakpoints, go to, choosing the next task, reload
and the error view. Each drives the app as a user would and checks the session and the screen text."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from textual.widgets import Static
from ui_helpers import settle

from tdxdbg.hw.tdx.leaves import Seamcall
from tdxdbg.hw.tdx.seamcall import TdxStep
from tdxdbg.scenario.loader import scenarios_dir
from tdxdbg.ui.app import TdxdbgApp
from tdxdbg.ui.screens import ErrorScreen

SIZE = (160, 48)


def pane(app: TdxdbgApp, selector: str) -> str:
    widget = app.query_one(selector)
    if hasattr(widget, "content"):
        return widget.content.plain
    tables = app.query_one("#tables")
    return "\n".join(tables._line(i).plain for i in range(tables.count))


def run(coro) -> None:
    asyncio.run(coro)


def test_step_into_moves_one_frame_of_the_followed_task() -> None:
    """s (step into): the cursor moves to the followed task's next frame and the header counts it."""
    async def go() -> None:
        app = TdxdbgApp("first_private_fault")
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot, app)
            assert app.session.position == 0
            total = len(app.session.frames)
            await pilot.press("s")
            assert app.session.position == 1
            assert f"frame 0/{total - 1}" in pane(app, "#header")
            for _ in range(5):
                await pilot.press("s")
            assert app.session.position == 6
            assert app.session.frame.task == "vcpu0"
    run(go())


def test_reverse_step_returns_to_identical_state() -> None:
    """S (reverse step) undoes a step: the position and the page-table pane are what they were."""
    async def go() -> None:
        app = TdxdbgApp("first_private_fault")
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot, app)
            app.goto_frame(40)
            await settle(pilot, app)
            before = (app.session.position, pane(app, "#tables"))
            await pilot.press("s")
            await pilot.press("S")
            assert (app.session.position, pane(app, "#tables")) == before
    run(go())


def test_breakpoint_on_page_aug_then_continue_stops_there() -> None:
    """A SEAMCALL breakpoint (palette: break: on TDH.MEM.PAGE.AUG) makes c stop at the AUG, shown in the log."""
    async def go() -> None:
        app = TdxdbgApp("first_private_fault")
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot, app)
            app.add_seamcall_breakpoint("TDH.MEM.PAGE.AUG", False, None)
            await pilot.press("c")
            await settle(pilot, app)
            f = app.session.frame
            assert f.step.kind is TdxStep.SEAMCALL and f.step.get("leaf") is Seamcall.TDH_MEM_PAGE_AUG
            assert "breakpoint" in app.status_text
            assert f.index in app.breakpoint_hits
    run(go())


def test_go_to_frame_and_the_frozen_owner_is_shown() -> None:
    """g 29 Enter goes to frame 29 of the demo, where vcpu0 has frozen the top-level mirror SPTE and vcpu1's
    cmpxchg just failed: the page tables say FROZEN by vcpu0."""
    async def go() -> None:
        app = TdxdbgApp("demo")
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot, app)
            await pilot.press("g")
            await pilot.press("2", "9", "enter")
            await settle(pilot, app)
            assert app.session.frame.index == 29
            assert "FROZEN by vcpu0" in pane(app, "#tables")
            assert "frame 29/" in pane(app, "#header")
    run(go())


def test_choose_task_forks_the_timeline() -> None:
    """t at a past frame picks the task that runs next: frames before stay, the frame at the cursor is the
    chosen task's, and the session records the fork."""
    async def go() -> None:
        app = TdxdbgApp("two_vcpus_same_gfn")
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot, app)
            app.goto_frame(9)
            await settle(pilot, app)
            scheduled = app.session.frames[10].task
            before = [f.task for f in app.session.frames[:10]]
            runnable = app.session.runnable_tasks()
            other = next(t for t in runnable if t != scheduled)
            await pilot.press("t")
            await pilot.pause(0.1)
            for _ in range(runnable.index(other)):
                await pilot.press("down")
            await pilot.press("enter")
            await settle(pilot, app)
            frames = app.session.frames
            assert [f.task for f in frames[:10]] == before
            assert frames[10].task == other
            assert app.session.forks
    run(go())


def test_reload_picks_up_an_edited_scenario(tmp_path: Path) -> None:
    """r re-reads the scenario file: an edited title shows without restarting the app."""
    async def go() -> None:
        path = tmp_path / "s.toml"
        shutil.copy(scenarios_dir() / "first_private_fault.toml", path)
        app = TdxdbgApp(str(path))
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot, app)
            old_title = app.opened.scenario.title
            text = path.read_text().replace(old_title, "Edited title")
            path.write_text(text)
            await pilot.press("r")
            await settle(pilot, app)
            assert "Edited title" in pane(app, "#header")
    run(go())


def test_scenario_errors_show_in_the_app(tmp_path: Path) -> None:
    """A scenario with errors opens an error screen listing file:line, key path and message; r reloads it
    once fixed; nothing raises."""
    async def go() -> None:
        path = tmp_path / "bad.toml"
        good = (scenarios_dir() / "first_private_fault.toml").read_text()
        path.write_text(good.replace("[td]", "[td]\nbogus = 1"))
        app = TdxdbgApp(str(path))
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot, app)
            assert isinstance(app.screen, ErrorScreen)
            shown = app.screen.query_one(Static).content.plain
            assert f"{path}:" in shown and "td.bogus" in shown
            path.write_text(good)
            await pilot.press("r")
            await settle(pilot, app)
            assert not isinstance(app.screen, ErrorScreen)
            assert app.session is not None
    run(go())


def test_missing_file_shows_an_error_screen() -> None:
    async def go() -> None:
        app = TdxdbgApp("/nonexistent/scenario.toml")
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot, app)
            assert isinstance(app.screen, ErrorScreen)
            assert "/nonexistent/scenario.toml" in app.screen.query_one(Static).content.plain
    run(go())


def test_next_seamcall_and_log_enter_go_to_frames() -> None:
    """e jumps to the next SEAMCALL (its return), whose locals show the leaf by name (an IntEnum, not 0x3) and
    the registers in hex; Enter on a log line goes to that line's frame."""
    async def go() -> None:
        app = TdxdbgApp("first_private_fault")
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot, app)
            await pilot.press("e")
            await settle(pilot, app)
            f = app.session.frame
            assert f.step.kind is TdxStep.SEAMCALL_RETURN and f.step.get("leaf") is Seamcall.TDH_MEM_SEPT_ADD
            stack = pane(app, "#stack")
            variables = pane(app, "#locals")
            assert "seamcall module.py:" in stack and "locals of seamcall" in variables
            assert "leaf = Seamcall.TDH_MEM_SEPT_ADD" in variables
            assert f"rcx = {f.step.get('gpa') | f.step.get('level'):#x}" in variables
            log = app.query_one("#log")
            log.focus()
            entry = app.event_index.entries[0]
            log.move_to(0)
            await pilot.press("enter")
            await settle(pilot, app)
            assert app.session.frame.index == entry.frame
    run(go())

