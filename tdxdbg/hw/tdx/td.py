"""A TD's control structures as the TDX module keeps them: TDR (lifecycle, CHLDCNT), TDCS (OP_STATE, attributes,
the S-EPT root page) and each vCPU's TDVPR (epoch, association, zero-step log)."""

from __future__ import annotations

import enum

import attrs

from tdxdbg.hw.ept import Gpaw
from tdxdbg.runtime.world import World


class OpState(enum.IntEnum):
    """TDCS OP_STATE (tdx-module `op_state_lookup`)."""

    UNINITIALIZED = 0
    INITIALIZED = 1
    RUNNABLE = 2
    LIVE_EXPORT = 3
    PAUSED_EXPORT = 4
    POST_EXPORT = 5
    MEMORY_IMPORT = 6
    STATE_IMPORT = 7
    POST_IMPORT = 8
    LIVE_IMPORT = 9
    FAILED_IMPORT = 10

    @property
    def tlb_tracking_required(self) -> bool:
        """`state_flags_lookup`: block + track before removal is enforced only while the TD can run."""
        return self in (OpState.RUNNABLE, OpState.LIVE_EXPORT, OpState.LIVE_IMPORT)


class Lifecycle(enum.IntEnum):
    """TDR lifecycle state."""

    TD_HKID_ASSIGNED = 0
    TD_KEYS_CONFIGURED = 1
    TD_BLOCKED = 2
    TD_TEARDOWN = 3


class TdAttr(enum.IntFlag):
    """TD ATTRIBUTES bits (tdx-module `td_param_attributes_t`)."""

    DEBUG = 1 << 0
    SEPT_VE_DISABLE = 1 << 28
    PKS = 1 << 30
    KL = 1 << 31
    PERFMON = 1 << 63


# Number of TDCS pages a TD needs; page 3 is the S-EPT root (`SEPT_ROOT_PAGE_INDEX`).
TDCS_PAGES = 4
SEPT_ROOT_PAGE_INDEX = 3
# The private HKID the emulated module assigns to TDs, and where key ids sit in a physical address:
# MKTME takes the top address bits for the key id, leaving 46 bits of physical address for the kernel.
TD_HKID = 1
KEYID_SHIFT = 46
KEYID_MASK = ((1 << 64) - 1) & ~((1 << KEYID_SHIFT) - 1)


@attrs.frozen(slots=True)
class TdConfig:
    """What TDH.MNG.CREATE/INIT fixed for the TD's life."""

    tdr: int
    gpaw: Gpaw
    attributes: TdAttr
    hkid: int
    tdcs: tuple[int, ...]
    # Derived once: they are read on every walk, and enum properties are slow.
    sept_root: int = attrs.field(init=False)
    root_level: int = attrs.field(init=False)
    shared_bit: int = attrs.field(init=False)

    @sept_root.default
    def _sept_root(self) -> int:
        return self.tdcs[SEPT_ROOT_PAGE_INDEX]

    @root_level.default
    def _root_level(self) -> int:
        return int(self.gpaw.root_level)

    @shared_bit.default
    def _shared_bit(self) -> int:
        return self.gpaw.shared_bit

    @property
    def pending_ve_disable(self) -> bool:
        """TDCS TD_CTLS.PENDING_VE_DISABLE, taken from ATTRIBUTES.SEPT_VE_DISABLE at init."""
        return bool(self.attributes & TdAttr.SEPT_VE_DISABLE)


# Zero-step mitigation (tdx-module `td_exit_stepping.h`).
STEPPING_EPF_THRESHOLD = 6
EPF_GPA_LIST_SIZE = 32


@attrs.frozen(slots=True)
class VcpuState:
    """The parts of a TDVPR this model needs."""

    tdr: int
    index: int
    associated: bool = False
    in_guest: bool = False
    vcpu_epoch: int = 0
    entry_rip: int = 0
    epf_count: int = 0
    epf_gpas: tuple[int, ...] = ()


def td_key(tdr: int) -> tuple[str, int]:
    return ("tdx.td", tdr)


def op_state_key(tdr: int) -> tuple[str, int]:
    return ("tdx.op_state", tdr)


def lifecycle_key(tdr: int) -> tuple[str, int]:
    return ("tdx.lifecycle", tdr)


CHLDCNT = "tdx.chldcnt"   # the tag of chldcnt_key


def chldcnt_key(tdr: int) -> tuple[str, int]:
    return (CHLDCNT, tdr)


def vcpu_key(tdvpr: int) -> tuple[str, int]:
    return ("tdx.vcpu", tdvpr)


def get_config(world: World, tdr: int) -> TdConfig | None:
    return world.get(td_key(tdr))


def add_chldcnt(world: World, tdr: int, delta: int) -> None:
    key = chldcnt_key(tdr)
    world.set(key, world.get(key, 0) + delta)
