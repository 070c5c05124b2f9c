"""Locks inside the TDX module: shared/exclusive (sharex) locks and per-entry locks with host priority.

All lock state lives in the World so that contention replays and rewinds with everything else. Every acquire is
a try-lock: the TDX module never spins, it returns TDX_OPERAND_BUSY with the operand that was busy
(TDX module include/tdx_locks.h).
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Hashable

import attrs

from tdxdbg.runtime.world import World


class LockMode(enum.Enum):
    SHARED = "shared"
    EXCLUSIVE = "exclusive"


@attrs.frozen(slots=True)
class Sharex:
    """A sharex lock: one exclusive holder, or any number of shared holders."""

    exclusive: str | None = None
    shared: tuple[str, ...] = ()

    @property
    def free(self) -> bool:
        return self.exclusive is None and not self.shared


FREE_LOCK = Sharex()

# Lock values are immutable and few (a holder, or a tuple of holders), but every SEAMCALL writes several: made
# once each and shared (the constructors, cached), so the World and the timeline's effects hold one object per
# distinct value. Called with positional arguments only, so equal values share one cache entry.
_sharex = functools.cache(Sharex)


def tree_lock_key(tdr: int) -> tuple[str, int]:
    """The TD's S-EPT tree lock."""
    return ("tdx.tree_lock", tdr)


def tdr_lock_key(tdr: int) -> tuple[str, int]:
    """The lock of the TD's TDR page (the explicit TDR operand)."""
    return ("tdx.tdr_lock", tdr)


def pamt_lock_key(pfn: int) -> tuple[str, int]:
    """The lock of one page's PAMT entry."""
    return ("tdx.pamt_lock", pfn)


def try_acquire(world: World, key: Hashable, mode: LockMode, holder: str) -> bool:
    lock: Sharex = world.get(key, FREE_LOCK)
    if lock.exclusive is not None:
        return False
    if mode is LockMode.EXCLUSIVE:
        if lock.shared:
            return False
        world.set(key, _sharex(holder, ()))
    else:
        world.set(key, _sharex(None, (*lock.shared, holder)))
    return True


def release(world: World, key: Hashable, mode: LockMode, holder: str) -> None:
    lock: Sharex = world.get(key, FREE_LOCK)
    if mode is LockMode.EXCLUSIVE:
        if lock.exclusive != holder:
            raise RuntimeError(f"{holder} releases {key} it does not hold exclusively")
        world.delete(key)
        return
    shared = list(lock.shared)
    shared.remove(holder)
    if shared:
        world.set(key, _sharex(None, tuple(shared)))
    else:
        world.delete(key)


@attrs.frozen(slots=True)
class EntryLock:
    """The TDEL bit of an S-EPT entry and its host-priority (HP) bit."""

    holder: str | None = None
    host_priority: bool = False


FREE_ENTRY_LOCK = EntryLock()
# Made once each and shared, as _sharex.
_entry_lock = functools.cache(EntryLock)


def entry_lock_key(table_pfn: int, index: int) -> tuple[str, int, int]:
    return ("tdx.tdel", table_pfn, index)


def host_acquire_entry(world: World, key: Hashable, holder: str) -> bool:
    """`sept_lock_acquire_host`: on contention set HP so the guest's next attempt yields to the host."""
    lock: EntryLock = world.get(key, FREE_ENTRY_LOCK)
    if lock.holder is not None:
        if not lock.host_priority:
            world.set(key, _entry_lock(lock.holder, True))
        return False
    world.set(key, _entry_lock(holder, False))
    return True


class GuestLockResult(enum.Enum):
    ACQUIRED = "acquired"
    BUSY = "busy"
    HOST_PRIORITY = "host_priority"


def guest_acquire_entry(world: World, key: Hashable, holder: str) -> GuestLockResult:
    """`sept_lock_acquire_guest`: a held entry is BUSY; a free entry with HP set is yielded to the host."""
    lock: EntryLock = world.get(key, FREE_ENTRY_LOCK)
    if lock.holder is not None:
        return GuestLockResult.BUSY
    if lock.host_priority:
        return GuestLockResult.HOST_PRIORITY
    world.set(key, _entry_lock(holder, False))
    return GuestLockResult.ACQUIRED


def release_entry(world: World, key: Hashable, holder: str) -> None:
    lock: EntryLock = world.get(key, FREE_ENTRY_LOCK)
    if lock.holder != holder:
        raise RuntimeError(f"{holder} releases entry lock {key} held by {lock.holder}")
    if lock.host_priority:
        world.set(key, _entry_lock(None, True))
    else:
        world.delete(key)
