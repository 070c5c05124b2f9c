"""Step kinds and payloads the engine yields: what a kernel engineer watches while stepping."""

from __future__ import annotations

import enum
from typing import NamedTuple

from tdxdbg.engine.spte import FROZEN_SPTE


class EngineStep(enum.Enum):
    FAULT = "fault"                    # kvm_mmu_page_fault entered for an EPT violation
    FAULTIN = "faultin"                # kvm_mmu_faultin_pfn decided pfn / exit
    ITER = "iter"                      # tdp_iter moved and read an SPTE
    SPTE_CMPXCHG = "spte_cmpxchg"      # try_cmpxchg64 on an SPTE (freeze is a cmpxchg to FROZEN_SPTE)
    SPTE_WRITE = "spte_write"          # a plain or xchg write (unfreeze, non-atomic set)
    HANDLE_CHANGED = "handle_changed"  # handle_changed_spte
    HOOK = "hook"                      # a kvm_x86_ops external-SPT hook called
    HOOK_RETURN = "hook_return"        # ... and what it returned
    SP_ALLOC = "sp_alloc"
    SP_FREE = "sp_free"
    RET_PF = "ret_pf"                  # a RET_PF_* decision
    LOCK = "lock"                      # a lock taken or released
    LOCK_WAIT = "lock_wait"            # waiting for a lock
    KVM_BUG = "kvm_bug"                # KVM_BUG_ON fired: the VM is dead
    WARN = "warn"                      # WARN_ON_ONCE fired
    EXIT = "exit"                      # a TD exit being handled
    USER_EXIT = "user_exit"            # exit to userspace (memory fault, hypercall)
    INVALIDATE = "invalidate"          # mmu_invalidate begin/end
    HOST_OP = "host_op"                # a host (userspace) action starts
    KICK = "kick"                      # vCPUs kicked out of guest mode
    ROOT = "root"                      # root allocated, invalidated, put


class IterPos(NamedTuple):
    """A tdp_iter position: the SPTE at (table, index) that maps `gfn` at `level`, and its value when read."""

    root: str          # "mirror" or "direct"
    level: int
    gfn: int
    index: int
    table: int         # pfn of the page-table page (sptep = table HPA + 8 * index)
    old_spte: int

    @property
    def sptep(self) -> int:
        return (self.table << 12) | (self.index << 3)


class SpteWrite(enum.Enum):
    """What an SPTE write is for: the engine says it, the log shows it, the checks read it.

    The freeze protocol (tdp_mmu.c: set_external_spte_present, handle_removed_pt) is FREEZE, then UNFREEZE
    (publish the new value) or RESTORE (put the old one back). The checks do not trust the label for that
    protocol: a write of FROZEN_SPTE over another value is a freeze whatever it is labelled
    (`SpteChange.freezes`), so a variant that labels its freeze otherwise is still watched."""

    SET = ""                              # install, link or split: the change itself says what it does
    FREEZE = "freeze"                     # FROZEN_SPTE written to own the SPTE across a hook or a removal
    FREEZE_SPIN = "freeze (spin)"         # handle_removed_pt(shared) found FROZEN_SPTE: spins, writes nothing
    UNFREEZE = "unfreeze"                 # the new value published over FROZEN_SPTE
    RESTORE = "restore"                   # the old value put back after the hook failed
    ZAP = "zap"                           # a present SPTE made non-present under the write lock
    ATOMIC_ZAP = "atomic zap"             # ... by a cmpxchg (mirror roots never do this: atomic-mirror-zap)
    PUBLISH_UNFROZEN = "publish (no freeze)"  # a mirror SPTE made present before its hook ran (no-freeze)
    FAST_PF = "fast pf"                   # fast_pf_fix_direct_spte: W and D set in place
    WRITE_PROTECT = "write-protect"       # dirty logging clears W
    CLEAR_DIRTY = "clear dirty"           # dirty logging clears D
    AGE = "age"                           # kvm_tdp_mmu_age_gfn_range clears A


class SpteChange(NamedTuple):
    """An SPTE write: where, what it held, what was written, and (for cmpxchg) whether it took."""

    root: str
    level: int
    gfn: int
    table: int
    index: int
    old: int
    new: int
    ok: bool = True
    what: SpteWrite = SpteWrite.SET

    @property
    def sptep(self) -> int:
        return (self.table << 12) | (self.index << 3)

    @property
    def freezes(self) -> bool:
        """This write took an SPTE that was not FROZEN_SPTE to FROZEN_SPTE, whatever it is labelled."""
        return self.ok and self.new == FROZEN_SPTE and self.old != FROZEN_SPTE


class HookCall(NamedTuple):
    name: str
    gfn: int
    level: int
    pfn: int = 0
    ret: int | None = None


class LockEvent(NamedTuple):
    lock: str
    mode: str        # "read" / "write"
    action: str      # "acquire", "release", "wait"


class FaultInfo(NamedTuple):
    """kvm_mmu_page_fault entered."""

    vcpu: int
    gpa: int
    error_code: int
    private: bool


class FaultinInfo(NamedTuple):
    """What kvm_mmu_faultin_pfn decided: a pfn, or why the fault retries or exits."""

    gfn: int
    result: str
    pfn: int | None = None
    private: bool | None = None
    max_level: int | None = None


class RetPfInfo(NamedTuple):
    vcpu: int
    ret: str
    value: int
    gfn: int
    gpa: int
    private: bool


class ExitInfo(NamedTuple):
    """A TD exit being handled by KVM: `what` says which part of the handling this is."""

    vcpu: int
    what: str
    gpa: int | None = None
    private: bool | None = None
    ret: object = None
    retries: int | None = None
    retry: int | None = None
    reenter: bool | None = None


class HandleChangedInfo(NamedTuple):
    gfn: int
    level: int
    old: int
    new: int
    shared: bool


def _payload_get(self: NamedTuple, name: str, default: object = None) -> object:
    """dict-style access, so readers treat NamedTuple and dict payloads alike."""
    return getattr(self, name, default)


for _cls in (IterPos, SpteChange, HookCall, LockEvent, FaultInfo, FaultinInfo, RetPfInfo, ExitInfo,
             HandleChangedInfo):
    _cls.get = _payload_get  # type: ignore[attr-defined]
