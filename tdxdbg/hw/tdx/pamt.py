"""PAMT: the TDX module's per-page metadata (page type, owner TD, size, blocking epoch).

Page types from the TDX module's pamt_manager.h / pamt_manager.c. A page with no PAMT record
in the World is PT_NDA (not assigned).
"""

from __future__ import annotations

import enum

import attrs

from tdxdbg.runtime.world import World


class PageType(enum.IntEnum):
    PT_NDA = 0
    PT_RSVD = 1
    PT_REG = 3
    PT_TDR = 4
    PT_TDCX = 5
    PT_TDVPR = 6
    PT_EPT = 8


@attrs.frozen(slots=True)
class Pamt:
    """One PAMT entry. `owner` is the TDR's pfn; `level` the page size (0 = 4K, 1 = 2M) of a PT_REG range head;
    `bepoch` the TD epoch stamped by TDH.MEM.RANGE.BLOCK."""

    page_type: PageType = PageType.PT_NDA
    owner: int = 0
    level: int = 0
    bepoch: int = 0


NDA = Pamt()


PAMT = "pamt"   # the tag of pamt_key


def pamt_key(pfn: int) -> tuple[str, int]:
    return (PAMT, pfn)


def get_pamt(world: World, pfn: int) -> Pamt:
    return world.get(pamt_key(pfn), NDA)


def set_pamt(world: World, pfn: int, entry: Pamt) -> None:
    if entry.page_type is PageType.PT_NDA:
        world.delete(pamt_key(pfn))
    else:
        world.set(pamt_key(pfn), entry)
