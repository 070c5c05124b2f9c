"""Pilot tests of the panes: every pane focusable and scrollable, locals expanded with Enter and copied with y,
SPTE bits as text, the log's current line visible and FROZEN_SPTE named, the TD's epochs and locks, the
SEAMCALL panel, a page-table selection kept on its GPA when the entry goes away, and the one-pane layout of a
small terminal."""

from __future__ import annotations

import asyncio

import pytest
from ui_helpers import settle

from tdxdbg.ui.app import PANES, TdxdbgApp
from tdxdbg.ui.lines import LineList
from tdxdbg.ui.variables import LocalsPane

# Frames of the demo scenario (tdxdbg/scenarios/demo.toml) with the default schedule.
DEMO_SEPT_ADD_L3 = 34      # vcpu0's TDH.MEM.SEPT.ADD(gpa 0, level 3) returns
DEMO_BLOCK = 170           # TDH.MEM.RANGE.BLOCK(gpa 0x1000) returns
DEMO_TRACK = 172           # TDH.MEM.TRACK returns
DEMO_REMOVE = 175          # TDH.MEM.PAGE.REMOVE(gpa 0x1000) returns
DEMO_FROZEN_HIT = 29       # vcpu1's cmpxchg finds vcpu0's FROZEN_SPTE


def text(app: TdxdbgApp, selector: str) -> str:
    return app.query_one(selector).content.plain


async def goto(pilot, app: TdxdbgApp, frame: int) -> None:
    app.goto_frame(frame)
    await settle(pilot, app)


def test_every_pane_is_focusable_and_scrolls() -> None:
    """Digits 1-8 focus each pane; a pane whose text is longer than it scrolls with page down."""
    async def go() -> None:
        app = TdxdbgApp("demo")
        async with app.run_test(size=(160, 48)) as pilot:
            await settle(pilot, app)
            await goto(pilot, app, DEMO_SEPT_ADD_L3)
            for n, (pane_id, _title) in enumerate(PANES, 1):
                await pilot.press(str(n))
                assert app.focused is app.query_one(f"#{pane_id}")
            await pilot.press("3")                       # the stack is deeper than its pane at this size
            stack = app.query_one("#stack", LineList)
            await pilot.press("home")
            top = stack.scroll_offset.y
            await pilot.press("pagedown", "pagedown")
            await pilot.pause()
            assert stack.scroll_offset.y > top
    asyncio.run(go())


def test_enter_expands_a_local_and_y_copies_it() -> None:
    """In the locals pane Enter on `result` (a SeamcallResult) lists its fields under it, Enter again folds
    them; y copies the whole value, not the row cut to the pane."""
    async def go() -> None:
        app = TdxdbgApp("demo")
        async with app.run_test(size=(160, 48)) as pilot:
            await settle(pilot, app)
            await goto(pilot, app, DEMO_SEPT_ADD_L3)
            await pilot.press("4")
            pane = app.query_one("#locals", LocalsPane)
            row = next(i for i, r in enumerate(pane._rows) if r.name == "result")
            pane.move_to(row + 1)
            await pilot.press("enter")
            shown = text(app, "#locals")
            assert "    rax = TdxStatus.TDX_SUCCESS" in shown and "    leaf = Seamcall.TDH_MEM_SEPT_ADD" in shown
            await pilot.press("y")
            assert app.clipboard.startswith("SeamcallResult(leaf=<Seamcall.TDH_MEM_SEPT_ADD: 3>")
            assert app.notices[-1].startswith("copied: SeamcallResult(")
            await pilot.press("enter")
            assert "    rax = " not in text(app, "#locals")
    asyncio.run(go())


def test_spte_bits_read_without_colour_and_frozen_is_named_in_the_log() -> None:
    """The inspector spells set bits and dots clear ones; the log says FROZEN_SPTE where vcpu1's cmpxchg
    found vcpu0's freeze, so /FROZEN finds it."""
    async def go() -> None:
        app = TdxdbgApp("demo")
        async with app.run_test(size=(160, 48)) as pilot:
            await settle(pilot, app)
            await goto(pilot, app, 110)          # after the AUG: gfn 0x1 is mapped R W X, accessed and dirty
            tables = app.query_one("#tables", LineList)
            leaf = next(i for i, ln in enumerate(app.table_lines) if ln.kind == "mirror" and ln.level == 1)
            tables.focus()
            tables.move_to(leaf, notify=True)
            await pilot.pause()
            shown = text(app, "#inspector")
            assert "  R W X ···· ·· A D \n" in shown
            assert "  MMU-present host-writable MMU-writable suppress-#VE \n" in shown
            app.goto_frame(0)
            await settle(pilot, app)
            await pilot.press("slash")
            await pilot.press(*"FROZEN_SPTE", "enter")
            await settle(pilot, app)
            assert app.session.frame.index == DEMO_FROZEN_HIT
            assert "(found FROZEN_SPTE 0x80000000000005a0)" in app.query_one("#log", LineList).line_text(
                app.query_one("#log", LineList).cursor)
    asyncio.run(go())


@pytest.mark.parametrize("size", [(80, 24), (160, 48), (200, 60)], ids=["80x24", "160x48", "200x60"])
def test_log_keeps_the_current_line_visible_and_marked(size: tuple[int, int]) -> None:
    async def go() -> None:
        app = TdxdbgApp("demo")
        async with app.run_test(size=size) as pilot:
            await settle(pilot, app)
            await goto(pilot, app, DEMO_REMOVE)
            log = app.query_one("#log", LineList)
            await pilot.pause()
            top = log.scroll_offset.y
            assert top <= log.cursor < top + log.scrollable_content_region.height
            assert log.line_text(log.cursor).startswith(f"►{DEMO_REMOVE:7d} vcpu0")
            assert f"frame {DEMO_REMOVE}/" in text(app, "#header") and f"frame {DEMO_REMOVE}" in app.status_text
    asyncio.run(go())


def test_td_state_shows_block_epoch_then_track() -> None:
    """After BLOCK the walk · TD pane lists the blocked gpa with its BLOCK epoch, not tracked; after TRACK the
    TD's TLB epoch has advanced and the entry is tracked."""
    async def go() -> None:
        app = TdxdbgApp("demo")
        async with app.run_test(size=(160, 48)) as pilot:
            await settle(pilot, app)
            await goto(pilot, app, DEMO_BLOCK)
            shown = text(app, "#walk")
            assert "TD TLB epoch 1 " in shown
            assert "BLOCKED gpa 0x1000 page 0x10009 BLOCK epoch 1 not tracked yet" in shown
            assert "vCPU0 outside the guest" in shown and "mmu_lock write vcpu0" in shown
            await goto(pilot, app, DEMO_TRACK)
            shown = text(app, "#walk")
            assert "TD TLB epoch 2 " in shown
            assert "BLOCKED gpa 0x1000 page 0x10009 BLOCK epoch 1 tracked" in shown
    asyncio.run(go())


def test_seamcall_panel_decodes_the_call() -> None:
    async def go() -> None:
        app = TdxdbgApp("demo")
        async with app.run_test(size=(160, 48)) as pilot:
            await settle(pilot, app)
            await goto(pilot, app, DEMO_SEPT_ADD_L3)
            shown = text(app, "#seamcall")
            assert shown.startswith(f"TDH.MEM.SEPT.ADD by vcpu0, frame {DEMO_SEPT_ADD_L3 - 2} -> {DEMO_SEPT_ADD_L3}")
            assert "RCX 0x0000000000000003 gpa: page_info: GPA | level of an S-EPT entry: gpa 0x0 level 3" in shown
            assert "RAX 0x0000000000000000 TDX_SUCCESS" in shown
            assert "gpa 0x0: FREE 0x0 -> NL_MAPPED 0x" in shown
            await goto(pilot, app, DEMO_REMOVE)
            shown = text(app, "#seamcall")
            assert "TDH.MEM.PAGE.REMOVE" in shown and "gpa 0x1000: BLOCKED 0x10009 -> FREE 0x0" in shown
    asyncio.run(go())


def test_selected_sept_entry_that_is_removed_stays_selected_as_free() -> None:
    async def go() -> None:
        app = TdxdbgApp("demo")
        async with app.run_test(size=(160, 48)) as pilot:
            await settle(pilot, app)
            await goto(pilot, app, DEMO_BLOCK)
            tables = app.query_one("#tables", LineList)
            row = next(i for i, ln in enumerate(app.table_lines) if ln.kind == "sept" and ln.gfn == 1)
            tables.focus()
            tables.move_to(row, notify=True)
            await pilot.pause()
            assert "S-EPT entry gpa 0x1000 TDX level 0" in text(app, "#inspector")
            await goto(pilot, app, DEMO_REMOVE)
            shown = text(app, "#inspector")
            assert shown.startswith("S-EPT entry gpa 0x1000 TDX level 0\n  FREE")
    asyncio.run(go())


def test_small_terminal_shows_one_pane_at_a_time() -> None:
    """At 80x24 the panes are not cut into a grid: one shows at a time, digits switch, the bar says which."""
    async def go() -> None:
        app = TdxdbgApp("demo")
        async with app.run_test(size=(80, 24)) as pilot:
            await settle(pilot, app)
            assert app.narrow
            assert app.query_one("#tables").display and not app.query_one("#source").display
            await pilot.press("2")
            assert app.query_one("#source").display and not app.query_one("#tables").display
            assert app.focused is app.query_one("#source")
            assert "2 source" in app.query_one("#panebar").content.plain
            assert app.query_one("#source").size.width == 78
    asyncio.run(go())
