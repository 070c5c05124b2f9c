"""Complete unrecorded executions per second: the base of an interleaving explorer.

For each scenario below: build the VM from the scenario, run every task to the end under a seeded random
schedule (seed 0, 1, 2, ...; the scenario's `order` prefix first), keeping each step's task, keys read and keys
written (tdxdbg.runtime.execution.Execution) and running the invariant checks after every step. Prints
`executions-per-second-<scenario>: N executions/s` (best of three rounds of ROUND_SECONDS each), plus the
average steps per execution.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tdxdbg.engine.checks import make_checks
from tdxdbg.engine.vm import build_vm
from tdxdbg.runtime.execution import Execution
from tdxdbg.runtime.runtime import StopReason
from tdxdbg.runtime.scheduler import Policy, ScheduleSpec
from tdxdbg.scenario.builder import build_setup
from tdxdbg.scenario.loader import load, resolve

SCENARIOS = ("two_vcpus_same_gfn", "three_vcpus_neighbours", "demo")
ROUND_SECONDS = 2.0
ROUNDS = 3
MAX_STEPS = 100_000


def executions_per_second(name: str) -> tuple[float, float]:
    path = resolve(name)
    scenario = load(path)
    setup = build_setup(scenario, path.parent)
    order = scenario.schedule.order
    seed = 0
    best = 0.0
    steps = 0
    runs = 0
    for _ in range(ROUNDS):
        count = 0
        start = time.perf_counter()
        while True:
            built = build_vm(setup)
            ex = Execution(built.machine.world, built.tasks, ScheduleSpec(Policy.RANDOM, seed, order),
                           make_checks(built.kvm))
            stop = ex.run(MAX_STEPS)
            assert stop is not StopReason.MAX_FRAMES, (name, seed)
            seed += 1
            count += 1
            steps += len(ex)
            elapsed = time.perf_counter() - start
            if elapsed >= ROUND_SECONDS:
                break
        runs += count
        best = max(best, count / elapsed)
    return best, steps / runs


def main() -> None:
    for name in sys.argv[1:] or SCENARIOS:
        rate, steps = executions_per_second(name)
        print(f"executions-per-second-{name}: {rate:.0f} executions/s")
        print(f"steps-per-execution-{name}: {steps:.0f} steps")


if __name__ == "__main__":
    main()
