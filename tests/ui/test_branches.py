"""Pilot tests of branches and comparison: t at a past frame keeps the old future as a branch, the strip marks
the fork, a lists branches and switches back, delete removes one, D compares two frames or this frame on two
branches side by side."""

from __future__ import annotations

import asyncio

from textual.widgets import Input, OptionList, Static
from ui_helpers import settle

from tdxdbg.ui.app import TdxdbgApp
from tdxdbg.ui.screens import BranchesScreen, DiffScreen, PromptScreen

SIZE = (160, 48)
FORK_AT = 10      # two_vcpus_same_gfn: a past frame where both vCPUs can run


async def fork(pilot, app: TdxdbgApp) -> tuple[str, str]:
    app.goto_frame(FORK_AT - 1)
    await settle(pilot, app)
    scheduled = app.session.frames[FORK_AT].task
    other = next(t for t in app.session.runnable_tasks() if t != scheduled)
    app.choose_task_named(other)
    await settle(pilot, app)
    return scheduled, other


def test_fork_keeps_the_old_future_as_a_branch_and_switches_back() -> None:
    async def go() -> None:
        app = TdxdbgApp("two_vcpus_same_gfn")
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot, app)
            old = app.session.picks
            scheduled, other = await fork(pilot, app)
            s = app.session
            assert s.branch == 2 and s.frames[FORK_AT].task == other
            assert "the old future is kept as branch 1" in app.notices[-1]
            assert s.fork_points() == (FORK_AT,)
            strip = app.query_one("#timeline")
            assert "Y" in strip.render_line(2).text
            await pilot.press("a")
            await pilot.pause()
            assert isinstance(app.screen, BranchesScreen)
            listed = [str(o.prompt) for o in app.screen.query_one(OptionList).options]
            assert listed[0].startswith("    1  main") and f"{len(old):>8,} frames" in listed[0]
            assert listed[1].startswith("*   2  " + f"{other} at position {FORK_AT}")
            await pilot.press("enter")                   # the highlighted first row: main
            await settle(pilot, app)
            assert s.branch == 1 and s.picks == old and s.frames[FORK_AT].task == scheduled
            assert s.position == FORK_AT + 1
            await pilot.press("a")
            await pilot.pause()
            await pilot.press("down", "delete")
            await settle(pilot, app)
            assert [b.id for b in s.branches()] == [1]
    asyncio.run(go())


def test_diff_of_the_same_point_on_two_branches_and_of_two_frames() -> None:
    async def go() -> None:
        app = TdxdbgApp("two_vcpus_same_gfn")
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot, app)
            scheduled, other = await fork(pilot, app)
            await pilot.press("D")
            await pilot.pause()
            assert isinstance(app.screen, PromptScreen)
            app.screen.query_one(Input).value = "branch 1"
            await pilot.press("enter")
            await pilot.pause()
            assert isinstance(app.screen, DiffScreen)
            shown = app.screen.query_one(Static).content.plain
            assert f"frame {FORK_AT} (branch 2)" in shown and f"frame {FORK_AT} (branch 1)" in shown
            assert f"task   {other} " in shown and f"task   {scheduled} " in shown
            await pilot.press("escape")
            await pilot.press("D")
            await pilot.pause()
            app.screen.query_one(Input).value = "0 5"
            await pilot.press("enter")
            await pilot.pause()
            rows = app.screen.rows
            assert rows == app.session.compare(1, 6)
            assert any(r.category == "task" for r in rows)
            await pilot.press("escape")
            await pilot.press("D")
            await pilot.pause()
            app.screen.query_one(Input).value = "branch 9"
            await pilot.press("enter")
            await pilot.pause()
            assert app.notices[-1] == "cannot compare: no branch 9"
    asyncio.run(go())
