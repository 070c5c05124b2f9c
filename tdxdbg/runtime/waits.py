"""What a blocked task waits for. A wait predicate (Step.wait) may carry a description of the resource and a
function naming the tasks that hold it, so that a run where no task can run is reported as a wait-for graph
(`vcpu0 waits for mmu_lock (read) held by host0`). The attributes live on the predicate itself: the runtime
calls predicates on its hottest path and must not pay for the description."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

Pred = TypeVar("Pred", bound=Callable[..., bool])
Holders = Callable[[Any], Iterable[str]]


def waits_for(what: str, held_by: Holders | None = None) -> Callable[[Pred], Pred]:
    """Describe a wait predicate: `what` it waits for, and `held_by(world)` the tasks holding it up."""

    def describe(pred: Pred) -> Pred:
        pred.waits_for = what  # type: ignore[attr-defined]
        pred.held_by = held_by  # type: ignore[attr-defined]
        return pred

    return describe


def wait_description(pred: Callable[..., bool] | None, world: Any) -> tuple[str | None, tuple[str, ...]]:
    """(what the predicate waits for, the tasks holding it up), as far as the predicate says."""
    what = getattr(pred, "waits_for", None)
    held_by = getattr(pred, "held_by", None)
    holders = tuple(held_by(world)) if held_by is not None else ()
    return what, holders
