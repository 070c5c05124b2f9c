"""Reading a scenario file: TOML (tomllib), then every key checked, with every problem collected.

A problem names the file, the key path (`vcpu[1].program[2]`), the line (found by scanning the TOML text for
the key) and what was expected and found. `load` raises ScenarioError with all of them; nothing else escapes.
"""

from __future__ import annotations

import os
import re
import stat
import sys
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from tdxdbg.engine.checks import invariant_names
from tdxdbg.engine.kvm import RetPf
from tdxdbg.hw.tdx.leaves import Seamcall
from tdxdbg.hw.tdx.sept import SeptState
from tdxdbg.hw.tdx.status import parse_status
from tdxdbg.scenario.model import (
    Expect,
    Inject,
    MemslotSpec,
    Op,
    Problem,
    Scenario,
    ScenarioError,
    ScheduleModel,
    TdSpec,
)
from tdxdbg.scenario.ops import (
    LEVEL_NAMES,
    MAX_U64,
    OpError,
    int_text,
    parse_guest_op,
    parse_host_op,
    parse_int,
    parse_size,
    shown,
)

TOP_KEYS = ("title", "description", "td", "memslot", "attributes", "vcpu", "host", "schedule", "inject", "expect")
TD_KEYS = ("gpaw", "variant", "sept_ve_disable", "state")
MEMSLOT_KEYS = ("id", "gpa", "size", "guest_memfd", "readonly", "dirty_log")
SCHEDULE_KEYS = ("policy", "seed", "order", "livelock_frames")
INJECT_KEYS = ("seamcall", "occurrence", "status")
EXPECT_KINDS = ("sept", "spte", "read", "seamcalls", "fault", "violation", "no_violations", "vm_dead", "panic",
                "stuck", "stop")
# `[[expect]] stop = "..."`: how the run ends. "deadlock" is the run's "stuck" (tasks left, none can run).
STOP_KINDS = ("done", "livelock", "deadlock")
EXPECT_FIELDS = {
    "sept": (("gpa", "level", "state"), ()),
    "spte": (("root", "gfn", "level"), ("present", "value")),
    "read": (("task", "gpa", "value"), ()),
    "seamcalls": (("leaves",), ("statuses", "match")),
    "fault": (("task", "gpa"), ("ret", "retries", "private")),
}
RET_NAMES = tuple(RetPf.__members__)
KVM_LEVELS = {"4K": 1, "2M": 2, "1G": 3}
# Bounds on what a scenario file may ask for, so that any input is read and checked in bounded time and memory.
MAX_FILE_BYTES = 1 << 20          # a scenario file; the shipped ones are a few kilobytes
MAX_PROBLEMS = 200                # problems reported one by one; the rest are counted in one more line
MAX_KEY_CHARS = 60                # of a key name quoted in a key path
MAX_PATH_SHOWN = 200              # of a scenario path that cannot be read, quoted in the message
MAX_OP_CHARS = 200                # one program operation
MAX_STATUS_CHARS = 100            # a status name with its operand id
MAX_ORDER_TURNS = 1_000_000       # [schedule] order, repeat counts expanded
MAX_LIVELOCK_FRAMES = 1_000_000   # [schedule] livelock_frames (the default run is cut at 500,000 frames)
# KVM_USER_MEM_SLOTS on x86 (KVM_MEM_SLOTS_NUM - KVM_INTERNAL_MEM_SLOTS): kvm_set_memory_region() refuses a
# slot id at or above it with -EINVAL.
KVM_USER_MEM_SLOTS = 32764
# KVM_MAX_VCPUS on x86: KVM_CREATE_VCPU fails beyond it. Host tasks (VMM threads) get the same bound.
KVM_MAX_VCPUS = 4096
MAX_HOSTS = 4096


# -- where shipped scenarios live -----------------------------------------------------------------------------
def scenarios_dir() -> Path:
    return Path(str(resources.files("tdxdbg") / "scenarios"))


def shipped() -> list[Path]:
    return sorted(scenarios_dir().glob("*.toml"))


def resolve(spec: str) -> Path:
    """A path, or the name (file stem) of a shipped scenario."""
    p = Path(spec)
    try:
        if p.exists() or p.suffix == ".toml" or "/" in spec or "\\" in spec:
            return p
        candidate = scenarios_dir() / f"{spec}.toml"
        return candidate if candidate.exists() else p
    except (OSError, ValueError):  # a name too long for the file system: reading it says so
        return p


# -- describing values ---------------------------------------------------------------------------------------
def describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"the integer {value}" if abs(value) <= MAX_U64 else int_text(value)
    if isinstance(value, float):
        return f"the float {value}"
    if isinstance(value, str):
        return f"the string {shown(value)}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"a {type(value).__name__} ({shown(value)})"


def render_path(path: tuple[Any, ...]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            name = part if len(part) <= MAX_KEY_CHARS else f"{part[:MAX_KEY_CHARS]}..."
            out += ("." if out else "") + name
    return out


# -- finding lines -------------------------------------------------------------------------------------------
# A table header: `[name]`, `[[name]]`, `[ "quoted" . name ]`. Written so that no line makes it backtrack
# more than linearly (a long run of spaces inside a multi-line string is a line too).
_HEADER = re.compile(r"^\s*\[\[?\s*([A-Za-z0-9_.\-\"']+(?:[ ]+[A-Za-z0-9_.\-\"']+)*)\s*\]\]?\s*(#.*)?$")
MAX_HEADER_CHARS = 1000   # longer lines are not looked at as table headers


class LineFinder:
    """Finds the line of a key path by scanning the TOML text (tomllib does not keep positions)."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        # (line index, name, is_array) of every table header.
        self.headers: list[tuple[int, str, bool]] = []
        for i, line in enumerate(self.lines):
            m = _HEADER.match(line) if len(line) <= MAX_HEADER_CHARS else None
            if m and not line.lstrip().startswith("#"):
                self.headers.append((i, m.group(1).strip(), line.lstrip().startswith("[[")))

    def _section(self, name: str, index: int | None) -> tuple[int, int] | None:
        hits = [i for i, (_ln, n, arr) in enumerate(self.headers) if n == name and arr == (index is not None)]
        if index is not None:
            if index >= len(hits):
                return None
            h = hits[index]
        elif hits:
            h = hits[0]
        else:
            return None
        start = self.headers[h][0]
        end = self.headers[h + 1][0] if h + 1 < len(self.headers) else len(self.lines)
        return start, end

    def _key_line(self, key: str, lo: int, hi: int) -> int | None:
        pat = re.compile(r"(^|[\s{,])" + re.escape(key) + r"\s*=")
        for i in range(lo, hi):
            line = self.lines[i]
            if line.lstrip().startswith("#"):
                continue
            if pat.search(line.split("#", 1)[0] if '"' not in line else line):
                return i
        return None

    def find(self, path: tuple[Any, ...], element: Any = None, earlier: int = 0) -> int | None:
        """1-based line of `path`. `element` is the array element's value when the path ends in an index, and
        `earlier` how many earlier elements of that array are equal to it."""
        if not path:
            return None
        first = path[0]
        rest = list(path[1:])
        index = None
        if rest and isinstance(rest[0], int):
            index = rest.pop(0)
        first_header = self.headers[0][0] if self.headers else len(self.lines)
        section = self._section(first, index)
        if section is None and index is None:
            # A top-level key (`title = ...`) or a table written inline.
            ln = self._key_line(first, 0, first_header)
            if ln is None:
                return None
            lo, hi, best = ln, len(self.lines), ln
        elif section is None:
            return None
        else:
            lo, hi = section
            best = lo
        pending_index = None
        for part in rest:
            if isinstance(part, int):
                pending_index = part
                continue
            ln = self._key_line(part, best, hi)
            if ln is None:
                break
            best = lo = ln
        if (pending_index is not None or isinstance(path[-1], int)) and isinstance(element, str):
            lit = [f'"{element}"', f"'{element}'"]
            seen = 0
            for i in range(best, hi):
                n = sum(self.lines[i].count(x) for x in lit)
                if n and seen + n > earlier:
                    return i + 1
                seen += n
        return best + 1


# -- the checker -----------------------------------------------------------------------------------------------
class Checker:
    def __init__(self, file: str, text: str) -> None:
        self.file = file
        self.finder = LineFinder(text)
        self.problems: list[Problem] = []
        self.unlisted = 0  # problems past MAX_PROBLEMS, counted, not located

    def problem(self, path: tuple[Any, ...], message: str, element: Any = None, earlier: int = 0) -> None:
        if len(self.problems) >= MAX_PROBLEMS:
            self.unlisted += 1
            return
        try:
            line = self.finder.find(path, element, earlier)
        except Exception:  # the line is a help, never a reason to fail
            line = None
        self.problems.append(Problem(self.file, render_path(path), message, line))

    def keys(self, table: dict[str, Any], allowed: tuple[str, ...], path: tuple[Any, ...]) -> None:
        for k in table:
            if k not in allowed:
                self.problem((*path, k), f"unknown key {shown(k)}: expected one of {', '.join(allowed)}")

    def typed(self, table: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str,
              path: tuple[Any, ...], default: Any = None, required: bool = False) -> Any:
        if key not in table:
            if required:
                self.problem(path, f"missing key {key!r}: expected {what}")
            return default
        v = table[key]
        ok = isinstance(v, kind) and not (isinstance(v, bool) and kind in (int, (int, str)))
        if ok and isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_U64:
            ok = False  # no key takes more than 64 bits
        if not ok:
            self.problem((*path, key), f"expected {what}, found {describe(v)}")
            return default
        return v

    def number(self, value: Any, path: tuple[Any, ...], what: str = "an address") -> int | None:
        if isinstance(value, bool) or not isinstance(value, int | str):
            self.problem(path, f"expected {what} (an integer, or a string like \"0x1000\"), found {describe(value)}")
            return None
        if isinstance(value, str):
            try:
                value = parse_int(value, what)
            except OpError as e:
                self.problem(path, str(e))
                return None
        if value < 0 or value > MAX_U64:
            self.problem(path, f"expected {what} between 0 and 2^64-1, found {describe(value)}")
            return None
        return value

    def size(self, value: Any, path: tuple[Any, ...]) -> int | None:
        try:
            return parse_size(value)
        except OpError as e:
            self.problem(path, str(e))
            return None


def load(spec: str | Path, variant: str | None = None) -> Scenario:
    """Read and check a scenario (a path or a shipped name). Raises ScenarioError listing every problem."""
    path = resolve(str(spec))
    file = str(path)
    raw = _read_bounded(path, file)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ScenarioError([Problem(file, "", f"expected UTF-8 text, found a byte {raw[e.start]:#04x} that is "
                                               f"not UTF-8 at offset {e.start}")]) from None
    return loads(text, file, variant, base_dir=path.parent)


def _read_bounded(path: Path, file: str) -> bytes:
    """The bytes of a regular file of at most MAX_FILE_BYTES. Opened without blocking, so that a FIFO or a
    device (/dev/zero, /dev/urandom) is refused instead of read forever."""
    if len(file) > MAX_PATH_SHOWN:  # a path that cannot be read is not quoted whole
        file = f"{file[:MAX_PATH_SHOWN // 2]}...{file[-MAX_PATH_SHOWN // 2:]}"

    def fail(message: str) -> ScenarioError:
        return ScenarioError([Problem(file, "", message)])

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        names = ", ".join(p.stem for p in shipped())
        raise fail(f"no such file: expected a readable scenario file or a shipped scenario name ({names})") \
            from None
    except (OSError, ValueError) as e:
        raise fail(f"cannot read the file: {getattr(e, 'strerror', None) or e}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise fail(f"expected a regular file, found {_file_kind(mode)}")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_FILE_BYTES:
            chunk = os.read(fd, MAX_FILE_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        raw = b"".join(chunks)
    except OSError as e:
        raise fail(f"cannot read the file: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_FILE_BYTES:
        raise fail(f"expected a scenario file of at most {MAX_FILE_BYTES} bytes, found a larger file")
    return raw


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((what for test, what in kinds if test(mode)), "a special file")


def loads(text: str, file: str = "<string>", variant: str | None = None,
          base_dir: Path | None = None) -> Scenario:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = re.search(r"\(at line (\d+), column (\d+)\)", msg)
        line = int(m.group(1)) if m else None
        what = re.sub(r"\s*\(at line \d+, column \d+\)", "", msg)
        if m:
            what += f" at column {m.group(2)}"
        if not m and "end of document" in msg:
            line = len(text.splitlines()) or 1
        raise ScenarioError([Problem(file, "", f"TOML syntax error: {what}", line)]) from None
    except ValueError as e:  # int() refusing a decimal literal of more than sys.get_int_max_str_digits()
        if "integer string conversion" not in str(e):
            raise ScenarioError([Problem(file, "", f"TOML syntax error: {type(e).__name__}: {e}")]) from None
        m = re.search(rf"[0-9_]{{{sys.get_int_max_str_digits()},}}", text)
        line = text.count("\n", 0, m.start()) + 1 if m else None
        raise ScenarioError([Problem(file, "", "expected a number that fits in 64 bits, found a decimal integer "
                                               f"of more than {sys.get_int_max_str_digits()} digits", line)]) \
            from None
    except Exception as e:  # anything tomllib may raise on strange input (e.g. recursion limits)
        raise ScenarioError([Problem(file, "", f"TOML syntax error: {type(e).__name__}: {e}")]) from None
    c = Checker(file, text)
    try:
        scenario = _check(c, data, file, variant, base_dir)
    except RecursionError:
        c.problems.append(Problem(file, "", "the file nests too deeply"))
        scenario = None
    if c.unlisted:
        c.problems.append(Problem(file, "", f"{c.unlisted} more problems not listed"))
    if c.problems or scenario is None:
        raise ScenarioError(c.problems)
    return scenario


def _table_array(c: Checker, data: dict[str, Any], key: str) -> list[dict[str, Any]]:
    v = data.get(key, [])
    if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
        c.problem((key,), f"expected an array of tables ([[{key}]]), found {describe(v)}")
        return []
    return v


def _check(c: Checker, data: dict[str, Any], file: str, variant_override: str | None,
           base_dir: Path | None) -> Scenario | None:
    c.keys(data, TOP_KEYS, ())
    title = c.typed(data, "title", str, "a string", (), default="")
    description = c.typed(data, "description", str, "a string", (), default="")

    # [td]
    td = TdSpec()
    if "td" not in data:
        c.problem((), "missing table [td]: every scenario needs [td] (gpaw, variant, ...)")
    elif not isinstance(data["td"], dict):
        c.problem(("td",), f"expected a table ([td]), found {describe(data['td'])}")
    else:
        t = data["td"]
        c.keys(t, TD_KEYS, ("td",))
        gpaw = c.typed(t, "gpaw", int, "48 or 52", ("td",), default=48)
        if gpaw not in (48, 52):
            c.problem(("td", "gpaw"), f"expected 48 or 52, found {describe(gpaw)}")
            gpaw = 48
        variant = c.typed(t, "variant", str, "a variant name or path/to/file.py:ClassName", ("td",),
                          default="upstream")
        ve = c.typed(t, "sept_ve_disable", bool, "a boolean", ("td",), default=True)
        state = c.typed(t, "state", str, "\"runnable\" or \"initialized\"", ("td",), default="runnable")
        if state not in ("runnable", "initialized"):
            c.problem(("td", "state"), f"expected \"runnable\" or \"initialized\", found {describe(state)}")
            state = "runnable"
        td = TdSpec(gpaw, variant, ve, state)
    if variant_override is not None:
        td = TdSpec(td.gpaw, cli_variant(variant_override), td.sept_ve_disable, td.state)
    _check_variant(c, td.variant, base_dir, from_cli=variant_override is not None)
    shared_bit = td.shared_bit

    # [[memslot]]
    slots: list[MemslotSpec] = []
    tables = _table_array(c, data, "memslot")
    if "memslot" not in data:
        c.problem((), "missing [[memslot]]: every scenario needs at least one memslot")
    elif data["memslot"] == []:
        c.problem(("memslot",), "expected at least one [[memslot]], found an empty array")
    for i, t in enumerate(tables):
        p = ("memslot", i)
        c.keys(t, MEMSLOT_KEYS, p)
        sid = c.typed(t, "id", int, "an integer memslot id", p, default=i)
        if not 0 <= sid < KVM_USER_MEM_SLOTS:
            c.problem((*p, "id"), f"expected a memslot id from 0 to {KVM_USER_MEM_SLOTS - 1}, found {int_text(sid)}")
            continue
        gpa = c.number(t["gpa"], (*p, "gpa"), "a GPA") if "gpa" in t else None
        if "gpa" not in t:
            c.problem(p, "missing key 'gpa': expected the memslot's first GPA")
        size = c.size(t["size"], (*p, "size")) if "size" in t else None
        if "size" not in t:
            c.problem(p, "missing key 'size': expected the memslot's size (e.g. \"64M\")")
        flags = [c.typed(t, k, bool, "a boolean", p, default=False) for k in ("guest_memfd", "readonly", "dirty_log")]
        if gpa is None or size is None:
            continue
        if gpa % 4096 or size % 4096:
            c.problem((*p, "gpa" if gpa % 4096 else "size"),
                      f"misaligned memslot: expected gpa and size multiples of 4K, found gpa {gpa:#x} size {size:#x}")
            continue
        if gpa & shared_bit or gpa + size > shared_bit:
            c.problem((*p, "gpa"), f"expected a memslot below the shared bit ({shared_bit:#x}), found "
                                   f"[{gpa:#x}, {gpa + size:#x})")
            continue
        if any(s.id == sid for s in slots):
            c.problem((*p, "id"), f"expected a unique memslot id, found {sid} again")
            continue
        if flags[0] and flags[2]:
            # check_memory_region_flags: "Dirty logging private memory is not currently supported."
            c.problem((*p, "dirty_log"), "expected dirty_log = false on a guest_memfd memslot: KVM refuses "
                                         "KVM_MEM_LOG_DIRTY_PAGES with KVM_MEM_GUEST_MEMFD (-EINVAL)")
        other = next((s for s in slots if s.gpa < gpa + size and gpa < s.gpa + s.size), None)
        if other is not None:
            c.problem(p, f"expected memslots that do not overlap, found [{gpa:#x}, {gpa + size:#x}) overlapping "
                         f"memslot {other.id}")
            continue
        slots.append(MemslotSpec(sid, gpa, size, *flags))

    def inside(gpa: int, size: int) -> bool:
        """Every byte of [gpa, gpa + size) lies in some memslot (adjacent memslots may share a range)."""
        pos, end = gpa, gpa + size
        for s in sorted(slots, key=lambda s: s.gpa):
            if s.gpa <= pos < s.gpa + s.size:
                pos = s.gpa + s.size
            if pos >= end:
                return True
        return False

    def where(gpa: int, size: int) -> str:
        listed = ", ".join(f"{s.id}: [{s.gpa:#x}, {s.gpa + s.size:#x})" for s in slots) or "none"
        return f"address outside every memslot: expected a range inside a memslot ({listed}), " \
               f"found [{gpa:#x}, {gpa + size:#x})"

    # [attributes]
    private: list[tuple[int, int]] = []
    if "attributes" in data:
        a = data["attributes"]
        if not isinstance(a, dict):
            c.problem(("attributes",), f"expected a table ([attributes]), found {describe(a)}")
        else:
            c.keys(a, ("private",), ("attributes",))
            ranges = a.get("private", [])
            if not isinstance(ranges, list):
                c.problem(("attributes", "private"),
                          f"expected an array of [gpa, size] pairs, found {describe(ranges)}")
                ranges = []
            for i, r in enumerate(ranges):
                p = ("attributes", "private", i)
                if not isinstance(r, list) or len(r) != 2:
                    c.problem(p, f"expected a [gpa, size] pair, found {describe(r)}")
                    continue
                gpa, size = c.number(r[0], p, "a GPA"), c.size(r[1], p)
                if gpa is None or size is None:
                    continue
                if gpa % 4096 or size % 4096:
                    c.problem(p, f"misaligned GPA: expected a 4K-aligned range, found [{gpa:#x}, {gpa + size:#x})")
                elif not inside(gpa, size) and slots:
                    c.problem(p, where(gpa, size))
                else:
                    private.append((gpa, size))

    # [[vcpu]] and [[host]]
    vcpus: list[tuple[Op, ...]] = []
    vcpu_tables, host_tables = _table_array(c, data, "vcpu"), _table_array(c, data, "host")
    if len(vcpu_tables) > KVM_MAX_VCPUS:
        c.problem(("vcpu", KVM_MAX_VCPUS), f"expected at most {KVM_MAX_VCPUS} [[vcpu]] (KVM_MAX_VCPUS), found "
                                           f"{len(vcpu_tables)}")
        vcpu_tables = []
    if len(host_tables) > MAX_HOSTS:
        c.problem(("host", MAX_HOSTS), f"expected at most {MAX_HOSTS} [[host]], found {len(host_tables)}")
        host_tables = []
    for i, t in enumerate(vcpu_tables):
        vcpus.append(tuple(_programs(c, t, ("vcpu", i), True, td, slots, inside, where)))
    hosts: list[tuple[Op, ...]] = []
    for i, t in enumerate(host_tables):
        hosts.append(tuple(_programs(c, t, ("host", i), False, td, slots, inside, where)))
        if not vcpus and any(op.kind in ("prefault", "init_mem_region") for op in hosts[-1]):
            c.problem(("host", i, "program"), "expected at least one [[vcpu]]: prefault and init_mem_region "
                                              "run on vcpu0, found no [[vcpu]]")
    tasks = [f"vcpu{i}" for i in range(len(vcpus))] + [f"host{i}" for i in range(len(hosts))]
    for i, t in enumerate(host_tables):
        _check_targets(c, t, i, hosts[i], tasks)

    schedule = _schedule(c, data, tasks)
    inject = _inject(c, data)
    expect = _expect(c, data, tasks, len(vcpus))
    if c.problems:
        return None
    return Scenario(file, Path(file).stem, title, description, td, tuple(slots),
                    tuple(sorted(private)), tuple(vcpus), tuple(hosts), schedule, tuple(inject), tuple(expect))


def cli_variant(spec: str) -> str:
    """A `--variant path/to/file.py:Class` typed on the command line names a file relative to the current
    directory (one written in the scenario file is relative to the scenario file): made absolute here."""
    path_text, sep, cls_name = spec.rpartition(":")
    if not sep or not path_text.endswith(".py") or Path(path_text).is_absolute():
        return spec
    return f"{Path.cwd() / path_text}:{cls_name}"


def _check_variant(c: Checker, variant: str, base_dir: Path | None, from_cli: bool) -> None:
    from tdxdbg.engine.vm import VariantError, load_variant
    path = ("--variant",) if from_cli else ("td", "variant")
    try:
        load_variant(variant, base_dir)
    except VariantError as e:
        c.problem(path, str(e))
    except ImportError as e:
        c.problem(path, f"variant {shown(variant)} is not available in this build: {e}")
    except Exception as e:  # never a traceback
        c.problem(path, f"cannot load variant {shown(variant)}: {type(e).__name__}: {e}")


def _check_targets(c: Checker, t: dict[str, Any], i: int, ops: tuple[Op, ...], tasks: list[str]) -> None:
    """`interrupt vcpuN` names a vCPU of the scenario; `signal TASK` another task of it."""
    prog = t.get("program", [])
    texts = [x.strip() if isinstance(x, str) else None for x in prog] if isinstance(prog, list) else []
    me = f"host{i}"
    for op in ops:
        if op.kind not in ("interrupt", "signal"):
            continue
        allowed = [x for x in tasks if x.startswith("vcpu")] if op.kind == "interrupt" else \
            [x for x in tasks if x != me]
        if op.task in allowed:
            continue
        j = texts.index(op.text)
        c.problem(("host", i, "program", j), f"unknown task {op.task!r}: expected one of "
                  f"{', '.join(allowed) or '(none)'}", prog[j], 0)


def _programs(c: Checker, t: dict[str, Any], p: tuple[Any, ...], guest: bool, td: TdSpec,
              slots: list[MemslotSpec], inside: Any, where: Any) -> list[Op]:
    c.keys(t, ("program",), p)
    prog = t.get("program", [])
    if not isinstance(prog, list):
        c.problem((*p, "program"), f"expected an array of operation strings, found {describe(prog)}")
        return []
    ops: list[Op] = []
    shared_bit = td.shared_bit
    for j, text in enumerate(prog):
        q = (*p, "program", j)

        def bad(msg: str, q: tuple[Any, ...] = q, text: Any = text, j: int = j) -> None:
            c.problem(q, msg, text, sum(1 for x in prog[:j] if x == text))

        if not isinstance(text, str):
            bad(f"expected a string holding an operation, found {describe(text)}")
            continue
        if len(text) > MAX_OP_CHARS:
            bad(f"expected an operation of at most {MAX_OP_CHARS} characters, found {shown(text)}")
            continue
        try:
            op = parse_guest_op(text) if guest else parse_host_op(text)
        except OpError as e:
            bad(str(e))
            continue
        if op.kind == "seamcall":
            ops.append(op)  # raw operands reach the TDX module as written
            continue
        if op.kind in ("mmio_read", "mmio_write"):
            gpa = op.gpa & ~shared_bit
            if op.gpa % 8:
                bad(f"misaligned GPA: expected an 8-byte-aligned GPA, found {op.gpa:#x}")
                continue
            if op.gpa >= 1 << td.gpaw or not op.gpa & shared_bit:
                bad(f"expected a shared GPA (with the shared bit {shared_bit:#x}, below 2^{td.gpaw}) for MMIO, "
                    f"found {op.gpa:#x}")
                continue
            if any(s.gpa < gpa + 8 and gpa < s.gpa + s.size for s in slots):
                bad(f"expected a GPA outside every memslot for MMIO (KVM only emulates MMIO where no memslot is), "
                    f"found {op.gpa:#x}")
                continue
        elif op.kind in ("read", "write", "fetch"):
            if op.gpa % 8:
                bad(f"misaligned GPA: expected an 8-byte-aligned GPA, found {op.gpa:#x}")
                continue
            gpa = op.gpa & ~shared_bit
            if op.gpa >= 1 << td.gpaw:
                bad(f"expected a GPA below 2^{td.gpaw} (GPAW {td.gpaw}), found {op.gpa:#x}")
                continue
            if not inside(gpa, 8):
                bad(where(gpa, 8))
                continue
        elif op.kind in ("accept", "map_gpa", "set_attributes", "punch_hole", "invalidate", "prefault",
                         "init_mem_region"):
            align = op.size if op.kind == "accept" else 4096
            if op.gpa % align or op.size % 4096:
                bad(f"misaligned GPA: expected a {'2M' if align == 2 << 20 else '4K'}-aligned GPA and size, "
                    f"found {op.gpa:#x} size {op.size:#x}")
                continue
            if op.kind == "map_gpa":
                # The TDVMCALL gets the shared bit when converting to shared, not when converting to private.
                op = Op(op.kind, op.text, gpa=(op.gpa & ~shared_bit) if op.private else (op.gpa | shared_bit),
                        size=op.size, private=op.private)
                gpa = op.gpa & ~shared_bit
            elif op.kind in ("accept",):
                gpa = op.gpa
                if op.gpa & shared_bit:
                    bad(f"expected a private GPA (without the shared bit {shared_bit:#x}) to accept, "
                        f"found {op.gpa:#x}")
                    continue
            else:
                gpa = op.gpa
                if gpa & shared_bit:
                    bad(f"expected a GPA without the shared bit ({shared_bit:#x}), found {gpa:#x}")
                    continue
            if not inside(gpa, op.size):
                bad(where(gpa, op.size))
                continue
        elif op.kind in ("delete_memslot", "dirty_log") and not any(s.id == op.slot for s in slots):
            bad(f"expected the id of a [[memslot]] ({', '.join(str(s.id) for s in slots) or 'none'}), "
                f"found {op.slot}")
            continue
        ops.append(op)
    return ops


def _schedule(c: Checker, data: dict[str, Any], tasks: list[str]) -> ScheduleModel:
    if "schedule" not in data:
        return ScheduleModel()
    s = data["schedule"]
    p = ("schedule",)
    if not isinstance(s, dict):
        c.problem(p, f"expected a table ([schedule]), found {describe(s)}")
        return ScheduleModel()
    c.keys(s, SCHEDULE_KEYS, p)
    policy = c.typed(s, "policy", str, "\"round_robin\", \"sequential\" or \"random\"", p, default="round_robin")
    if policy not in ("round_robin", "sequential", "random"):
        c.problem((*p, "policy"), f"expected \"round_robin\", \"sequential\" or \"random\", found {describe(policy)}")
        policy = "round_robin"
    seed = c.typed(s, "seed", int, "an integer seed", p, default=0)
    if not 0 <= seed <= MAX_U64:
        c.problem((*p, "seed"), f"expected a seed between 0 and 2^64-1, found {int_text(seed)}")
        seed = 0
    order = c.typed(s, "order", list, "an array of task names", p, default=[])
    names: list[str] = []
    for i, name in enumerate(order):
        earlier = sum(1 for x in order[:i] if x == name)
        if not isinstance(name, str):
            c.problem((*p, "order", i), f"expected a task name, found {describe(name)}", name, earlier)
            continue
        m = re.fullmatch(r"(.+?)\*([0-9]+)", name)
        task, count_text = (m.group(1), m.group(2)) if m else (name, "1")
        # Counted before any conversion: a repeat count longer than the bound's digits is over the bound.
        count = int(count_text) if len(count_text.lstrip("0")) <= len(str(MAX_ORDER_TURNS)) else MAX_ORDER_TURNS + 1
        if task not in tasks:
            c.problem((*p, "order", i), f"unknown task {shown(task)}: expected one of "
                                        f"{', '.join(tasks) or '(no tasks)'}", name, earlier)
        elif len(names) + count > MAX_ORDER_TURNS:
            c.problem((*p, "order", i), f"expected an order of at most {MAX_ORDER_TURNS} turns in all (repeat "
                                        f"counts included), found more by {shown(name)}", name, earlier)
            break
        else:
            names.extend([task] * count)
    livelock = c.typed(s, "livelock_frames", int, "a number of frames (0 turns livelock detection off)", p)
    if livelock is not None and not 0 <= livelock <= MAX_LIVELOCK_FRAMES:
        c.problem((*p, "livelock_frames"), f"expected a number of frames from 0 (off) to {MAX_LIVELOCK_FRAMES}, "
                                           f"found {int_text(livelock)}")
        livelock = None
    return ScheduleModel(policy, seed, tuple(names), livelock)


def _leaf(c: Checker, value: Any, path: tuple[Any, ...]) -> str | None:
    if not isinstance(value, str):
        c.problem(path, f"expected a SEAMCALL leaf name like \"TDH.MEM.PAGE.AUG\", found {describe(value)}")
        return None
    try:
        return Seamcall.parse(value).name
    except ValueError:
        c.problem(path, f"unknown SEAMCALL leaf {shown(value)}: expected a leaf like TDH.MEM.PAGE.AUG")
        return None


def _status(c: Checker, value: Any, path: tuple[Any, ...]) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | str):
        c.problem(path, f"expected a TDX status name like \"TDX_OPERAND_BUSY\" or an integer, found {describe(value)}")
        return None
    if isinstance(value, int):
        if not 0 <= value <= MAX_U64:
            c.problem(path, f"expected a 64-bit status, found {describe(value)}")
            return None
        return value
    if len(value) > MAX_STATUS_CHARS:
        c.problem(path, f"expected a status name like TDX_OPERAND_BUSY (optionally |OPERAND) or an integer, "
                        f"found {shown(value)}")
        return None
    try:
        n = parse_status(value)
    except ValueError as e:
        c.problem(path, f"{e}: expected a status name like TDX_OPERAND_BUSY (optionally |OPERAND) or an integer")
        return None
    if not 0 <= n <= MAX_U64:
        c.problem(path, f"expected a 64-bit status, found {shown(value)}")
        return None
    return n


def _inject(c: Checker, data: dict[str, Any]) -> list[Inject]:
    out: list[Inject] = []
    for i, t in enumerate(_table_array(c, data, "inject")):
        p = ("inject", i)
        c.keys(t, INJECT_KEYS, p)
        for k in INJECT_KEYS:
            if k not in t:
                c.problem(p, f"missing key {k!r}: expected seamcall, occurrence and status")
        leaf = _leaf(c, t["seamcall"], (*p, "seamcall")) if "seamcall" in t else None
        occ = c.typed(t, "occurrence", int, "a positive integer (1 = the first call)", p)
        if occ is not None and occ < 1:
            c.problem((*p, "occurrence"), f"expected a positive integer (1 = the first call), found {occ}")
            occ = None
        status = _status(c, t["status"], (*p, "status")) if "status" in t else None
        if leaf is not None and occ is not None and status is not None:
            out.append(Inject(leaf, occ, status))
    return out


def _level(c: Checker, value: Any, path: tuple[Any, ...], names: dict[str, int], lo: int, hi: int,
           numbering: str) -> int | None:
    if isinstance(value, str) and value.upper() in names:
        return names[value.upper()]
    if isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi:
        return value
    c.problem(path, f"expected a level (\"4K\", \"2M\", \"1G\" or {lo}-{hi} in {numbering}), found {describe(value)}")
    return None


def _expect(c: Checker, data: dict[str, Any], tasks: list[str], nvcpus: int) -> list[Expect]:
    out: list[Expect] = []
    vcpu_tasks = [f"vcpu{i}" for i in range(nvcpus)]
    for i, t in enumerate(_table_array(c, data, "expect")):
        p = ("expect", i)
        c.keys(t, EXPECT_KINDS, p)
        if not t:
            c.problem(p, f"expected one of {', '.join(EXPECT_KINDS)}, found an empty table")
        for kind, v in t.items():
            if kind not in EXPECT_KINDS:
                continue
            e = _one_expect(c, kind, v, (*p, kind), tasks, vcpu_tasks)
            if e is not None:
                out.append(e)
    return out


def _task(c: Checker, value: Any, path: tuple[Any, ...], allowed: list[str]) -> str | None:
    if not isinstance(value, str) or value not in allowed:
        c.problem(path, f"unknown task: expected one of {', '.join(allowed) or '(none)'}, found {describe(value)}")
        return None
    return value


def _one_expect(c: Checker, kind: str, v: Any, p: tuple[Any, ...], tasks: list[str],
                vcpu_tasks: list[str]) -> Expect | None:
    if kind in ("no_violations", "vm_dead", "stuck"):
        if not isinstance(v, bool):
            c.problem(p, f"expected a boolean, found {describe(v)}")
            return None
        if kind == "no_violations" and not v:
            c.problem(p, "expected true (write `no_violations = true`), found false")
            return None
        return Expect(kind, f"{kind} = {str(v).lower()}", (("value", v),))
    if kind == "violation":
        names = invariant_names()
        if not isinstance(v, str) or v not in names:
            c.problem(p, f"unknown invariant: expected one of {', '.join(names)}, found {describe(v)}")
            return None
        return Expect(kind, f"violation {v}", (("name", v),))
    if kind == "stop":
        if not isinstance(v, str) or v not in STOP_KINDS:
            c.problem(p, f"expected how the run ends ({', '.join(repr(k) for k in STOP_KINDS)}), found {describe(v)}")
            return None
        return Expect(kind, f"the run ends in {v}" if v != "done" else "the run ends with every task done",
                      (("value", v),))
    if kind == "panic":
        task = _task(c, v, p, vcpu_tasks)
        return None if task is None else Expect(kind, f"guest panic on {task}", (("task", task),))
    if not isinstance(v, dict):
        c.problem(p, f"expected an inline table like {{ {', '.join(EXPECT_FIELDS[kind][0])} = ... }}, "
                     f"found {describe(v)}")
        return None
    required, optional = EXPECT_FIELDS[kind]
    c.keys(v, required + optional, p)
    missing = [k for k in required if k not in v]
    for k in missing:
        c.problem(p, f"missing key {k!r}: expected {', '.join(required)}")
    if missing:
        return None
    n = len(c.problems)
    f: dict[str, Any] = {}
    if kind == "sept":
        f["gpa"] = c.number(v["gpa"], (*p, "gpa"), "a GPA")
        f["level"] = _level(c, v["level"], (*p, "level"), LEVEL_NAMES, 0, 4, "TDX numbering, 0 = 4K")
        st = v["state"]
        if not isinstance(st, str) or st.upper() not in SeptState.__members__:
            c.problem((*p, "state"), f"expected an S-EPT state ({', '.join(SeptState.__members__)}), "
                                     f"found {describe(st)}")
        else:
            f["state"] = st.upper()
        if len(c.problems) == n:
            text = f"S-EPT {f['gpa']:#x} level {f['level']} is {f['state']}"
    elif kind == "spte":
        root = v["root"]
        if root not in ("mirror", "direct"):
            c.problem((*p, "root"), f"expected \"mirror\" or \"direct\", found {describe(root)}")
        f["root"] = root
        f["gfn"] = c.number(v["gfn"], (*p, "gfn"), "a gfn")
        f["level"] = _level(c, v["level"], (*p, "level"), KVM_LEVELS, 1, 5, "KVM numbering, 1 = 4K")
        f["present"] = c.typed(v, "present", bool, "a boolean", p, default=True)
        if "value" in v:
            f["value"] = c.number(v["value"], (*p, "value"), "an SPTE value")
        if len(c.problems) == n:
            what = "present" if f["present"] else "not present"
            if f.get("value") is not None:
                what += f" = {f['value']:#x}"
            text = f"{root} SPTE gfn {f['gfn']:#x} level {f['level']} {what}"
    elif kind == "read":
        f["task"] = _task(c, v["task"], (*p, "task"), vcpu_tasks)
        f["gpa"] = c.number(v["gpa"], (*p, "gpa"), "a GPA")
        f["value"] = c.number(v["value"], (*p, "value"), "a 64-bit value")
        if len(c.problems) == n:
            text = f"{f['task']} reads {f['value']:#x} at {f['gpa']:#x}"
    elif kind == "seamcalls":
        leaves = v["leaves"]
        if not isinstance(leaves, list):
            c.problem((*p, "leaves"), f"expected an array of leaf names, found {describe(leaves)}")
            leaves = []
        f["leaves"] = tuple(_leaf(c, x, (*p, "leaves", j)) for j, x in enumerate(leaves))
        if "statuses" in v:
            sts = v["statuses"]
            if not isinstance(sts, list) or len(sts) != len(leaves):
                c.problem((*p, "statuses"), f"expected an array of {len(leaves)} statuses (one per leaf), "
                                            f"found {describe(sts)}")
            else:
                f["statuses"] = tuple(_status(c, x, (*p, "statuses", j)) for j, x in enumerate(sts))
        match = v.get("match", "subsequence")
        if match not in ("exact", "subsequence"):
            c.problem((*p, "match"), f"expected \"exact\" or \"subsequence\", found {describe(match)}")
        f["match"] = match
        if len(c.problems) == n:
            names = [Seamcall[x].dotted for x in f["leaves"]]
            if "statuses" in f:
                from tdxdbg.hw.tdx.status import describe as sdesc
                names = [f"{a}={sdesc(b)}" for a, b in zip(names, f["statuses"], strict=True)]
            text = f"SEAMCALLs ({match}): {', '.join(names)}"
    elif kind == "fault":
        f["task"] = _task(c, v["task"], (*p, "task"), vcpu_tasks)
        f["gpa"] = c.number(v["gpa"], (*p, "gpa"), "a GPA")
        if "ret" in v:
            ret = v["ret"]
            if isinstance(ret, bool) or not (isinstance(ret, int) or (isinstance(ret, str) and (
                    ret in RET_NAMES or re.fullmatch(r"-E[A-Z]{1,20}|-?\d{1,20}", ret)))):
                c.problem((*p, "ret"), f"expected a RET_PF_* name ({', '.join(RET_NAMES)}) or an errno like "
                                       f"\"-EFAULT\", found {describe(ret)}")
            elif isinstance(ret, int) and abs(ret) > MAX_U64:
                c.problem((*p, "ret"), f"expected a RET_PF_* name or an errno like \"-EFAULT\", found "
                                       f"{describe(ret)}")
            else:
                f["ret"] = str(ret) if isinstance(ret, int) else ret
        if "retries" in v:
            f["retries"] = c.typed(v, "retries", int, "an integer", p)
        if "private" in v:
            f["private"] = c.typed(v, "private", bool, "a boolean", p)
        if len(c.problems) == n:
            text = f"{f['task']} fault at {f['gpa']:#x}"
            if "ret" in f:
                text += f" ends {f['ret']}"
            if f.get("retries") is not None:
                text += f" after {f['retries']} retries"
    if len(c.problems) != n:
        return None
    return Expect(kind, text, tuple(sorted(f.items())))
