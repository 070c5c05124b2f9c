"""Running a VmSetup headless to the end through the Session API (tdxdbg.session): checks on, locals not
recorded."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from tdxdbg.engine.vm import VmSetup
from tdxdbg.runtime.frame import Frame
from tdxdbg.runtime.scheduler import ScheduleSpec
from tdxdbg.session.session import Session

DEFAULT_MAX_FRAMES = 500_000


@attrs.frozen
class TaskEnd:
    name: str
    state: str          # "done", "failed", "waiting", "ready", "runnable", "not started"
    result: Any = None
    error: str | None = None


class PeekState:
    """A copy of the final world state with the World's `peek` interface."""

    def __init__(self, state: Mapping[Any, Any]) -> None:
        self._state = dict(state)

    def peek(self, key: Any, default: Any = None) -> Any:
        return self._state.get(key, default)


@attrs.frozen
class FinalState:
    world: PeekState
    tasks: tuple[TaskEnd, ...]
    stop_message: str = ""     # why the run stopped: the deadlock or livelock report, "" when it ended


@attrs.frozen
class VmInfo:
    """What the trace needs of the VM: the TDR and the shared bit as a gfn bit."""

    tdr: int
    gfn_direct_bits: int


def _results(frames: Sequence[Frame]) -> dict[str, tuple[Any, str | None]]:
    out: dict[str, tuple[Any, str | None]] = {}
    for f in frames:
        v = f.step.kind.value
        if v == "task_done":
            r = f.step.get("result")
            out[f.task] = (r if isinstance(r, int | str | None) else str(r), None)
        elif v == "task_error":
            out[f.task] = (None, str(f.step.get("error")))
    return out


def run_setup(setup: VmSetup, schedule: ScheduleSpec,
              max_frames: int | None = DEFAULT_MAX_FRAMES) -> tuple[Sequence[Frame], FinalState, VmInfo, str]:
    """Build the VM and run every task to the end (or until stuck, or `max_frames`). Returns
    (frames, final state, VM info, stop reason: "done" | "stuck" | "livelock" | "max_frames")."""
    s = Session.open(setup, schedule)
    ev = s.run_to_end(max_frames)
    stop = {"end": "done"}.get(ev.reason.value, ev.reason.value)
    frames = list(s.frames)
    final = PeekState(s.state_at())
    res = _results(frames)
    tasks = tuple(TaskEnd(t.name, t.state, *res.get(t.name, (None, None))) for t in s.task_views(with_locals=False))
    message = ev.message if stop in ("stuck", "livelock") else ""
    return frames, FinalState(final, tasks, message), VmInfo(s.context.tdr, s.context.gfn_direct_bits), stop
