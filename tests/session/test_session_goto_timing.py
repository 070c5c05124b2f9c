"""goto on a long timeline: 200,000 frames of one vCPU accepting fresh private pages. Prints the median time of
goto(random position) alone and with the state read at the new position."""

from __future__ import annotations

import random
import statistics
import time

from tdxdbg.engine.gmem import Memslot
from tdxdbg.engine.vm import VmSetup
from tdxdbg.hw import guest
from tdxdbg.runtime.scheduler import ScheduleSpec
from tdxdbg.session import Session, StopReason

FRAMES = 200_000
PAGES_64M = (64 << 20) >> 12


def accept_many():
    yield from guest.accept_memory(0, PAGES_64M << 12)


def test_goto_median_on_200k_frames():
    setup = VmSetup(memslots=(Memslot(0, 0, PAGES_64M, guest_memfd=True),), private_ranges=((0, PAGES_64M),),
                    vcpu_programs=(accept_many,))
    s = Session.open(setup, ScheduleSpec())
    t0 = time.perf_counter()
    ev = s.run_to_end(FRAMES)
    record_s = time.perf_counter() - t0
    assert ev.reason is StopReason.MAX_FRAMES and len(s.frames) == FRAMES
    rng = random.Random(1)
    targets = [rng.randrange(FRAMES + 1) for _ in range(300)]
    goto_only, with_state, with_views = [], [], []
    for pos in targets:
        t = time.perf_counter()
        s.goto(pos)
        goto_only.append(time.perf_counter() - t)
    for pos in targets:
        t = time.perf_counter()
        s.goto(pos)
        s.state_at()
        with_state.append(time.perf_counter() - t)
    for pos in targets[:100]:
        t = time.perf_counter()
        s.goto(pos)
        s.spte_at("mirror", 5)
        s.sept_entry_at(5 << 12)
        s.task_views()
        with_views.append(time.perf_counter() - t)
    med = {name: statistics.median(xs) * 1e3 for name, xs in
           (("goto", goto_only), ("goto+state_at", with_state), ("goto+spte/sept/tasks", with_views))}
    print(f"\nrecorded {FRAMES} frames in {record_s:.1f} s; median ms: "
          + ", ".join(f"{k} {v:.3f}" for k, v in med.items()))
    assert med["goto+state_at"] < 50
