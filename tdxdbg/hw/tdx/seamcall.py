"""What a SEAMCALL is: its registers in flight, its result, and the registry of leaf handlers."""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import attrs

from tdxdbg.hw.tdx.leaves import Seamcall
from tdxdbg.hw.tdx.sept import FREE_ENTRY, SeptEntry
from tdxdbg.hw.tdx.status import TdxStatus, describe, is_error, status_name

if TYPE_CHECKING:
    from tdxdbg.hw.tdx.module import TdxModule
    from tdxdbg.hw.tdx.td import TdConfig


class TdxStep(enum.Enum):
    """Step kinds the TDX module and TD vCPUs produce."""

    SEAMCALL = "seamcall"
    SEAMCALL_RETURN = "seamcall_return"
    TDCALL = "tdcall"
    TDCALL_RETURN = "tdcall_return"
    TD_ENTRY = "td_entry"
    TD_EXIT = "td_exit"
    GUEST_ACCESS = "guest_access"


class SeamcallEntry(NamedTuple):
    """Payload of a SEAMCALL step: the registers and what the module's checks took (locks as (name, exclusive))."""

    leaf: Seamcall
    rcx: int
    rdx: int
    r8: int
    r9: int
    gpa: int
    level: int
    locks: tuple[tuple[str, bool], ...]
    injected: bool


class SeamcallReturn(NamedTuple):
    """Payload of a SEAMCALL_RETURN step: the output registers."""

    leaf: Seamcall
    rax: int
    rcx: int
    rdx: int
    r8: int
    gpa: int
    level: int
    injected: bool

    @property
    def status(self) -> str:
        return describe(self.rax)

    @property
    def error(self) -> bool:
        return is_error(self.rax)


class TdcallEntry(NamedTuple):
    """A guest TDCALL entered the module (after its walk and entry lock)."""

    leaf: Any
    rcx: int
    gpa: int
    level: int
    locked: bool


class TdcallReturn(NamedTuple):
    """What a guest TDCALL returned (or that it exited to the host instead: `exit`)."""

    leaf: Any
    gpa: int
    level: int
    rax: int | None
    status: str
    exit: bool


class TdEntry(NamedTuple):
    vcpu: int
    epoch: int
    flush: bool
    rip: int


class TdExitInfo(NamedTuple):
    """TDH.VP.ENTER came back: the exit (reason, qualification, GPA) or why the TD was not entered."""

    leaf: Any
    vcpu: int
    rax: int
    reason: str | None
    status: str
    error: bool
    gpa: int
    exit_qual: int
    ext_qual: int
    entered: bool
    injected: bool = False


class GuestAccessInfo(NamedTuple):
    """One guest read, write or fetch: its value, or the EPT-violation exit or #VE it took instead."""

    vcpu: int
    access: str
    gpa: int
    shared: bool
    value: int | None = None
    exit: str | None = None
    ve: bool = False


@attrs.frozen(slots=True)
class SeamcallResult:
    leaf: Seamcall
    rax: int
    rcx: int = 0
    rdx: int = 0
    r8: int = 0

    @property
    def status(self) -> str:
        return status_name(self.rax)

    @property
    def ok(self) -> bool:
        return not is_error(self.rax)

    def __str__(self) -> str:
        return f"{self.leaf.dotted} = {describe(self.rax)}"


def success(c: Call, rcx: int = 0, rdx: int = 0, r8: int = 0) -> SeamcallResult:
    """TDX_SUCCESS for the call `c`, with its output registers."""
    return SeamcallResult(c.leaf, TdxStatus.TDX_SUCCESS, rcx, rdx, r8)


@attrs.define(slots=True)
class Call:
    """One SEAMCALL in flight: its registers, what the checks found, and the locks it holds."""

    leaf: Seamcall
    rcx: int
    rdx: int
    r8: int
    r9: int
    caller: str
    cfg: TdConfig | None = None
    gpa: int = 0
    level: int = 0
    table: int = 0
    index: int = 0
    entry: SeptEntry = FREE_ENTRY
    walk_level: int = 0
    page: int = 0
    locks: list[tuple[str, Any, Any]] = attrs.Factory(list)


Prepare = Callable[["TdxModule", Call], "SeamcallResult | None"]
Execute = Callable[["TdxModule", Call], "SeamcallResult"]


@attrs.frozen(slots=True, repr=False)
class Handler:
    prepare: Prepare
    execute: Execute

    def __repr__(self) -> str:
        # By the handler class's name: the default repr would show function addresses, which differ per run.
        return f"Handler({self.prepare.__qualname__.rsplit('.', 1)[0]})"


HANDLERS: dict[Seamcall, Handler] = {}


def handler(leaf: Seamcall) -> Callable[[type], type]:
    """Register a class with `prepare` and `execute` static methods as the handler of `leaf`."""

    def register(cls: type) -> type:
        HANDLERS[leaf] = Handler(cls.prepare, cls.execute)
        return cls

    return register
