"""A TD vCPU: TDH.VP.ENTER, guest execution one instruction per step, and the TD exit back to the host.

Guest accesses with the shared bit set are translated by a hardware walk of the shared EPT (KVM's direct root
in host memory), setting A and D bits as the CPU does; private ones go through the TDX module's S-EPT.
TDX module: TDH.VP.ENTER samples the TD epoch at entry (see tdh_mem_track.c for its other side),
td_ept_violation.c (what an access does), td_exit_stepping.c (zero-step mitigation).
"""

from __future__ import annotations

import copy
from collections.abc import Generator
from typing import Any

import attrs

from tdxdbg.hw import insn as guest
from tdxdbg.hw.ept import (
    EPT_RWX,
    EXIT_QUAL_RWX_SHIFT,
    PAGE_SHIFT,
    PAGE_SIZE,
    PT_ENTRIES,
    Access,
    EptBit,
    ExitQual,
    ExitReason,
    entry_pfn,
    is_misconfigured,
    is_present,
    pt_index,
)
from tdxdbg.hw.memory import HostMemory
from tdxdbg.hw.tdx import epoch
from tdxdbg.hw.tdx.guest_calls import (
    EptViolation,
    TdcallResult,
    log_epf,
    tdg_mem_page_accept,
    translate_private,
    would_fault,
)
from tdxdbg.hw.tdx.leaves import Seamcall, Tdcall
from tdxdbg.hw.tdx.locks import LockMode, release, tree_lock_key, try_acquire
from tdxdbg.hw.tdx.module import TdxModule
from tdxdbg.hw.tdx.seamcall import (
    GuestAccessInfo,
    GuestInterruptInfo,
    SeamcallEntry,
    SeamcallReturn,
    TdcallReturn,
    TdEntry,
    TdExitInfo,
    TdxStep,
)
from tdxdbg.hw.tdx.status import OperandId, TdxStatus, describe
from tdxdbg.hw.tdx.td import Lifecycle, OpState, TdConfig, VcpuState, lifecycle_key, op_state_key, td_key, vcpu_key
from tdxdbg.runtime.step import Step

RUN_OP_STATES = frozenset({OpState.RUNNABLE, OpState.LIVE_EXPORT, OpState.LIVE_IMPORT})
# GLA valid + access to the final translation: what a data access that faults on its GPA reports.
DATA_ACCESS_QUAL = ExitQual.GLA_VALID | ExitQual.GLA_TRANSLATED
# tdx_ept_violation_exit_to_vmm (TDX module): "When exit is due to EPT violation, bits 12-7 of the exit
# qualification are cleared to 0" and the GPA "is similar to the VMCS guest-physical address, except that bits
# 11:0 are cleared to 0". So KVM never sees GLA_VALID or GLA_TRANSLATED for a TD.
EXIT_QUAL_CLEARED_FOR_VMM = int(ExitQual.GLA_VALID | ExitQual.GLA_TRANSLATED | ExitQual.USER | ExitQual.WRITABLE_LA
                                | ExitQual.NX_LA | ExitQual.NMI_UNBLOCKING)
# Entry-permission bit each access needs.
NEEDED = {Access.READ: EptBit.READ, Access.WRITE: EptBit.WRITE, Access.FETCH: EptBit.EXEC}


@attrs.frozen(slots=True)
class TdExit:
    """What TDH.VP.ENTER returned: RAX (the exit reason, or an error status when the TD was not entered),
    RCX (exit qualification), RDX (extended exit qualification), R8 (GPA) and the TDVMCALL registers."""

    rax: int
    reason: ExitReason | None = None
    exit_qual: int = 0
    ext_qual: int = 0
    gpa: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    entered: bool = True
    # Not a register: the full GPA of the faulting access, which the module keeps for its zero-step log
    # (td_exit_epf_stepping_log runs before bits 11:0 are cleared for R8).
    fault_gpa: int = 0
    r14: int = 0
    r15: int = 0

    @classmethod
    def of(cls, reason: ExitReason, exit_qual: int = 0, ext_qual: int = 0, gpa: int = 0, r10: int = 0,
           r11: int = 0, r12: int = 0, r13: int = 0, entered: bool = True, r14: int = 0, r15: int = 0) -> TdExit:
        """A TD exit (RAX holds the exit reason)."""
        return cls(reason, reason, exit_qual, ext_qual, gpa, r10, r11, r12, r13, entered, r14=r14, r15=r15)

    @classmethod
    def ept_exit_to_vmm(cls, reason: ExitReason, gpa: int, exit_qual: int = 0, ext_qual: int = 0,
                        entered: bool = True) -> TdExit:
        """tdx_ept_violation_exit_to_vmm / tdx_ept_misconfig_exit_to_vmm: an EPT exit as the host sees it, with
        exit-qualification bits 12:7 and GPA bits 11:0 cleared."""
        return cls(reason, reason, exit_qual & ~EXIT_QUAL_CLEARED_FOR_VMM, ext_qual, gpa & ~(PAGE_SIZE - 1),
                   entered=entered, fault_gpa=gpa)

    @property
    def error(self) -> bool:
        return self.reason is None

    def __str__(self) -> str:
        if self.reason is None:
            return f"TDH.VP.ENTER failed: {describe(self.rax)}"
        return f"TD exit {self.reason.name} gpa={self.gpa:#x}"


# What the guest program received, newest first: (result, the results before it). A persistent list, so
# recording one more result costs one tuple whatever the program's length.
Retired = tuple[Any, "Retired"] | None


@attrs.frozen(slots=True)
class GuestCpu:
    """The guest side of a TD vCPU, in the World: whether the program started or ended, the instruction it is
    at (re-executed after a TD exit until it retires), its position (the operation it is in, for programs made
    of operations, and the results of the instructions it retired since that operation began: the program
    rebuilt at that operation and replayed with them is where it was), and the host's answer to a pending
    TDG.VP.VMCALL, which the guest sees at the next TD entry."""

    started: bool = False
    halted: bool = False
    pending: Any = None
    retired: Retired = None
    op: int = 0
    vmcall: TdcallResult | None = None


IDLE_GUEST = GuestCpu()


class TdVcpu:
    """One vCPU of a TD running a guest program. Its state (epoch, association, RIP, the guest program's
    position) is in the World; the program's generator is only a cache of that position, rebuilt when the
    World says the program is elsewhere (another timeline position, a replay)."""

    def __init__(self, module: TdxModule, memory: HostMemory, tdr: int, index: int,
                 program: guest.GuestProgramFactory) -> None:
        self.module = module
        self.memory = memory
        self.world = module.world
        self.tdr = tdr
        self.index = index
        self.tdvpr = module.create_vcpu(tdr, index)
        self._program = program
        # The live guest program and the position (GuestCpu.op, GuestCpu.retired) it is at (retired compared by
        # identity).
        self._gen: guest.GuestProgram | None = None
        self._gen_op = 0
        self._gen_at: Retired = None
        self.world.set(self.rip_key, 0)
        self.world.set(self.guest_key, IDLE_GUEST)

    def rebind(self, module: TdxModule, memory: HostMemory) -> TdVcpu:
        """This vCPU over `module`'s World (a copy of the machine); the copy builds its own guest program."""
        other = copy.copy(self)
        other.module = module
        other.memory = memory
        other.world = module.world
        other._gen = None
        other._gen_op = 0
        other._gen_at = None
        return other

    # -- keys ------------------------------------------------------------------------------------------------
    @property
    def rip_key(self) -> tuple[str, int]:
        return ("vcpu.rip", self.tdvpr)

    @property
    def guest_key(self) -> tuple[str, int]:
        return ("vcpu.guest", self.tdvpr)

    @property
    def kick_key(self) -> tuple[str, int]:
        return ("vcpu.kick", self.tdvpr)

    @property
    def pi_key(self) -> tuple[str, int]:
        """The posted-interrupt descriptor (struct pi_desc): the vectors set in its PIR; PID.ON is "any"."""
        return ("vcpu.pi_desc", self.tdvpr)

    @property
    def eptp_key(self) -> tuple[str, int]:
        return ("vcpu.shared_eptp", self.tdvpr)

    # -- host-side controls ------------------------------------------------------------------------------
    @property
    def halted(self) -> bool:
        """The guest program has finished."""
        return self.world.get(self.guest_key).halted

    @property
    def in_guest(self) -> bool:
        return self.world.peek(vcpu_key(self.tdvpr)).in_guest

    def set_shared_eptp(self, root_pfn: int) -> None:
        """VMWRITE of SHARED_EPT_POINTER in the TD VMCS (KVM `tdx_load_mmu_pgd`)."""
        self.world.set(self.eptp_key, root_pfn)

    def kick(self) -> None:
        """An IPI: a vCPU in guest mode exits with EXTERNAL_INTERRUPT before its next instruction."""
        if self.world.get(vcpu_key(self.tdvpr)).in_guest:
            self.world.set(self.kick_key, True)

    def post_interrupt(self, vector: int) -> None:
        """Set `vector` in the PIR and PID.ON (pi_test_and_set_pir, pi_test_and_set_on). The CPU processes the
        descriptor when the notification vector arrives in guest mode, and the TDX module sends itself that
        notification at TD entry when PID.ON is set: either way the guest takes the interrupt before its next
        instruction (see _run_guest)."""
        pir = self.world.get(self.pi_key) or ()
        if vector not in pir:
            self.world.set(self.pi_key, tuple(sorted((*pir, vector), reverse=True)))

    def complete_tdvmcall(self, r10: int, r11: int = 0) -> None:
        """The host's answer to the pending TDG.VP.VMCALL; the guest sees it at the next TD entry."""
        g = self.world.get(self.guest_key)
        self.world.set(self.guest_key, attrs.evolve(g, vmcall=TdcallResult(0, r10=r10, r11=r11)))

    # -- TDH.VP.ENTER ------------------------------------------------------------------------------------------
    def enter(self) -> Generator[Step, None, TdExit]:
        """TDH.VP.ENTER: enter the TD, run the guest until something exits to the host, and return the exit."""
        w, m = self.world, self.module
        key = vcpu_key(self.tdvpr)
        st: VcpuState = w.get(key)
        tdr = st.tdr
        cfg: TdConfig = w.get(td_key(tdr))
        rip = w.get(self.rip_key)
        injected = m.count_call(Seamcall.TDH_VP_ENTER)
        status = injected
        if status is None:
            if w.get(lifecycle_key(tdr)) is not Lifecycle.TD_KEYS_CONFIGURED:
                status = TdxStatus.TDX_TD_KEYS_NOT_CONFIGURED
            elif w.get(op_state_key(tdr)) not in RUN_OP_STATES:
                status = TdxStatus.TDX_OP_STATE_INCORRECT
            elif not try_acquire(w, epoch.epoch_lock_key(tdr), LockMode.SHARED, w.task):
                status = TdxStatus.TDX_OPERAND_BUSY | OperandId.TD_EPOCH
        if status is not None:
            return (yield from self._not_entered(TdExit(status, entered=False), injected is not None))
        # `adjust_tlb_tracking_state`: count this vCPU in the current epoch; flush if it missed an epoch.
        td_epoch = epoch.enter(w, tdr)
        release(w, epoch.epoch_lock_key(tdr), LockMode.SHARED, w.task)
        flush = st.vcpu_epoch != td_epoch
        if st.epf_gpas:
            # `td_entry_stepping_filter`: refuse to enter while a recorded GPA would still fault.
            tree = tree_lock_key(tdr)
            if not try_acquire(w, tree, LockMode.EXCLUSIVE, w.task):
                epoch.leave(w, tdr, td_epoch)
                return (yield from self._not_entered(
                    TdExit(TdxStatus.TDX_OPERAND_BUSY | OperandId.SEPT_TREE, entered=False), False))
            # The zero-step filter: VP.ENTER holds the S-EPT tree lock exclusively across this step.
            yield Step(TdxStep.SEAMCALL, SeamcallEntry(Seamcall.TDH_VP_ENTER, self.tdvpr << 12, 0, 0, 0,
                                                       st.epf_gpas[0], 0, (("sept_tree", True),), False))
            faulting = next((g for g in st.epf_gpas if would_fault(m, cfg, g)), None)
            release(w, tree, LockMode.EXCLUSIVE, w.task)
            if faulting is not None:
                epoch.leave(w, tdr, td_epoch)
                return (yield from self._not_entered(
                    TdExit.ept_exit_to_vmm(ExitReason.EPT_VIOLATION, faulting, entered=False), False))
            # The filter leaves the log as it is; only forward progress at a TD exit resets it.
        w.set(key, attrs.evolve(st, associated=True, in_guest=True, vcpu_epoch=td_epoch, entry_rip=rip))
        yield Step(TdxStep.TD_ENTRY, TdEntry(self.index, td_epoch, flush, rip))
        try:
            g = w.get(self.guest_key)
            if g.vmcall is not None:
                # The TDVMCALL's result reaches the guest program, which may panic on it (a failed MapGPA).
                self._complete(attrs.evolve(g, vmcall=None), g.vmcall)
            exit = yield from self._run_guest(cfg)
        except Exception:
            # The guest program raised (a guest panic, e.g. an unexpected #VE): the vCPU's thread ends here, out
            # of the TD. The model departs from Linux, whose panic() spins in the guest (an IPI still forces a TD
            # exit and KVM re-enters it): ending the thread instead, the vCPU must still leave the TD as at any
            # TD exit (its epoch, guest mode, a pending kick), or a TDH.MEM.TRACK would count it in its epoch
            # and a kick (kvm_make_all_cpus_request) would wait for it forever. Not `finally`: a generator
            # dropped unfinished (a replay, a fork) must not write the World.
            self._leave_td(key, tdr)
            raise
        # TD exit: leave the epoch this vCPU entered in.
        st = w.get(key)
        epoch.leave(w, tdr, st.vcpu_epoch)
        if exit.reason is ExitReason.EPT_VIOLATION and not exit.gpa & cfg.shared_bit:
            st = log_epf(m, self.tdvpr, exit.fault_gpa, w.get(self.rip_key))
        elif (st.epf_count or st.epf_gpas) and w.get(self.rip_key) != st.entry_rip:
            # `vmexit_stepping_filter`: forward progress at any TD exit resets the zero-step log.
            st = attrs.evolve(st, epf_count=0, epf_gpas=())
        w.set(key, attrs.evolve(st, in_guest=False))
        # A kick that arrived after the guest's last instruction is taken by the host on this exit, not at the
        # next entry.
        w.delete(self.kick_key)
        yield Step(TdxStep.TD_EXIT, self._exit_payload(exit))
        return exit

    def _leave_td(self, key: Any, tdr: int) -> None:
        """The vCPU is out of the TD: out of the epoch it entered in, not in guest mode, no kick pending."""
        w = self.world
        st = w.get(key)
        epoch.leave(w, tdr, st.vcpu_epoch)
        w.set(key, attrs.evolve(st, in_guest=False))
        w.delete(self.kick_key)

    def _not_entered(self, exit: TdExit, injected: bool) -> Generator[Step, None, TdExit]:
        """VP.ENTER returned without entering: an error status (a SEAMCALL return), or the zero-step filter's
        synthesized EPT violation (a TD exit that never entered)."""
        if exit.error:
            yield Step(TdxStep.SEAMCALL_RETURN, SeamcallReturn(Seamcall.TDH_VP_ENTER, exit.rax, 0, 0, 0, 0, 0,
                                                               injected))
        else:
            yield Step(TdxStep.TD_EXIT, self._exit_payload(exit, injected))
        return exit

    def _exit_payload(self, exit: TdExit, injected: bool = False) -> TdExitInfo:
        return TdExitInfo(Seamcall.TDH_VP_ENTER, self.index, exit.rax, exit.reason.name if exit.reason else None,
                          describe(exit.rax) if exit.error else "TDX_SUCCESS", exit.error, exit.gpa,
                          exit.exit_qual, exit.ext_qual, exit.entered, injected)

    # -- guest execution --------------------------------------------------------------------------------------
    def _program_at(self, g: GuestCpu) -> guest.GuestProgram:
        """The guest program positioned at `g`: the live one when it is there, else a new one started at `g`'s
        operation and sent every result `g` records since (the program is deterministic in what it receives)."""
        gen = self._gen
        if gen is not None and self._gen_at is g.retired and self._gen_op == g.op:
            return gen
        gen = self._program(g.op) if g.op else self._program()
        insn = next(gen)
        results = []
        node = g.retired
        while node is not None:
            results.append(node[0])
            node = node[1]
        for result in reversed(results):
            insn = gen.send(result)
        if insn != g.pending:
            raise RuntimeError(f"guest program of vCPU {self.index} replayed to {insn}, expected {g.pending}")
        self._gen, self._gen_op, self._gen_at = gen, g.op, g.retired
        return gen

    def _current(self) -> guest.Insn | None:
        w = self.world
        g: GuestCpu = w.get(self.guest_key)
        if g.halted:
            return None
        if not g.started:
            gen = self._program()
            try:
                insn = next(gen)
            except StopIteration:
                w.set(self.guest_key, attrs.evolve(g, started=True, halted=True))
                return None
            op = getattr(gen, "op", 0)
            self._gen, self._gen_op, self._gen_at = gen, op, None
            w.set(self.guest_key, attrs.evolve(g, started=True, pending=insn, op=op))
            return insn
        return g.pending

    def _complete(self, g: GuestCpu | None, result: Any) -> None:
        """The pending instruction retired with `result`: RIP moves and the program gets the result. `g` is the
        vCPU's GuestCpu to start from (None: as in the World)."""
        w = self.world
        if g is None:
            g = w.get(self.guest_key)
        w.set(self.rip_key, w.get(self.rip_key) + 1)
        gen = self._program_at(g)
        retired = (result, g.retired)
        try:
            insn = gen.send(result)
        except StopIteration:
            self._gen = None
            w.set(self.guest_key, attrs.evolve(g, pending=None, halted=True, retired=retired))
            return
        op = getattr(gen, "op", 0)
        if op != g.op:
            retired = None  # a new operation began: the position restarts there
        self._gen_op, self._gen_at = op, retired
        w.set(self.guest_key, attrs.evolve(g, pending=insn, retired=retired, op=op))

    def _run_guest(self, cfg: TdConfig) -> Generator[Step, None, TdExit]:
        w = self.world
        while True:
            if w.get(self.kick_key):
                w.delete(self.kick_key)
                return TdExit.of(ExitReason.EXTERNAL_INTERRUPT)
            pir = w.get(self.pi_key)
            if pir and not w.get(self.guest_key).halted:
                # Posted-interrupt processing: PIR -> vIRR, PID.ON cleared, and the guest takes the vectors at
                # this instruction boundary. Model: the guest's interrupt handlers are not run (no instructions
                # retired); each returns to the interrupted instruction, which then executes as it would have.
                w.delete(self.pi_key)
                yield Step(TdxStep.GUEST_INTERRUPT, GuestInterruptInfo(self.index, pir, w.get(self.rip_key)))
                continue
            insn = self._current()
            if insn is None:
                return TdExit.of(ExitReason.HLT)
            if isinstance(insn, guest.MemAccess):
                outcome = self._access(cfg, insn)
                shared = bool(insn.gpa & cfg.shared_bit)
                if isinstance(outcome, TdExit):
                    yield Step(TdxStep.GUEST_ACCESS, GuestAccessInfo(self.index, insn.access.value, insn.gpa,
                                                                     shared, exit="EPT_VIOLATION"))
                    return outcome
                yield Step(TdxStep.GUEST_ACCESS, GuestAccessInfo(
                    self.index, insn.access.value, insn.gpa, shared,
                    outcome if isinstance(outcome, int) else None, None,
                    isinstance(outcome, guest.VirtualizationException)))
                self._complete(None, outcome)
            elif insn.leaf is Tdcall.TDG_MEM_PAGE_ACCEPT:
                result = yield from tdg_mem_page_accept(self.module, self.tdvpr, insn.rcx)
                if isinstance(result, EptViolation):
                    return TdExit.ept_exit_to_vmm(ExitReason.EPT_VIOLATION, result.gpa, result.exit_qual,
                                                  result.ext_qual)
                self._complete(None, result)
            elif insn.leaf is Tdcall.TDG_VP_VMCALL:
                # Exits to the host with the call's registers; RIP moves when the host completes it.
                return TdExit.of(ExitReason.TDCALL, r10=insn.r10, r11=insn.r11, r12=insn.r12, r13=insn.r13,
                                 r14=insn.r14, r15=insn.r15)
            elif insn.leaf is Tdcall.TDG_VP_INFO:
                yield Step(TdxStep.TDCALL_RETURN, TdcallReturn(insn.leaf, 0, 0, 0, "TDX_SUCCESS", False))
                self._complete(None, TdcallResult(0, rcx=int(cfg.gpaw)))
            else:
                yield Step(TdxStep.TDCALL_RETURN, TdcallReturn(insn.leaf, 0, 0, TdxStatus.TDX_OPERAND_INVALID,
                                                               "TDX_OPERAND_INVALID|RAX", False))
                self._complete(None, TdcallResult(TdxStatus.TDX_OPERAND_INVALID | OperandId.RAX))

    def _access(self, cfg: TdConfig, insn: guest.MemAccess) -> int | TdExit | guest.VirtualizationException | None:
        """Translate and perform one access. Returns the value read (None for a write), a TD exit, or a #VE."""
        gpa = insn.gpa
        qual = insn.access.exit_qual | DATA_ACCESS_QUAL
        if gpa & cfg.shared_bit:
            res = self._walk_shared(cfg, gpa, insn.access, qual)
            if isinstance(res, int):
                return self._data(res, gpa, insn)
            return res
        t = translate_private(self.module, cfg, gpa, qual)
        if t.pfn is not None:
            return self._data(t.pfn, gpa, insn)
        if t.ve:
            return guest.VirtualizationException(gpa, int(qual), pending=True)
        assert t.violation is not None
        v = t.violation
        exit_qual = v.exit_qual if v.ext_qual else int(qual)
        return TdExit.ept_exit_to_vmm(ExitReason.EPT_VIOLATION, v.gpa, exit_qual, v.ext_qual)

    def _data(self, pfn: int, gpa: int, insn: guest.MemAccess) -> int | None:
        offset = gpa & (PAGE_SIZE - 1)
        if insn.access is Access.WRITE:
            self.memory.write_word(pfn, offset, insn.value)
            return None
        return self.memory.read_word(pfn, offset)

    def _walk_shared(self, cfg: TdConfig, gpa: int, access: Access,
                     qual: ExitQual) -> int | TdExit | guest.VirtualizationException:
        """The CPU's walk of the shared EPT: A bits on every entry used, D on the leaf of a write.
        A non-present entry exits to the host when SVE is set and becomes a #VE in the guest when it is clear.
        `qual` is the access's exit qualification."""
        mem = self.memory
        table = self.world.get(self.eptp_key)
        if not table:
            return TdExit.ept_exit_to_vmm(ExitReason.EPT_VIOLATION, gpa, int(qual))
        level = int(cfg.root_level)
        perms = int(EPT_RWX)
        while True:
            idx = pt_index(gpa, level)
            e = mem.read_entry(table, idx)
            perms &= e
            if not is_present(e):
                if e & EptBit.SUPPRESS_VE:
                    return TdExit.ept_exit_to_vmm(ExitReason.EPT_VIOLATION, gpa, int(qual))
                # The #VE information area reports the full faulting GPA (the guest's MMIO emulation uses it).
                return guest.VirtualizationException(gpa, int(qual))
            leaf = level == 0 or bool(e & EptBit.PAGE_SIZE)
            if is_misconfigured(e, level, leaf):
                return TdExit.ept_exit_to_vmm(ExitReason.EPT_MISCONFIG, gpa)
            if leaf and not perms & NEEDED[access]:
                return TdExit.ept_exit_to_vmm(ExitReason.EPT_VIOLATION, gpa, int(qual) | (perms << EXIT_QUAL_RWX_SHIFT))
            # Plain ints in the World: `int | EptBit` would store an EptBit pseudo-member.
            new = e | int(EptBit.ACCESSED)
            if leaf and access is Access.WRITE:
                new |= int(EptBit.DIRTY)
            if new != e:
                mem.write_entry(table, idx, new)
            if leaf:
                return entry_pfn(e) + ((gpa >> PAGE_SHIFT) & (PT_ENTRIES ** level - 1))
            table, level = entry_pfn(e), level - 1
