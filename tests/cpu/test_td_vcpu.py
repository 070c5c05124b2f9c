"""The TD vCPU: the shared-EPT hardware walk, private accesses through the S-EPT, epochs at entry and exit,
kicks, TDG.VP.VMCALL and zero-step mitigation (TDX module tdh_mem_track.c, td_ept_violation.c, td_exit_stepping.c)."""

from __future__ import annotations

import enum

import pytest

from tdxdbg.hw import insn
from tdxdbg.hw.cpu import TdVcpu
from tdxdbg.hw.ept import EptBit, ExitReason, pt_index
from tdxdbg.hw.guest import GuestPanic
from tdxdbg.hw.insn import TdcallInsn, VirtualizationException
from tdxdbg.hw.machine import Machine, drive
from tdxdbg.hw.tdx.epoch import get_epoch
from tdxdbg.hw.tdx.guest_calls import TdcallResult
from tdxdbg.hw.tdx.leaves import Seamcall, Tdcall
from tdxdbg.hw.tdx.seamcall import TdxStep
from tdxdbg.hw.tdx.td import TdAttr, vcpu_key
from tdxdbg.runtime import Runtime, Step, StopReason, Task
from tdxdbg.runtime.scheduler import ScheduleSpec

SHARED = 1 << 47
R, W, X = int(EptBit.READ), int(EptBit.WRITE), int(EptBit.EXEC)
RWX = R | W | X
PS = int(EptBit.PAGE_SIZE)
A, D = 1 << 8, 1 << 9
SVE = 1 << 63
# Data access to the final translation: GLA valid (bit 7) and GLA translated (bit 8).
QUAL_READ = 0x181
QUAL_WRITE = 0x182
# ... as the host sees them: tdx_ept_violation_exit_to_vmm clears exit-qualification bits 12:7 (and GPA bits 11:0).
VMM_QUAL_READ = 0x1
VMM_QUAL_WRITE = 0x2
RWX_ALLOWED = 0x38  # exit qualification bits 3-5

PRIV = 0x8000_0000  # a private GPA inside the 2M region the helpers build S-EPT tables for


class Host(enum.Enum):
    PREPARE = "prepare"
    KICKED = "kicked"


# -- harness --------------------------------------------------------------------------------------------------
def new_td(attributes: TdAttr = TdAttr.SEPT_VE_DISABLE) -> tuple[Machine, int]:
    m = Machine()
    return m, m.tdx.create_td(attributes=attributes)


def seamcall(m: Machine, leaf: Seamcall, **regs):
    res = drive(m.tdx.seamcall(leaf, **regs), m.world)
    assert res.rax == 0, res
    return res


def add_sept_tables(m: Machine, tdr: int, gpa: int) -> None:
    """TDH.MEM.SEPT.ADD at levels 3, 2, 1 so that 4K pages of the 2M region around `gpa` can be AUGed."""
    for level in (3, 2, 1):
        aligned = gpa & ~((1 << (12 + 9 * level)) - 1)
        seamcall(m, Seamcall.TDH_MEM_SEPT_ADD, rcx=aligned | level, rdx=tdr << 12,
                 r8=m.memory.alloc("kvm:sept") << 12)


def aug(m: Machine, tdr: int, gpa: int) -> int:
    """TDH.MEM.PAGE.AUG a fresh host page at `gpa` (4K); returns its pfn."""
    pfn = m.memory.alloc("kvm:guest")
    seamcall(m, Seamcall.TDH_MEM_PAGE_AUG, rcx=gpa, rdx=tdr << 12, r8=pfn << 12)
    return pfn


def enter(v: TdVcpu, steps: list | None = None):
    return drive(v.enter(), v.world, task="vcpu0", steps=steps)


def rip(v: TdVcpu) -> int:
    return v.world.peek(v.rip_key)


def vstate(v: TdVcpu):
    return v.world.peek(vcpu_key(v.tdvpr))


class Recorder:
    """A guest program running a fixed list of instructions and keeping what each one returned."""

    def __init__(self, insns):
        self.insns = list(insns)
        self.results: list = []

    def __call__(self):
        for i in self.insns:
            self.results.append((yield i))


class SharedEpt:
    """Four table pages for GPAW 48 (PML4 -> PDPT -> PD -> PT) whose entries the test writes itself."""

    def __init__(self, m: Machine):
        self.m = m
        self.pml4, self.pdpt, self.pd, self.pt = (m.memory.alloc("kvm:ept") for _ in range(4))

    def link(self, gpa: int, pml4e: int = RWX, pdpte: int = RWX, pde: int | None = RWX) -> None:
        """Non-leaf entries for `gpa` down to the PT (pde=None: leave the PDE to the caller)."""
        mem = self.m.memory
        mem.write_entry(self.pml4, pt_index(gpa, 3), (self.pdpt << 12) | pml4e)
        mem.write_entry(self.pdpt, pt_index(gpa, 2), (self.pd << 12) | pdpte)
        if pde is not None:
            mem.write_entry(self.pd, pt_index(gpa, 1), (self.pt << 12) | pde)

    def entries(self, gpa: int) -> list[int]:
        mem = self.m.memory
        return [mem.read_entry(self.pml4, pt_index(gpa, 3)), mem.read_entry(self.pdpt, pt_index(gpa, 2)),
                mem.read_entry(self.pd, pt_index(gpa, 1)), mem.read_entry(self.pt, pt_index(gpa, 0))]


def shared_vcpu(program_insns, attributes: TdAttr = TdAttr.SEPT_VE_DISABLE):
    m, tdr = new_td(attributes)
    ept = SharedEpt(m)
    prog = Recorder(program_insns)
    v = TdVcpu(m.tdx, m.memory, tdr, 0, prog)
    v.set_shared_eptp(ept.pml4)
    return m, tdr, ept, prog, v


# -- shared accesses: the hardware walk ------------------------------------------------------------------------
SGPA = SHARED | 0x12_3456_7000   # indices: PML4 0x100, PDPT 0x48, PD 0x1a2, PT 0x167


def test_shared_gpa_indices_include_the_shared_bit_in_the_pml4_index():
    """GPAW 48: the PML4 index is GPA bits 47:39, so the shared bit selects PML4 entries 256-511."""
    assert [pt_index(SGPA, lvl) for lvl in (3, 2, 1, 0)] == [0x100, 0x48, 0x1A2, 0x167]


def test_shared_read_sets_accessed_on_every_entry_used_and_not_dirty():
    """A read through the shared EPT sets A (bit 8) in the PML4E, PDPTE, PDE and PTE, and never D (bit 9)."""
    m, _tdr, ept, prog, v = shared_vcpu([insn.read(SGPA + 0x18)])
    data = m.memory.alloc("kvm:shared")
    ept.link(SGPA)
    m.memory.write_entry(ept.pt, pt_index(SGPA, 0), (data << 12) | RWX)
    m.memory.write_word(data, 0x18, 0xDEAD_BEEF)
    ex = enter(v)
    assert ex.reason is ExitReason.HLT
    assert prog.results == [0xDEAD_BEEF]
    assert [hex(e) for e in ept.entries(SGPA)] == [
        hex((ept.pdpt << 12) | 0x107), hex((ept.pd << 12) | 0x107),
        hex((ept.pt << 12) | 0x107), hex((data << 12) | 0x107)]
    assert all(type(e) is int for e in ept.entries(SGPA))
    assert rip(v) == 1


def test_shared_write_sets_dirty_on_the_leaf_only_and_is_read_back():
    """A write sets A on every entry and D only on the leaf PTE; the value lands in the mapped host page."""
    m, _tdr, ept, prog, v = shared_vcpu([insn.write(SGPA + 0x20, 0x1234_5678_9ABC_DEF0), insn.read(SGPA + 0x20)])
    data = m.memory.alloc("kvm:shared")
    ept.link(SGPA)
    m.memory.write_entry(ept.pt, pt_index(SGPA, 0), (data << 12) | RWX)
    ex = enter(v)
    assert ex.reason is ExitReason.HLT
    assert prog.results == [None, 0x1234_5678_9ABC_DEF0]
    assert m.memory.read_word(data, 0x20) == 0x1234_5678_9ABC_DEF0
    assert [hex(e) for e in ept.entries(SGPA)] == [
        hex((ept.pdpt << 12) | 0x107), hex((ept.pd << 12) | 0x107),
        hex((ept.pt << 12) | 0x107), hex((data << 12) | 0x307)]
    assert rip(v) == 2


def test_shared_2m_leaf_translates_offsets_inside_the_2mib_page():
    """A PDE with PS set maps 2 MiB: GPA bits 20:12 select the 4K page inside it; A on all three entries, D on
    the PDE for a write."""
    base_gpa = SHARED | 0x4020_0000
    off = 0x1_2345 << 3  # 0x91a28: page 0x91, byte offset 0xa28
    gpa = base_gpa + off
    m, _tdr, ept, prog, v = shared_vcpu([insn.read(gpa), insn.write(gpa + 8, 77), insn.read(gpa + 8)])
    base = m.memory.alloc_contiguous(512, "kvm:huge", align=512)
    ept.link(gpa, pde=None)
    m.memory.write_entry(ept.pd, pt_index(gpa, 1), (base << 12) | PS | RWX)
    m.memory.write_word(base + 0x91, 0xA28, 0xABCD)
    ex = enter(v)
    assert ex.reason is ExitReason.HLT
    assert prog.results == [0xABCD, None, 77]
    assert m.memory.read_word(base + 0x91, 0xA30) == 77
    mem = m.memory
    assert hex(mem.read_entry(ept.pml4, pt_index(gpa, 3))) == hex((ept.pdpt << 12) | 0x107)
    assert hex(mem.read_entry(ept.pdpt, pt_index(gpa, 2))) == hex((ept.pd << 12) | 0x107)
    assert hex(mem.read_entry(ept.pd, pt_index(gpa, 1))) == hex((base << 12) | 0x387)
    assert mem.table_entries(ept.pt) == {}


@pytest.mark.parametrize(("level", "reserved_bit"), [(1, 1 << 12), (1, 1 << 20), (2, 1 << 29)])
def test_huge_leaf_with_a_reserved_address_bit_is_an_ept_misconfiguration(level, reserved_bit):
    """SDM "EPT Misconfigurations": bits 20:12 of a 2M leaf and 29:12 of a 1G leaf are reserved. An access
    through such a leaf exits with EPT_MISCONFIG (49) and the page GPA (tdx_ept_misconfig_exit_to_vmm); nothing
    is read, RIP stays."""
    gpa = SHARED | 0x4020_0000 | 0x3_4568
    m, _tdr, ept, prog, v = shared_vcpu([insn.read(gpa)])
    base = m.memory.alloc_contiguous(512, "kvm:huge", align=512)
    if level == 1:
        ept.link(gpa, pde=None)
        m.memory.write_entry(ept.pd, pt_index(gpa, 1), (base << 12) | reserved_bit | PS | RWX)
    else:
        ept.link(gpa, pdpte=RWX)
        m.memory.write_entry(ept.pdpt, pt_index(gpa, 2), (base << 12) | reserved_bit | PS | RWX)
    ex = enter(v)
    assert (ex.reason, ex.rax, ex.gpa) == (ExitReason.EPT_MISCONFIG, 49, gpa & ~0xFFF)
    assert prog.results == [] and rip(v) == 0


def test_write_without_read_and_reserved_memtype_are_misconfigurations():
    """SDM "EPT Misconfigurations": W without R in any entry, memory type 2 in a leaf."""
    for pte in (W | X, (2 << 3) | RWX):
        m, _tdr, ept, _prog, v = shared_vcpu([insn.read(SGPA)])
        ept.link(SGPA)
        m.memory.write_entry(ept.pt, pt_index(SGPA, 0), (m.memory.alloc("kvm:shared") << 12) | pte)
        assert enter(v).reason is ExitReason.EPT_MISCONFIG


def test_shared_non_present_entry_with_sve_exits_to_the_host():
    """A non-present shared EPT entry with SVE set: TD exit EPT_VIOLATION (48), R8 = page GPA with the shared
    bit, exit qualification with the access bit and bits 3-5 zero; RIP stays so the access is retried."""
    m, _tdr, ept, prog, v = shared_vcpu([insn.write(SGPA + 0x40, 5)])
    ept.link(SGPA)
    m.memory.write_entry(ept.pt, pt_index(SGPA, 0), SVE)
    ex = enter(v)
    assert ex.reason is ExitReason.EPT_VIOLATION and ex.rax == 48
    assert ex.gpa == SGPA
    assert ex.exit_qual == VMM_QUAL_WRITE
    assert ex.exit_qual & RWX_ALLOWED == 0
    assert ex.ext_qual == 0
    assert prog.results == [] and rip(v) == 0
    # The host maps the page; re-entry re-executes the write.
    data = m.memory.alloc("kvm:shared")
    m.memory.write_entry(ept.pt, pt_index(SGPA, 0), (data << 12) | RWX | SVE)
    ex = enter(v)
    assert ex.reason is ExitReason.HLT
    assert m.memory.read_word(data, 0x40) == 5
    assert hex(m.memory.read_entry(ept.pt, pt_index(SGPA, 0))) == hex(SVE | (data << 12) | 0x307)


def test_shared_read_through_non_present_pde_with_sve_exits():
    """A non-present entry above the leaf (here the PDE) with SVE set also exits; a read sets exit-qual bit 0."""
    m, _tdr, ept, _prog, v = shared_vcpu([insn.read(SGPA + 8)])
    ept.link(SGPA, pde=None)
    m.memory.write_entry(ept.pd, pt_index(SGPA, 1), SVE)
    ex = enter(v)
    assert (ex.reason, ex.gpa, ex.exit_qual, ex.ext_qual) == (ExitReason.EPT_VIOLATION, SGPA, VMM_QUAL_READ, 0)


def test_shared_non_present_entry_without_sve_is_a_ve_in_the_guest():
    """Entry value 0 (KVM's MMIO SPTE: RWX = 0, SVE = 0): the CPU converts the violation into a #VE for the
    guest, carrying the faulting GPA; no TD exit happens and the guest continues."""
    _m, _tdr, ept, prog, v = shared_vcpu([insn.read(SGPA + 0x30), insn.write(SGPA + 0x38, 1)])
    ept.link(SGPA)
    ex = enter(v)
    assert ex.reason is ExitReason.HLT
    assert prog.results == [VirtualizationException(SGPA + 0x30, QUAL_READ),
                            VirtualizationException(SGPA + 0x38, QUAL_WRITE)]
    assert rip(v) == 2


def test_write_to_read_only_shared_leaf_reports_readable_not_writable():
    """A write to a read-only leaf exits with exit-qualification bit 1 (write) and bit 3 (readable) set,
    bits 4 (writable) and 5 (executable) clear."""
    m, _tdr, ept, _prog, v = shared_vcpu([insn.write(SGPA, 9)])
    data = m.memory.alloc("kvm:shared")
    ept.link(SGPA)
    m.memory.write_entry(ept.pt, pt_index(SGPA, 0), (data << 12) | R | SVE)
    ex = enter(v)
    assert ex.reason is ExitReason.EPT_VIOLATION
    assert ex.gpa == SGPA
    assert ex.exit_qual == VMM_QUAL_WRITE | 0x8
    assert m.memory.read_word(data, 0) == 0
    assert rip(v) == 0


def test_shared_permissions_are_the_and_of_every_level():
    """Allowed access is the AND of R/W/X over all entries used: a read-only PDE forbids a write through a
    RWX PTE, and the exit qualification reports readable only."""
    m, _tdr, ept, prog, v = shared_vcpu([insn.read(SGPA), insn.write(SGPA, 3)])
    data = m.memory.alloc("kvm:shared")
    ept.link(SGPA, pde=R)
    m.memory.write_entry(ept.pt, pt_index(SGPA, 0), (data << 12) | RWX)
    ex = enter(v)
    assert prog.results == [0]
    assert (ex.reason, ex.gpa, ex.exit_qual) == (ExitReason.EPT_VIOLATION, SGPA, VMM_QUAL_WRITE | 0x8)


def test_shared_access_without_shared_eptp_exits():
    """No SHARED_EPT_POINTER loaded: a shared access exits with an EPT violation for the page GPA."""
    m, tdr = new_td()
    prog = Recorder([insn.read(SGPA + 8)])
    v = TdVcpu(m.tdx, m.memory, tdr, 0, prog)
    ex = enter(v)
    assert (ex.reason, ex.gpa, ex.exit_qual) == (ExitReason.EPT_VIOLATION, SGPA, VMM_QUAL_READ)


# -- private accesses ---------------------------------------------------------------------------------------------
def test_private_access_to_free_gpa_exits_with_no_extended_qualification():
    """A private GPA whose walk hits FREE: EPT-violation TD exit, RDX (ext_qual) 0, R8 = GPA."""
    m, tdr = new_td()
    prog = Recorder([insn.read(PRIV)])
    v = TdVcpu(m.tdx, m.memory, tdr, 0, prog)
    ex = enter(v)
    assert (ex.rax, ex.reason, ex.gpa, ex.ext_qual, ex.exit_qual) == (
        48, ExitReason.EPT_VIOLATION, PRIV, 0, VMM_QUAL_READ)
    # With tables present but the 4K leaf FREE: the same exit.
    add_sept_tables(m, tdr, PRIV)
    ex = enter(v)
    assert (ex.reason, ex.gpa, ex.ext_qual) == (ExitReason.EPT_VIOLATION, PRIV, 0)
    assert prog.results == []


def test_private_access_to_pending_page_with_sept_ve_disable_exits_type_6():
    """PENDING leaf and SEPT_VE_DISABLE: TD exit with extended exit qualification type 6
    (PENDING_EPT_VIOLATION) and no allowed bits (exit qualification bits 3-5 zero)."""
    m, tdr = new_td(TdAttr.SEPT_VE_DISABLE)
    add_sept_tables(m, tdr, PRIV)
    aug(m, tdr, PRIV)
    prog = Recorder([insn.write(PRIV + 0x10, 1)])
    v = TdVcpu(m.tdx, m.memory, tdr, 0, prog)
    ex = enter(v)
    assert ex.reason is ExitReason.EPT_VIOLATION
    assert ex.ext_qual & 0xF == 6 and ex.ext_qual == 6
    assert ex.exit_qual & RWX_ALLOWED == 0
    assert ex.exit_qual == VMM_QUAL_WRITE
    assert ex.gpa == PRIV
    assert prog.results == []


def test_private_access_to_pending_page_without_sept_ve_disable_is_a_ve():
    """PENDING leaf with SEPT_VE_DISABLE clear: the TDX module injects a #VE (pending) into the guest."""
    m, tdr = new_td(TdAttr(0))
    add_sept_tables(m, tdr, PRIV)
    aug(m, tdr, PRIV)
    prog = Recorder([insn.read(PRIV + 0x10)])
    v = TdVcpu(m.tdx, m.memory, tdr, 0, prog)
    ex = enter(v)
    assert ex.reason is ExitReason.HLT
    assert prog.results == [VirtualizationException(PRIV + 0x10, QUAL_READ, pending=True)]


def test_accepted_page_reads_zero_and_keeps_written_values():
    """After TDG.MEM.PAGE.ACCEPT the page reads as zero and keeps what the guest writes."""
    m, tdr = new_td()
    add_sept_tables(m, tdr, PRIV)
    pfn = aug(m, tdr, PRIV)
    prog = Recorder([TdcallInsn(Tdcall.TDG_MEM_PAGE_ACCEPT, rcx=PRIV), insn.read(PRIV + 0x10),
                     insn.write(PRIV + 0x10, 0xFEED), insn.read(PRIV + 0x10), insn.read(PRIV + 0x18)])
    v = TdVcpu(m.tdx, m.memory, tdr, 0, prog)
    ex = enter(v)
    assert ex.reason is ExitReason.HLT
    assert prog.results == [TdcallResult(0), 0, None, 0xFEED, 0]
    assert m.memory.page_data(pfn) == {0x10: 0xFEED}
    assert rip(v) == 5


def test_accept_zeroes_data_already_in_the_host_page():
    """ACCEPT zeroes the page: data written into its host memory before ACCEPT is gone."""
    m, tdr = new_td()
    add_sept_tables(m, tdr, PRIV)
    pfn = aug(m, tdr, PRIV)
    m.memory.write_word(pfn, 0x10, 0xBAD)
    m.memory.write_word(pfn, 0xFF8, 0xBAD2)
    prog = Recorder([TdcallInsn(Tdcall.TDG_MEM_PAGE_ACCEPT, rcx=PRIV), insn.read(PRIV + 0x10),
                     insn.read(PRIV + 0xFF8)])
    v = TdVcpu(m.tdx, m.memory, tdr, 0, prog)
    enter(v)
    assert prog.results == [TdcallResult(0), 0, 0]
    assert m.memory.page_data(pfn) == {}


# -- epochs and kicks ---------------------------------------------------------------------------------------------
def test_enter_leaves_guest_mode_and_restores_the_epoch_refcount():
    """TD entry counts the vCPU in REFCOUNT[TD_EPOCH & 1]; when enter() returns the vCPU is out of guest mode
    and the refcount is back to 0."""
    m, tdr = new_td()
    prog = Recorder([insn.read(PRIV)])
    v = TdVcpu(m.tdx, m.memory, tdr, 0, prog)
    gen = v.enter()
    m.world.task = "vcpu0"
    step = next(gen)
    assert step.kind is TdxStep.TD_ENTRY
    assert v.in_guest
    assert get_epoch(m.world, tdr).refcount == (0, 1)
    assert get_epoch(m.world, tdr).td_epoch == 1
    ex = drive(gen, m.world, task="vcpu0")
    assert ex.reason is ExitReason.EPT_VIOLATION
    assert not v.in_guest
    st = vstate(v)
    assert (st.associated, st.vcpu_epoch) == (True, 1)
    assert get_epoch(m.world, tdr).refcount == (0, 0)
    assert m.world.peek(("tdx.epoch_lock", tdr)) is None


def _kick_runtime(m: Machine, v: TdVcpu, order: tuple[str, ...]) -> Runtime:
    def vcpu_task():
        return (yield from v.enter())

    def host_task():
        yield Step(Host.PREPARE)
        v.kick()
        yield Step(Host.KICKED)

    return Runtime(m.world, [Task("vcpu0", vcpu_task()), Task("host", host_task())],
                   ScheduleSpec(order=order))


def test_kicked_vcpu_exits_with_external_interrupt_before_its_next_instruction():
    """A kick while the vCPU is in guest mode makes it exit with EXTERNAL_INTERRUPT before executing its next
    instruction; RIP, memory and the epoch refcount are as if it had not run further."""
    m, _tdr, ept, _prog, v = shared_vcpu([insn.write(SGPA, 1), insn.write(SGPA + 8, 2)])
    data = m.memory.alloc("kvm:shared")
    ept.link(SGPA)
    m.memory.write_entry(ept.pt, pt_index(SGPA, 0), (data << 12) | RWX)
    rt = _kick_runtime(m, v, ("vcpu0", "vcpu0", "host", "host", "vcpu0", "vcpu0"))
    assert rt.run() is StopReason.DONE
    kinds = [(f.task, f.kind) for f in rt.timeline]
    assert kinds[:5] == [("vcpu0", TdxStep.TD_ENTRY), ("vcpu0", TdxStep.GUEST_ACCESS), ("host", Host.PREPARE),
                         ("host", Host.KICKED), ("vcpu0", TdxStep.TD_EXIT)]
    assert rt.timeline[3].effects == ((v.kick_key, rt.timeline[3].effects[0][1], True),)
    ex = rt.task("vcpu0").result
    assert ex.reason is ExitReason.EXTERNAL_INTERRUPT and ex.rax == 1
    assert m.memory.page_data(data) == {0: 1}
    assert rip(v) == 1
    assert v.kick_key not in m.world
    assert get_epoch(m.world, v.tdr).refcount == (0, 0)
    # The next entry runs the instruction the kick preempted.
    ex = enter(v)
    assert ex.reason is ExitReason.HLT
    assert m.memory.page_data(data) == {0: 1, 8: 2}


def test_kick_outside_guest_mode_does_nothing():
    """kick() of a vCPU that is not in guest mode records no kick and the next entry runs normally."""
    m, _tdr, ept, _prog, v = shared_vcpu([insn.read(SGPA)])
    ept.link(SGPA)
    m.memory.write_entry(ept.pt, pt_index(SGPA, 0), (m.memory.alloc("kvm:shared") << 12) | RWX)
    v.kick()
    assert v.kick_key not in m.world
    assert enter(v).reason is ExitReason.HLT


def test_kick_landing_during_the_td_exit_does_not_cause_a_spurious_exit():
    """A kick that arrives after the guest's faulting access but before the TD exit completes is consumed by
    that exit: the next entry executes the guest instead of exiting with EXTERNAL_INTERRUPT."""
    m, tdr = new_td()
    prog = Recorder([insn.read(PRIV)])
    v = TdVcpu(m.tdx, m.memory, tdr, 0, prog)
    rt = _kick_runtime(m, v, ("vcpu0", "vcpu0", "host", "host", "vcpu0", "vcpu0"))
    assert rt.run() is StopReason.DONE
    assert [f.kind for f in rt.timeline[:5]] == [TdxStep.TD_ENTRY, TdxStep.GUEST_ACCESS, Host.PREPARE,
                                                 Host.KICKED, TdxStep.TD_EXIT]
    assert rt.task("vcpu0").result.reason is ExitReason.EPT_VIOLATION
    assert v.kick_key not in m.world
    ex = enter(v)
    assert (ex.reason, ex.gpa) == (ExitReason.EPT_VIOLATION, PRIV)


def _panicking(insns, panics_on):
    """A guest program running `insns` that panics (GuestPanic) when an instruction's result satisfies
    `panics_on`."""
    def prog():
        for i in insns:
            result = yield i
            if panics_on(result):
                raise GuestPanic(f"guest panic on {result}")
    return prog


@pytest.mark.parametrize("where", ["#VE", "TDVMCALL result"])
def test_a_guest_panic_leaves_guest_mode_its_epoch_and_any_kick(where: str):
    """The model ends a vCPU's thread when its guest panics (Linux's panic() would spin in the guest): the vCPU
    must be out of the TD as after a TD exit, or kvm_make_all_cpus_request would wait for it forever (a kick
    pending) and TDH.MEM.TRACK would count it in its epoch. Either way the guest program panics: on a #VE
    (PENDING private page, SEPT_VE_DISABLE clear) or on the TDVMCALL result handed over at the next entry."""
    m, tdr = new_td(TdAttr(0) if where == "#VE" else TdAttr.SEPT_VE_DISABLE)
    if where == "#VE":
        add_sept_tables(m, tdr, PRIV)
        aug(m, tdr, PRIV)
        v = TdVcpu(m.tdx, m.memory, tdr, 0, _panicking(
            [insn.read(PRIV)], lambda r: isinstance(r, VirtualizationException) and r.pending))
        gen = v.enter()
        assert next(gen).kind is TdxStep.TD_ENTRY
        # The kick lands after the access met the PENDING page, before the guest takes the #VE.
        step = next(gen)
        assert (step.kind, step.payload.ve) == (TdxStep.GUEST_ACCESS, True)
    else:
        call = TdcallInsn(Tdcall.TDG_VP_VMCALL, r11=0x10001, r12=PRIV, r13=0x1000)
        v = TdVcpu(m.tdx, m.memory, tdr, 0, _panicking([call], lambda r: r == TdcallResult(0, r10=1)))
        assert enter(v).reason is ExitReason.TDCALL
        v.complete_tdvmcall(r10=1)
        gen = v.enter()
        assert next(gen).kind is TdxStep.TD_ENTRY
    assert v.in_guest and get_epoch(m.world, tdr).refcount != (0, 0)
    v.kick()
    assert m.world.peek(v.kick_key) is True
    with pytest.raises(GuestPanic):
        drive(gen, m.world, task="vcpu0")
    assert not v.in_guest
    assert v.kick_key not in m.world
    assert get_epoch(m.world, tdr).refcount == (0, 0)


# -- TDG.VP.VMCALL ------------------------------------------------------------------------------------------------
def test_tdvmcall_exits_with_its_registers_and_completes_at_next_entry():
    """TDG.VP.VMCALL exits with reason TDCALL (77) carrying R11-R13; after complete_tdvmcall the next entry
    hands the guest a TdcallResult with the host's R10 and advances RIP by exactly one."""
    m, tdr = new_td()
    call = TdcallInsn(Tdcall.TDG_VP_VMCALL, r11=0x10001, r12=PRIV | SHARED, r13=0x20_0000)
    prog = Recorder([call])
    v = TdVcpu(m.tdx, m.memory, tdr, 0, prog)
    ex = enter(v)
    assert (ex.rax, ex.reason, ex.r10, ex.r11, ex.r12, ex.r13) == (
        77, ExitReason.TDCALL, 0, 0x10001, PRIV | SHARED, 0x20_0000)
    assert rip(v) == 0 and prog.results == []
    # Without a completion the call is executed again.
    ex = enter(v)
    assert ex.reason is ExitReason.TDCALL and rip(v) == 0 and prog.results == []
    v.complete_tdvmcall(r10=0)
    ex = enter(v)
    assert ex.reason is ExitReason.HLT
    assert prog.results == [TdcallResult(0, r10=0)]
    assert rip(v) == 1


def test_tdvmcall_retry_status_reaches_the_guest():
    """complete_tdvmcall(r10=RETRY, r11=next GPA) is what the guest's TDVMCALL returns."""
    m, tdr = new_td()
    call = TdcallInsn(Tdcall.TDG_VP_VMCALL, r11=0x10001, r12=PRIV, r13=0x4000)
    prog = Recorder([call, call])
    v = TdVcpu(m.tdx, m.memory, tdr, 0, prog)
    assert enter(v).reason is ExitReason.TDCALL
    v.complete_tdvmcall(r10=1, r11=PRIV + 0x1000)
    ex = enter(v)
    assert ex.reason is ExitReason.TDCALL
    assert prog.results == [TdcallResult(0, r10=1, r11=PRIV + 0x1000)]
    assert rip(v) == 1


# -- zero-step mitigation --------------------------------------------------------------------------------------
def test_seventh_private_ept_exit_at_one_rip_arms_zero_step():
    """Private EPT-violation exits 1-6 at one RIP only count; the 7th records the GPA (epf_gpas): the full GPA of
    the access (td_exit_epf_stepping_log runs before tdx_ept_violation_exit_to_vmm clears bits 11:0 for R8)."""
    m, tdr = new_td()
    prog = Recorder([insn.read(PRIV + 0x10)])
    v = TdVcpu(m.tdx, m.memory, tdr, 0, prog)
    for n in range(1, 7):
        ex = enter(v)
        assert (ex.reason, ex.entered) == (ExitReason.EPT_VIOLATION, True)
        st = vstate(v)
        assert (st.epf_count, st.epf_gpas) == (n, ()), n
    ex = enter(v)
    assert (ex.reason, ex.gpa) == (ExitReason.EPT_VIOLATION, PRIV)
    assert vstate(v).epf_gpas == (PRIV + 0x10,)
    assert m.world.peek(("tdx.vcpu", v.tdvpr)).epf_gpas == (PRIV + 0x10,)


def test_shared_ept_exits_do_not_count_for_zero_step():
    """Only private-GPA EPT violations are logged: shared ones leave the counter at 0."""
    m, _tdr, ept, _prog, v = shared_vcpu([insn.read(SGPA)])
    ept.link(SGPA)
    m.memory.write_entry(ept.pt, pt_index(SGPA, 0), SVE)
    for _ in range(8):
        assert enter(v).reason is ExitReason.EPT_VIOLATION
    st = vstate(v)
    assert (st.epf_count, st.epf_gpas) == (0, ())


def test_armed_zero_step_refuses_entry_while_the_gpa_still_faults():
    """With a recorded GPA that would still fault, TDH.VP.ENTER does not enter: it returns EPT_VIOLATION for
    that GPA, reverts the epoch refcount and releases the S-EPT tree lock."""
    m, tdr = new_td()
    prog = Recorder([insn.read(PRIV)])
    v = TdVcpu(m.tdx, m.memory, tdr, 0, prog)
    for _ in range(7):
        enter(v)
    steps: list = []
    ex = enter(v, steps)
    assert (ex.reason, ex.gpa, ex.entered) == (ExitReason.EPT_VIOLATION, PRIV, False)
    assert [s.kind for s in steps] == [TdxStep.SEAMCALL, TdxStep.TD_EXIT]
    assert get_epoch(m.world, tdr).refcount == (0, 0)
    assert ("tdx.tree_lock", tdr) not in m.world
    assert not v.in_guest
    assert vstate(v).epf_gpas == (PRIV,)


def test_progress_resets_the_zero_step_counter():
    """An exit at a RIP different from the entry RIP (the guest made progress) resets the counter and list and
    counts as the first exit at the new RIP; the 7th exit at that RIP arms zero-step."""
    m, tdr = new_td(TdAttr(0))
    gpa_b, gpa_c = PRIV, PRIV + 0x1000
    prog = Recorder([insn.read(gpa_b), insn.read(gpa_c)])
    v = TdVcpu(m.tdx, m.memory, tdr, 0, prog)
    for n in range(1, 6):
        enter(v)
        assert vstate(v).epf_count == n
    # The host AUGs B: the read gets a #VE (SEPT_VE_DISABLE clear), RIP moves, and C faults at RIP 1.
    add_sept_tables(m, tdr, gpa_b)
    aug(m, tdr, gpa_b)
    ex = enter(v)
    assert (ex.reason, ex.gpa) == (ExitReason.EPT_VIOLATION, gpa_c)
    assert rip(v) == 1
    st = vstate(v)
    # Reset, then this exit counts as the first at the new RIP.
    assert (st.epf_count, st.epf_gpas) == (1, ())
    for n in range(2, 7):
        enter(v)
        assert (vstate(v).epf_count, vstate(v).epf_gpas) == (n, ())
    enter(v)
    assert vstate(v).epf_gpas == (gpa_c,)


def test_armed_zero_step_enters_once_the_gpa_no_longer_faults():
    """The stepping filter lets the vCPU in once the recorded GPA translates or would be a #VE: a PENDING page
    of a TD with SEPT_VE_DISABLE clear is convertible, so it does not block entry; the guest's progress then
    resets the log at the next TD exit."""
    m, tdr = new_td(TdAttr(0))
    prog = Recorder([insn.read(PRIV)])
    v = TdVcpu(m.tdx, m.memory, tdr, 0, prog)
    for _ in range(7):
        enter(v)
    assert vstate(v).epf_gpas == (PRIV,)
    add_sept_tables(m, tdr, PRIV)
    aug(m, tdr, PRIV)
    steps: list = []
    ex = enter(v, steps)
    assert ex.reason is ExitReason.HLT and ex.entered
    assert steps[0].kind is TdxStep.SEAMCALL
    assert prog.results == [VirtualizationException(PRIV, QUAL_READ, pending=True)]
    st = vstate(v)
    assert (st.epf_count, st.epf_gpas) == (0, ())
    assert ("tdx.tree_lock", tdr) not in m.world


@pytest.mark.parametrize("attributes", [TdAttr.SEPT_VE_DISABLE, TdAttr(0)])
def test_stepping_filter_treats_a_free_gpa_as_still_faulting(attributes):
    """A recorded GPA that is still FREE blocks entry whatever SEPT_VE_DISABLE says."""
    m, tdr = new_td(attributes)
    prog = Recorder([insn.read(PRIV)])
    v = TdVcpu(m.tdx, m.memory, tdr, 0, prog)
    for _ in range(7):
        enter(v)
    ex = enter(v)
    assert (ex.reason, ex.entered) == (ExitReason.EPT_VIOLATION, False)
