"""Overhead of the invariant checks (tdxdbg/engine/checks.py) on 2,000 private faults: best of 5 runs without
checks, with a no-op check (the runtime's own cost of running checks) and with make_checks(kvm)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from tdxdbg.engine.checks import make_checks
from tdxdbg.engine.gmem import Memslot
from tdxdbg.engine.vm import VmSetup, build_vm
from tdxdbg.hw import guest
from tdxdbg.runtime import Runtime
from tdxdbg.runtime.scheduler import ScheduleSpec

N = int(sys.argv[1]) if len(sys.argv) > 1 else 2000


def prog() -> Any:
    for i in range(N):
        yield from guest.accept_memory(0x100000 + i * 0x1000, 0x1000)


def run(checks: Callable[[Any], list]) -> float:
    built = build_vm(VmSetup(memslots=(Memslot(0, 0, 16384, guest_memfd=True),), private_ranges=((0, 16384),),
                             vcpu_programs=(lambda: prog(),)))
    rt = Runtime(built.machine.world, built.tasks, ScheduleSpec(), checks=checks(built.kvm))
    t = time.perf_counter()
    rt.run()
    return time.perf_counter() - t


def main() -> None:
    none = min(run(lambda _k: []) for _ in range(5))
    noop = min(run(lambda _k: [lambda *_a: ()]) for _ in range(5))
    real = min(run(make_checks) for _ in range(5))
    print(f"{N} private faults: no checks {none:.3f}s; no-op check {noop:.3f}s (+{100 * (noop / none - 1):.1f}%); "
          f"make_checks {real:.3f}s (+{100 * (real / none - 1):.1f}%, the checker itself "
          f"+{100 * (real - noop) / none:.1f}%)")


if __name__ == "__main__":
    main()
