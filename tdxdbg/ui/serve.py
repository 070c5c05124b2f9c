"""`tdxdbg serve`: the debugger in a web browser, through textual-serve. Each browser tab that connects gets
its own debugger process (textual-serve starts `python -m tdxdbg.ui.serve --app ...` with Textual's web
driver); the server only relays its screen and the browser's keys and mouse."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def app_command(scenario: str, variant: str | None, schedule: str | None) -> str:
    """The shell command textual-serve runs per connection."""
    argv = [sys.executable, "-m", "tdxdbg.ui.serve", "--app", scenario]
    if variant:
        argv += ["--variant", variant]
    if schedule:
        argv += ["--schedule", schedule]
    return shlex.join(argv)


def serve(scenario: str, variant: str | None, schedule: str | None, host: str, port: int) -> None:
    """Serve the debugger on http://host:port until interrupted."""
    from textual_serve.server import Server

    # The app process may start in another directory: give it absolute paths for files that exist here.
    if Path(scenario).exists():
        scenario = str(Path(scenario).resolve())
    if variant and ":" in variant and Path(variant.rsplit(":", 1)[0]).exists():
        path, cls = variant.rsplit(":", 1)
        variant = f"{Path(path).resolve()}:{cls}"
    Server(app_command(scenario, variant, schedule), host=host, port=port, title="tdxdbg").serve()


def _app_main(argv: list[str]) -> int:
    """One served debugger (run by textual-serve with TEXTUAL_DRIVER set to the web driver)."""
    p = argparse.ArgumentParser(prog="tdxdbg.ui.serve")
    p.add_argument("--app", required=True)
    p.add_argument("--variant")
    p.add_argument("--schedule")
    ns = p.parse_args(argv)
    from tdxdbg.ui.app import TdxdbgApp

    app = TdxdbgApp(ns.app, ns.variant, ns.schedule)
    app.run()
    return int(app.return_code or 0)


if __name__ == "__main__":
    sys.exit(_app_main(sys.argv[1:]))
