"""Scheduler: which runnable task advances at each step. The list of picks is the schedule."""

from __future__ import annotations

import enum
import random
from collections.abc import Sequence

import attrs

from tdxdbg.runtime.task import Task


class Policy(enum.Enum):
    SEQUENTIAL = "sequential"
    ROUND_ROBIN = "round_robin"
    RANDOM = "random"


# Frames a run may go without progress before a Session stops it as a livelock (tdxdbg.session.progress).
DEFAULT_LIVELOCK_FRAMES = 5000


@attrs.frozen(slots=True)
class ScheduleSpec:
    """A policy, its seed (for RANDOM), and an explicit prefix of task names consumed one per step; and how
    many frames without progress make a livelock (0: never; None: DEFAULT_LIVELOCK_FRAMES, or more with many
    tasks)."""

    policy: Policy = Policy.ROUND_ROBIN
    seed: int = 0
    order: tuple[str, ...] = ()
    livelock_frames: int | None = None


class Scheduler:
    """Deterministic choice among runnable tasks; the RNG is seeded and drawn once per pick."""

    def __init__(self, spec: ScheduleSpec) -> None:
        self.spec = spec
        self._rng = random.Random(spec.seed)
        self._last: int = -1
        self.skipped: list[tuple[int, str]] = []

    def pick(self, tasks: Sequence[Task], runnable: Sequence[int], step_index: int,
             forced: str | None = None) -> int:
        """Index into `tasks` of the task to run. `runnable` is non-empty and sorted.

        The policy proposes even when the pick is forced, so the RNG stream stays aligned with the step count.
        """
        policy = self.spec.policy
        if policy is Policy.SEQUENTIAL:
            choice = runnable[0]
        elif policy is Policy.ROUND_ROBIN:
            choice = next((i for i in runnable if i > self._last), runnable[0])
        else:
            choice = runnable[self._rng.randrange(len(runnable))]
        if forced is None and step_index < len(self.spec.order):
            forced = self.spec.order[step_index]
            idx = next((i for i in runnable if tasks[i].name == forced), None)
            if idx is None:
                self.skipped.append((step_index, forced))
            else:
                choice = idx
        elif forced is not None:
            idx = next((i for i in runnable if tasks[i].name == forced), None)
            if idx is None:
                raise ValueError(f"task {forced!r} is not runnable at step {step_index}")
            choice = idx
        self._last = choice
        return choice
