"""Screens of the debugger at fixed frames of shipped scenarios, at 80x24 (one pane at a time), 120x40 and 200x60
(pytest-textual-snapshot;
the SVGs under __snapshots__ are the reviewed reference: update them with --snapshot-update after review).

The app numbers source lines from their function's `def` (relative_lines): the stack shows `file.py +N` and the
source pane `+0..+N`, so an edit elsewhere in the engine does not re-baseline the snapshots, while an edit to
the function shown, or a change in what the engine does, still does."""

from __future__ import annotations

import pytest
from ui_helpers import settle

from tdxdbg.engine.spte import FROZEN_SPTE
from tdxdbg.engine.steps import EngineStep
from tdxdbg.ui.app import TdxdbgApp


def _first_freeze(frames) -> int:
    return next(f.index for f in frames
                if f.step.kind is EngineStep.SPTE_CMPXCHG and f.step.get("new") == FROZEN_SPTE and f.step.get("ok"))


def _first_retry(frames) -> int:
    return next(f.index for f in frames if f.step.kind is EngineStep.RET_PF and f.step.get("ret") == "RET_PF_RETRY")


def _first_violation(frames) -> int:
    return next(f.index for f in frames if f.violations)


CASES = {
    "first_fault_at_freeze": ("first_private_fault", _first_freeze),
    "race_at_retry": ("two_vcpus_same_gfn", _first_retry),
    "violation_frame": ("broken_no_freeze", _first_violation),
}


@pytest.mark.parametrize("size", [(80, 24), (120, 40), (200, 60)], ids=["80x24", "120x40", "200x60"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_main_screen(snap_compare, case: str, size: tuple[int, int]) -> None:
    scenario, where = CASES[case]
    app = TdxdbgApp(scenario, relative_lines=True)

    async def run_before(pilot) -> None:
        await settle(pilot, app)
        app.goto_frame(where(app.session.frames))
        await settle(pilot, app)

    assert snap_compare(app, terminal_size=size, run_before=run_before)
