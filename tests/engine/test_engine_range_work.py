"""Work on a range is proportional to what is populated, not to the range's size: truncating a guest_memfd
range (kvm_gmem_punch_hole -> truncate_inode_pages_range, which walks the page cache's xarray and skips holes)
and discarding the userspace backing (the mm zaps only populated page tables) visit only the pages that
exist (by 2 MiB chunk). A 4 TiB memslot with three pages in two chunks costs two chunks of work, not 2^30
pages."""

from __future__ import annotations

import textwrap
from typing import Any

from tdxdbg.engine.vm import build_vm
from tdxdbg.runtime import Runtime, StopReason
from tdxdbg.runtime.scheduler import Policy, ScheduleSpec
from tdxdbg.scenario.builder import build_setup
from tdxdbg.scenario.loader import loads

TIB4 = 4 << 40
FAR = 0x40_0000_0000           # 256 GiB: a chunk far from the first


def _run(text: str) -> tuple[Any, Runtime]:
    scenario = loads(textwrap.dedent(text), "range.toml")
    built = build_vm(build_setup(scenario))
    rt = Runtime(built.machine.world, built.tasks, ScheduleSpec(Policy.SEQUENTIAL))
    assert rt.run(max_frames=20_000) is StopReason.DONE
    return built, rt


def _keys_read(rt: Runtime, task: str, kind: str) -> set[tuple]:
    return {k for f in rt.timeline.frames if f.task == task for k in f.reads if type(k) is tuple and k[0] == kind}


PRIVATE = f"""
    [td]
    [[memslot]]
    gpa = 0
    size = {TIB4}
    guest_memfd = true
    [attributes]
    private = [[0, {TIB4}]]
    [[vcpu]]
    program = ["accept 0x1000", "accept 0x3000", "accept {FAR:#x}"]
    [[host]]
    program = [{{ops}}]
"""


def test_punch_hole_over_4tib_visits_the_populated_pages_only() -> None:
    built, rt = _run(PRIVATE.replace("{ops}", f'"punch_hole 0 {TIB4:#x}"'))
    # The gfns of the two populated 2 MiB chunks are looked up (512 each), none of the other 2^30 - 1024.
    chunk_gfns = [*range(512), *range(FAR >> 12, (FAR >> 12) + 512)]
    assert _keys_read(rt, "host0", "gmem.pfn") == {("gmem.pfn", 0, g) for g in chunk_gfns}
    world = built.machine.world
    assert not [k for k in world.snapshot() if type(k) is tuple and k[0] == "gmem.pfn"]
    assert world.peek(("gmem.chunks", 0)) == ()


def test_punch_hole_of_one_page_keeps_its_neighbours() -> None:
    built, rt = _run(PRIVATE.replace("{ops}", '"punch_hole 0x1000 0x1000"'))
    world = built.machine.world
    assert _keys_read(rt, "host0", "gmem.pfn") == {("gmem.pfn", 0, 1)}
    assert world.peek(("gmem.pfn", 0, 1)) is None
    assert world.peek(("gmem.pfn", 0, 3)) is not None
    # The first 2 MiB chunk still holds gfn 3; the far chunk was not touched.
    assert world.peek(("gmem.chunks", 0)) == (0, FAR >> 21)


SHARED = f"""
    [td]
    [[memslot]]
    gpa = 0
    size = {TIB4}
    [[vcpu]]
    program = ["write 0x800000001000 1", "write {(1 << 47) | FAR:#x} 2"]
    [[host]]
    program = ["invalidate 0 {TIB4:#x}"]
"""


def test_invalidate_over_4tib_discards_the_populated_chunks_only() -> None:
    built, rt = _run(SHARED)
    assert _keys_read(rt, "host0", "hva.chunk") == {("hva.chunk", 0, 0), ("hva.chunk", 0, FAR >> 21)}
    world = built.machine.world
    assert world.peek(("hva.chunks", 0)) == ()
    assert world.peek(("hva.chunk", 0, 0)) is None
