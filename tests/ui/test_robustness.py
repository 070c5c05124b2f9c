"""Pilot tests that the debugger survives what a user can do to it: no colour, blank and malformed prompt input,
and keys pressed while a worker owns the session (refused with a message, or queued behind recording ahead;
the UI never reads the session meanwhile)."""

from __future__ import annotations

import asyncio
import threading

import pytest
from ui_helpers import settle

from tdxdbg.session.events import StopEvent, StopReason
from tdxdbg.ui.app import TdxdbgApp
from tdxdbg.ui.lines import Pane
from tdxdbg.ui.screens import PromptScreen

SIZE = (160, 48)


def header(app: TdxdbgApp) -> str:
    return app.query_one("#header", Pane).content.plain


@pytest.mark.parametrize("env", [{"NO_COLOR": "1"}, {"NO_COLOR": "1", "TERM": "dumb"}], ids=["no_color", "dumb"])
def test_no_color_draws_and_steps(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """NO_COLOR=1 (Textual's monochrome filter reads every segment's colour): the first frame draws, s steps."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)

    async def go() -> None:
        app = TdxdbgApp("demo")
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot, app)
            await pilot.press("s", "s")
            await settle(pilot, app)
            assert app.session.position > 1 and f"frame {app.session.position - 1}/" in header(app)
            assert app.screen.query_one("#timeline").render_line(1).text.strip()
        assert app._exception is None
    asyncio.run(go())


PROMPT_INPUTS = {
    "B": (["   ", "", "TDH.NO.SUCH", "a b c", "[/]", "any [bold]x"], "SEAMCALL"),
    "w": (["   ", "", "zz", "-1", "[/]", "9" * 5000], "gfn"),
    "g": (["   ", "", "zz", "-3", "[red]", "9" * 5000], "frame"),
}


@pytest.mark.parametrize("key", sorted(PROMPT_INPUTS))
def test_prompts_turn_bad_input_into_messages(key: str) -> None:
    """Blank, malformed or markup-looking input in every prompt is an error message; the app keeps running and
    nothing is added or moved."""
    inputs, _what = PROMPT_INPUTS[key]

    async def go() -> None:
        app = TdxdbgApp("first_private_fault", record_ahead=0)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot, app)
            for text in inputs:
                before = len(app.notices)
                await pilot.press(key)
                await pilot.pause()
                assert isinstance(app.screen, PromptScreen)
                app.screen.query_one("Input").value = text
                await pilot.press("enter")
                await settle(pilot, app)
                assert not isinstance(app.screen, PromptScreen)
                assert len(app.notices) == before + 1, (text, app.notices[-3:])
                assert app.session.position == 0
                assert not app.session.breakpoints.active
        assert app._exception is None
    asyncio.run(go())


class Gate:
    """Holds a session command in the worker thread until the test opens it, so keys arrive while it runs."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def hold(self, session, frames: int) -> None:
        session.progress(frames)
        self.entered.set()
        assert self.release.wait(30)


def forbid_reads_while_busy(app: TdxdbgApp) -> list[str]:
    """Make every read of the session from the UI thread while a worker owns it a recorded error."""
    bad: list[str] = []
    s = app.session
    main = threading.get_ident()
    for name in ("kvm", "view", "task_views", "task_view", "state_at", "walk_path", "sept_entry_at", "last_write"):
        orig = getattr(s, name)

        def wrapped(*a, _orig=orig, _name=name, **k):
            if app._run_label and threading.get_ident() == main:
                bad.append(_name)
            return _orig(*a, **k)
        setattr(s, name, wrapped)
    return bad


def test_keys_during_recording_ahead_are_queued_and_the_ui_does_not_read_the_session() -> None:
    """While the worker records ahead: progress arrives as messages (the header counts frames), a key is queued
    (the recording is interrupted) and runs once the worker lets go; the UI never reads the session meanwhile."""
    async def go() -> None:
        app = TdxdbgApp("first_private_fault", record_ahead=0)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot, app)
            s = app.session
            bad = forbid_reads_while_busy(app)
            gate = Gate()
            real = s.run_to_end

            def held(max_frames=None):
                gate.hold(s, 777)
                return real(max_frames=max_frames)
            s.run_to_end = held
            app.record_ahead = 1000
            app.record_ahead_worker()
            assert app._run_label.startswith("recording")      # busy before the worker runs anything
            await asyncio.get_running_loop().run_in_executor(None, gate.entered.wait, 30)
            await pilot.pause(0.05)
            assert "777 frames" in header(app)
            await pilot.press("s", "tab")
            assert app.session.position == 0 and len(app._queued) == 2
            gate.release.set()
            await settle(pilot, app)
            assert app.session.position == 1
            assert not app._queued
            assert bad == []
        assert app._exception is None
    asyncio.run(go())


def test_keys_during_continue_are_refused_with_a_message() -> None:
    """During c (a run of the user's own) another key is refused with a message, not lost silently, and the
    UI does not block on the session."""
    async def go() -> None:
        app = TdxdbgApp("first_private_fault", record_ahead=0)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot, app)
            s = app.session
            bad = forbid_reads_while_busy(app)
            gate = Gate()

            def held(max_frames=None):
                gate.hold(s, 5)
                return StopEvent(StopReason.END, s.position, "held")
            s.continue_ = held
            await pilot.press("c")
            await asyncio.get_running_loop().run_in_executor(None, gate.entered.wait, 30)
            await pilot.press("s")
            await pilot.pause()
            assert any("in progress" in n for n in app.notices)
            gate.release.set()
            await settle(pilot, app)
            assert app.session.position == 0
            assert "end at" in app.status_text
            assert bad == []
        assert app._exception is None
    asyncio.run(go())
