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
    GUEST_INTERRUPT = "guest_interrupt"


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


class GuestInterruptInfo(NamedTuple):
    """The guest took posted interrupts (their vectors, highest priority first) at an instruction boundary."""

    vcpu: int
    vectors: tuple[int, ...]
    rip: int


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


class Reg(enum.Enum):
    """A SEAMCALL register operand or output."""

    RCX = "rcx"
    RDX = "rdx"
    R8 = "r8"
    R9 = "r9"


class Arg(enum.Enum):
    """What an operand is: how a scenario's `seamcall` op gives it (or the VMM fills it in) and how it is shown.

    PAGE_INFO and PAGE_RANGE are page_info_api_input_t (GPA | level in one register): a scenario gives
    `GPA [LEVEL]`, the log shows `gpa=..., level=...`. PAGE_RANGE names a page (or huge page), so a call at a
    huge level is about every gfn of its range; PAGE_INFO names one S-EPT entry (a table's, for SEPT.ADD)."""

    PAGE_INFO = "page_info"
    PAGE_RANGE = "page_range"
    GPA = "gpa"                  # a GPA alone (TDH.MR.EXTEND's 256-byte chunk): `GPA`
    PA = "pa"                    # a host physical address the scenario gives: `PA`
    VALUE = "value"              # a number the scenario gives, shown in hex
    TDR = "tdr"                  # the TD's TDR PA: the VMM fills it in
    TDVPR = "tdvpr"              # vCPU 0's TDVPR PA: the VMM fills it in
    NEW_PAGE = "new_page"        # a 4K page the VMM allocates for the module (not shown)
    NEW_PAGE_AT_LEVEL = "new_page_at_level"  # ... of the PAGE_RANGE level's size (PAGE.AUG at 2M)
    SOURCE_PAGE = "source_page"  # a page the VMM allocates and the module copies from (not shown)

    @property
    def user_words(self) -> tuple[str, ...]:
        """The words a scenario's `seamcall` op gives for this operand (each optional, 0 when left out; VALUE
        is spelled with the operand's name)."""
        return {Arg.PAGE_INFO: ("GPA", "LEVEL"), Arg.PAGE_RANGE: ("GPA", "LEVEL"), Arg.GPA: ("GPA",),
                Arg.PA: ("PA",), Arg.VALUE: ("VALUE",)}.get(self, ())


_PAGE_INFO_ARGS = (Arg.PAGE_INFO, Arg.PAGE_RANGE)
# page_info_api_input_t: GPA in bits 51:12, level in bits 2:0.
PAGE_INFO_LEVEL_MASK = 0x7


@attrs.frozen
class Operand:
    """One input register of a leaf: its name in the log, the register, what it is, and whether the log line
    shows it (a page the VMM allocated, or the TDR beside a GPA, is left out: one TD per scenario)."""

    name: str
    reg: Reg
    arg: Arg
    shown: bool = True


@attrs.frozen
class Output:
    """One output register a leaf returns on success, with its name in the log."""

    name: str
    reg: Reg


@attrs.frozen
class LeafInfo:
    """A leaf as declared on its handler: operands and outputs. Scenario `seamcall` ops, breakpoints, the log
    line and the JSON trace are derived from this."""

    leaf: Seamcall
    operands: tuple[Operand, ...]
    returns: tuple[Output, ...] = ()

    @property
    def syntax(self) -> str:
        """The scenario op: `seamcall TDH.MEM.PAGE.AUG [GPA [LEVEL]]`."""
        words = self.user_words
        tail = "".join(f" [{w}" for w in words) + "]" * len(words)
        return f"seamcall {self.leaf.dotted}{tail}"

    @property
    def user_words(self) -> tuple[str, ...]:
        """The numbers a scenario's `seamcall` op gives, in order (LEVEL: 0-7 or 4K/2M/1G)."""
        return tuple(o.name.upper() if o.arg is Arg.VALUE else w for o in self.operands for w in o.arg.user_words)

    @property
    def maps_range(self) -> bool:
        """A call at a huge level is about every gfn of the range (its operand is a page, not an entry)."""
        return any(o.arg is Arg.PAGE_RANGE for o in self.operands)

    def register_of(self, *args: Arg) -> Reg | None:
        """The register of the first operand of one of these kinds, or None."""
        return next((o.reg for o in self.operands if o.arg in args), None)

    def shown_operands(self, regs: Any) -> str:
        """`gpa=0x1000, level=0` / `tdr=0x10000000`: the operands the leaf has, from its input registers
        (`regs.rcx` ...)."""
        parts = []
        for o in self.operands:
            if not o.shown:
                continue
            v = getattr(regs, o.reg.value)
            if o.arg in _PAGE_INFO_ARGS:
                parts.append(f"gpa={v & ~0xFFF & ((1 << 52) - 1):#x}, level={v & PAGE_INFO_LEVEL_MASK}")
            else:
                parts.append(f"{o.name}={v:#x}")
        return ", ".join(parts)

    def shown_returns(self, regs: Any) -> str:
        return ", ".join(f"{r.name}={getattr(regs, r.reg.value):#x}" for r in self.returns)


HANDLERS: dict[Seamcall, Handler] = {}
LEAVES: dict[Seamcall, LeafInfo] = {}


def handler(leaf: Seamcall, operands: tuple[Operand, ...], returns: tuple[Output, ...] = ()) -> Callable[[type],
                                                                                                          type]:
    """Register a class with `prepare` and `execute` static methods as the handler of `leaf`, with the
    leaf's operands and outputs: the one place a leaf is declared."""

    def register(cls: type) -> type:
        HANDLERS[leaf] = Handler(cls.prepare, cls.execute)
        LEAVES[leaf] = LeafInfo(leaf, operands, returns)
        return cls

    return register


def declare(leaf: Seamcall, operands: tuple[Operand, ...], returns: tuple[Output, ...] = ()) -> None:
    """Declare a leaf the module does not dispatch (TDH.VP.ENTER is the TD vCPU's, tdxdbg/hw/cpu.py): it can be
    a breakpoint and has a log line, but a scenario cannot issue it as a raw SEAMCALL."""
    LEAVES[leaf] = LeafInfo(leaf, operands, returns)


def unregister(leaf: Seamcall) -> None:
    """Forget a leaf's handler and declaration (a leaf registered by a test or a plugin)."""
    HANDLERS.pop(leaf, None)
    LEAVES.pop(leaf, None)


def leaf_info(leaf: Seamcall) -> LeafInfo | None:
    return LEAVES.get(leaf)


def parse_leaf(text: str) -> Seamcall:
    """A leaf the emulated module implements, by its name (TDH.MEM.PAGE.AUG, any case, dots or underscores).
    Raises ValueError naming the implemented leaves."""
    try:
        leaf = Seamcall.parse(text)
    except ValueError:
        leaf = None
    if leaf is None or leaf not in LEAVES:
        known = ", ".join(sorted(x.dotted for x in LEAVES))
        raise ValueError(f"unknown SEAMCALL leaf {text!r}: expected one the emulated TDX module implements "
                         f"({known})")
    return leaf


# Operands most leaves share, named once.
PAGE_INFO_RCX = Operand("gpa", Reg.RCX, Arg.PAGE_INFO)
PAGE_RANGE_RCX = Operand("gpa", Reg.RCX, Arg.PAGE_RANGE)
TDR_RDX = Operand("tdr", Reg.RDX, Arg.TDR, shown=False)
TDR_RCX = Operand("tdr", Reg.RCX, Arg.TDR)
NEW_PAGE_R8 = Operand("hpa", Reg.R8, Arg.NEW_PAGE, shown=False)

# TDH.VP.ENTER: RCX = the vCPU's TDVPR (entered by TdVcpu.enter in tdxdbg/hw/cpu.py).
declare(Seamcall.TDH_VP_ENTER, (Operand("tdvpr", Reg.RCX, Arg.TDVPR),))
