"""Pending interrupts and signals end TDX's local retry loop and KVM's other retry loops.

tdx_handle_ept_violation retries RET_PF_RETRY locally until `kvm_vcpu_has_events(vcpu) || signal_pending(current)`
(or a dead VM, or, in newer trees, an invalid memslot). For a TD, kvm_vcpu_has_events is
tdx_protected_apic_has_interrupt -> pi_has_pending_interrupt (the posted-interrupt descriptor). A signal ends
KVM_RUN with -EINTR / KVM_EXIT_INTR (vcpu_run -> kvm_handle_signal_exit); kvm_tdp_map_page and
kvm_vcpu_pre_fault_memory return -EINTR. The scenarios are story 3 in v6.16: vCPU0 retries locally inside its
kvm->srcu read section while memslot deletion waits in synchronize_srcu_expedited; host1 signals or interrupts
vCPU0 at frame 83."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from engine_helpers import seamcalls, setup

from tdxdbg.cli import main
from tdxdbg.engine.kvm import signal_key
from tdxdbg.engine.mmu import PFERR_GUEST_FINAL_MASK, PFERR_PRIVATE_ACCESS
from tdxdbg.engine.vm import build_vm
from tdxdbg.hw.tdx.seamcall import TdxStep
from tdxdbg.runtime import Runtime
from tdxdbg.runtime.scheduler import Policy, ScheduleSpec
from tdxdbg.scenario.builder import build_setup
from tdxdbg.scenario.loader import load, loads, scenarios_dir
from tdxdbg.scenario.run import run_scenario, schedule_of
from tdxdbg.scenario.runner import run_setup

SIGNAL = scenarios_dir() / "local_retry_ended_by_signal_v6_16.toml"
INTERRUPT = scenarios_dir() / "local_retry_ended_by_interrupt_v6_16.toml"


def _run(path: Path) -> tuple[list[Any], Any]:
    sc = load(path)
    frames, final, _kvm, stop = run_setup(build_setup(sc, path.parent), schedule_of(sc), 10_000)
    assert stop == "done"
    return frames, final


def _what(f: Any) -> tuple[Any, ...]:
    """(frame, task, kind, what the step says) for the frames that tell the exit handling."""
    get = f.step.get
    said = get("what") or get("reason") or get("op") or get("lock")
    if f.step.kind is TdxStep.GUEST_INTERRUPT:
        said = get("vectors")
    ret = get("ret")
    return (f.index, f.task, f.step.kind.value, said) + ((ret, get("retries")) if ret is not None else ())


_KINDS = {"exit", "user_exit", "td_entry", "guest_interrupt", "host_op", "kick"}


def _story(frames: list[Any], start: int, end: int) -> list[tuple[Any, ...]]:
    return [_what(f) for f in frames[start:end] if f.step.kind.value in _KINDS
            or (f.task == "host0" and f.step.get("lock") == "kvm->srcu")]


def test_signal_pending_ends_the_local_retry_and_kvm_run_returns_eintr_kvm_exit_intr() -> None:
    """tdx_handle_ept_violation (v6.16): signal_pending(current) breaks the loop after retry 5 with RET_PF_RETRY;
    vcpu_run -> kvm_handle_signal_exit: KVM_RUN returns -EINTR, run->exit_reason KVM_EXIT_INTR, which drops the
    vCPU's kvm->srcu read section so that synchronize_srcu_expedited returns (frame 91); the VMM handles the
    signal and calls KVM_RUN again (TD entry at frame 92)."""
    frames, final = _run(SIGNAL)
    assert _story(frames, 80, 93) == [
        (80, "vcpu0", "exit", "local retry"),
        (82, "host0", "lock_wait", "kvm->srcu"),
        (83, "host1", "host_op", "signal vcpu0"),
        (85, "host1", "kick", "signal to vcpu0"),
        (87, "host1", "host_op", "signal vcpu0", 0, None),
        (88, "vcpu0", "exit", "EPT violation handled", "RET_PF_RETRY", 5),
        (90, "vcpu0", "user_exit", "KVM_EXIT_INTR"),
        (91, "host0", "lock", "kvm->srcu"),
        (92, "vcpu0", "td_entry", None),
    ]
    # The VMM handled the signal on the way back to userspace.
    assert final.world.peek(signal_key("vcpu0")) is None
    # The fault after the slot is gone: KVM_EXIT_MEMORY_FAULT (-EFAULT = -14), the VMM stops the vCPU.
    assert _story(frames, 123, 129)[-2:] == [(126, "vcpu0", "user_exit", "KVM_EXIT_MEMORY_FAULT"),
                                             (127, "vcpu0", "exit", "EPT violation handled", -14, 3)]


def test_posted_interrupt_ends_the_local_retry_and_the_guest_takes_it_at_entry() -> None:
    """tdx_deliver_interrupt sets vector 0xec in the PIR; kvm_vcpu_has_events (pi_has_pending_interrupt) breaks
    the loop after retry 5 with RET_PF_RETRY; KVM re-enters the TD without a userspace exit, and the guest takes
    the interrupt before its ACCEPT runs again (frame 92), which clears the descriptor."""
    frames, _final = _run(INTERRUPT)
    assert _story(frames, 80, 95) == [
        (80, "vcpu0", "exit", "local retry"),
        (82, "host0", "lock_wait", "kvm->srcu"),
        (83, "host1", "host_op", "interrupt vcpu0 0xec"),
        (85, "host1", "kick", "posted interrupt vector 0xec to vCPU 0"),
        (87, "host1", "host_op", "interrupt vcpu0 0xec", 0, None),
        (88, "vcpu0", "exit", "EPT violation handled", "RET_PF_RETRY", 5),
        (90, "vcpu0", "td_entry", None),
        (91, "host0", "lock", "kvm->srcu"),
        (92, "vcpu0", "guest_interrupt", (0xEC,)),
    ]
    assert not [f for f in frames if f.step.get("reason") == "KVM_EXIT_INTR"]
    # Taken once: processing the descriptor cleared PID.ON and the PIR.
    assert [f.index for f in frames if f.step.kind is TdxStep.GUEST_INTERRUPT] == [92]
    assert frames[94].step.kind is TdxStep.TDCALL      # then the ACCEPT runs again


def test_without_the_event_v6_16_livelocks() -> None:
    """The same run without host1 is the livelock of memslot_delete_during_fault_v6_16: the event is what ends it."""
    text = SIGNAL.read_text().replace('[[host]]\nprogram = ["signal vcpu0"]\n', "")
    text = text.replace('stop = "done"', 'stop = "livelock"')
    report = run_scenario(loads(text, str(SIGNAL)))
    assert report.facts.stop == "livelock"


def test_kvm_tdp_map_page_returns_eintr_on_a_pending_signal() -> None:
    """kvm_tdp_map_page: `if (signal_pending(current)) return -EINTR;` before each attempt, so no SEAMCALL."""
    results: list[int] = []

    def host(kvm: Any) -> Any:
        kvm.world.set(signal_key("host0"), True)
        r = yield from kvm.kvm_tdp_map_page(kvm.vcpus[0], 0x1000, PFERR_GUEST_FINAL_MASK | PFERR_PRIVATE_ACCESS, [1])
        results.append(r)

    built = build_vm(setup(lambda: iter(()), host_programs=(host,)))
    rt = Runtime(built.machine.world, built.tasks, ScheduleSpec(Policy.ROUND_ROBIN, 0, ("host0*20",)))
    rt.run()
    assert results == [-4]
    assert not seamcalls(rt)


PREFAULT = """\
title = "t"
[td]
gpaw = 48
[[memslot]]
gpa = 0x0
size = "2M"
guest_memfd = true
[attributes]
private = [[0x0, "2M"]]
[[vcpu]]
program = []
[[host]]
program = ["prefault 0x0 8K", "prefault 0x0 8K"]
[[host]]
program = ["signal host0"]
[schedule]
order = ["host1*3"]
"""


def test_kvm_vcpu_pre_fault_memory_returns_eintr_then_the_signal_is_handled() -> None:
    """kvm_vcpu_pre_fault_memory checks signal_pending before each mapping: the first KVM_PRE_FAULT_MEMORY
    returns -EINTR (-4) with nothing mapped; the VMM thread handles the signal on return to userspace, and
    the second maps both pages (0)."""
    sc = loads(PREFAULT, "prefault.toml")
    frames, _final, _kvm, stop = run_setup(build_setup(sc, Path(".")), schedule_of(sc), 10_000)
    assert stop == "done"
    assert [(f.task, f.step.get("op"), f.step.get("ret")) for f in frames
            if f.step.get("scenario_op") is not None and f.step.get("ret") is not None] == [
        ("host1", "signal host0", 0), ("host0", "prefault 0x0 8K", -4), ("host0", "prefault 0x0 8K", 0)]
    augs = [f for f in frames if f.step.kind is TdxStep.SEAMCALL and f.step.get("leaf").name == "TDH_MEM_PAGE_AUG"]
    assert [f.step.get("gpa") for f in augs] == [0x0, 0x1000]


@pytest.mark.parametrize(("op", "message"), [
    ("interrupt vcpu3", "unknown task 'vcpu3': expected one of vcpu0"),
    ("interrupt host0", "expected a vCPU task (vcpu0, vcpu1, ...), found 'host0'"),
    ("interrupt vcpu0 0x1f", "expected a VECTOR from 0x20 to 0xff (below 0x20 are exceptions), found '0x1f'"),
    ("signal host0", "unknown task 'host0': expected one of vcpu0, host1"),
    ("signal cpu0", "expected a task (vcpu0, host1, ...), found 'cpu0'"),
])
def test_bad_targets_are_one_problem(tmp_path: Path, op: str, message: str) -> None:
    p = tmp_path / "s.toml"
    p.write_text(PREFAULT.replace('["prefault 0x0 8K", "prefault 0x0 8K"]', f'["{op}"]'))
    err = io.StringIO()
    assert main(["validate", str(p)], io.StringIO(), err) == 2
    assert err.getvalue() == f"error: {p}:13: host[0].program[0]: {message}\n"
