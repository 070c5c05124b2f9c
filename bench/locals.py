"""The cost of showing a frame's locals, which are rebuilt by replay (runtime/replay.py), not recorded.

Figures (over LOCALS_SAMPLES random (frame, task) pairs of a 1,000,000-frame timeline of four vCPUs accepting
pages, bench/engine.py's fault workload):
  locals-view-median-ms   median time of Session.task_locals the first time a frame's locals are shown: no live
                          replay or rendered locals cached (cold), the cursor at that frame as the UI has it
  locals-view-p99-ms      the 99th percentile of the same
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import engine  # bench/engine.py: the fault benchmark's TD

from tdxdbg.runtime.scheduler import Policy, ScheduleSpec
from tdxdbg.session import Session

VCPUS = 4
LOCALS_SAMPLES = int(sys.argv[1]) if len(sys.argv) > 1 else 1000


def main() -> None:
    setup = engine.build_setup(VCPUS, engine.GOTO_PAGES)
    session = Session.open(setup, ScheduleSpec(Policy.ROUND_ROBIN), checks_factory=lambda _kvm: ())
    session.run_to_end(None)
    n = len(session)
    names = [t.name for t in session.tasks]
    rng = random.Random(9)
    times = []
    for _ in range(LOCALS_SAMPLES):
        i = rng.randrange(n)
        task = rng.choice(names)
        session.goto(i + 1)
        session.state_at()                    # the panes read the state there first: the cursor state is at i + 1
        session._replays.clear()              # cold: nothing to continue from
        session._locals.clear()
        start = time.perf_counter()
        loc = session.task_locals(task, i)
        times.append(time.perf_counter() - start)
        assert not loc.error, loc.error
    times.sort()
    print(f"locals-view-frames: {n} frames")
    print(f"locals-view-median-ms: {statistics.median(times) * 1e3:.2f} ms")
    print(f"locals-view-p99-ms: {times[int(len(times) * 0.99) - 1] * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
