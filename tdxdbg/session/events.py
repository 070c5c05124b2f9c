"""Why a Session command stopped: a plain, frozen value the UI and CLI render."""

from __future__ import annotations

import enum

import attrs


class StopReason(enum.Enum):
    STEP = "step"                  # the command's own target was reached (one step, over, out, goto)
    BREAKPOINT = "breakpoint"      # one or more breakpoints hit (see StopEvent.breakpoints)
    VIOLATION = "violation"        # a frame carried invariant violations
    END = "end"                    # every task finished: nothing more to run
    STUCK = "stuck"                # tasks remain but none is runnable: a deadlock (the message says who waits)
    LIVELOCK = "livelock"          # tasks run but nothing progresses (tdxdbg.session.progress)
    START = "start"                # going backwards reached position 0
    MAX_FRAMES = "max_frames"      # the frame budget of the command ran out
    INTERRUPTED = "interrupted"    # Session.interrupt() was called while running
    ERROR = "error"                # the command could not be done (message says why); nothing changed


@attrs.frozen(slots=True)
class StopEvent:
    """Where a command left the cursor and why.

    `position` is the cursor after the command (0 .. number of frames); `frame_index` the index of the frame at
    the cursor (position - 1, None at position 0); `breakpoints` the ids of the breakpoints hit at that frame;
    `frames_run` how many frames the engine executed (0 when only the cursor moved within the recording).
    """

    reason: StopReason
    position: int
    message: str = ""
    breakpoints: tuple[int, ...] = ()
    frames_run: int = 0
    forked: bool = False

    @property
    def frame_index(self) -> int | None:
        return self.position - 1 if self.position > 0 else None

    @property
    def ok(self) -> bool:
        return self.reason is not StopReason.ERROR

    def __str__(self) -> str:
        text = f"{self.reason.value} at position {self.position}"
        if self.breakpoints:
            text += f" (breakpoint {', '.join(map(str, self.breakpoints))})"
        if self.message:
            text += f": {self.message}"
        return text
