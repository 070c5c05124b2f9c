"""Engine throughput and timeline cost.

Figures:
  private-faults-per-second        one vCPU accepting 20,000 fresh private 4K pages (each ACCEPT exits, KVM
                                   faults the page in: SEPT.ADD where needed, PAGE.AUG), recording stacks,
                                   effects and footprints, checks on (no locals: not captured at record time)
  private-faults-per-second-unrecorded  the same with nothing recorded and no checks (the tasks driven straight
                                   through), in the same process
  recorded-vs-unrecorded           private-faults-per-second divided by the unrecorded figure
  private-faults-per-second-4vcpu  four vCPUs, 5,000 pages each, round-robin interleaving
  timeline-bytes-per-frame         memory per frame of the 1,000,000-frame timeline below: growth of the resident
                                   set of a fresh process while it builds the VM and records the timeline
                                   (checks off, no locals), so allocator overhead counts too
  timeline-bytes-per-frame-46k     the same for a 46,000-frame timeline (2,000 pages), measured with
                                   tracemalloc
  goto-median-ms                   median time to rebuild the state of a random frame of a 1,000,000-frame
                                   timeline (the cursor is elsewhere each time)
  goto-session-median-ms           the same through Session.goto plus reading the state there
  goto-views-median-ms             Session.goto plus the views the panes read (an SPTE, an S-EPT entry, the
                                   tasks)
"""

from __future__ import annotations

import functools
import gc
import os
import random
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tdxdbg.engine.gmem import Memslot
from tdxdbg.engine.steps import EngineStep
from tdxdbg.engine.vm import BuiltVm, VmSetup, build_vm
from tdxdbg.hw import guest
from tdxdbg.hw.insn import OpProgramFactory
from tdxdbg.runtime import Runtime, Task, TaskState
from tdxdbg.runtime.scheduler import Policy, ScheduleSpec
from tdxdbg.session import Session

PAGES = 20_000
# About 23 frames a page: enough pages for a timeline of at least 1,000,000 frames.
GOTO_PAGES = 44_000
SLOT_PAGES = 1 << 17   # 512 MiB of guest memory, all private
GOTO_SAMPLES = 200


def _checks(kvm):
    try:
        from tdxdbg.engine.checks import make_checks
    except ImportError:
        return []
    return make_checks(kvm)


def accept_pages(first: int, count: int) -> OpProgramFactory:
    """`count` operations `accept GPA 4K`, as a scenario's program of accepts builds them."""
    return OpProgramFactory([functools.partial(guest.accept_memory, (first + i) << 12, 0x1000)
                             for i in range(count)])


def build_setup(vcpus: int, pages: int) -> VmSetup:
    """The benchmark's TD: one all-private guest_memfd slot, `vcpus` vCPUs accepting `pages` pages between them."""
    per = pages // vcpus
    return VmSetup(memslots=(Memslot(0, 0, SLOT_PAGES, guest_memfd=True),), private_ranges=((0, SLOT_PAGES),),
                   vcpu_programs=tuple(accept_pages(16 + i * per, per) for i in range(vcpus)))


def build(vcpus: int, pages: int) -> BuiltVm:
    return build_vm(build_setup(vcpus, pages))


def run(vcpus: int, pages: int, policy: Policy, checks: bool = True) -> tuple[Runtime, float, int]:
    """Record the workload (stacks, effects, footprints and, with `checks`, the invariant checks; no locals: they
    are no longer captured at record time)."""
    built = build(vcpus, pages)
    rt = Runtime(built.machine.world, built.tasks, ScheduleSpec(policy),
                 checks=_checks(built.kvm) if checks else ())
    start = time.perf_counter()
    rt.run()
    elapsed = time.perf_counter() - start
    faults = sum(1 for f in rt.timeline.frames if f.step.kind is EngineStep.RET_PF)
    assert all(t.error is None for t in built.tasks), [t.error for t in built.tasks]
    return rt, elapsed, faults


def drive_unrecorded(world: Any, tasks: list[Task]) -> None:
    """Run each task to its end, in order (the sequential schedule), keeping nothing: no frames, stacks, effects
    or checks (the World's per-step read and write lists are just emptied). The ceiling any recording lowers."""
    reads, writes = world._reads, world._writes
    for task in tasks:
        world.task = task.name
        send = task.gen.send
        try:
            while True:
                step = send(None)
                if step.wait is not None and not step.wait(world):
                    raise RuntimeError(f"{task.name} waits; an unrecorded run cannot schedule around that")
                reads.clear()
                writes.clear()
        except StopIteration:
            task.state = TaskState.DONE


def unrecorded(pages: int) -> float:
    """Seconds to run the one-vCPU workload unrecorded."""
    built = build(1, pages)
    start = time.perf_counter()
    drive_unrecorded(built.machine.world, built.tasks)
    return time.perf_counter() - start


def main() -> None:
    _rt, elapsed, faults = run(1, PAGES, Policy.SEQUENTIAL)
    recorded = faults / elapsed
    print(f"private-faults-per-second: {recorded:.0f} faults/s")
    _rt = None
    gc.collect()
    # The same faults with nothing recorded, in this process; the recorded run made one fault per page.
    ceiling = PAGES / unrecorded(PAGES)
    print(f"private-faults-per-second-unrecorded: {ceiling:.0f} faults/s")
    print(f"recorded-vs-unrecorded: {recorded / ceiling:.2f}")
    gc.collect()
    _rt4, elapsed, faults = run(4, PAGES, Policy.ROUND_ROBIN)
    print(f"private-faults-per-second-4vcpu: {faults / elapsed:.0f} faults/s")
    _rt4 = None
    gc.collect()

    # Timeline memory: the 1,000,000-frame timeline in a fresh process (nothing freed by the runs above can
    # be reused and hide growth), then a short one here with tracemalloc.
    child = subprocess.run([sys.executable, __file__, RSS_CHILD], capture_output=True, text=True, check=True)
    print(f"timeline-bytes-per-frame: {float(child.stdout):.0f} bytes")
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    rt, _e, _f = run(1, 2000, Policy.SEQUENTIAL, checks=False)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    print(f"timeline-bytes-per-frame-46k: {(after - before) / len(rt.timeline):.0f} bytes")
    rt = None
    gc.collect()

    # goto on a 1,000,000-frame timeline: record one through a Session (without checks, to save time), then
    # rebuild the state of random positions, each far from where the cursor was.
    setup = build_setup(1, GOTO_PAGES)
    session = Session.open(setup, ScheduleSpec(Policy.SEQUENTIAL), checks_factory=lambda _kvm: ())
    session.run_to_end(None)
    assert session.finished
    tl = session._rt.timeline
    n = len(tl)
    rng = random.Random(1)
    targets = [rng.randrange(n + 1) for _ in range(GOTO_SAMPLES)]
    times = []
    for pos in targets:
        t0 = time.perf_counter()
        tl.state_at(pos)
        times.append((time.perf_counter() - t0) * 1000)
    print(f"goto-median-ms: {statistics.median(times):.1f} ms")
    # The same through the Session, as the debugger does it: goto, then the state read at the new position, then
    # the views the panes show (an SPTE, an S-EPT entry, the tasks).
    with_state, with_views = [], []
    for pos in targets:
        t0 = time.perf_counter()
        session.goto(pos)
        session.state_at()
        with_state.append((time.perf_counter() - t0) * 1000)
    for pos in targets[:GOTO_SAMPLES // 2]:
        t0 = time.perf_counter()
        session.goto(pos)
        session.spte_at("mirror", 5)
        session.sept_entry_at(5 << 12)
        session.task_views()
        with_views.append((time.perf_counter() - t0) * 1000)
    print(f"goto-session-median-ms: {statistics.median(with_state):.1f} ms")
    print(f"goto-views-median-ms: {statistics.median(with_views):.1f} ms")
    print(f"goto-timeline-frames: {n} frames")


RSS_CHILD = "--timeline-rss"


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timeline_rss() -> None:
    """(Child process.) Resident-set growth per frame while building the VM and recording GOTO_PAGES pages."""
    gc.collect()
    before = resident_bytes()
    built = build(1, GOTO_PAGES)
    rt = Runtime(built.machine.world, built.tasks, ScheduleSpec(Policy.SEQUENTIAL))
    rt.run()
    assert all(t.error is None for t in built.tasks), [t.error for t in built.tasks]
    print((resident_bytes() - before) / len(rt.timeline))


if __name__ == "__main__":
    if RSS_CHILD in sys.argv:
        timeline_rss()
    else:
        main()
