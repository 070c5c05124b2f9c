"""The `tdxdbg` command: the Textual debugger by default, plus headless `run`, `validate` and `scenarios`."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import stat
import sys
from typing import IO, Any

NEEDS_TERMINAL = ("tdxdbg: the debugger needs a terminal (standard input and output must be a TTY);\n"
                  "run a scenario headless with `tdxdbg run {scenario}`")


def _run_tui(scenario: str | None, variant: str | None, schedule: str | None, err: IO[str]) -> int:
    """The Textual debugger on `scenario` (the built-in demo when None). Scenario errors show in the app.

    The exit status is the app's return code: 1 when the app crashed (Textual sets it on an unhandled
    exception), 2 when the scenario could not be opened, 0 when the user quit."""
    from tdxdbg.ui.loading import DEMO

    spec = scenario or DEMO
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        print(NEEDS_TERMINAL.format(scenario=spec), file=err)
        return 2
    from tdxdbg.ui.app import TdxdbgApp

    app = TdxdbgApp(spec, variant, schedule)
    try:
        app.run()
    except Exception as e:  # a failure outside Textual's own handler (driver start-up, shutdown)
        print(f"tdxdbg: the debugger failed: {type(e).__name__}: {e}", file=err)
        return 1
    # None: the app ended without App.exit and without an exception (e.g. the terminal went away).
    return int(app.return_code or 0)


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad usage as exit status 2 through an exception, not sys.exit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{self.prog}: error: {message}")


class _UsageError(Exception):
    pass


SUBCOMMANDS = ("run", "validate", "scenarios", "tui", "serve")
USAGE = ("tdxdbg [SCENARIO] [--variant V] [--schedule S]   (the debugger; the built-in demo without SCENARIO)\n"
         "       tdxdbg serve [SCENARIO] [--host H] [--port P] (the debugger in a web browser)\n"
         "       tdxdbg {run,validate,scenarios,tui,serve} ...\n"
         "       tdxdbg --version")


def _add_tui_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", nargs="?", help="a scenario file, or the name of a shipped scenario")
    p.add_argument("--variant", help="override [td].variant (a name or path/to/file.py:ClassName, a path "
                                     "relative to the current directory)")
    p.add_argument("--schedule", help="round_robin | sequential | random | random:SEED")


def _parser() -> _Parser:
    from tdxdbg import __version__

    p = _Parser(prog="tdxdbg", usage=USAGE,
                description="Step-through debugger for KVM's handling of TDX guest page faults. Without a "
                            "command, `tdxdbg [SCENARIO] [--variant V] [--schedule S]` opens the debugger "
                            "(the same as `tdxdbg tui ...`).")
    p.add_argument("-V", "--version", action="version", version=f"tdxdbg {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    r = sub.add_parser("run", prog="tdxdbg run", help="run a scenario to the end and report")
    r.add_argument("scenario", help="a scenario file, or the name of a shipped scenario")
    r.add_argument("--variant", help="override [td].variant (a name or path/to/file.py:ClassName, a path "
                                     "relative to the current directory)")
    r.add_argument("--schedule", help="round_robin | sequential | random | random:SEED")
    r.add_argument("--json", metavar="PATH", help="write the JSON trace to PATH ('-' for standard output)")
    r.add_argument("--events", action="store_true",
                   help="add every frame's event to the JSON trace (freezes, cmpxchgs, SPTE writes, locks, ...)")
    r.add_argument("--max-frames", type=_frames, default=None, metavar="N", help="stop after N frames (exit 1)")
    v = sub.add_parser("validate", prog="tdxdbg validate", help="check scenario files without running them")
    v.add_argument("scenario", nargs="+")
    sub.add_parser("scenarios", prog="tdxdbg scenarios", help="list the shipped scenarios")
    t = sub.add_parser("tui", prog="tdxdbg tui",
                       help="open a scenario in the debugger (the built-in demo when none is given); "
                            "`tdxdbg tui` may be left out")
    _add_tui_options(t)
    sv = sub.add_parser("serve", prog="tdxdbg serve",
                        help="serve the debugger in a web browser (textual-serve; one debugger per browser tab)")
    _add_tui_options(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000)")
    return p


def _port(text: str) -> int:
    """--port: 1..65535."""
    try:
        n = int(text, 10) if len(text) <= 5 else -1
    except ValueError:
        n = -1
    if not 1 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port 1..65535, found {text[:20]!r}")
    return n


def _frames(text: str) -> int:
    """--max-frames: a positive integer (at most 64 bits of digits are read)."""
    from tdxdbg.scenario.ops import OpError, parse_u64

    try:
        n = parse_u64(text, "a positive integer")
    except OpError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {n}")
    return n


def _argv(args: list[str]) -> list[str]:
    """The bare form `tdxdbg [SCENARIO] [--variant V] [--schedule S]` is `tdxdbg tui ...`."""
    if args and (args[0] in SUBCOMMANDS or args[0] in ("-h", "--help", "-V", "--version")):
        return args
    return ["tui", *args]


class _OutputError(Exception):
    """Standard output could not be written (closed, full, a broken pipe)."""

    def __init__(self, reason: str, broken_pipe: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.broken_pipe = broken_pipe


class _Stream:
    """A text stream whose write failures are an _OutputError (`report`) or ignored (standard error: there is
    nowhere left to report them)."""

    def __init__(self, stream: IO[str] | None, report: bool) -> None:
        self._stream = stream
        self._report = report

    def _fail(self, e: BaseException | None) -> None:
        if self._report:
            reason = "it is closed" if e is None or isinstance(e, ValueError) else (
                getattr(e, "strerror", None) or str(e))
            raise _OutputError(reason, isinstance(e, BrokenPipeError)) from None

    def write(self, text: str) -> int:
        if self._stream is None:
            self._fail(None)
            return len(text)
        try:
            return self._stream.write(text)
        except (OSError, ValueError) as e:  # ValueError: I/O operation on a closed file
            self._fail(e)
            return len(text)

    def flush(self) -> None:
        if self._stream is None:
            return
        try:
            self._stream.flush()
        except (OSError, ValueError) as e:
            self._fail(e)

    def isatty(self) -> bool:
        try:
            return self._stream is not None and self._stream.isatty()
        except (OSError, ValueError):
            return False

    @property
    def encoding(self) -> str:
        return getattr(self._stream, "encoding", None) or "utf-8"


def _lenient(stream: IO[str] | None) -> None:
    """Characters the terminal's encoding cannot show (a unicode title under LANG=C or PYTHONIOENCODING=ascii)
    are written as backslash escapes instead of failing."""
    if isinstance(stream, io.TextIOWrapper):
        with contextlib.suppress(Exception):
            stream.reconfigure(errors="backslashreplace")


def _silence_stdout() -> None:
    """After standard output failed, point it at /dev/null so that the interpreter's final flush does not fail
    again (the recipe of the Python documentation for SIGPIPE)."""
    with contextlib.suppress(Exception):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def main(argv: list[str] | None = None, stdout: IO[str] | None = None, stderr: IO[str] | None = None) -> int:
    real = stdout is None
    if real:
        _lenient(sys.stdout)
        _lenient(sys.stderr)
    out = _Stream(sys.stdout if stdout is None else stdout, report=True)
    err = _Stream(sys.stderr if stderr is None else stderr, report=False)
    try:
        code = _main(sys.argv[1:] if argv is None else list(argv), out, err)  # type: ignore[arg-type]
        out.flush()
    except _OutputError as e:
        if real:
            _silence_stdout()
        if e.broken_pipe:  # the reader went away (`tdxdbg scenarios | head`): nothing to say, nobody to say it to
            return 1
        print(f"error: cannot write to standard output: {e.reason}", file=err)  # type: ignore[arg-type]
        return 2
    return code


def _main(argv: list[str], out: IO[str], err: IO[str]) -> int:
    args = _argv(argv)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            ns = _parser().parse_args(args)
    except _UsageError as e:
        print(str(e), file=err)
        return 2
    except SystemExit as e:  # --help, --version
        return int(e.code or 0)
    try:
        if ns.command == "run":
            return _run(ns, out, err)
        if ns.command == "validate":
            return _validate(ns.scenario, out, err)
        if ns.command == "scenarios":
            return _list(out)
        if ns.command == "tui":
            return _run_tui(ns.scenario, ns.variant, ns.schedule, err)
        if ns.command == "serve":
            return _serve(ns, out, err)
    except KeyboardInterrupt:
        print("tdxdbg: interrupted", file=err)
        return 130
    except _OutputError:
        raise
    except Exception as e:  # a bug of tdxdbg, not of the input: one line saying where, never a traceback
        tb = e.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = f" at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else ""
        print(f"tdxdbg: internal error: {type(e).__name__}: {e}{where} (a bug: please report it with the "
              "scenario)", file=err)
        return 1
    _parser().print_help(out)
    return 2


def _serve(ns: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    """`tdxdbg serve`: check the scenario here (bad input is exit 2 before anything listens), then serve."""
    from tdxdbg.scenario.loader import load
    from tdxdbg.scenario.model import ScenarioError
    from tdxdbg.ui.loading import DEMO
    from tdxdbg.ui.serve import serve

    spec = ns.scenario or DEMO
    try:
        load(spec, variant=ns.variant)
    except ScenarioError as e:
        _print_problems(e, err)
        return 2
    print(f"tdxdbg: serving {spec} on http://{ns.host}:{ns.port} (Ctrl+C stops)", file=out)
    out.flush()
    try:
        serve(spec, ns.variant, ns.schedule, ns.host, ns.port)
    except OSError as e:
        print(f"error: cannot listen on {ns.host}:{ns.port}: {e.strerror or e}", file=err)
        return 2
    return 0


def _print_problems(e: object, err: IO[str]) -> None:
    for p in getattr(e, "problems", []):
        print(f"error: {p}", file=err)


def _run(ns: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    from tdxdbg.scenario.loader import load
    from tdxdbg.scenario.model import Problem, ScenarioError
    from tdxdbg.scenario.run import ScheduleError, run_scenario, schedule_of
    from tdxdbg.scenario.summary import print_summary
    from tdxdbg.scenario.trace import dumps

    try:
        scenario = load(ns.scenario, variant=ns.variant)
    except ScenarioError as e:
        _print_problems(e, err)
        return 2
    try:
        schedule = schedule_of(scenario, ns.schedule)
    except ScheduleError as e:
        print(f"error: {e}", file=err)
        return 2
    if ns.events and not ns.json:
        print("error: --events: expected --json PATH too (the events go into the JSON trace)", file=err)
        return 2
    if ns.json and ns.json != "-" and (kind := _not_a_regular_file(ns.json)):
        print(f"error: {Problem(ns.json, '--json', _not_regular_message(kind))}", file=err)
        return 2
    kwargs: dict[str, Any] = {} if ns.max_frames is None else {"max_frames": ns.max_frames}
    report = run_scenario(scenario, schedule, events=ns.events, **kwargs)
    if ns.json == "-":
        out.write(dumps(report.json_obj()))
        print_summary(report, err)
    else:
        print_summary(report, out)
        if ns.json:
            try:
                _write_trace(ns.json, dumps(report.json_obj()))
            except _NotRegular as e:
                print(f"error: {Problem(ns.json, '--json', _not_regular_message(e.kind))}", file=err)
                return 2
            except OSError as e:
                print(f"error: {Problem(ns.json, '--json', f'cannot write the trace: {e.strerror or e}')}", file=err)
                return 2
    return 0 if report.ok else 1


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


class _NotRegular(Exception):
    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def _kind_of(mode: int) -> str:
    return next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")


def _not_a_regular_file(path: str) -> str:
    """What an existing `path` is when it is not a regular file ("" when it is one, or does not exist yet, or
    cannot be looked at: opening it will say why). A FIFO would block the write until a reader comes."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return ""
    return "" if stat.S_ISREG(mode) else _kind_of(mode)


def _not_regular_message(kind: str) -> str:
    return f"expected a regular file (or a new one) for the trace, found {kind}; use '-' for standard output"


def _write_trace(path: str, text: str) -> None:
    """Write the JSON trace to a regular file. O_NONBLOCK: should `path` have become a FIFO since the check
    before the run, the open fails (ENXIO without a reader) or returns at once instead of waiting; the file is
    truncated only once it is known to be a regular file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as e:
        kind = _not_a_regular_file(path)
        if kind:
            raise _NotRegular(kind) from e
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _NotRegular(_kind_of(mode))
        os.set_blocking(fd, True)
        os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    with open(fd, "w", encoding="utf-8") as fh:
        fh.write(text)


def _validate(specs: list[str], out: IO[str], err: IO[str]) -> int:
    from tdxdbg.scenario.loader import load
    from tdxdbg.scenario.model import ScenarioError

    status = 0
    for spec in specs:
        try:
            sc = load(spec)
        except ScenarioError as e:
            _print_problems(e, err)
            status = 2
            continue
        print(f"ok: {sc.path}: {sc.title}", file=out)
    return status


def _list(out: IO[str]) -> int:
    from tdxdbg.scenario.loader import load, shipped
    from tdxdbg.scenario.model import ScenarioError

    for path in shipped():
        try:
            title = load(path).title
        except ScenarioError as e:
            title = f"(invalid: {e.problems[0].message})"
        print(f"{path.stem:<34} {title}", file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
