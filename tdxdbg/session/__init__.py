"""The debugger session: what the UI and CLI use. A cursor over a recorded timeline, stepping commands,
breakpoints, forks and read-only views of the state at any position.

Also re-exports the few engine and hardware names the UI shows (the UI reaches the engine only through here)."""

from tdxdbg.engine.spte import FROZEN_SPTE, describe_spte
from tdxdbg.hw.memory import pte_key
from tdxdbg.hw.tdx.leaves import Seamcall
from tdxdbg.hw.tdx.sept import SEPT, SeptState, sept_key
from tdxdbg.session.breakpoints import Breakpoint, BreakpointError, BreakpointKind, Breakpoints, GfnWatch
from tdxdbg.session.decode import SeptEntryView, SpteBits, decode_sept, decode_spte
from tdxdbg.session.events import StopEvent, StopReason
from tdxdbg.session.session import ForkRecord, Session, TaskInfo

__all__ = [
    "FROZEN_SPTE",
    "SEPT",
    "Breakpoint",
    "BreakpointError",
    "BreakpointKind",
    "Breakpoints",
    "ForkRecord",
    "GfnWatch",
    "Seamcall",
    "SeptEntryView",
    "SeptState",
    "Session",
    "SpteBits",
    "StopEvent",
    "StopReason",
    "TaskInfo",
    "decode_sept",
    "decode_spte",
    "describe_spte",
    "pte_key",
    "sept_key",
]
