"""struct kvm for a TD: the VM-wide state KVM keeps, its locks, KVM_BUG_ON, and RET_PF values per era.

All of it lives in the World under "kvm." keys; the Python object holds configuration only.
"""

from __future__ import annotations

import enum
from collections.abc import Generator
from typing import Any, NamedTuple

import attrs

from tdxdbg.engine.steps import EngineStep, LockEvent
from tdxdbg.hw.ept import Gpaw
from tdxdbg.hw.machine import Machine
from tdxdbg.hw.tdx.td import OpState, TdAttr
from tdxdbg.runtime.step import Step
from tdxdbg.runtime.waits import waits_for
from tdxdbg.runtime.world import World

Gen = Generator[Step, None, Any]


class RetPf(enum.Enum):
    """RET_PF_* names; each variant maps them to its era's values (`ret_pf_values`)."""

    RET_PF_CONTINUE = "RET_PF_CONTINUE"
    RET_PF_RETRY = "RET_PF_RETRY"
    RET_PF_EMULATE = "RET_PF_EMULATE"
    RET_PF_WRITE_PROTECTED = "RET_PF_WRITE_PROTECTED"
    RET_PF_INVALID = "RET_PF_INVALID"
    RET_PF_FIXED = "RET_PF_FIXED"
    RET_PF_SPURIOUS = "RET_PF_SPURIOUS"


# v6.12+ (mmu_internal.h with RET_PF_WRITE_PROTECTED).
RET_PF_V612 = {RetPf.RET_PF_CONTINUE: 0, RetPf.RET_PF_RETRY: 1, RetPf.RET_PF_EMULATE: 2,
               RetPf.RET_PF_WRITE_PROTECTED: 3, RetPf.RET_PF_INVALID: 4, RetPf.RET_PF_FIXED: 5,
               RetPf.RET_PF_SPURIOUS: 6}
# v5.16 .. v6.11, the numbering the v7 TDX series was written against.
RET_PF_V516 = {RetPf.RET_PF_CONTINUE: 0, RetPf.RET_PF_RETRY: 1, RetPf.RET_PF_EMULATE: 2,
               RetPf.RET_PF_INVALID: 3, RetPf.RET_PF_FIXED: 4, RetPf.RET_PF_SPURIOUS: 5}


class TdState(enum.Enum):
    """kvm_tdx->state."""

    TD_STATE_UNINITIALIZED = 0
    TD_STATE_INITIALIZED = 1
    TD_STATE_RUNNABLE = 2


class MmuLock(NamedTuple):
    """kvm->mmu_lock, an rwlock: one writer or any number of readers (task names)."""

    writer: str | None = None
    readers: tuple[str, ...] = ()


FREE_MMU_LOCK = MmuLock()

# The six mmu_lock events, made once: every fault acquires and releases the lock, and the timeline keeps each
# frame's payload (one shared object instead of one per frame).
_READ_ACQUIRE = LockEvent("mmu_lock", "read", "acquire")
_READ_WAIT = LockEvent("mmu_lock", "read", "wait")
_READ_RELEASE = LockEvent("mmu_lock", "read", "release")
_WRITE_ACQUIRE = LockEvent("mmu_lock", "write", "acquire")
_WRITE_WAIT = LockEvent("mmu_lock", "write", "wait")
_WRITE_RELEASE = LockEvent("mmu_lock", "write", "release")

K_MMU_LOCK = ("kvm.mmu_lock",)
# kvm->srcu: the read sections in progress, as (task, section number) pairs, and how many sections began.
K_SRCU_READERS = ("kvm.srcu_readers",)
K_SRCU_SECTIONS = ("kvm.srcu_sections",)
# kvm->mn_active_invalidate_count: mmu-notifier invalidations between range_start and range_end.
K_MN_ACTIVE_INVALIDATE_COUNT = ("kvm.mn_active_invalidate_count",)
_SRCU_SYNC_WAIT = LockEvent("kvm->srcu", "synchronize", "wait")
_SRCU_SYNC_DONE = LockEvent("kvm->srcu", "synchronize", "done")
K_VM_DEAD = ("kvm.vm_dead",)
K_VM_BUGGED = ("kvm.vm_bugged",)
K_TD_STATE = ("kvm.tdx_state",)
# kvm_tdx->nr_premapped (v6.16 era: mirror leaves mapped before finalize that await TDH.MEM.PAGE.ADD).
K_NR_PREMAPPED = ("kvm.nr_premapped",)
# kvm_tdx->page_add_src: the source page of the KVM_TDX_INIT_MEM_REGION page being mapped (newer trees).
K_PAGE_ADD_SRC = ("kvm.page_add_src",)
K_WAIT_FOR_SEPT_ZAP = ("kvm.wait_for_sept_zap",)
K_HKID = ("kvm.hkid_assigned",)
K_PRE_FAULT_ALLOWED = ("kvm.pre_fault_allowed",)
# The VM is being destroyed (kvm_destroy_vm has started): vCPUs stop, the private root may go.
K_DESTROYING = ("kvm.destroying",)
# The host tasks inside a system call on one of the VM's files (the VM fd, a vCPU fd, a guest_memfd) or inside
# an mmu-notifier callback: each holds a reference on the VM, so kvm_destroy_vm (the last kvm_put_kvm) waits
# for them.
K_FILE_USERS = ("kvm.file_users",)


def signal_key(task: str) -> tuple[str, str]:
    """A signal sent to the thread of `task` (a vCPU thread or a VMM thread) and not handled yet: what
    signal_pending(current) reads. The thread handles it on its next return to userspace."""
    return ("task.signal_pending", task)


@attrs.frozen(slots=True)
class TdConfigSpec:
    """How the VM was created: KVM_TDX_INIT_VM parameters that matter here."""

    gpaw: Gpaw = Gpaw.GPAW_48
    sept_ve_disable: bool = True
    runnable: bool = True
    nx_huge_page_workaround: bool = False
    host_maxphyaddr: int = 52


class KvmBase:
    """The parts of struct kvm / kvm_arch / kvm_tdx every other piece uses."""

    # Override points (every method and class attribute of the engine classes is one: docs/variants.md).
    # Patches typically change here: the era's RET_PF_* numbering (ret_pf_values), what KVM_BUG_ON and
    # WARN_ON_ONCE do (kvm_bug_on, warn_on_once), the mmu_lock rwlock (read_lock .. write_unlock).

    name = "upstream"
    description = "The newest kvm-x86 tree (v6.19 TDX rework: TDX_BUG_ON, PAGE.ADD from the map path)."
    ret_pf_values: dict[RetPf, int] = RET_PF_V612

    def __init__(self, machine: Machine, spec: TdConfigSpec | None = None) -> None:
        self.machine = machine
        self.world: World = machine.world
        self.memory = machine.memory
        self.tdx_module = machine.tdx
        self.spec = spec or TdConfigSpec()
        attributes = TdAttr.SEPT_VE_DISABLE if self.spec.sept_ve_disable else TdAttr(0)
        op_state = OpState.RUNNABLE if self.spec.runnable else OpState.INITIALIZED
        self.tdr = self.tdx_module.create_td(self.spec.gpaw, attributes, op_state)
        # kvm->arch.gfn_direct_bits: the shared bit as a gfn (TDX_SHARED_BIT_PWL_4/5).
        self.gfn_direct_bits = self.spec.gpaw.shared_bit >> 12
        self.root_level = int(self.spec.gpaw.root_level) + 1   # KVM levels: PML4 = 4
        w = self.world
        w.set(K_TD_STATE, TdState.TD_STATE_RUNNABLE if self.spec.runnable else TdState.TD_STATE_INITIALIZED)
        w.set(K_PRE_FAULT_ALLOWED, self.spec.runnable)
        w.set(K_HKID, True)
        self.vcpus: list[Any] = []

    # -- RET_PF ------------------------------------------------------------------------------------------------
    def ret_pf_value(self, ret: RetPf) -> int:
        return self.ret_pf_values[ret]

    # -- VM state ------------------------------------------------------------------------------------------
    @property
    def vm_dead(self) -> bool:
        return bool(self.world.get(K_VM_DEAD))

    def kvm_vm_dead(self, reason: str) -> Gen:
        """kvm_vm_dead: no vCPU runs again; every ioctl fails with -EIO."""
        self.world.set(K_VM_DEAD, reason)
        yield Step(EngineStep.KVM_BUG, {"message": reason, "bug": False})

    def kvm_bug_on(self, cond: bool, message: str) -> Gen:
        """KVM_BUG_ON: when `cond` holds, mark the VM bugged and dead (a red frame). Returns `cond`.
        `WARN_ON_ONCE(__ret && !(kvm)->vm_bugged)`: on an already bugged VM it only returns `cond` - no second
        warning, and the first message stays the VM's reason."""
        if not cond:
            return False
        if self.world.get(K_VM_BUGGED):
            return True
        self.world.set(K_VM_BUGGED, message)
        self.world.set(K_VM_DEAD, message)
        yield Step(EngineStep.KVM_BUG, {"message": message, "bug": True})
        return True

    def warn_on_once(self, cond: bool, message: str) -> Gen:
        if cond:
            yield Step(EngineStep.WARN, {"message": message})
        return cond

    # -- mmu_lock ------------------------------------------------------------------------------------------
    def holds_mmu_lock_write(self) -> bool:
        return self.world.get(K_MMU_LOCK, FREE_MMU_LOCK).writer == self.world.task

    def read_lock(self) -> Gen:
        """read_lock(&kvm->mmu_lock): waits while a writer holds it."""
        w = self.world
        while True:
            lk: MmuLock = w.get(K_MMU_LOCK, FREE_MMU_LOCK)
            if lk.writer is None:
                w.set(K_MMU_LOCK, MmuLock(None, (*lk.readers, w.task)))
                yield Step(EngineStep.LOCK, _READ_ACQUIRE)
                return
            yield Step(EngineStep.LOCK_WAIT, _READ_WAIT, _no_writer)

    def read_unlock(self) -> Gen:
        w = self.world
        lk: MmuLock = w.get(K_MMU_LOCK, FREE_MMU_LOCK)
        readers = list(lk.readers)
        readers.remove(w.task)
        w.set(K_MMU_LOCK, MmuLock(None, tuple(readers)) if readers else FREE_MMU_LOCK)
        yield Step(EngineStep.LOCK, _READ_RELEASE)

    def write_lock(self) -> Gen:
        """write_lock(&kvm->mmu_lock): waits until no reader and no writer hold it."""
        w = self.world
        while True:
            lk: MmuLock = w.get(K_MMU_LOCK, FREE_MMU_LOCK)
            if lk.writer is None and not lk.readers:
                w.set(K_MMU_LOCK, MmuLock(w.task, ()))
                yield Step(EngineStep.LOCK, _WRITE_ACQUIRE)
                return
            yield Step(EngineStep.LOCK_WAIT, _WRITE_WAIT, _unlocked)

    def write_unlock(self) -> Gen:
        self.world.set(K_MMU_LOCK, FREE_MMU_LOCK)
        yield Step(EngineStep.LOCK, _WRITE_RELEASE)

    # -- kvm->srcu -----------------------------------------------------------------------------------------
    def srcu_read_lock(self) -> None:
        """srcu_read_lock(&kvm->srcu): never waits, so it is not a step of its own (like rcu_read_lock): its
        World write shows in the task's next frame. Memslots looked up inside the section stay what they were
        (a memslot update publishes a new array and frees the old one only after a grace period)."""
        w = self.world
        section = w.get(K_SRCU_SECTIONS, 0) + 1
        w.set(K_SRCU_SECTIONS, section)
        w.set(K_SRCU_READERS, (*w.get(K_SRCU_READERS, ()), (w.task, section)))

    def srcu_read_unlock(self) -> None:
        """srcu_read_unlock: ends this task's innermost read section."""
        w = self.world
        readers = w.get(K_SRCU_READERS, ())
        mine = max(i for i, (task, _n) in enumerate(readers) if task == w.task)
        w.set(K_SRCU_READERS, readers[:mine] + readers[mine + 1:])

    def synchronize_srcu_expedited(self) -> Gen:
        """synchronize_srcu_expedited(&kvm->srcu): wait until every read section that began before this call
        has ended; sections that begin meanwhile do not hold it up."""
        pending = frozenset(self.world.get(K_SRCU_READERS, ()))
        if pending:
            def still_reading(world: World) -> tuple[str, ...]:
                return tuple(dict.fromkeys(t for t, n in world.peek(K_SRCU_READERS, ()) if (t, n) in pending))

            yield Step(EngineStep.LOCK_WAIT, _SRCU_SYNC_WAIT,
                       waits_for("a kvm->srcu grace period (read sections that began before)", still_reading)(
                           lambda world: pending.isdisjoint(world.peek(K_SRCU_READERS, ()))))
        yield Step(EngineStep.LOCK, _SRCU_SYNC_DONE)


@waits_for("mmu_lock (read)", lambda world: _holders(world, readers=False))
def _no_writer(world: World) -> bool:
    return world.peek(K_MMU_LOCK, FREE_MMU_LOCK).writer is None


@waits_for("mmu_lock (write)", lambda world: _holders(world, readers=True))
def _unlocked(world: World) -> bool:
    lk = world.peek(K_MMU_LOCK, FREE_MMU_LOCK)
    return lk.writer is None and not lk.readers


def _holders(world: World, readers: bool) -> tuple[str, ...]:
    lk = world.peek(K_MMU_LOCK, FREE_MMU_LOCK)
    return ((lk.writer,) if lk.writer else ()) + (lk.readers if readers else ())
