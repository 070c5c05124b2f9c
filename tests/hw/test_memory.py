"""Host memory (tdxdbg/hw/memory.py): freeing a page-table page deletes exactly the entries it has, in index
order, found through the entries written per table page rather than by testing all 512 keys."""

from __future__ import annotations

import random

from tdxdbg.hw.memory import PTE, HostMemory, fill_key, pte_key
from tdxdbg.runtime.world import MISSING, World

FILL = 0x8000_0000_0000_0000   # KVM's SHADOW_NONPRESENT_VALUE style fill: absent entries read as this


def _tables_in_world(world: World) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for key, _value in world.items():
        if key.__class__ is tuple and key[0] == PTE:
            out.setdefault(key[1], set()).add(key[2])
    return {t: s for t, s in out.items() if s}


def test_free_deletes_exactly_the_written_entries_in_index_order() -> None:
    world = World()
    mem = HostMemory(world)
    mem.init()
    table = mem.alloc_table("kvm:pt", FILL)
    mem.write_entry(table, 300, 0x1234_5007)
    mem.write_entry(table, 9, 0x5678_9007)
    mem.write_entry(table, 2, 0x5678_a007)
    mem.write_entry(table, 7, 0x9abc_0007)
    mem.write_entry(table, 7, FILL)            # back to the fill value: no entry left
    assert mem.read_entry(table, 7) == FILL
    world.take_effects()
    mem.free(table)
    writes, _reads = world.take_effects()
    deleted = [key for key, _old, new in writes if key[0] == PTE]
    assert deleted == [pte_key(table, 2), pte_key(table, 9), pte_key(table, 300)]
    assert all(new is MISSING for key, _old, new in writes if key[0] == PTE)
    assert fill_key(table) not in world and _tables_in_world(world) == {}


def test_written_entries_mirror_the_world_through_random_writes_and_frees() -> None:
    rng = random.Random(5)
    world = World()
    mem = HostMemory(world)
    mem.init()
    tables = [mem.alloc_table("kvm:pt", rng.choice((0, FILL))) for _ in range(4)]
    for _ in range(2000):
        op = rng.random()
        if op < 0.05 and tables:
            mem.free(tables.pop(rng.randrange(len(tables))))
        elif op < 0.1:
            tables.append(mem.alloc_table("kvm:pt", rng.choice((0, FILL))))
        elif tables:
            t = rng.choice(tables)
            fill = world.peek(fill_key(t), 0)
            mem.write_entry(t, rng.randrange(512), rng.choice((fill, 0x1000 * rng.randrange(1, 9) | 7)))
        assert {t: s for t, s in mem._written.items() if s} == _tables_in_world(world)
    # A HostMemory made over a World that already has entries starts from them.
    assert {t: s for t, s in HostMemory(world)._written.items() if s} == _tables_in_world(world)
