"""Opening a scenario for the debugger: a session, or the problems that stop one from being built."""

from __future__ import annotations

from pathlib import Path

import attrs

from tdxdbg.scenario import loader
from tdxdbg.scenario.builder import build_setup
from tdxdbg.scenario.model import Problem, Scenario, ScenarioError
from tdxdbg.scenario.run import ScheduleError, schedule_of
from tdxdbg.session.session import Session

DEMO = "demo"


@attrs.frozen
class Opened:
    """A scenario that loaded, with its session; or the problems (and the path) when it did not."""

    spec: str
    path: str
    session: Session | None = None
    scenario: Scenario | None = None
    problems: tuple[Problem, ...] = ()
    error: str = ""


def open_scenario(spec: str, variant: str | None = None, schedule: str | None = None) -> Opened:
    try:
        path = str(loader.resolve(spec))
    except Exception as exc:  # anything the user can reach ends as a message, never a traceback
        return Opened(spec, spec, error=f"{type(exc).__name__}: {exc}")
    try:
        scenario = loader.load(path, variant=variant)
        setup = build_setup(scenario, Path(path).parent)
        session = Session.open(setup, schedule_of(scenario, schedule))
    except ScenarioError as exc:
        return Opened(spec, path, problems=tuple(exc.problems))
    except ScheduleError as exc:
        return Opened(spec, path, error=str(exc))
    except Exception as exc:
        return Opened(spec, path, error=f"{type(exc).__name__}: {exc}")
    return Opened(spec, path, session=session, scenario=scenario)
