"""MMIO for a TD: an MMIO SPTE (make_mmio_spte, SUPPRESS_VE clear), the guest's #VE, TDG.VP.VMCALL<#VE.RequestMMIO>
(R11 = EXIT_REASON_EPT_VIOLATION) -> tdx_emulate_mmio -> KVM_EXIT_MMIO -> the VMM -> tdx_complete_mmio_read."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from engine_helpers import setup

from tdxdbg.cli import main
from tdxdbg.engine.vm import build_vm
from tdxdbg.hw.insn import TdcallInsn
from tdxdbg.hw.tdx.leaves import Tdcall, Tdvmcall, TdvmcallStatus
from tdxdbg.runtime import Runtime
from tdxdbg.runtime.scheduler import Policy, ScheduleSpec
from tdxdbg.scenario.builder import build_setup
from tdxdbg.scenario.loader import load, scenarios_dir
from tdxdbg.scenario.run import schedule_of
from tdxdbg.scenario.runner import run_setup

MMIO = scenarios_dir() / "mmio_via_tdvmcall.toml"


def _frames() -> list[Any]:
    sc = load(MMIO)
    frames, _final, _kvm, stop = run_setup(build_setup(sc, MMIO.parent), schedule_of(sc), 10_000)
    assert stop == "done"
    return frames


def _said(f: Any) -> tuple[Any, ...]:
    get = f.step.get
    kind = f.step.kind.value
    if kind == "user_exit":
        return (f.index, kind, get("reason"), get("gpa"), get("len"), get("is_write"), get("data"))
    if kind == "guest_access":
        return (f.index, kind, get("access"), get("gpa"), get("exit"), get("ve"))
    if kind == "td_exit":
        return (f.index, kind, get("reason"))
    return (f.index, kind, get("what") or get("ret"))


def test_first_access_installs_the_mmio_spte_make_mmio_spte_value() -> None:
    """kvm_mmu_page_fault on a shared gfn with no memslot: tdp_mmu_map installs make_mmio_spte(gfn 0x10000,
    generation 1) = generation bit 3 (0x8) | shadow_mmio_value 0 | gpa 0x10000000, RET_PF_EMULATE (2)."""
    frames = _frames()
    leaf = [f for f in frames if f.step.kind.value == "spte_cmpxchg" and f.step.get("level") == 1]
    assert [(f.step.get("root"), f.step.get("gfn"), f.step.get("old"), f.step.get("new")) for f in leaf] == [
        ("direct", 0x10000, 0x8000_0000_0000_0000, 0x1000_0008)]
    ret = [(f.step.get("ret"), f.step.get("value")) for f in frames if f.step.kind.value == "ret_pf"]
    assert ret == [("RET_PF_EMULATE", 2)]


def test_tdvmcall_mmio_exits_to_the_vmm_and_a_read_completes_at_the_next_kvm_run() -> None:
    """The #VE (SUPPRESS_VE clear) -> TDVMCALL (exit reason TDCALL) -> tdx_emulate_mmio -> KVM_EXIT_MMIO with the
    shared bit stripped (gpa 0x10000000, len 8); a write carries its data; a read's answer goes to R11 through
    tdx_complete_mmio_read at the next KVM_RUN, before TDH.VP.ENTER."""
    frames = _frames()
    shown = [_said(f) for f in frames[29:49]]
    assert shown == [
        (29, "exit", "EPT violation handled"),
        (30, "td_entry", None),
        (31, "guest_access", "write", 0x800010000000, None, True),
        (32, "td_exit", "TDCALL"),
        (33, "user_exit", "KVM_EXIT_MMIO", 0x10000000, 8, True, 0x5A),
        (34, "exit", "VMM: MMIO write 0x10000000 = 0x5a"),
        (35, "td_entry", None),
        (36, "guest_access", "read", 0x800010000000, None, True),
        (37, "td_exit", "TDCALL"),
        (38, "user_exit", "KVM_EXIT_MMIO", 0x10000000, 8, False, 0),
        (39, "exit", "VMM: MMIO read 0x10000000 = 0x5a"),
        (40, "exit", "MMIO read complete: 0x5a"),
        (41, "td_entry", None),
        (42, "guest_access", "read", 0x800010000008, None, True),
        (43, "td_exit", "TDCALL"),
        (44, "user_exit", "KVM_EXIT_MMIO", 0x10000008, 8, False, 0),
        (45, "exit", "VMM: MMIO read 0x10000008 = 0x0"),
        (46, "exit", "MMIO read complete: 0x0"),
        (47, "td_entry", None),
        (48, "td_exit", "HLT"),
    ]
    # Only the first access faulted: the MMIO SPTE stays, and the later accesses to the page (0x800010000008
    # included) take the #VE directly.
    assert [f.index for f in frames if f.step.kind.value == "fault"] == [9]


@pytest.mark.parametrize(("r12", "r13", "r14", "why"), [
    (3, 0, 1 << 47 | 0x10000000, "size not 1, 2, 4 or 8"),
    (8, 2, 1 << 47 | 0x10000000, "direction not 0 or 1"),
    (8, 0, 1 << 47 | 0x10000ffc, "crosses a page"),
    (8, 0, 1 << 47 | 0x1000, "a valid memslot covers it"),
])
def test_tdx_emulate_mmio_invalid_operands(r12: int, r13: int, r14: int, why: str) -> None:
    """tdx_emulate_mmio: `goto error` -> TDVMCALL_STATUS_INVALID_OPERAND in R10, no exit to userspace."""
    results: list[Any] = []

    def prog() -> Any:
        res = yield TdcallInsn(Tdcall.TDG_VP_VMCALL, r11=Tdvmcall.EPT_VIOLATION, r12=r12, r13=r13, r14=r14)
        results.append(res.r10)

    built = build_vm(setup(prog))
    rt = Runtime(built.machine.world, built.tasks, ScheduleSpec(Policy.ROUND_ROBIN))
    rt.run()
    assert results == [TdvmcallStatus.OPERAND_INVALID], why
    assert not [f for f in rt.timeline.frames if f.step.get("reason") == "KVM_EXIT_MMIO"]


BASE = MMIO.read_text()


@pytest.mark.parametrize(("op", "message"), [
    ("mmio_read 0x800000001000", "expected a GPA outside every memslot for MMIO (KVM only emulates MMIO where no "
                                 "memslot is), found 0x800000001000"),
    ("mmio_read 0x10000000", "expected a shared GPA (with the shared bit 0x800000000000, below 2^48) for MMIO, "
                             "found 0x10000000"),
    ("mmio_write 0x800010000004 1", "misaligned GPA: expected an 8-byte-aligned GPA, found 0x800010000004"),
])
def test_bad_mmio_ops_are_one_problem(tmp_path: Path, op: str, message: str) -> None:
    p = tmp_path / "s.toml"
    p.write_text(BASE.replace('"mmio_write 0x800010000000 0x5a"', f'"{op}"'))
    err = io.StringIO()
    assert main(["validate", str(p)], io.StringIO(), err) == 2
    line = BASE.splitlines().index(next(x for x in BASE.splitlines() if x.startswith("program ="))) + 1
    assert err.getvalue() == f"error: {p}:{line}: vcpu[0].program[0]: {message}\n"
