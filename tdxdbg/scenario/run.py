"""Load -> build -> run -> facts -> expectations -> verdict: what `tdxdbg run` does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from tdxdbg.runtime.scheduler import Policy, ScheduleSpec
from tdxdbg.scenario.builder import build_setup
from tdxdbg.scenario.expectations import Result, evaluate
from tdxdbg.scenario.model import Scenario
from tdxdbg.scenario.ops import OpError, parse_u64, shown
from tdxdbg.scenario.runner import DEFAULT_MAX_FRAMES, run_setup
from tdxdbg.scenario.trace import Facts, collect, to_json_obj


@attrs.frozen
class Report:
    scenario: Scenario
    schedule: ScheduleSpec
    facts: Facts
    results: tuple[Result, ...]
    unexpected: tuple[Any, ...]       # violations the scenario did not expect
    ok: bool
    stop_message: str = ""            # the deadlock or livelock report ("" when the run ended)

    def json_obj(self) -> dict[str, Any]:
        return to_json_obj(self.scenario, self.scenario.td.variant, self.schedule, self.facts, self.results,
                           self.ok, self.stop_message)


class ScheduleError(ValueError):
    """A schedule override that is not round_robin, sequential, random or random:SEED (the message says so)."""


def schedule_of(scenario: Scenario, override: str | None = None) -> ScheduleSpec:
    """The scenario's [schedule], or `override` ("round_robin", "sequential", "random", "random:SEED").
    Raises ScheduleError for any other override."""
    s = scenario.schedule
    policy, seed = s.policy, s.seed
    if override is not None:
        name, _, seed_text = override.partition(":")
        bad = name not in ("round_robin", "sequential", "random") or (seed_text and name != "random")
        if not bad and seed_text:
            try:
                seed = parse_u64(seed_text, "a seed")
            except OpError:
                bad = True
        if bad:
            raise ScheduleError(f"--schedule: expected round_robin, sequential, random or random:SEED (SEED "
                                f"below 2^64), found {shown(override)}")
        policy = name
    return ScheduleSpec(Policy(policy), seed, s.order, s.livelock_frames)


def run_scenario(scenario: Scenario, schedule: ScheduleSpec | None = None,
                 max_frames: int | None = DEFAULT_MAX_FRAMES, events: bool = False) -> Report:
    schedule = schedule or schedule_of(scenario)
    setup = build_setup(scenario, Path(scenario.path).parent)
    frames, final, kvm, stop = run_setup(setup, schedule, max_frames)
    facts = collect(frames, final, kvm, stop, events)
    results = tuple(evaluate(scenario, facts, kvm, final.world))
    expected_names = {e.get("name") for e in scenario.expect if e.kind == "violation"}
    unexpected = tuple(v for v in facts.violations if v.invariant not in expected_names)
    expected_panics = {e.get("task") for e in scenario.expect if e.kind == "panic"}
    expect_stuck = any((e.kind == "stuck" and e.get("value")) or (e.kind == "stop" and e.get("value") == "deadlock")
                       for e in scenario.expect)
    expect_livelock = any(e.kind == "stop" and e.get("value") == "livelock" for e in scenario.expect)
    # A VM that died (KVM_BUG_ON, kvm_vm_dead) fails the run unless the scenario says `vm_dead = true`.
    expect_vm_dead = any(e.kind == "vm_dead" and e.get("value") for e in scenario.expect)
    ok = (all(r.ok for r in results) and not unexpected and not facts.errors
          and all(p.task in expected_panics for p in facts.panics)
          and (not facts.vm_dead or expect_vm_dead)
          and (stop == "done" or (stop == "stuck" and expect_stuck) or (stop == "livelock" and expect_livelock)))
    return Report(scenario, schedule, facts, results, unexpected, ok, final.stop_message)
