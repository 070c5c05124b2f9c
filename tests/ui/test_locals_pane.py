"""Pilot test of the locals pane: the locals of historical frames, old and recent, are the values of that frame
(rebuilt by replay), so an iterator's state agrees with the walk pane."""

from __future__ import annotations

import asyncio

from test_app import pane
from ui_helpers import settle

from tdxdbg.engine.steps import EngineStep
from tdxdbg.ui.app import TdxdbgApp

SIZE = (200, 60)


async def goto(pilot, app: TdxdbgApp, index: int) -> None:
    await pilot.press("g", *str(index), "enter")
    await settle(pilot, app)


async def select(pilot, app: TdxdbgApp, function: str) -> str:
    """Move the selected activation up (u) until it is `function`; the locals pane's text then."""
    for _ in range(30):
        stack = app.query_one("#locals").content.plain
        if stack.startswith(f"locals of {function} "):
            return stack
        await pilot.press("u")
        await settle(pilot, app)
    raise AssertionError(f"no activation {function}:\n{stack}")


def test_locals_pane_shows_the_iterator_as_it_was_at_the_frame_shown() -> None:
    """two_vcpus_same_gfn, g 28, up to kvm_tdp_mmu_map: the walk pane is at L4 idx 0 gfn 0x0 and so is `it`
    (it later moves to L1 gfn 0x1, which a recorded reference showed here before). Then a recent frame where
    the walk is at L1, and the old frame again from that later cursor."""
    async def go() -> None:
        app = TdxdbgApp("two_vcpus_same_gfn")
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot, app)
            await goto(pilot, app, 28)
            assert app.session.frame.task == "vcpu0"
            stack = await select(pilot, app, "kvm_tdp_mmu_map")
            assert "L4 idx   0 gfn 0x0 " in pane(app, "#walk")
            assert "it = tdp_iter(mirror L4 gfn=0x0 idx=0 " in stack

            s = app.session
            s.run_to_end()
            late = max(i for i in range(len(s)) if s.frames.task_of(i) == "vcpu0"
                       and s.frames.kind_of(i) is EngineStep.ITER and s.frames.payload_of(i).level == 1)
            await goto(pilot, app, late)
            stack = await select(pilot, app, "kvm_tdp_mmu_map")
            assert "L1 idx   1 gfn 0x1 " in pane(app, "#walk")
            assert "it = tdp_iter(mirror L1 gfn=0x1 idx=1 " in stack

            await goto(pilot, app, 28)
            stack = await select(pilot, app, "kvm_tdp_mmu_map")
            assert "it = tdp_iter(mirror L4 gfn=0x0 idx=0 " in stack
            assert "replay mismatch" not in stack
    asyncio.run(go())
