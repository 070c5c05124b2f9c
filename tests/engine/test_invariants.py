"""The invariant registry (tdxdbg/engine/invariants.py): an invariant registered in one place runs and is a name
scenarios may expect; registrations that would never run are refused; the pre-filter (what each invariant
declares it watches) loses nothing against handing every invariant every frame."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tdxdbg.cli import main
from tdxdbg.engine.checks import make_checks
from tdxdbg.engine.invariants import REGISTRY, Invariant, invariant_names, register, unregister
from tdxdbg.engine.steps import EngineStep
from tdxdbg.engine.vm import build_vm
from tdxdbg.hw.tdx.leaves import Seamcall
from tdxdbg.hw.tdx.seamcall import TdxStep
from tdxdbg.hw.tdx.status import is_error
from tdxdbg.runtime import Runtime
from tdxdbg.runtime.frame import Violation
from tdxdbg.scenario.builder import build_setup
from tdxdbg.scenario.loader import load, shipped
from tdxdbg.scenario.run import run_scenario, schedule_of

SCENARIOS = Path(__file__).resolve().parents[2] / "tdxdbg" / "scenarios"


class SeptAddSucceeded(Invariant):
    """A stand-in invariant for the tests: every successful TDH.MEM.SEPT.ADD 'violates' it."""

    name = "test-sept-add-succeeded"
    description = "Every successful TDH.MEM.SEPT.ADD (a test of the registry)."
    kinds = frozenset({TdxStep.SEAMCALL_RETURN})

    def step(self, world: Any, task: str, step: Any, out: list[Violation]) -> None:
        if step.get("leaf") is Seamcall.TDH_MEM_SEPT_ADD and not is_error(step.get("rax")):
            out.append(Violation(self.name, f"SEPT.ADD by {task}"))


@pytest.fixture
def registered() -> Iterator[type[Invariant]]:
    register(SeptAddSucceeded)
    try:
        yield SeptAddSucceeded
    finally:
        unregister(SeptAddSucceeded.name)


def scenario_expecting(tmp_path: Path, name: str) -> Path:
    text = (SCENARIOS / "first_private_fault.toml").read_text()
    text = text.replace("no_violations = true", f'violation = "{name}"')
    p = tmp_path / "expects.toml"
    p.write_text(text)
    return p


def test_an_invariant_registered_in_one_place_runs_on_a_scenario(registered: type[Invariant],
                                                                 tmp_path: Path) -> None:
    """first_private_fault adds the S-EPT tables of TDX levels 3, 2 and 1: three successful SEPT.ADDs."""
    assert registered.name in invariant_names()
    report = run_scenario(load(scenario_expecting(tmp_path, registered.name)))
    assert [(v.invariant, v.message) for v in report.facts.violations] == \
        [(registered.name, "SEPT.ADD by vcpu0")] * 3
    assert report.ok  # the scenario expects exactly that invariant


def test_validate_rejects_an_unknown_invariant_name(tmp_path: Path) -> None:
    p = scenario_expecting(tmp_path, "test-sept-add-succeeded")
    out, err = io.StringIO(), io.StringIO()
    assert main(["validate", str(p)], out, err) == 2
    line = next(i for i, text in enumerate(p.read_text().splitlines(), 1) if "test-sept-add-succeeded" in text)
    assert err.getvalue() == (f"error: {p}:{line}: expect[4].violation: unknown invariant: expected one of "
                              f"{', '.join(invariant_names())}, found the string 'test-sept-add-succeeded'\n")
    assert out.getvalue() == ""


def test_validate_accepts_a_registered_invariant_name(registered: type[Invariant], tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    assert main(["validate", str(scenario_expecting(tmp_path, registered.name))], out, err) == 0, err.getvalue()


@pytest.mark.parametrize(("attrs", "message"), [
    ({}, "watches nothing"),
    ({"tags": frozenset({"pte"})}, "declares tags but does not override writes()"),
    ({"kinds": frozenset({EngineStep.RET_PF})}, "declares kinds but does not override step()"),
    ({"kinds": frozenset({EngineStep.RET_PF}), "step": lambda *a: None,
      "writes": lambda *a: None}, "overrides writes() but declares no tags"),
    ({"kinds": frozenset({EngineStep.RET_PF}), "step": lambda *a: None, "name": "Bad_Name"}, "kebab-case"),
    ({"kinds": frozenset({EngineStep.RET_PF}), "step": lambda *a: None, "name": "kvm-bug"},
     "registered already"),
    ({"kinds": frozenset({EngineStep.RET_PF}), "step": lambda *a: None, "description": ""},
     "a description is required"),
])
def test_register_refuses_an_invariant_that_would_never_run(attrs: dict[str, Any], message: str) -> None:
    fields = {"name": "test-never-runs", "description": "d", **attrs}
    cls = type("NeverRuns", (Invariant,), fields)
    before = dict(REGISTRY)
    with pytest.raises(ValueError, match=re.escape(message)):
        register(cls)
    assert before == REGISTRY


def _violations(path: Path, schedule: str | None, prefilter: bool) -> list[tuple[int, tuple[Violation, ...]]]:
    scenario = load(path)
    built = build_vm(build_setup(scenario, path.parent))
    rt = Runtime(built.machine.world, built.tasks, schedule_of(scenario, schedule),
                 checks=make_checks(built.kvm, prefilter=prefilter))
    rt.run(max_frames=200_000)
    frames = rt.timeline.frames
    return [(i, frames.violations[i]) for i in sorted(frames.violations)]


@pytest.mark.parametrize("path", shipped(), ids=lambda p: p.stem)
def test_prefiltered_checks_equal_every_invariant_on_every_frame(path: Path) -> None:
    """The registry's pre-filter (writes by declared tag, steps by declared kind, and the runtime skipping
    frames that wrote nothing and whose kind no invariant watches) reports exactly what every invariant reports
    when handed every write and every step of every frame, on every shipped scenario under its own schedule and
    a random one."""
    for schedule in (None, "random:7"):
        assert _violations(path, schedule, True) == _violations(path, schedule, False), schedule


def test_the_prefilter_comparison_can_fail() -> None:
    """An invariant that looks at a step kind it does not declare reports less when pre-filtered."""

    class Undeclared(Invariant):
        name = "test-undeclared-kind"
        description = "Looks at RET_PF but declares SEAMCALL (a test of the reference comparison)."
        kinds = frozenset({TdxStep.SEAMCALL})

        def step(self, world: Any, task: str, step: Any, out: list[Violation]) -> None:
            if step.kind is EngineStep.RET_PF:
                out.append(Violation(self.name, "RET_PF"))

    register(Undeclared)
    try:
        path = SCENARIOS / "first_private_fault.toml"
        filtered, unfiltered = (_violations(path, "round_robin", p) for p in (True, False))
        assert not any(v.invariant == Undeclared.name for _i, vs in filtered for v in vs)
        assert any(v.invariant == Undeclared.name for _i, vs in unfiltered for v in vs)
    finally:
        unregister(Undeclared.name)
