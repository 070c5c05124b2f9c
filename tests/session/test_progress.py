"""Livelock and deadlock: a run that cannot end stops early and says why (tdxdbg.session.progress).

The livelock: a variant whose kvm_mmu_invalidate_end forgets the in_progress decrement, so every later fault in
the range fails mmu_invalidate_retry_gfn() and returns RET_PF_RETRY forever; the host task that left the
invalidation open is the one that could have ended it. The deadlock: a variant that holds mmu_lock for write
across synchronize_srcu_expedited() in kvm_swap_active_memslots, while a vCPU inside its SRCU read section
waits for mmu_lock (read): the wait-for cycle."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import pytest

from tdxdbg.cli import main
from tdxdbg.scenario.builder import build_setup
from tdxdbg.scenario.loader import load
from tdxdbg.scenario.run import run_scenario, schedule_of
from tdxdbg.session.events import StopReason
from tdxdbg.session.session import Session

LEAKY = textwrap.dedent('''
    from tdxdbg.engine.gmem import K_INVALIDATE, MmuInvalidate
    from tdxdbg.engine.variants.upstream import Upstream


    class LeakyInvalidate(Upstream):
        def kvm_mmu_invalidate_end(self) -> None:
            inv = self.world.get(K_INVALIDATE, MmuInvalidate())
            self.world.set(K_INVALIDATE, inv._replace(seq=inv.seq + 1))   # in_progress is never decremented
''')
LIVELOCK = textwrap.dedent('''
    title = "an invalidation that never ends"
    [td]
    variant = "leaky.py:LeakyInvalidate"
    [[memslot]]
    gpa = 0
    size = "2M"
    [[vcpu]]
    program = ["write 0x800000001000 1"]
    [[host]]
    program = ["invalidate 0 2M"]
    [schedule]
    order = ["host0*40"]
''')
SYNC = textwrap.dedent('''
    from tdxdbg.engine.variants.upstream import Upstream


    class SyncUnderMmuLock(Upstream):
        def kvm_swap_active_memslots(self, slots, what, slot_id):
            yield from self.write_lock()
            yield from super().kvm_swap_active_memslots(slots, what, slot_id)
            yield from self.write_unlock()
''')
DEADLOCK = textwrap.dedent('''
    title = "synchronize_srcu under mmu_lock"
    [td]
    variant = "sync.py:SyncUnderMmuLock"
    [[memslot]]
    gpa = 0
    size = "2M"
    guest_memfd = true
    [attributes]
    private = [[0, "2M"]]
    [[vcpu]]
    program = ["accept 0x1000"]
    [[host]]
    program = ["delete_memslot 0"]
    [schedule]
    order = ["vcpu0*12", "host0*40"]
''')

LIVELOCK_MESSAGE = (
    "livelock: no progress for 5000 frames (frames 9-5008: no guest instruction retired, no new mapping, no host "
    "operation completed); the loop repeats every 7 frames: vcpu0 kvm_mmu_page_fault (fault) -> "
    "kvm_mmu_faultin_pfn (faultin) -> record_ret_pf (ret_pf) -> tdx_handle_exit (exit) -> enter (td_entry) -> "
    "_run_guest (guest_access) -> enter (td_exit); host0 could have ended it (it wrote kvm.mmu_invalidate, which "
    "the loop reads, last at frame 5; now finished)")
DEADLOCK_MESSAGE = (
    "deadlock: vcpu0 waits for mmu_lock (read) held by host0 -> host0 waits for a kvm->srcu grace period (read "
    "sections that began before) held by vcpu0 (a cycle: none of them can run again)")


@pytest.fixture
def scenarios(tmp_path: Path) -> Path:
    (tmp_path / "leaky.py").write_text(LEAKY)
    (tmp_path / "livelock.toml").write_text(LIVELOCK)
    (tmp_path / "sync.py").write_text(SYNC)
    (tmp_path / "deadlock.toml").write_text(DEADLOCK)
    return tmp_path


def test_a_ret_pf_retry_loop_nothing_ends_is_a_livelock(scenarios: Path) -> None:
    report = run_scenario(load(scenarios / "livelock.toml"))
    assert (report.facts.stop, report.facts.frames, report.ok) == ("livelock", 5009, False)
    assert report.stop_message == LIVELOCK_MESSAGE


def test_a_wait_for_cycle_is_a_deadlock(scenarios: Path) -> None:
    report = run_scenario(load(scenarios / "deadlock.toml"))
    assert (report.facts.stop, report.facts.frames, report.ok) == ("stuck", 18, False)
    assert report.stop_message == DEADLOCK_MESSAGE


@pytest.mark.parametrize(("name", "message"), [("livelock", LIVELOCK_MESSAGE), ("deadlock", DEADLOCK_MESSAGE)])
def test_run_prints_the_report_and_exits_1(scenarios: Path, name: str, message: str) -> None:
    out = io.StringIO()
    assert main(["run", str(scenarios / f"{name}.toml")], out, io.StringIO()) == 1
    text = out.getvalue()
    assert " ".join(text.split()).count(message) == 1  # the console wraps long lines
    assert text.splitlines()[-1] == "FAILED"


def _session(path: Path) -> Session:
    scenario = load(path)
    return Session.open(build_setup(scenario, path.parent), schedule_of(scenario))


def test_continue_stops_at_the_livelock_recorded_or_not(scenarios: Path) -> None:
    """The debugger's `c` stops there too, whether it records the frames or walks recorded ones again."""
    s = _session(scenarios / "livelock.toml")
    ev = s.continue_()
    assert (ev.reason, ev.position, ev.message) == (StopReason.LIVELOCK, 5009, LIVELOCK_MESSAGE)
    s.goto(0)
    ev = s.continue_()
    assert (ev.reason, ev.position) == (StopReason.LIVELOCK, 5009)
    # Going on: the next report comes after another 5000 frames without progress.
    ev = s.continue_()
    assert (ev.reason, ev.position) == (StopReason.LIVELOCK, 10009)
    assert ev.message.startswith("livelock: no progress for 5000 frames (frames 5009-10008: ")


def test_the_scenario_sets_the_bound(scenarios: Path) -> None:
    text = LIVELOCK.replace('order = ["host0*40"]', 'order = ["host0*40"]\nlivelock_frames = 70')
    (scenarios / "short.toml").write_text(text)
    report = run_scenario(load(scenarios / "short.toml"))
    assert (report.facts.stop, report.facts.frames) == ("livelock", 79)
    assert report.stop_message.startswith("livelock: no progress for 70 frames (frames 9-78: ")
    (scenarios / "off.toml").write_text(text.replace("livelock_frames = 70", "livelock_frames = 0"))
    report = run_scenario(load(scenarios / "off.toml"), max_frames=20_000)
    assert (report.facts.stop, report.facts.frames, report.stop_message) == ("max_frames", 20_000, "")


@pytest.mark.parametrize(("value", "message"), [
    ("-1", "expected a number of frames from 0 (off) to 1000000, found -1"),
    ("1000001", "expected a number of frames from 0 (off) to 1000000, found 1000001"),
    ('"5000"', "expected a number of frames (0 turns livelock detection off), found the string '5000'"),
])
def test_a_bad_bound_is_one_problem(scenarios: Path, value: str, message: str) -> None:
    p = scenarios / "bad.toml"
    p.write_text(LIVELOCK.replace('order = ["host0*40"]', f'order = ["host0*40"]\nlivelock_frames = {value}'))
    err = io.StringIO()
    assert main(["validate", str(p)], io.StringIO(), err) == 2
    assert err.getvalue() == f"error: {p}:14: schedule.livelock_frames: {message}\n"


def test_a_wait_nothing_holds_is_a_deadlock_named_by_its_step(tmp_path: Path) -> None:
    """A build-time TD (OP_STATE INITIALIZED) that is never finalized: the vCPU thread waits for
    KVM_TDX_FINALIZE_VM, which no task will issue. Its wait does not name a holder; the report names it by the
    task's last step."""
    p = tmp_path / "never_finalized.toml"
    p.write_text('[td]\nstate = "initialized"\n[[memslot]]\ngpa = 0\nsize = "16M"\nguest_memfd = true\n'
                 '[[vcpu]]\nprogram = ["read 0x1000"]\n')
    report = run_scenario(load(p))
    assert (report.facts.stop, report.ok) == ("stuck", False)
    assert report.stop_message == ("deadlock: no task can run; vcpu0 waits for VMM: waiting for "
                                   "KVM_TDX_FINALIZE_VM in vcpu_thread")


def test_the_bound_grows_with_the_number_of_tasks() -> None:
    """Round robin over many tasks gives each one turn in so many frames: 3000 vCPUs starting together take
    more than 5000 frames before the first instruction retires, and that is not a livelock."""
    from tdxdbg.runtime.timeline import Timeline
    from tdxdbg.session.progress import FRAMES_PER_TASK, ProgressWatch

    assert FRAMES_PER_TASK == 200
    assert ProgressWatch(Timeline({}), {}, None, tasks=3).bound == 5000
    assert ProgressWatch(Timeline({}), {}, None, tasks=3000).bound == 600_000
    # A bound the scenario sets is kept.
    assert ProgressWatch(Timeline({}), {}, 70, tasks=3000).bound == 70
    assert ProgressWatch(Timeline({}), {}, 0, tasks=3000).bound == 0
