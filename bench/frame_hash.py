"""A hash of every frame of every shipped scenario under three schedules, to show a speed change kept frames
identical: run it before and after, the lines must not change.

Each frame contributes its task, step kind, payload, stack (function, file, line), effects, reads and
violations. Locals are left out (they are being removed from recording). Prints
  frames-hash: HEX              every field above
  frames-hash-no-lines: HEX     the same with stacks reduced to function names (an edit that only moves source
                                lines changes the first hash but not this one)
and, with --each, one `frames-hash-<scenario>: HEX` line per scenario; `--dump DIR` writes every frame as text
to DIR/<scenario>.txt (to diff two trees).
"""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tdxdbg.runtime.scheduler import ScheduleSpec
from tdxdbg.scenario.builder import build_setup
from tdxdbg.scenario.loader import load, shipped
from tdxdbg.scenario.run import schedule_of
from tdxdbg.session.session import Session

SCHEDULES = ("round_robin", "sequential", "random:7")
_TB_FILE = re.compile(r'File "[^"]*", line \d+')


def _kind(kind: object) -> str:
    return f"{type(kind).__name__}.{getattr(kind, 'name', kind)}"


def _payload(payload: object) -> object:
    """The payload as hashed: a TASK_ERROR's traceback without file paths and line numbers (they name the
    checkout and move with any edit of the runtime; the function names and the error stay)."""
    if isinstance(payload, dict) and "traceback" in payload:
        return {**payload, "traceback": _TB_FILE.sub("File", payload["traceback"])}
    return payload


def frames_of(path: Path, schedule: str) -> list:
    scenario = load(path)
    spec: ScheduleSpec = schedule_of(scenario, schedule)
    session = Session.open(build_setup(scenario, path.parent), spec)
    session.run_to_end(500_000)
    return list(session.frames)


def hash_scenario(path: Path) -> tuple[str, str]:
    full = hashlib.sha256()
    short = hashlib.sha256()
    for schedule in SCHEDULES:
        for f in frames_of(path, schedule):
            common = repr((f.index, f.task, _kind(f.step.kind), _payload(f.step.payload), f.effects, f.reads,
                           f.violations)).encode()
            full.update(common)
            full.update(repr(tuple((e.function, Path(e.filename).name, e.line) for e in f.stack)).encode())
            short.update(common)
            short.update(repr(tuple(e.function for e in f.stack)).encode())
    return full.hexdigest(), short.hexdigest()


def main() -> None:
    full = hashlib.sha256()
    short = hashlib.sha256()
    for path in shipped():
        a, b = hash_scenario(path)
        full.update(a.encode())
        short.update(b.encode())
        if "--dump" in sys.argv:
            out = Path(sys.argv[sys.argv.index("--dump") + 1])
            out.mkdir(parents=True, exist_ok=True)
            with open(out / f"{path.stem}.txt", "w") as fh:
                for schedule in SCHEDULES:
                    for f in frames_of(path, schedule):
                        print(schedule, f.index, f.task, _kind(f.step.kind), _payload(f.step.payload), f.effects,
                              f.reads, f.violations, tuple(e.function for e in f.stack), file=fh)
        if "--each" in sys.argv:
            print(f"frames-hash-{path.stem}: {a[:16]} {b[:16]}")
    print(f"frames-hash: {full.hexdigest()[:32]}")
    print(f"frames-hash-no-lines: {short.hexdigest()[:32]}")


if __name__ == "__main__":
    main()
