"""The invariant registry: each invariant is one registered class that declares what it watches.

An invariant names the World key tags (the first element of a key tuple, e.g. "pte") whose writes it judges
and the step kinds it judges, plus its name (what scenario files write as `violation = "name"`) and a
description. `register` adds it; `Checker` makes one instance of every registered invariant per VM and hands
each frame only to the invariants that watch something in it. The declarations are the only pre-filter, so an
invariant cannot be registered without them, and tests run every invariant on every frame to prove that what
an invariant looks at is what it declares.

    @register
    class KvmBug(Invariant):
        name = "kvm-bug"
        description = "A KVM_BUG step: KVM_BUG_ON fired and the VM is dead."
        kinds = frozenset({EngineStep.KVM_BUG})

        def step(self, world, task, step, out):
            if step.kind is EngineStep.KVM_BUG and step.get("bug", True):
                out.append(Violation(self.name, "KVM_BUG_ON: ..."))
"""

from __future__ import annotations

import enum
import re
from collections.abc import Hashable
from typing import Any, ClassVar

from tdxdbg.runtime.frame import Violation
from tdxdbg.runtime.step import Step
from tdxdbg.runtime.world import World

# Reported when an invariant itself raises: a red frame naming the invariant, never a traceback.
CHECKER_ERROR = "checker-error"
_NAME = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")

Write = tuple[Hashable, Any, Any]


class Invariant:
    """One invariant of one VM. Subclasses set the class attributes and override the hooks they declared:
    `writes` when `tags` is not empty, `step` when `kinds` is not empty.

    Hooks must ignore what they do not look at: the pre-filter is an optimisation, and the reference mode
    (Checker(prefilter=False), used by the tests) hands every invariant every write and every step.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    # World key tags whose writes `writes` judges.
    tags: ClassVar[frozenset[str]] = frozenset()
    # Step kinds `step` judges.
    kinds: ClassVar[frozenset[enum.Enum]] = frozenset()

    def __init__(self, kvm: Any) -> None:
        self.kvm = kvm

    def seed(self, key: tuple, value: Any) -> None:
        """Called once per World entry with a watched tag when the checks are made (running indexes start from
        the built VM, not from empty)."""

    def writes(self, world: World, writes: list[Write], out: list[Violation]) -> None:
        """Judge a frame's writes (key, old, new) with watched tags, in write order; `world` is the state after
        the frame (read it with `peek`)."""

    def step(self, world: World, task: str, step: Step, out: list[Violation]) -> None:
        """Judge a frame's step (after its writes were judged)."""


# name -> invariant class, in registration order (the order a frame's violations are reported in).
REGISTRY: dict[str, type[Invariant]] = {}


def register(cls: type[Invariant]) -> type[Invariant]:
    """Add an invariant to every Checker made from now on. Refuses what would never run or be found."""
    name = cls.name
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"invariant {cls.__qualname__}: name must be kebab-case (like 'kvm-bug'), found {name!r}")
    if name in REGISTRY or name == CHECKER_ERROR:
        raise ValueError(f"invariant {name!r} is registered already")
    if not cls.description:
        raise ValueError(f"invariant {name!r}: a description is required")
    if not cls.tags and not cls.kinds:
        raise ValueError(f"invariant {name!r} watches nothing: declare the World key tags (tags) and/or the step "
                         f"kinds (kinds) it judges, or it never runs")
    if cls.tags and cls.writes is Invariant.writes:
        raise ValueError(f"invariant {name!r} declares tags but does not override writes()")
    if cls.kinds and cls.step is Invariant.step:
        raise ValueError(f"invariant {name!r} declares kinds but does not override step()")
    if not cls.tags and cls.writes is not Invariant.writes:
        raise ValueError(f"invariant {name!r} overrides writes() but declares no tags: it would never see a write")
    if not cls.kinds and cls.step is not Invariant.step:
        raise ValueError(f"invariant {name!r} overrides step() but declares no kinds: it would never see a step")
    REGISTRY[name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a registered invariant (tests that register their own)."""
    del REGISTRY[name]


def invariant_names() -> tuple[str, ...]:
    """Every name a scenario may expect: the registered invariants and checker-error."""
    return (*REGISTRY, CHECKER_ERROR)


class Checker:
    """Every registered invariant of one VM, as one runtime check.

    `step_kinds` tells the runtime which step kinds matter on a frame that wrote nothing (runtime.Check); the
    Checker itself hands a frame's writes only to the invariants watching their tags and its step only to
    those watching its kind. With `prefilter=False` every invariant sees every write and every step (the
    reference the tests compare against).
    """

    def __init__(self, kvm: Any, invariants: Any = None, prefilter: bool = True) -> None:
        classes = list(REGISTRY.values()) if invariants is None else list(invariants)
        self.invariants: list[Invariant] = [cls(kvm) for cls in classes]
        self.prefilter = prefilter
        by_tag: dict[str, list[Invariant]] = {}
        by_kind: dict[int, list[Invariant]] = {}
        for inv in self.invariants:
            for tag in inv.tags:
                by_tag.setdefault(tag, []).append(inv)
            for kind in inv.kinds:
                by_kind.setdefault(id(kind), []).append(inv)
        self._by_tag = by_tag
        # By identity: an enum member hashes in Python, and this look-up runs after every frame. Members are
        # singletons kept alive by the invariant classes, so their ids are stable.
        self._by_kind = by_kind
        self._writers = [inv for inv in self.invariants if inv.tags]
        self.step_kinds: frozenset[Any] | None = (
            frozenset(k for inv in self.invariants for k in inv.kinds) if prefilter else None)
        self._seed(kvm.world)

    def _seed(self, world: World) -> None:
        by_tag = self._by_tag
        for key, value in world.items():
            if key.__class__ is tuple and key:
                for inv in by_tag.get(key[0], ()):
                    inv.seed(key, value)

    def __call__(self, world: World, step: Step, effects: tuple) -> list[Violation]:
        """The violations of one frame: `effects` are its writes, flat (key, old, new, key, old, new, ...)."""
        out: list[Violation] = []
        if not self.prefilter:
            return self._unfiltered(world, step, effects, out)
        if effects:
            by_tag = self._by_tag
            if len(effects) == 3:
                # One write, the common case: no batching.
                key = effects[0]
                invs = by_tag.get(key[0]) if key.__class__ is tuple else None
                if invs is not None:
                    one = [(key, effects[1], effects[2])]
                    for inv in invs:
                        try:
                            inv.writes(world, one, out)
                        except Exception as exc:  # a checker bug is a red frame, never a traceback
                            out.append(self._error(inv, "writes", exc))
            else:
                self._batched(world, effects, out)
        invs = self._by_kind.get(id(step.kind))
        if invs is not None:
            task = world.task
            for inv in invs:
                try:
                    inv.step(world, task, step, out)
                except Exception as exc:
                    out.append(self._error(inv, getattr(step.kind, "name", step.kind), exc))
        return out

    def _batched(self, world: World, effects: tuple, out: list[Violation]) -> None:
        """Hand each invariant the writes with its tags, in write order (invariants in registration order)."""
        batches: dict[Invariant, list[Write]] | None = None
        by_tag = self._by_tag
        for i in range(0, len(effects), 3):
            key = effects[i]
            if key.__class__ is not tuple:
                continue
            invs = by_tag.get(key[0])
            if invs is None:
                continue   # most writes: a tag no invariant watches
            if batches is None:
                batches = {}
            w = (key, effects[i + 1], effects[i + 2])
            for inv in invs:
                b = batches.get(inv)
                if b is None:
                    batches[inv] = [w]
                else:
                    b.append(w)
        if batches is not None:
            for inv in self._writers:
                b = batches.get(inv)
                if b is not None:
                    try:
                        inv.writes(world, b, out)
                    except Exception as exc:
                        out.append(self._error(inv, "writes", exc))

    def _unfiltered(self, world: World, step: Step, effects: tuple, out: list[Violation]) -> list[Violation]:
        it = iter(effects)
        writes = list(zip(it, it, it, strict=True))
        if writes:
            for inv in self._writers:
                try:
                    inv.writes(world, writes, out)
                except Exception as exc:
                    out.append(self._error(inv, "writes", exc))
        task = world.task
        for inv in self.invariants:
            if inv.kinds:
                try:
                    inv.step(world, task, step, out)
                except Exception as exc:
                    out.append(self._error(inv, getattr(step.kind, "name", step.kind), exc))
        return out

    @staticmethod
    def _error(inv: Invariant, where: Any, exc: Exception) -> Violation:
        return Violation(CHECKER_ERROR, f"{inv.name} ({where}): {type(exc).__name__}: {exc}")
