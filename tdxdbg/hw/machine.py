"""The emulated platform: one World holding host memory and the TDX module's state."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, TypeVar

from tdxdbg.hw.memory import HostMemory
from tdxdbg.hw.tdx.module import TdxModule
from tdxdbg.runtime.step import Step
from tdxdbg.runtime.world import World

T = TypeVar("T")


class Machine:
    """Host memory and the TDX module over one World."""

    def __init__(self, world: World | None = None) -> None:
        self.world = world if world is not None else World()
        self.memory = HostMemory(self.world)
        self.memory.init()
        self.tdx = TdxModule(self.world, self.memory)


def drive(gen: Generator[Step, Any, T], world: World | None = None, task: str = "host",
          steps: list[Step] | None = None) -> T:
    """Run a steppable generator to completion outside the scheduler (set-up code and tests)."""
    if world is not None:
        world.task = task
    try:
        while True:
            step = next(gen)
            if steps is not None:
                steps.append(step)
    except StopIteration as stop:
        return stop.value
