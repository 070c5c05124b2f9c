"""The parsed scenario: frozen values, nothing here knows TOML or the engine."""

from __future__ import annotations

from typing import Any

import attrs


@attrs.frozen
class Problem:
    """One error in a scenario file: where (file, key path, line) and what was expected and found."""

    file: str
    key: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ScenarioError(Exception):
    """A scenario that cannot be used; `problems` lists every error found."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


@attrs.frozen
class TdSpec:
    gpaw: int = 48
    variant: str = "upstream"
    sept_ve_disable: bool = True
    state: str = "runnable"      # or "initialized"

    @property
    def shared_bit(self) -> int:
        return 1 << (self.gpaw - 1)


@attrs.frozen
class MemslotSpec:
    id: int
    gpa: int
    size: int
    guest_memfd: bool = False
    readonly: bool = False
    dirty_log: bool = False


@attrs.frozen
class Op:
    """One program operation. `text` is the string as written; the other fields are what it says."""

    kind: str
    text: str
    gpa: int = 0
    size: int = 0
    value: int | None = None      # write VALUE, read ... expect VALUE
    level: int = 0                # accept: TDX level (0 = 4K, 1 = 2M); seamcall: LEVEL as written
    private: bool = False         # map_gpa / set_attributes direction
    slot: int = 0                 # delete_memslot, dirty_log
    on: bool = False              # dirty_log on|off
    leaf: str = ""                # seamcall: the leaf's enum name (TDH_MEM_SEPT_ADD)
    args: tuple[int, ...] = ()    # seamcall: the numbers given, in the order of the leaf's declared operands
    task: str = ""                # interrupt / signal: the task whose thread it targets


@attrs.frozen
class Inject:
    leaf: str          # Seamcall enum name
    occurrence: int
    status: int


@attrs.frozen
class Expect:
    """One expectation: its kind, the text shown in reports, and the kind's fields as a sorted tuple."""

    kind: str
    text: str
    fields: tuple[tuple[str, Any], ...] = ()

    def get(self, name: str, default: Any = None) -> Any:
        for k, v in self.fields:
            if k == name:
                return v
        return default


@attrs.frozen
class ScheduleModel:
    policy: str = "round_robin"
    seed: int = 0
    order: tuple[str, ...] = ()
    livelock_frames: int | None = None     # None: the default (DEFAULT_LIVELOCK_FRAMES)


@attrs.frozen
class Scenario:
    path: str
    name: str
    title: str
    description: str
    td: TdSpec
    memslots: tuple[MemslotSpec, ...]
    private: tuple[tuple[int, int], ...]          # (gpa, size)
    vcpus: tuple[tuple[Op, ...], ...]
    hosts: tuple[tuple[Op, ...], ...]
    schedule: ScheduleModel
    inject: tuple[Inject, ...]
    expect: tuple[Expect, ...]

    @property
    def task_names(self) -> tuple[str, ...]:
        return (*(f"vcpu{i}" for i in range(len(self.vcpus))), *(f"host{i}" for i in range(len(self.hosts))))
