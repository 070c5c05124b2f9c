"""`[[expect]] stop = "done" | "livelock" | "deadlock"`: a scenario can expect how its run ends, so that a run
that cannot end (story 3 in v6.16) is a passing scenario that shows the bug, and the fixed era fails it."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from tdxdbg.cli import main
from tdxdbg.runtime.scheduler import Policy, ScheduleSpec
from tdxdbg.scenario.loader import load, loads, scenarios_dir
from tdxdbg.scenario.model import ScenarioError
from tdxdbg.scenario.run import run_scenario

STORY3 = scenarios_dir() / "memslot_delete_during_fault_v6_16.toml"
STORY3_MESSAGE = (
    "livelock: no progress for 400 frames (frames 56-455: no guest instruction retired, no new mapping, no host "
    "operation completed); the loop repeats every 4 frames: vcpu0 record_ret_pf (ret_pf) -> "
    "tdx_handle_ept_violation (exit) -> kvm_mmu_page_fault (fault) -> kvm_mmu_faultin_pfn (faultin); host0 could "
    "have ended it (it wrote kvm.memslots, which the loop reads, last at frame 61; now waits for a kvm->srcu grace "
    "period (read sections that began before) held by vcpu0)")


def test_story3_v6_16_local_retry_holding_srcu_livelocks_with_memslot_deletion() -> None:
    """v6.16 tdx_handle_ept_violation retries RET_PF_RETRY (kvm_mmu_faultin_pfn on a KVM_MEMSLOT_INVALID slot)
    inside the vCPU's kvm->srcu read section, while kvm_swap_active_memslots waits in synchronize_srcu_expedited:
    the run stops as a livelock after livelock_frames = 400, and the scenario that expects it passes."""
    report = run_scenario(load(STORY3))
    assert (report.facts.stop, report.facts.frames, report.ok) == ("livelock", 456, True)
    assert report.stop_message == STORY3_MESSAGE
    r = report.results[0]
    assert (r.text, r.ok, r.detail) == (
        "the run ends in livelock", True, "the run ended livelock")
    # kvm_arch_flush_shadow_memslot never ran: no SEAMCALL from host0.
    assert [s.task for s in report.facts.seamcalls] == ["vcpu0"] * 4


def test_story3_fixed_in_upstream_fails_the_livelock_expectation() -> None:
    """Upstream's local retry stops on an invalid memslot (returns to userspace), synchronize_srcu_expedited
    returns and the deletion finishes: the run ends, so `stop = "livelock"` fails and the run exits 1."""
    out = io.StringIO()
    assert main(["run", str(STORY3), "--variant", "upstream"], out, io.StringIO()) == 1
    text = " ".join(out.getvalue().split())
    assert "FAIL the run ends in livelock (the run ended done)" in text
    assert "livelock:" not in text


def test_run_prints_the_expected_livelock_report_and_exits_0() -> None:
    out = io.StringIO()
    assert main(["run", str(STORY3)], out, io.StringIO()) == 0
    text = out.getvalue()
    assert " ".join(text.split()).count(STORY3_MESSAGE) == 1
    assert text.splitlines()[-1] == "OK"


def test_a_livelock_expected_as_a_deadlock_fails() -> None:
    text = STORY3.read_text().replace('stop = "livelock"', 'stop = "deadlock"')
    report = run_scenario(loads(text, str(STORY3)))
    assert report.ok is False
    assert (report.results[0].text, report.results[0].ok, report.results[0].detail) == (
        "the run ends in deadlock", False, "the run ended livelock")


def test_stop_done_holds_for_a_run_that_ends() -> None:
    text = STORY3.read_text().replace('stop = "livelock"', 'stop = "done"').replace('variant = "v6.16"', "")
    report = run_scenario(loads(text, str(STORY3)), ScheduleSpec(Policy.ROUND_ROBIN, 0, ("vcpu0*59", "host0*3")))
    assert (report.results[0].text, report.results[0].ok) == ("the run ends with every task done", True)


@pytest.mark.parametrize(("value", "found"), [('"hang"', "the string 'hang'"), ("true", "the boolean true")])
def test_a_bad_stop_is_one_problem(tmp_path: Path, value: str, found: str) -> None:
    p = tmp_path / "s.toml"
    p.write_text(STORY3.read_text().replace('stop = "livelock"', f"stop = {value}"))
    err = io.StringIO()
    assert main(["validate", str(p)], io.StringIO(), err) == 2
    line = p.read_text().splitlines().index(f"stop = {value}") + 1
    assert err.getvalue() == (f"error: {p}:{line}: expect[0].stop: expected how the run ends ('done', 'livelock', "
                              f"'deadlock'), found {found}\n")
    with pytest.raises(ScenarioError):
        load(p)


def test_json_trace_carries_the_livelock_report(tmp_path: Path) -> None:
    """`stop_report`: the same report text the summary prints, so a script reading the trace sees why it stopped."""
    import json

    path = tmp_path / "t.json"
    assert main(["run", str(STORY3), "--json", str(path)], io.StringIO(), io.StringIO()) == 0
    trace = json.loads(path.read_text())
    assert (trace["stop"], trace["stop_report"]) == ("livelock", STORY3_MESSAGE)


def test_json_trace_stop_report_is_null_when_the_run_ended(tmp_path: Path) -> None:
    import json

    path = tmp_path / "t.json"
    assert main(["run", str(STORY3), "--variant", "upstream", "--json", str(path)], io.StringIO(),
                io.StringIO()) == 1
    trace = json.loads(path.read_text())
    assert (trace["stop"], trace["stop_report"]) == ("done", None)
