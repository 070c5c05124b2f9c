"""Random keys over every binding and into every prompt and modal screen, at three terminal sizes: the debugger
never raises. Seeded, so a failure replays exactly (the seed and the keys so far are in the message)."""

from __future__ import annotations

import asyncio
import random

import pytest
from ui_helpers import settle

from tdxdbg.ui.app import TdxdbgApp
from tdxdbg.ui.commands import COMMANDS

PRESSES = 160
# Every bound key (but q, which quits), what prompts and lists take, and text typed into prompts.
KEYS = [
    *sorted({c.key for c in COMMANDS if c.key != "q"}),
    "enter", "enter", "escape", "up", "down", "left", "right", "pageup", "pagedown", "home", "end", "space",
    "delete", "backspace", "shift+tab", "ctrl+r", "ctrl+t", "0", "x", "1", "a", "[", "]", "minus", "space",
]


@pytest.mark.parametrize("size", [(80, 24), (160, 48), (200, 60)], ids=["80x24", "160x48", "200x60"])
def test_random_keys_never_raise(size: tuple[int, int]) -> None:
    seed = size[0] * 1000 + size[1]
    rng = random.Random(seed)

    async def go() -> None:
        app = TdxdbgApp("two_vcpus_same_gfn", record_ahead=2000)
        pressed: list[str] = []
        async with app.run_test(size=size) as pilot:
            await settle(pilot, app)
            for _ in range(PRESSES):
                key = rng.choice(KEYS)
                pressed.append(key)
                await pilot.press(key)
                if app._exception is not None:
                    break
                if rng.random() < 0.1:
                    await settle(pilot, app)
            await settle(pilot, app)
            assert app._exception is None, (seed, pressed)
            assert app.is_running, (seed, pressed)
    asyncio.run(go())
