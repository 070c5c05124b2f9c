"""Where the time of the two throughput benchmarks goes: the same work with parts of the recording turned off.

For bench/engine.py's private faults (its TD, one vCPU, 5,000 pages here) and bench/seamcalls.py's SEAMCALL cycles:
  *-unrecorded      the tasks driven straight through, with no Runtime: no frames, stacks, effects or
                    checks kept (the World's per-step read and write lists are just emptied). The ceiling that
                    any recording can only lower.
  *-no-checks       everything recorded, no invariant checks (faults only; the SEAMCALL bench runs none).
  *                 everything on, as the headline benchmarks run.
Each figure is the best of three runs.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import engine  # bench/engine.py: the fault workload it times
import seamcalls  # bench/seamcalls.py: the SEAMCALL cycle it times

from tdxdbg.engine.checks import make_checks
from tdxdbg.runtime import Runtime
from tdxdbg.runtime.scheduler import Policy, ScheduleSpec

FAULT_PAGES = 5_000
RUNS = 3


def time_faults(mode: str) -> float:
    built = engine.build(1, FAULT_PAGES)
    tasks = built.tasks
    world = built.machine.world
    if mode == "unrecorded":
        start = time.perf_counter()
        engine.drive_unrecorded(world, tasks)
        return time.perf_counter() - start
    rt = Runtime(world, tasks, ScheduleSpec(Policy.SEQUENTIAL),
                 checks=make_checks(built.kvm) if mode != "no-checks" else ())
    start = time.perf_counter()
    rt.run()
    elapsed = time.perf_counter() - start
    assert all(t.error is None for t in tasks), [t.error for t in tasks]
    return elapsed


def time_seamcalls(mode: str) -> float:
    world, tasks, verify = seamcalls.build()
    if mode == "unrecorded":
        start = time.perf_counter()
        engine.drive_unrecorded(world, tasks)
        elapsed = time.perf_counter() - start
    else:
        rt = Runtime(world, tasks, ScheduleSpec(Policy.SEQUENTIAL))
        start = time.perf_counter()
        rt.run()
        elapsed = time.perf_counter() - start
    verify()
    return elapsed


def best(timer: Callable[[str], float], mode: str) -> float:
    return min(timer(mode) for _ in range(RUNS))


def main() -> None:
    for mode in ("unrecorded", "no-checks", ""):
        name = "private-faults-per-second" + (f"-{mode}" if mode else "")
        print(f"{name}: {FAULT_PAGES / best(time_faults, mode):.0f} faults/s")
    calls = seamcalls.PAGES * seamcalls.CALLS_PER_PAGE
    for mode in ("unrecorded", ""):
        name = "seamcalls-per-second" + (f"-{mode}" if mode else "")
        print(f"{name}: {calls / best(time_seamcalls, mode):.0f} calls/s")


if __name__ == "__main__":
    main()
