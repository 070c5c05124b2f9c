"""Step: what a task reports at a preemption point."""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import Any

import attrs


class StepKind(enum.Enum):
    """Kinds the runtime itself produces; higher layers define their own enums."""

    TASK_START = "task_start"
    TASK_DONE = "task_done"
    TASK_ERROR = "task_error"
    WAIT = "wait"


_EMPTY: Mapping[str, Any] = {}


@attrs.frozen(slots=True)
class Step:
    """A preemption point: `kind` (any enum member) and a payload of plain values.

    `wait`, when given, is a predicate over the World: the task is not runnable until it holds
    (a task spinning on a lock yields a Step with a wait instead of busy-looping).
    """

    kind: enum.Enum
    payload: Mapping[str, Any] = _EMPTY
    wait: Callable[[Any], bool] | None = attrs.field(default=None, eq=False, repr=False)

    def get(self, name: str, default: Any = None) -> Any:
        return self.payload.get(name, default)
