"""The debugger session: what the UI and CLI use. A cursor over a recorded timeline, stepping commands,
breakpoints, forks and read-only views of the state at any position."""

from tdxdbg.session.breakpoints import Breakpoint, BreakpointError, BreakpointKind, Breakpoints
from tdxdbg.session.decode import SeptEntryView, SpteBits, decode_sept, decode_spte
from tdxdbg.session.events import StopEvent, StopReason
from tdxdbg.session.session import ForkRecord, Session, TaskInfo

__all__ = [
    "Breakpoint",
    "BreakpointError",
    "BreakpointKind",
    "Breakpoints",
    "ForkRecord",
    "SeptEntryView",
    "Session",
    "SpteBits",
    "StopEvent",
    "StopReason",
    "TaskInfo",
    "decode_sept",
    "decode_spte",
]
