"""The `tdxdbg` command."""

from __future__ import annotations

import sys

PLANNED = """\
tdxdbg {version}: a step-through debugger for how Linux KVM resolves page faults of Intel TDX guests.

What exists today: the step runtime (tdxdbg.runtime) and the emulated TDX machine (tdxdbg.hw): TD vCPUs,
host memory, and a TDX module that owns the Secure EPT and enforces its state machine with the real
SEAMCALL leaf numbers and status codes.

What this command will become: a terminal debugger (Textual) that opens a scenario and steps KVM's TDP MMU
through a TDX page fault frame by frame, plus headless `run`, `validate` and `scenarios` subcommands.
Neither exists yet, so this command only prints this message.
"""


def main(argv: list[str] | None = None) -> int:
    from tdxdbg import __version__

    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-V", "--version"):
        print(f"tdxdbg {__version__}")
        return 0
    print(PLANNED.format(version=__version__))
    return 0


if __name__ == "__main__":
    sys.exit(main())
