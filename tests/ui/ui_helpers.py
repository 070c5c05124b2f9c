"""Driving the debugger headless in tests."""

from __future__ import annotations

from typing import Any

from tdxdbg.ui.app import TdxdbgApp
from tdxdbg.ui.lines import LineList


async def settle(pilot: Any, app: TdxdbgApp) -> None:
    """Wait until background runs finished and the screen caught up."""
    for _ in range(300):
        await pilot.pause(0.01)
        if not app._run_label:
            break
    await app.workers.wait_for_complete()
    await pilot.pause(0.05)
    # Each list scrolls its cursor into view again after the refresh that lays out its new size; under load
    # that refresh can come after the pause above, so do it now (what the app does a moment later anyway).
    for lines in app.screen.query(LineList):
        lines.scroll_to_cursor()
    await pilot.pause()
