"""SEAMCALL throughput with the step runtime recording every frame.

10,000 private 4K pages go through the TDX module's whole cycle: TDH.MEM.PAGE.AUG, the guest's
TDG.MEM.PAGE.ACCEPT, TDH.MEM.RANGE.BLOCK, TDH.MEM.TRACK and TDH.MEM.PAGE.REMOVE (five calls a page). The
S-EPT tables are built beforehand and not timed. Frames are recorded with stacks, effects and footprints, not
locals (not recorded: they are rebuilt by replay when shown, see bench/locals.py). Prints
`seamcalls-per-second: N calls/s`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tdxdbg.hw.cpu import TdVcpu
from tdxdbg.hw.ept import Level
from tdxdbg.hw.insn import TdcallInsn
from tdxdbg.hw.machine import Machine, drive
from tdxdbg.hw.tdx.leaves import Seamcall, Tdcall
from tdxdbg.runtime import Runtime, Task
from tdxdbg.runtime.scheduler import Policy, ScheduleSpec

PAGES = 10_000
BASE_GPA = 0x4000_0000
CALLS_PER_PAGE = 5


def build() -> tuple[Any, list[Task], Callable[[], None]]:
    """The machine's World, the three tasks (host AUG, vCPU ACCEPT, host BLOCK/TRACK/REMOVE) and a check to run
    after they finish."""
    m = Machine()
    tdx, mem, world = m.tdx, m.memory, m.world
    tdr = tdx.create_td()
    rdx = tdr << 12
    gpas = [BASE_GPA + i * 0x1000 for i in range(PAGES)]
    # Untimed: the upper S-EPT levels every page needs.
    done = set()
    for gpa in gpas:
        for level, size in ((Level.PML4, 1 << 39), (Level.PDPT, 1 << 30), (Level.PD, 1 << 21)):
            key = (level, gpa // size)
            if key not in done:
                done.add(key)
                r = drive(tdx.seamcall(Seamcall.TDH_MEM_SEPT_ADD, gpa // size * size | level, rdx,
                                       mem.alloc("kvm:sept") << 12), world)
                assert r.ok, r
    pages = [mem.alloc("gmem") << 12 for _ in gpas]

    def host_aug():
        for gpa, hpa in zip(gpas, pages, strict=True):
            r = yield from tdx.seamcall(Seamcall.TDH_MEM_PAGE_AUG, gpa, rdx, hpa)
            assert r.ok, r

    def guest():
        for gpa in gpas:
            res = yield TdcallInsn(Tdcall.TDG_MEM_PAGE_ACCEPT, rcx=gpa)
            assert res.rax == 0, res

    vcpu = TdVcpu(tdx, mem, tdr, 0, guest)

    def vcpu_run():
        exit = yield from vcpu.enter()
        assert vcpu.halted, exit

    def host_zap():
        for gpa in gpas:
            for leaf, rcx in ((Seamcall.TDH_MEM_RANGE_BLOCK, gpa), (Seamcall.TDH_MEM_TRACK, rdx),
                              (Seamcall.TDH_MEM_PAGE_REMOVE, gpa)):
                r = yield from tdx.seamcall(leaf, rcx, rdx)
                assert r.ok, r

    tasks = [Task("host_aug", host_aug()), Task("vcpu0", vcpu_run()), Task("host_zap", host_zap())]

    def verify() -> None:
        assert all(t.error is None and t.finished for t in tasks), [t.error for t in tasks]
        assert tdx.chldcnt(tdr) == len(done) + 4 + 1, tdx.chldcnt(tdr)

    return world, tasks, verify


def main() -> None:
    world, tasks, verify = build()
    rt = Runtime(world, tasks, ScheduleSpec(Policy.SEQUENTIAL))
    start = time.perf_counter()
    rt.run()
    elapsed = time.perf_counter() - start
    verify()
    calls = PAGES * CALLS_PER_PAGE
    print(f"seamcalls-per-second: {calls / elapsed:.0f} calls/s")
    print(f"frames-recorded: {len(rt.timeline)} frames")


if __name__ == "__main__":
    main()
