"""Engine throughput and timeline cost.

Figures:
  private-faults-per-second        one vCPU accepting 20,000 fresh private 4K pages (each ACCEPT exits, KVM
                                   faults the page in: SEPT.ADD where needed, PAGE.AUG), recording and checks on
  private-faults-per-second-4vcpu  four vCPUs, 5,000 pages each, round-robin interleaving
  timeline-bytes-per-frame         memory the recorded timeline holds per frame (tracemalloc)
  goto-median-ms                   median time to rebuild the state of a random frame of a 1,000,000-frame
                                   timeline (the cursor is elsewhere each time)
"""

from __future__ import annotations

import gc
import random
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tdxdbg.engine.gmem import Memslot
from tdxdbg.engine.steps import EngineStep
from tdxdbg.engine.vm import VmSetup, build_vm
from tdxdbg.hw import guest
from tdxdbg.runtime import Runtime
from tdxdbg.runtime.scheduler import Policy, ScheduleSpec

PAGES = 20_000
# About 23 frames a page: enough pages for a timeline of at least 1,000,000 frames.
GOTO_PAGES = 44_000
SLOT_PAGES = 1 << 17   # 512 MiB of guest memory, all private


def _checks(kvm):
    try:
        from tdxdbg.engine.checks import make_checks
    except ImportError:
        return []
    return make_checks(kvm)


def accept_pages(first: int, count: int):
    def program():
        for i in range(count):
            yield from guest.accept_memory((first + i) << 12, 0x1000)
    return program


def run(vcpus: int, pages: int, policy: Policy, checks: bool = True) -> tuple[Runtime, float, int]:
    per = pages // vcpus
    setup = VmSetup(memslots=(Memslot(0, 0, SLOT_PAGES, guest_memfd=True),),
                    private_ranges=((0, SLOT_PAGES),),
                    vcpu_programs=tuple(accept_pages(16 + i * per, per) for i in range(vcpus)))
    built = build_vm(setup)
    rt = Runtime(built.machine.world, built.tasks, ScheduleSpec(policy),
                 checks=_checks(built.kvm) if checks else ())
    start = time.perf_counter()
    rt.run()
    elapsed = time.perf_counter() - start
    faults = sum(1 for f in rt.timeline.frames if f.step.kind is EngineStep.RET_PF)
    assert all(t.error is None for t in built.tasks), [t.error for t in built.tasks]
    return rt, elapsed, faults


def main() -> None:
    _rt, elapsed, faults = run(1, PAGES, Policy.SEQUENTIAL)
    print(f"private-faults-per-second: {faults / elapsed:.0f} faults/s")
    _rt = None
    gc.collect()
    _rt4, elapsed, faults = run(4, PAGES, Policy.ROUND_ROBIN)
    print(f"private-faults-per-second-4vcpu: {faults / elapsed:.0f} faults/s")
    _rt4 = None
    gc.collect()

    # Timeline memory: frames of a 2,000-page run, measured with tracemalloc.
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    rt, _e, _f = run(1, 2000, Policy.SEQUENTIAL, checks=False)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    print(f"timeline-bytes-per-frame: {(after - before) / len(rt.timeline):.0f} bytes")
    rt = None
    gc.collect()

    # goto on a 1,000,000-frame timeline: record one (without checks, to save time), then rebuild the state of
    # random positions, each far from where the cursor was.
    rt, _e, _f = run(1, GOTO_PAGES, Policy.SEQUENTIAL, checks=False)
    tl = rt.timeline
    n = len(tl)
    rng = random.Random(1)
    times = []
    for _ in range(200):
        pos = rng.randrange(n + 1)
        t0 = time.perf_counter()
        tl.state_at(pos)
        times.append((time.perf_counter() - t0) * 1000)
    print(f"goto-median-ms: {statistics.median(times):.1f} ms")
    print(f"goto-timeline-frames: {n} frames")


if __name__ == "__main__":
    main()
