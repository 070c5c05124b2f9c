"""TLB tracking: the TD epoch and its two parity-indexed refcounts (tdx-module `adjust_tlb_tracking_state`,
`is_tlb_tracked`, tdh_mem_track.c)."""

from __future__ import annotations

import attrs

from tdxdbg.runtime.world import World

# The epoch a new TD starts in. The module's initial value is not confirmed in source; any value works as long
# as BEPOCH of a never-blocked page (0) reads as tracked, which holds for 1 and above.
INITIAL_TD_EPOCH = 1


@attrs.frozen(slots=True)
class EpochState:
    td_epoch: int = INITIAL_TD_EPOCH
    refcount: tuple[int, int] = (0, 0)


def epoch_key(tdr: int) -> tuple[str, int]:
    return ("tdx.epoch", tdr)


def epoch_lock_key(tdr: int) -> tuple[str, int]:
    return ("tdx.epoch_lock", tdr)


def get_epoch(world: World, tdr: int) -> EpochState:
    return world.get(epoch_key(tdr), EpochState())


def enter(world: World, tdr: int) -> int:
    """TD entry: sample TD_EPOCH and count the vCPU in that epoch's refcount. Returns the sampled epoch."""
    st = get_epoch(world, tdr)
    e = st.td_epoch
    rc = list(st.refcount)
    rc[e & 1] += 1
    world.set(epoch_key(tdr), EpochState(e, (rc[0], rc[1])))
    return e


def leave(world: World, tdr: int, vcpu_epoch: int) -> None:
    """TD exit (or a reverted entry): the vCPU leaves the epoch it entered in."""
    st = get_epoch(world, tdr)
    rc = list(st.refcount)
    if rc[vcpu_epoch & 1] <= 0:
        raise RuntimeError(f"epoch refcount underflow for epoch {vcpu_epoch}")
    rc[vcpu_epoch & 1] -= 1
    world.set(epoch_key(tdr), EpochState(st.td_epoch, (rc[0], rc[1])))


def previous_epoch_busy(st: EpochState) -> bool:
    """TDH.MEM.TRACK may advance only when nobody who entered in TD_EPOCH - 1 is still in the guest."""
    return st.refcount[(st.td_epoch - 1) & 1] != 0


def advance(world: World, tdr: int) -> int:
    st = get_epoch(world, tdr)
    world.set(epoch_key(tdr), EpochState(st.td_epoch + 1, st.refcount))
    return st.td_epoch + 1


def is_tracked(st: EpochState, bepoch: int) -> bool:
    """`is_tlb_tracked`: blocked at BEPOCH, then TRACK, then every vCPU of epoch BEPOCH has left the guest."""
    if st.td_epoch > bepoch + 1:
        return True
    return st.td_epoch == bepoch + 1 and st.refcount[bepoch & 1] == 0
