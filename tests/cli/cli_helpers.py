"""Running a command in a pseudo-terminal (the debugger refuses to start without one), with a time bound."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import time

import attrs

_ESCAPE = re.compile(r"\x1b(\[[0-9;?<>=$]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[@-Z\\-_])")


@attrs.frozen
class PtyResult:
    code: int | None       # None: killed at the time bound
    output: str            # as the terminal received it, escape sequences included

    @property
    def text(self) -> str:
        """The output without terminal escape sequences."""
        return _ESCAPE.sub("", self.output)


def run_in_pty(argv: list[str], env: dict[str, str] | None = None, seconds: float = 60.0) -> PtyResult:
    """Run `argv` with a pty as stdin/stdout/stderr; read until it exits; kill it after `seconds`."""
    pid, fd = pty.fork()
    if pid == 0:  # the child
        try:
            if env is not None:
                os.environ.clear()
                os.environ.update(env)
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)
    out = bytearray()
    deadline = time.monotonic() + seconds
    killed = False
    while True:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            killed = True
            break
        ready, _, _ = select.select([fd], [], [], 0.2)
        if not ready:
            continue
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        out += data
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return PtyResult(None if killed else os.waitstatus_to_exitcode(status), out.decode("utf-8", "replace"))
