"""Task: a generator the scheduler advances one step at a time."""

from __future__ import annotations

import enum
from collections.abc import Callable, Generator
from typing import Any

from tdxdbg.runtime.step import Step


class TaskState(enum.Enum):
    READY = "ready"
    WAITING = "waiting"
    DONE = "done"
    FAILED = "failed"


class Task:
    """A named generator of Steps. `yield` is a preemption point, `yield from` a call."""

    __slots__ = ("error", "gen", "kind", "name", "result", "started", "state", "wait")

    def __init__(self, name: str, gen: Generator[Step, Any, Any], kind: str = "task") -> None:
        self.name = name
        self.kind = kind
        self.gen = gen
        self.state = TaskState.READY
        self.wait: Callable[[Any], bool] | None = None
        self.result: Any = None
        self.error: str | None = None
        # Whether the generator has run a step (before that, the World is where its entry starts from).
        self.started = False

    @property
    def finished(self) -> bool:
        return self.state in (TaskState.DONE, TaskState.FAILED)

    def __repr__(self) -> str:
        return f"Task({self.name!r}, {self.state.value})"
