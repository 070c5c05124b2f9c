"""Program strings -> Op values. Each parser raises OpError with an "expected ..., found ..." message."""

from __future__ import annotations

import re

from tdxdbg.hw.tdx.module import TdxModule  # noqa: F401  (registers the leaf handlers and their operands)
from tdxdbg.hw.tdx.seamcall import HANDLERS, LEAVES, parse_leaf
from tdxdbg.scenario.model import Op

MAX_U64 = (1 << 64) - 1
SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
# Digits, underscores between digits (as in TOML and Python), no leading or trailing or doubled underscore.
# No leading zero in decimal (as TOML and Python): `010` is refused rather than guessed to be octal.
NUMBER = r"0[xX][0-9a-fA-F]+(?:_[0-9a-fA-F]+)*|(?:0|[1-9][0-9]*)(?:_[0-9]+)*"
_NUMBER_RE = re.compile(NUMBER)
_SIZE_RE = re.compile(rf"^({NUMBER})\s*([KMGkmg])?$")
# The most significant digits a 64-bit value has: more are refused before any conversion (Python refuses to
# convert decimal text longer than 4300 digits, and a huge number helps nobody).
U64_HEX_DIGITS = 16
U64_DEC_DIGITS = 20
MAX_SHOWN = 60          # characters of the user's text quoted back in a message
LEVEL_NAMES = {"4K": 0, "2M": 1, "1G": 2}
# `interrupt vcpuN [VECTOR]`: vectors 0-31 are exceptions (FIRST_EXTERNAL_VECTOR in arch/x86/include/asm/
# irq_vectors.h); the default is Linux's LOCAL_TIMER_VECTOR.
FIRST_EXTERNAL_VECTOR = 0x20
MAX_VECTOR = 0xFF
DEFAULT_INTERRUPT_VECTOR = 0xEC

GUEST_SYNTAX = {
    "read": "read GPA [expect VALUE]",
    "write": "write GPA VALUE",
    "fetch": "fetch GPA",
    "accept": "accept GPA [4K|2M]",
    "map_gpa": "map_gpa GPA SIZE private|shared",
    "mmio_read": "mmio_read GPA",
    "mmio_write": "mmio_write GPA VALUE",
}
HOST_SYNTAX = {
    "set_attributes": "set_attributes GPA SIZE private|shared",
    "punch_hole": "punch_hole GPA SIZE",
    "invalidate": "invalidate GPA SIZE",
    "delete_memslot": "delete_memslot ID",
    "dirty_log": "dirty_log ID on|off",
    "prefault": "prefault GPA SIZE",
    "init_mem_region": "init_mem_region GPA SIZE",
    "interrupt": "interrupt vcpuN [VECTOR]",
    "signal": "signal TASK",
    "finalize": "finalize",
    "destroy": "destroy",
    "seamcall": "seamcall LEAF [OPERANDS]",
}


class OpError(ValueError):
    pass


def int_text(n: int) -> str:
    """An integer for a message: decimal, or its size in bits when longer than 64 bits (Python refuses to
    print integers of more than 4300 decimal digits)."""
    return str(n) if abs(n).bit_length() <= 64 else f"{'-' if n < 0 else ''}an integer of {abs(n).bit_length()} bits"


def shown(value: object) -> str:
    """The user's value quoted back in a message, cut to MAX_SHOWN characters."""
    if isinstance(value, int) and not isinstance(value, bool):
        return int_text(value)
    try:
        text = repr(value)
    except ValueError:  # a container holding an integer too long to print
        return f"a {type(value).__name__}"
    if len(text) <= MAX_SHOWN:
        return text
    more = f" ({len(value)} characters)" if isinstance(value, str) else ""
    return f"{text[:MAX_SHOWN]}...{more}"


def parse_int(text: str, what: str = "an integer") -> int:
    """A non-negative integer written in decimal or 0x hex (underscores between digits allowed), at most 64
    bits of significant digits."""
    t = text.strip()
    if not _NUMBER_RE.fullmatch(t):
        raise OpError(f"expected {what}, found {shown(text)}")
    hexa = t[:2] in ("0x", "0X")
    digits = (t[2:] if hexa else t).replace("_", "").lstrip("0")
    if len(digits) > (U64_HEX_DIGITS if hexa else U64_DEC_DIGITS):
        raise OpError(f"expected {what} that fits in 64 bits, found {shown(text)}")
    return int(digits or "0", 16 if hexa else 10)


def parse_size(value: object) -> int:
    """An integer, or a number with K, M or G (binary): "4K", "2M", "0x200000". At most 2^64-1."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise OpError(f"expected a size (an integer or a string like \"4K\", \"2M\", \"1G\"), "
                      f"found {shown(value)}")
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE_RE.match(value.strip())
        if not m:
            raise OpError(f"expected a size (an integer or a number with K, M or G, like \"2M\"), "
                          f"found {shown(value)}")
        n = parse_int(m.group(1), "a size") * (SIZE_UNITS[m.group(2).upper()] if m.group(2) else 1)
    if n <= 0:
        raise OpError(f"expected a positive size, found {shown(value)}")
    if n > MAX_U64:
        raise OpError(f"expected a size below 2^64, found {shown(value)}")
    return n


def parse_u64(text: str, what: str) -> int:
    n = parse_int(text, what)
    if n > MAX_U64:
        raise OpError(f"expected {what} that fits in 64 bits, found {shown(text)}")
    return n


def _split(text: str, syntax: dict[str, str], side: str) -> tuple[str, list[str]]:
    if not isinstance(text, str):
        raise OpError(f"expected a string holding a {side} operation, found {shown(text)}")
    words = text.split()
    if not words:
        raise OpError(f"expected a {side} operation ({', '.join(syntax)}), found an empty string")
    name = words[0]
    if name not in syntax:
        raise OpError(f"unknown {side} operation {shown(name)}: expected one of {', '.join(syntax)}")
    return name, words[1:]


def _arity(name: str, args: list[str], lo: int, hi: int, syntax: dict[str, str]) -> None:
    if not lo <= len(args) <= hi:
        found = " ".join([name, *args])
        raise OpError(f"expected `{syntax[name]}`, found {shown(found)}")


def _direction(word: str, name: str) -> bool:
    if word not in ("private", "shared"):
        raise OpError(f"expected private or shared as the last word of {name}, found {shown(word)}")
    return word == "private"


def parse_guest_op(text: str) -> Op:
    name, args = _split(text, GUEST_SYNTAX, "guest")
    syn = GUEST_SYNTAX
    t = text.strip()
    if name == "read":
        if len(args) not in (1, 3):
            _arity(name, args, 99, 99, syn)
        gpa = parse_u64(args[0], "a GPA")
        value = None
        if len(args) == 3:
            if args[1] != "expect":
                raise OpError(f"expected `read GPA expect VALUE`, found {shown(args[1])} where `expect` goes")
            value = parse_u64(args[2], "a 64-bit VALUE")
        return Op("read", t, gpa=gpa, value=value)
    if name == "write":
        _arity(name, args, 2, 2, syn)
        return Op("write", t, gpa=parse_u64(args[0], "a GPA"), value=parse_u64(args[1], "a 64-bit VALUE"))
    if name == "fetch":
        _arity(name, args, 1, 1, syn)
        return Op("fetch", t, gpa=parse_u64(args[0], "a GPA"))
    if name == "mmio_read":
        _arity(name, args, 1, 1, syn)
        return Op(name, t, gpa=parse_u64(args[0], "a GPA"))
    if name == "mmio_write":
        _arity(name, args, 2, 2, syn)
        return Op(name, t, gpa=parse_u64(args[0], "a GPA"), value=parse_u64(args[1], "a 64-bit VALUE"))
    if name == "accept":
        _arity(name, args, 1, 2, syn)
        level = 0
        if len(args) == 2:
            if args[1].upper() not in ("4K", "2M"):
                raise OpError(f"expected 4K or 2M as the accept level, found {shown(args[1])}")
            level = LEVEL_NAMES[args[1].upper()]
        return Op("accept", t, gpa=parse_u64(args[0], "a GPA"), level=level, size=4096 << (9 * level))
    # map_gpa
    _arity(name, args, 3, 3, syn)
    return Op("map_gpa", t, gpa=parse_u64(args[0], "a GPA"), size=parse_size(args[1]),
              private=_direction(args[2], name))


def parse_level(text: str) -> int:
    """A TDX level: 0..7, or 4K / 2M / 1G."""
    if text.upper() in LEVEL_NAMES:
        return LEVEL_NAMES[text.upper()]
    n = parse_int(text, "a LEVEL (0-7, or 4K, 2M, 1G)")
    if n > 7:
        raise OpError(f"expected a LEVEL between 0 and 7 (TDX numbering, 0 = 4K), found {shown(text)}")
    return n


def parse_host_op(text: str) -> Op:
    name, args = _split(text, HOST_SYNTAX, "host")
    syn = HOST_SYNTAX
    t = text.strip()
    if name in ("set_attributes",):
        _arity(name, args, 3, 3, syn)
        return Op(name, t, gpa=parse_u64(args[0], "a GPA"), size=parse_size(args[1]),
                  private=_direction(args[2], name))
    if name in ("punch_hole", "invalidate", "prefault", "init_mem_region"):
        _arity(name, args, 2, 2, syn)
        return Op(name, t, gpa=parse_u64(args[0], "a GPA"), size=parse_size(args[1]))
    if name == "delete_memslot":
        _arity(name, args, 1, 1, syn)
        return Op(name, t, slot=parse_int(args[0], "a memslot ID"))
    if name == "dirty_log":
        _arity(name, args, 2, 2, syn)
        if args[1] not in ("on", "off"):
            raise OpError(f"expected on or off, found {shown(args[1])}")
        return Op(name, t, slot=parse_int(args[0], "a memslot ID"), on=args[1] == "on")
    if name == "interrupt":
        _arity(name, args, 1, 2, syn)
        if not re.fullmatch(r"vcpu\d{1,4}", args[0]):
            raise OpError(f"expected a vCPU task (vcpu0, vcpu1, ...), found {shown(args[0])}")
        vector = parse_int(args[1], "a VECTOR") if len(args) > 1 else DEFAULT_INTERRUPT_VECTOR
        if not FIRST_EXTERNAL_VECTOR <= vector <= MAX_VECTOR:
            raise OpError(f"expected a VECTOR from {FIRST_EXTERNAL_VECTOR:#x} to {MAX_VECTOR:#x} (below "
                          f"{FIRST_EXTERNAL_VECTOR:#x} are exceptions), found {shown(args[1])}")
        return Op(name, t, task=args[0], value=vector)
    if name == "signal":
        _arity(name, args, 1, 1, syn)
        if not re.fullmatch(r"(vcpu|host)\d{1,4}", args[0]):
            raise OpError(f"expected a task (vcpu0, host1, ...), found {shown(args[0])}")
        return Op(name, t, task=args[0])
    if name in ("finalize", "destroy"):
        _arity(name, args, 0, 0, syn)
        return Op(name, t)
    # seamcall LEAF [OPERANDS]: the operands the leaf's handler declares (tdxdbg/hw/tdx/seamcall.py LeafInfo)
    if not args:
        raise OpError(f"expected `{syn[name]}`, found {shown(t)}")
    try:
        leaf = parse_leaf(args[0])
    except ValueError:
        raise OpError(f"unknown SEAMCALL leaf {shown(args[0])}: expected a leaf the emulated TDX module implements, "
                      "like TDH.MEM.SEPT.ADD or TDH.MEM.PAGE.AUG") from None
    if leaf not in HANDLERS:
        raise OpError(f"{leaf.dotted} cannot be issued as a raw SEAMCALL: a vCPU's KVM_RUN enters the TD")
    info = LEAVES[leaf]
    words = info.user_words
    if len(args) - 1 > len(words):
        raise OpError(f"expected `{info.syntax}`, found {shown(t)}")
    values = tuple(parse_level(text) if word == "LEVEL" else parse_u64(text, f"a {word}")
                   for word, text in zip(words, args[1:], strict=False))
    return Op("seamcall", t, leaf=leaf.name, args=values)
