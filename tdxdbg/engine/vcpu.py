"""struct kvm_vcpu for a TD and the vCPU thread: KVM_RUN (enter the TD, take the exit, handle it, re-enter),
with the userspace (VMM) half that answers exits to userspace, as QEMU's vCPU thread would."""

from __future__ import annotations

import copy
from typing import Any

from tdxdbg.engine.kvm import (
    K_DESTROYING,
    K_TD_STATE,
    K_VM_DEAD,
    K_WAIT_FOR_SEPT_ZAP,
    Gen,
    RetPf,
    TdState,
    signal_key,
)
from tdxdbg.engine.mmu import EFAULT, EINTR, EIO
from tdxdbg.engine.steps import EngineStep, ExitInfo
from tdxdbg.hw.cpu import TdExit, TdVcpu
from tdxdbg.hw.ept import ExitReason
from tdxdbg.hw.insn import GuestProgramFactory
from tdxdbg.hw.tdx.leaves import Tdvmcall, TdvmcallStatus
from tdxdbg.runtime.step import Step

# TDX_MAP_GPA_MAX_LEN: KVM exits to userspace for at most 2 MiB of a MapGPA at a time.
TDX_MAP_GPA_MAX_LEN = 2 << 20
KVM_HC_MAP_GPA_RANGE = 12
KVM_MAP_GPA_RANGE_ENCRYPTED = 1 << 4
KVM_MAP_GPA_RANGE_DECRYPTED = 0


def mmio_device_key(gpa: int) -> tuple[str, int]:
    """The value of the VMM's emulated device register at `gpa` (the model's KVM_EXIT_MMIO answerer)."""
    return ("vmm.mmio", gpa)


class _VcpuField:
    """A field of struct kvm_vcpu that crosses KVM_RUN calls, kept in the World under ("kvm.vcpu.NAME", index):
    a vCPU task recreated at the head of its run loop finds it there. Absent means the default."""

    __slots__ = ("default", "prefix")

    def __init__(self, default: Any = None) -> None:
        self.default = default
        self.prefix = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.prefix = f"kvm.vcpu.{name}"

    def __get__(self, vcpu: Any, owner: type | None = None) -> Any:
        return vcpu.world.get((self.prefix, vcpu.index), self.default)

    def __set__(self, vcpu: Any, value: Any) -> None:
        if value == self.default:
            vcpu.world.delete((self.prefix, vcpu.index))
        else:
            vcpu.world.set((self.prefix, vcpu.index), value)


class KvmVcpu:
    """One vCPU: the emulated TD vCPU plus what KVM keeps for it (its roots, exits userspace must answer). The
    object holds configuration only; every field is in the World."""

    # Local-retry count of the last EPT violation (tdx_handle_ept_violation's loop).
    fault_retries = _VcpuField(0)
    # KVM_EXIT_MEMORY_FAULT for userspace: (gpa, size, private).
    memory_fault = _VcpuField(None)
    # A MapGPA in progress (vcpu->arch.map_gpa_next, map_gpa_end) and the KVM_EXIT_HYPERCALL userspace is
    # answering (nr, gpa, npages, attributes).
    map_gpa = _VcpuField((0, 0))
    hypercall = _VcpuField(None)
    # KVM_EXIT_MMIO for userspace (run->mmio): (gpa, len, is_write, data); data is the VMM's answer to a read.
    mmio = _VcpuField(None)
    # vcpu->arch.complete_userspace_io is tdx_complete_mmio_read (a read's answer goes to R11 at the next KVM_RUN).
    mmio_read_pending = _VcpuField(False)
    # run->exit_reason == KVM_EXIT_INTR: KVM_RUN returned -EINTR for a pending signal (kvm_handle_signal_exit).
    exit_intr = _VcpuField(False)

    def __init__(self, kvm: Any, index: int, program: GuestProgramFactory) -> None:
        self.kvm = kvm
        self.world = kvm.world
        self.index = index
        self.name = f"vcpu{index}"
        self.hw = TdVcpu(kvm.tdx_module, kvm.memory, kvm.tdr, index, program)
        self.stopped_key = ("kvm.vcpu_stopped", index)
        # The VMM issued its first KVM_RUN: the thread's set-up is behind it.
        self.running_key = ("kvm.vcpu_running", index)
        kvm.world.set(self.stopped_key, False)

    def rebind(self, kvm: Any) -> KvmVcpu:
        """This vCPU in `kvm`, a copy of the VM over another World (see vm.clone_vm)."""
        other = copy.copy(self)
        other.kvm = kvm
        other.world = kvm.world
        other.hw = self.hw.rebind(kvm.tdx_module, kvm.memory)
        return other

    def root_key(self, kind: str) -> tuple[str, int, str]:
        return ("kvm.vcpu_root", self.index, kind)

    @property
    def mirror_root(self) -> int:
        return self.world.get(self.root_key("mirror"), 0)

    @property
    def direct_root(self) -> int:
        return self.world.get(self.root_key("direct"), 0)

    def set_root(self, kind: str, root: int) -> None:
        self.world.set(self.root_key(kind), root)


class VcpuOps:
    """The vCPU thread. Mixed into the VM class so variants can override exit handling."""

    # Override points a patch typically changes: kvm_arch_vcpu_ioctl_run (entry and wait_for_sept_zap),
    # tdx_handle_exit, handle_tdvmcall, MapGPA (tdx_map_gpa, _tdx_map_gpa for the kernel's __tdx_map_gpa,
    # tdx_complete_vmcall_map_gpa), and the VMM's half (vmm_handle_exit, vmm_convert).

    world: Any
    vcpus: list[KvmVcpu]

    def create_vcpu(self, program: GuestProgramFactory) -> KvmVcpu:
        vcpu = KvmVcpu(self, len(self.vcpus), program)
        self.vcpus.append(vcpu)
        return vcpu

    def vcpu_thread(self, vcpu: KvmVcpu) -> Gen:
        """Userspace's vCPU thread: KVM_RUN until the guest program ends, the VM dies or is destroyed.

        Also the task's entry when it is recreated from the World (to rebuild locals by replay): at the loop
        head nothing is carried but `stop`, which is None there, and the set-up is skipped once done."""
        w = self.world
        try:
            if not w.get(vcpu.running_key):
                if w.get(K_TD_STATE) is not TdState.TD_STATE_RUNNABLE:
                    # The VMM starts vCPU threads only once the TD is finalized (tdx_vcpu_pre_run refuses KVM_RUN
                    # before that): a build-time scenario's vCPUs wait for KVM_TDX_FINALIZE_VM (or teardown).
                    yield Step(EngineStep.EXIT,
                               ExitInfo(vcpu=vcpu.index, what="VMM: waiting for KVM_TDX_FINALIZE_VM"),
                               _td_runnable_or_destroying)
                yield from self.kvm_mmu_load(vcpu)
                w.set(vcpu.running_key, True)
            stop = None
            while stop is None:
                w.quiescent()
                stop = yield from self.vmm_vcpu_run(vcpu)
            w.set(vcpu.stopped_key, True)
            return stop
        except Exception:
            # Not `finally`: a generator dropped unfinished (a replay, a fork) must not write the World.
            w.set(vcpu.stopped_key, True)
            raise

    def vmm_vcpu_run(self, vcpu: KvmVcpu) -> Gen:
        """One KVM_RUN and what the VMM does with its result: None to call KVM_RUN again, else why it stops."""
        r = yield from self.kvm_arch_vcpu_ioctl_run(vcpu)
        # Back in userspace: the thread's pending signal is delivered now (QEMU's SIG_IPI handler), and after
        # KVM_EXIT_INTR the VMM calls KVM_RUN again (kvm_cpu_exec: -EINTR is EXCP_INTERRUPT).
        self.world.delete(signal_key(vcpu.name))
        if r == EINTR and vcpu.exit_intr:
            vcpu.exit_intr = False
            return None
        if r == 0 and vcpu.hw.halted:
            return "halted"
        if r == EFAULT and vcpu.memory_fault is not None:
            r = 0  # KVM_EXIT_MEMORY_FAULT: -EFAULT with an exit reason userspace acts on
        if r < 0:
            return f"KVM_RUN: {r}"
        return (yield from self.vmm_handle_exit(vcpu)) or None

    def kvm_arch_vcpu_ioctl_run(self, vcpu: KvmVcpu) -> Gen:
        """KVM_RUN (vcpu_run's loop): enter and handle exits in the kernel until one needs userspace (0) or
        fails (< 0). `r` is 1 at every loop head, so a vCPU recreated there carries nothing else."""
        if vcpu.mmio_read_pending:
            # kvm_arch_vcpu_ioctl_run: vcpu->arch.complete_userspace_io first.
            yield from self.tdx_complete_mmio_read(vcpu)
        r = 1
        while r > 0:
            self.world.quiescent()
            r = yield from self.vcpu_enter_guest(vcpu)
            if r > 0 and self.signal_pending():
                # vcpu_run: __xfer_to_guest_mode_work_pending() -> kvm_xfer_to_guest_mode_handle_work.
                r = yield from self.kvm_handle_signal_exit(vcpu)
        return r

    def vcpu_enter_guest(self, vcpu: KvmVcpu) -> Gen:
        """One entry into the TD and the handling of its exit: 1 to re-enter, 0 for userspace, < 0 on error.

        kvm->srcu is held for reading except while in the guest (kvm_arch_vcpu_ioctl_run takes it,
        vcpu_enter_guest drops it around the vendor run and retakes it after the exit), so a memslot update's
        synchronize_srcu waits for the exit being handled, faults included. The model also drops it at the end
        of each pass, where nothing runs before the next pass retakes it, so the loop head holds nothing."""
        w = self.world
        self.srcu_read_lock()
        if w.get(K_VM_DEAD):
            yield Step(EngineStep.EXIT, ExitInfo(vcpu=vcpu.index, what="VM is dead: KVM_RUN returns -EIO"))
            r = -5
        elif w.get(K_DESTROYING):
            r = -4
        elif vcpu.hw.halted:
            r = 0
        else:
            yield from self.kvm_mmu_load(vcpu)
            self.srcu_read_unlock()
            if self.signal_pending():
                # kvm_vcpu_exit_request: xfer_to_guest_mode_work_pending() cancels the entry; vcpu_run then
                # exits to userspace for the signal.
                yield Step(EngineStep.EXIT, ExitInfo(vcpu=vcpu.index, what="signal pending: entry cancelled"))
                return 1
            if w.get(K_WAIT_FOR_SEPT_ZAP):
                # tdx_vcpu_run: stay out of the TD while a zap retries with vCPUs kept out.
                yield Step(EngineStep.EXIT, ExitInfo(vcpu=vcpu.index, what="wait_for_sept_zap: not entering"),
                           lambda world: not world.peek(K_WAIT_FOR_SEPT_ZAP))
                return 1
            exit = yield from vcpu.hw.enter()
            self.srcu_read_lock()
            r = yield from self.tdx_handle_exit(vcpu, exit)
        self.srcu_read_unlock()
        return r

    def tdx_handle_exit(self, vcpu: KvmVcpu, exit: TdExit) -> Gen:
        """Dispatch a TD exit. Returns 1 to re-enter, 0 to go to userspace, < 0 on error."""
        if exit.error:
            # TDH.VP.ENTER BUSY (S-EPT tree or epoch): exit reason -1, fastpath "handled": just re-enter.
            yield Step(EngineStep.EXIT, ExitInfo(vcpu=vcpu.index, what=f"VP.ENTER failed: {exit}", reenter=True))
            return 1
        reason = exit.reason
        if reason is ExitReason.EPT_VIOLATION:
            vcpu.fault_retries = 0
            ret = yield from self.tdx_handle_ept_violation(vcpu, exit)
            yield Step(EngineStep.EXIT, ExitInfo(
                vcpu=vcpu.index, what="EPT violation handled", gpa=exit.gpa,
                private=self.tdx_is_private_gpa(exit.gpa),
                ret=ret.name if isinstance(ret, RetPf) else ret, retries=vcpu.fault_retries))
            if isinstance(ret, RetPf):
                return 1
            return ret
        if reason is ExitReason.EPT_MISCONFIG:
            # tdx_handle_exit: "if (unlikely(vp_enter_ret == EXIT_REASON_EPT_MISCONFIG)) KVM_BUG_ON": KVM never
            # builds a misconfigured shared-EPT entry for a TD (its MMIO SPTEs are #VE-able, not misconfigs).
            yield from self.kvm_bug_on(True, f"EPT misconfiguration at {exit.gpa:#x}")
            return EIO
        if reason is ExitReason.TDCALL:
            ret = yield from self.handle_tdvmcall(vcpu, exit)
            return ret
        if reason is ExitReason.HLT:
            return 0
        return 1

    # -- TDG.VP.VMCALL ----------------------------------------------------------------------------------------
    def handle_tdvmcall(self, vcpu: KvmVcpu, exit: TdExit) -> Gen:
        if exit.r11 == Tdvmcall.MAP_GPA:
            ret = yield from self.tdx_map_gpa(vcpu, exit.r12, exit.r13)
            return ret
        if exit.r11 == Tdvmcall.EPT_VIOLATION:
            ret = yield from self.tdx_emulate_mmio(vcpu, exit)
            return ret
        vcpu.hw.complete_tdvmcall(TdvmcallStatus.SUBFUNC_UNSUPPORTED)
        yield Step(EngineStep.EXIT, ExitInfo(vcpu=vcpu.index, what=f"TDVMCALL {exit.r11:#x} unsupported"))
        return 1

    def tdx_emulate_mmio(self, vcpu: KvmVcpu, exit: TdExit) -> Gen:
        """TDVMCALL<#VE.RequestMMIO> (tdx_emulate_mmio): size R12, direction R13, GPA R14, value R15 for a write.
        Size 1/2/4/8, direction 0/1, the access within one page, and no valid memslot at the GPA (shared bit
        stripped), else TDVMCALL_STATUS_INVALID_OPERAND. No in-kernel device (KVM_FAST_MMIO_BUS, KVM_MMIO_BUS,
        the local APIC) answers in the model, so it exits to userspace with KVM_EXIT_MMIO; a read completes at
        the next KVM_RUN (tdx_complete_mmio_read)."""
        size, write, gpa = exit.r12, exit.r13, exit.r14
        val = exit.r15 if write else 0
        gpa &= ~self.spec.gpaw.shared_bit
        slot = self.kvm_vcpu_gfn_to_memslot(gpa >> 12)
        if (size not in (1, 2, 4, 8) or write not in (0, 1) or ((gpa + size - 1) ^ gpa) & ~0xFFF
                or (slot is not None and not slot.invalid)):
            vcpu.hw.complete_tdvmcall(TdvmcallStatus.OPERAND_INVALID)
            yield Step(EngineStep.EXIT, ExitInfo(vcpu=vcpu.index, what="MMIO: invalid operand", gpa=gpa))
            return 1
        vcpu.mmio = (gpa, size, bool(write), val)
        vcpu.mmio_read_pending = not write
        if write:
            # No complete_userspace_io for a write: the guest gets back R10 as it was at the exit, 0 (SUCCESS).
            vcpu.hw.complete_tdvmcall(TdvmcallStatus.SUCCESS)
        yield Step(EngineStep.USER_EXIT, {"vcpu": vcpu.index, "reason": "KVM_EXIT_MMIO", "gpa": gpa, "len": size,
                                          "is_write": bool(write), "data": val})
        return 0

    def tdx_complete_mmio_read(self, vcpu: KvmVcpu) -> Gen:
        """complete_userspace_io after a KVM_EXIT_MMIO read: the data userspace put in run->mmio goes to the
        guest's R11 (tdvmcall_set_return_val), R10 = SUCCESS."""
        gpa, _size, _write, data = vcpu.mmio
        vcpu.mmio = None
        vcpu.mmio_read_pending = False
        vcpu.hw.complete_tdvmcall(TdvmcallStatus.SUCCESS, data)
        yield Step(EngineStep.EXIT, ExitInfo(vcpu=vcpu.index, what=f"MMIO read complete: {data:#x}", gpa=gpa))
        return 1

    def tdx_map_gpa(self, vcpu: KvmVcpu, gpa: int, size: int) -> Gen:
        """Validate, then forward to userspace in chunks of at most 2 MiB (KVM_EXIT_HYPERCALL)."""
        gpaw_limit = 1 << int(self.spec.gpaw)
        shared_bit = self.spec.gpaw.shared_bit
        if (not size or gpa + size > gpaw_limit or (gpa & shared_bit) != ((gpa + size - 1) & shared_bit)):
            vcpu.hw.complete_tdvmcall(TdvmcallStatus.OPERAND_INVALID, gpa)
            yield Step(EngineStep.EXIT, ExitInfo(vcpu=vcpu.index, what="MapGPA: invalid operand", gpa=gpa))
            return 1
        if gpa % 4096 or size % 4096:
            vcpu.hw.complete_tdvmcall(TdvmcallStatus.ALIGN_ERROR, gpa)
            yield Step(EngineStep.EXIT, ExitInfo(vcpu=vcpu.index, what="MapGPA: misaligned", gpa=gpa))
            return 1
        vcpu.map_gpa = (gpa, gpa + size)
        yield from self._tdx_map_gpa(vcpu)
        return 0

    def _tdx_map_gpa(self, vcpu: KvmVcpu) -> Gen:
        """__tdx_map_gpa: exit to userspace (KVM_EXIT_HYPERCALL) for the next chunk of the MapGPA in progress.

        One leading underscore, not the kernel's two: Python mangles `__name` inside a class body to
        `_VcpuOps__name`, so a variant defining `__tdx_map_gpa` would never be called. Engine methods a variant
        may override are never name-mangled (as `_tdp_mmu_set_spte_atomic` for `__tdp_mmu_set_spte_atomic`)."""
        nxt, end = vcpu.map_gpa
        size = min(end - nxt, TDX_MAP_GPA_MAX_LEN)
        private = not nxt & self.spec.gpaw.shared_bit
        vcpu.hypercall = (KVM_HC_MAP_GPA_RANGE, nxt & ~self.spec.gpaw.shared_bit, size >> 12,
                          KVM_MAP_GPA_RANGE_ENCRYPTED if private else KVM_MAP_GPA_RANGE_DECRYPTED)
        yield Step(EngineStep.USER_EXIT, {"vcpu": vcpu.index, "reason": "KVM_EXIT_HYPERCALL",
                                          "nr": KVM_HC_MAP_GPA_RANGE, "gpa": vcpu.hypercall[1],
                                          "npages": size >> 12, "private": private})

    def tdx_complete_vmcall_map_gpa(self, vcpu: KvmVcpu, ret: int) -> Gen:
        """Userspace answered one chunk: next chunk, done, or RETRY with R11 = where to resume."""
        nxt, end = vcpu.map_gpa
        if ret:
            vcpu.hw.complete_tdvmcall(TdvmcallStatus.RETRY if ret == -11 else TdvmcallStatus.OPERAND_INVALID, nxt)
            return 1
        # The chunk just answered was min(end - nxt, TDX_MAP_GPA_MAX_LEN) long (userspace already cleared
        # vcpu.hypercall); the kernel likewise advances map_gpa_next by TDX_MAP_GPA_MAX_LEN.
        nxt = min(nxt + TDX_MAP_GPA_MAX_LEN, end)
        vcpu.map_gpa = (nxt, end)
        if nxt >= end:
            vcpu.hw.complete_tdvmcall(TdvmcallStatus.SUCCESS)
            yield Step(EngineStep.EXIT, ExitInfo(vcpu=vcpu.index, what="MapGPA complete"))
            return 1
        if self.kvm_vcpu_has_events(vcpu):
            vcpu.hw.complete_tdvmcall(TdvmcallStatus.RETRY, nxt)
            return 1
        yield from self._tdx_map_gpa(vcpu)
        return 0

    # -- the VMM (userspace) half of the vCPU thread ---------------------------------------------------------
    def vmm_handle_exit(self, vcpu: KvmVcpu) -> Gen:
        """What QEMU does with an exit to userspace before the next KVM_RUN. Returns a reason to stop, or None."""
        if vcpu.memory_fault is not None:
            gpa, size, private = vcpu.memory_fault
            vcpu.memory_fault = None
            slot = self.kvm_vcpu_gfn_to_memslot(gpa >> 12)
            if private and (slot is None or not slot.guest_memfd):
                # QEMU's kvm_convert_memory fails for memory without a guest_memfd (no memory region at all,
                # e.g. a deleted memslot): KVM_RUN's caller stops the VM instead of converting forever.
                return f"KVM_EXIT_MEMORY_FAULT: cannot convert {gpa:#x} to private"
            # An implicit conversion: make the range what the guest accessed it as.
            yield from self.vmm_convert(gpa >> 12, (gpa + size) >> 12, private)
            return None
        if vcpu.mmio is not None:
            gpa, size, write, data = vcpu.mmio
            key = mmio_device_key(gpa)
            if write:
                # The model's device: a bank of 8-byte registers that reads back what was written (0 at first).
                self.world.set(key, data)
                vcpu.mmio = None
            else:
                vcpu.mmio = (gpa, size, write, self.world.get(key, 0))
            shown = data if write else self.world.get(key, 0)
            yield Step(EngineStep.EXIT, ExitInfo(
                vcpu=vcpu.index, what=f"VMM: MMIO {'write' if write else 'read'} {gpa:#x} = {shown:#x}", gpa=gpa))
            return None
        hc = vcpu.hypercall
        if hc is not None:
            _nr, gpa, npages, attrs = hc
            yield from self.vmm_convert(gpa >> 12, (gpa >> 12) + npages, bool(attrs & KVM_MAP_GPA_RANGE_ENCRYPTED))
            vcpu.hypercall = None
            r = yield from self.tdx_complete_vmcall_map_gpa(vcpu, 0)
            if r == 0 and vcpu.hypercall is not None:
                return (yield from self.vmm_handle_exit(vcpu))
            return None
        return "stopped"

    def vmm_convert(self, start: int, end: int, private: bool) -> Gen:
        """QEMU's kvm_convert_memory: flip the attributes, then discard the backing that is no longer used."""
        yield from self.kvm_vm_set_mem_attributes(start, end, private)
        if private:
            yield from self.kvm_mmu_notifier_invalidate_range_start(start, end)
            self.discard_shared_backing(start, end)
            yield from self.kvm_mmu_notifier_invalidate_range_end(start, end)
        else:
            yield from self.kvm_gmem_punch_hole(start, end)


def _td_runnable_or_destroying(world: Any) -> bool:
    return world.peek(K_TD_STATE) is TdState.TD_STATE_RUNNABLE or bool(world.peek(K_DESTROYING))
