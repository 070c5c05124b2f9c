"""Scenario -> VmSetup: memslots, attributes, injections, and the guest and host programs as generator factories.

Tasks are vcpu0, vcpu1, ... (one per [[vcpu]]) then host0, host1, ... (one per [[host]]).
"""

from __future__ import annotations

import functools
from collections.abc import Generator
from pathlib import Path
from typing import Any

from tdxdbg.engine.gmem import Memslot
from tdxdbg.engine.kvm import signal_key
from tdxdbg.engine.steps import EngineStep
from tdxdbg.engine.vm import VmSetup, load_variant
from tdxdbg.hw import guest
from tdxdbg.hw.ept import Gpaw, Level
from tdxdbg.hw.insn import OpProgramFactory
from tdxdbg.hw.tdx.leaves import Seamcall
from tdxdbg.hw.tdx.seamcall import LEAVES, Arg, Reg
from tdxdbg.runtime.step import Step
from tdxdbg.scenario.model import Op, Scenario

PAGES_PER_2M = 512


def guest_op(op: Op) -> guest.GuestGen:
    """One operation of the vCPU's guest kernel, as the Linux guest does it."""
    if op.kind == "read":
        yield from guest.read_value(op.gpa)
    elif op.kind == "write":
        yield from guest.write_value(op.gpa, op.value or 0)
    elif op.kind == "fetch":
        yield from guest.fetch_value(op.gpa)
    elif op.kind == "accept":
        yield from guest.accept_memory(op.gpa, op.size, Level.PD if op.level == 1 else Level.PT)
    elif op.kind == "map_gpa":
        yield from guest.map_gpa(op.gpa, op.size)
    elif op.kind == "mmio_read":
        yield from guest.mmio_read(op.gpa)
    elif op.kind == "mmio_write":
        yield from guest.mmio_write(op.gpa, op.value or 0)


def guest_program(ops: tuple[Op, ...]) -> OpProgramFactory:
    """The vCPU's guest kernel: the operations in order. A vCPU can rebuild it at any operation."""
    return OpProgramFactory([functools.partial(guest_op, op) for op in ops])


def next_op_key(task: str) -> tuple[str, str]:
    """The index of the next operation of a host task's program."""
    return ("host.next_op", task)


def host_program(kvm: Any, ops: tuple[Op, ...]) -> Generator[Step, None, Any]:
    """Userspace (the VMM) issuing ioctls, one operation after the other. Which one is next is in the World
    (("host.next_op", task)), so this is also the task's entry when it is recreated before an operation."""
    w = kvm.world
    key = next_op_key(w.task)
    while (i := w.get(key, 0)) < len(ops):
        w.quiescent()
        yield from host_step(kvm, ops[i], i, key)
    return "done"


def host_step(kvm: Any, op: Op, i: int, key: tuple[str, str]) -> Generator[Step, None, Any]:
    """Operation `i` of a host program, between two HOST_OP frames; the last one also moves the program on."""
    yield Step(EngineStep.HOST_OP, {"op": op.text, "scenario_op": i})
    ret = yield from host_op(kvm, op)
    # Back in userspace: a signal sent to this thread is handled now (signal_pending is false again).
    kvm.world.delete(signal_key(kvm.world.task))
    kvm.world.set(key, i + 1)
    yield Step(EngineStep.HOST_OP, {"op": op.text, "scenario_op": i, "ret": _ret_text(ret)})


def _ret_text(ret: Any) -> Any:
    if ret is None or isinstance(ret, int | str | bool):
        return ret
    return str(ret)


def host_op(kvm: Any, op: Op) -> Generator[Step, None, Any]:
    k = op.kind
    start, end = op.gpa >> 12, (op.gpa + op.size) >> 12
    # VM and vCPU ioctls go through kvm_vm_ioctl / kvm_vcpu_ioctl, which refuse them on a bugged VM; the
    # guest_memfd fallocate, the mm's invalidation and closing the VM are not KVM ioctls. Every call on one of
    # the VM's files goes through vm_file_call: -EBADF once `destroy` closed them, and teardown waits for it.
    if k == "set_attributes":
        return (yield from kvm.vm_file_call("KVM_SET_MEMORY_ATTRIBUTES", kvm.kvm_vm_ioctl(
            "KVM_SET_MEMORY_ATTRIBUTES", kvm.kvm_vm_set_mem_attributes(start, end, op.private))))
    if k == "punch_hole":
        return (yield from kvm.vm_file_call("fallocate(PUNCH_HOLE) on guest_memfd",
                                            kvm.kvm_gmem_punch_hole(start, end)))
    if k == "invalidate":
        return (yield from kvm.mm_discard_shared_backing(start, end))
    if k in ("delete_memslot", "dirty_log"):
        return (yield from kvm.vm_file_call("KVM_SET_USER_MEMORY_REGION2", _memslot_ioctl(kvm, op)))
    if k == "prefault":
        vcpu = kvm.vcpus[0]
        return (yield from kvm.vm_file_call("KVM_PRE_FAULT_MEMORY", kvm.kvm_vcpu_ioctl(
            vcpu, "KVM_PRE_FAULT_MEMORY", kvm.kvm_vcpu_pre_fault_memory(vcpu, op.gpa, op.size))))
    if k == "init_mem_region":
        vcpu = kvm.vcpus[0]
        ioctl = "KVM_MEMORY_ENCRYPT_OP(KVM_TDX_INIT_MEM_REGION)"
        return (yield from kvm.vm_file_call(ioctl, kvm.kvm_vcpu_ioctl(
            vcpu, ioctl, kvm.kvm_tdx_init_mem_region(vcpu, op.gpa, op.size))))
    if k == "interrupt":
        # An MSI from the VMM's device model (KVM_SIGNAL_MSI -> kvm_apic_set_irq -> tdx_deliver_interrupt).
        vcpu = kvm.vcpus[int(op.task[len("vcpu"):])]
        return (yield from kvm.vm_file_call("KVM_SIGNAL_MSI", kvm.kvm_vm_ioctl(
            "KVM_SIGNAL_MSI", kvm.tdx_deliver_interrupt(vcpu, op.value))))
    if k == "signal":
        # tgkill() to another thread of the VMM: not an ioctl.
        target = int(op.task[len("vcpu"):]) if op.task.startswith("vcpu") else None
        return (yield from kvm.send_signal(op.task, None if target is None else kvm.vcpus[target]))
    if k == "finalize":
        ioctl = "KVM_MEMORY_ENCRYPT_OP(KVM_TDX_FINALIZE_VM)"
        return (yield from kvm.vm_file_call(ioctl, kvm.kvm_vm_ioctl(ioctl, kvm.tdx_td_finalize())))
    if k == "destroy":
        return (yield from kvm.kvm_destroy_vm())
    if k == "seamcall":
        r = yield from raw_seamcall(kvm, op)
        return r.status
    raise AssertionError(k)


def _memslot_ioctl(kvm: Any, op: Op) -> Generator[Step, None, Any]:
    """KVM_SET_USER_MEMORY_REGION2 deleting a memslot or toggling its dirty logging."""
    if not any(s.id == op.slot for s in kvm.memslots()):
        yield Step(EngineStep.WARN, {"message": f"no memslot {op.slot}: -EINVAL"})
        return -22
    body = kvm.kvm_delete_memslot(op.slot) if op.kind == "delete_memslot" else kvm.kvm_set_dirty_logging(op.slot,
                                                                                                         op.on)
    return (yield from kvm.kvm_vm_ioctl("KVM_SET_USER_MEMORY_REGION2", body))


def raw_seamcall(kvm: Any, op: Op) -> Generator[Step, None, Any]:
    """The playground: the registers as the leaf's handler declares them (LeafInfo), from the numbers written,
    the TD's TDR and vCPU 0's TDVPR, and pages from the allocator where the leaf takes one."""
    leaf = Seamcall[op.leaf]
    info = LEAVES[leaf]
    given = iter(op.args)
    regs = {reg: 0 for reg in Reg}
    level = 0
    for o in info.operands:
        n = len(o.arg.user_words)
        values = [next(given, 0) for _ in range(n)]
        arg = o.arg
        if arg in (Arg.PAGE_INFO, Arg.PAGE_RANGE):
            gpa, level = values
            regs[o.reg] = gpa | level
        elif arg in (Arg.GPA, Arg.PA, Arg.VALUE):
            regs[o.reg] = values[0]
        elif arg is Arg.TDR:
            regs[o.reg] = kvm.tdr << 12
        elif arg is Arg.TDVPR:
            regs[o.reg] = kvm.vcpus[0].hw.tdvpr << 12 if kvm.vcpus else 0
        elif arg is Arg.NEW_PAGE_AT_LEVEL and level == 1:
            # A 2M page: 512 contiguous, 2M-aligned 4K pages (the module refuses larger levels before
            # looking at the page, so no larger allocation is made for them).
            regs[o.reg] = kvm.memory.alloc_contiguous(PAGES_PER_2M, "vmm:raw-seamcall", align=PAGES_PER_2M) << 12
        elif arg in (Arg.NEW_PAGE, Arg.NEW_PAGE_AT_LEVEL):
            regs[o.reg] = kvm.memory.alloc("vmm:raw-seamcall") << 12
        elif arg is Arg.SOURCE_PAGE:
            regs[o.reg] = kvm.memory.alloc("vmm:raw-seamcall-source") << 12
        else:
            raise AssertionError(arg)
    return (yield from kvm.tdx_module.seamcall(leaf, regs[Reg.RCX], regs[Reg.RDX], regs[Reg.R8], regs[Reg.R9]))


def build_setup(scenario: Scenario, base_dir: Path | None = None) -> VmSetup:
    """The VmSetup the engine builds the VM from (the variant was checked when the scenario was loaded)."""
    if base_dir is None:
        base_dir = Path(scenario.path).parent
    td = scenario.td
    slots = tuple(Memslot(s.id, s.gpa >> 12, s.size >> 12, s.guest_memfd, s.readonly, s.dirty_log)
                  for s in scenario.memslots)
    private = tuple((gpa >> 12, (gpa + size) >> 12) for gpa, size in scenario.private)
    vcpu_programs = tuple(guest_program(ops) for ops in scenario.vcpus)
    host_programs = tuple(_host_factory(ops) for ops in scenario.hosts)
    inject = tuple((Seamcall[i.leaf], i.occurrence, i.status) for i in scenario.inject)
    return VmSetup(gpaw=Gpaw.GPAW_52 if td.gpaw == 52 else Gpaw.GPAW_48, sept_ve_disable=td.sept_ve_disable,
                   runnable=td.state == "runnable", variant=load_variant(td.variant, base_dir), memslots=slots,
                   private_ranges=private, vcpu_programs=vcpu_programs, host_programs=host_programs, inject=inject)




def _host_factory(ops: tuple[Op, ...]) -> Any:
    return lambda kvm: host_program(kvm, ops)
