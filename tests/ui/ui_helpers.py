"""Driving the debugger headless in tests."""

from __future__ import annotations

from typing import Any

from tdxdbg.ui.app import TdxdbgApp


async def settle(pilot: Any, app: TdxdbgApp) -> None:
    """Wait until background runs finished and the screen caught up."""
    for _ in range(300):
        await pilot.pause(0.01)
        if not app._run_label:
            break
    await app.workers.wait_for_complete()
    await pilot.pause(0.05)
