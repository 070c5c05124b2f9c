"""Step: what a task reports at a preemption point."""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple


class StepKind(enum.Enum):
    """Kinds the runtime itself produces; higher layers define their own enums."""

    TASK_START = "task_start"
    TASK_DONE = "task_done"
    TASK_ERROR = "task_error"
    WAIT = "wait"


_EMPTY: Mapping[str, Any] = {}


class Step(NamedTuple):
    """A preemption point: `kind` (any enum member) and a payload of plain values.

    `wait`, when given, is a predicate over the World (use `world.peek`): the task is not runnable until it
    holds, so a task waiting on a lock yields a Step with a wait instead of busy-looping.
    A NamedTuple rather than an attrs class: millions are created and kept, so construction cost and size matter.
    """

    kind: enum.Enum
    payload: Any = _EMPTY
    wait: Callable[[Any], bool] | None = None

    def get(self, name: str, default: Any = None) -> Any:
        """A payload field, whether the payload is a mapping or a NamedTuple."""
        payload = self.payload
        # A plain dict or a NamedTuple first: isinstance against the Mapping ABC goes through the ABC machinery.
        if payload.__class__ is dict:
            return payload.get(name, default)
        if isinstance(payload, tuple) or not isinstance(payload, Mapping):
            return getattr(payload, name, default)
        return payload.get(name, default)

    def fields(self) -> dict[str, Any]:
        """The payload as a dict (for views and export)."""
        payload = self.payload
        if isinstance(payload, Mapping):
            return dict(payload)
        as_dict = getattr(payload, "_asdict", None)
        return as_dict() if as_dict is not None else {"value": payload}
