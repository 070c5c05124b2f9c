"""Helpers for the engine tests: build a TD with vCPU/host programs, run it under a schedule, and pick frames.

Expected values are literals worked out from the kernel (make_spte, the RET_PF_* values of mmu_internal.h, the
order of the kvm_x86_ops hooks and their SEAMCALLs in tdx.c) so that a wrong constant or a reordered step in the
engine makes a test fail.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from tdxdbg.engine.gmem import Memslot
from tdxdbg.engine.steps import EngineStep
from tdxdbg.engine.vm import BuiltVm, VmSetup, build_vm
from tdxdbg.hw.tdx.leaves import Seamcall
from tdxdbg.hw.tdx.seamcall import TdxStep
from tdxdbg.runtime import Frame, Runtime, StepKind, StopReason
from tdxdbg.runtime.scheduler import Policy, ScheduleSpec

SHARED = 1 << 47                       # GPAW 48 shared bit (GPA)
SHARED_GFN = 1 << 35                   # ... as a gfn: kvm->arch.gfn_direct_bits
FROZEN = 0x8000_0000_0000_05A0         # FROZEN_SPTE
NONPRESENT = 0x8000_0000_0000_0000     # SHADOW_NONPRESENT_VALUE
RET_PF_RETRY = 1
RET_PF_FIXED = 5
RET_PF_SPURIOUS = 6
NPAGES = 16384                         # 64 MiB of guest memory at gfn 0


def setup(*vcpu_programs: Callable[[], Any], host_programs: tuple = (), private: tuple = ((0, NPAGES),),
          memslots: tuple | None = None, **kw: Any) -> VmSetup:
    slots = memslots if memslots is not None else (Memslot(0, 0, NPAGES, guest_memfd=True),)
    return VmSetup(memslots=slots, private_ranges=private, vcpu_programs=tuple(vcpu_programs),
                   host_programs=tuple(host_programs), **kw)


def run(s: VmSetup, policy: Policy = Policy.ROUND_ROBIN, seed: int = 0, order: tuple[str, ...] = (),
        max_frames: int = 100_000) -> tuple[BuiltVm, Runtime]:
    built = build_vm(s)
    rt = Runtime(built.machine.world, built.tasks, ScheduleSpec(policy, seed, order))
    reason = rt.run(max_frames=max_frames)
    assert reason is StopReason.DONE, (reason, [(t.name, t.state) for t in rt.tasks])
    return built, rt


def step_until(rt: Runtime, task: str, pred: Callable[[Frame], bool]) -> None:
    """Force `task` step by step until a frame it makes matches `pred` (fails if it cannot run)."""
    while True:
        f = rt.step(forced=task)
        assert f is not None, f"{task} cannot run"
        if pred(f):
            return


def frames(rt: Runtime, *kinds: Any, task: str | None = None, **fields: Any) -> list[Frame]:
    """Frames of the given step kinds (and task), whose payload fields equal `fields`."""
    out = []
    for f in rt.timeline.frames:
        if kinds and f.step.kind not in kinds:
            continue
        if task is not None and f.task != task:
            continue
        if all(f.step.get(k) == v for k, v in fields.items()):
            out.append(f)
    return out


def seamcalls(rt: Runtime, task: str | None = None, leaves: Iterable[Seamcall] | None = None) -> list[Frame]:
    """SEAMCALL entry frames (not TDH.VP.ENTER), optionally only `leaves`."""
    want = set(leaves) if leaves is not None else None
    return [f for f in frames(rt, TdxStep.SEAMCALL, task=task)
            if f.step.get("leaf") is not Seamcall.TDH_VP_ENTER and (want is None or f.step.get("leaf") in want)]


def leaf_names(fs: Iterable[Frame]) -> list[str]:
    return [f.step.get("leaf").name for f in fs]


def seamcall_return(rt: Runtime, entry: Frame) -> Frame:
    """The SEAMCALL_RETURN frame of the same task that follows `entry`."""
    for f in rt.timeline.frames[entry.index + 1:]:
        if f.task == entry.task and f.step.kind is TdxStep.SEAMCALL_RETURN:
            return f
    raise AssertionError(f"no return for frame {entry.index}")


def no_kvm_bug(rt: Runtime) -> None:
    bugs = frames(rt, EngineStep.KVM_BUG)
    assert not bugs, [f.step.payload for f in bugs]
    errors = frames(rt, StepKind.TASK_ERROR)
    assert not errors, [f.step.get("error") for f in errors]


def ret_pfs(rt: Runtime, task: str | None = None) -> list[tuple[str, int]]:
    return [(f.step.get("ret"), f.step.get("value")) for f in frames(rt, EngineStep.RET_PF, task=task)]


def walk(kvm: Any, root: int, gfn: int, gfn_bits: int = 0) -> list[tuple[int, int, int]]:
    """(level, index, value) of each entry a hardware-style walk for `gfn` reads under `root`: walk_spte stopped
    at each level in turn."""
    from tdxdbg.engine.tdp_iter import walk_spte

    out = []
    for target in range(kvm.root_level, 0, -1):
        level, _table, idx, v = walk_spte(kvm.world.peek, root, kvm.root_level, gfn | gfn_bits, target)
        out.append((level, idx, v))
        if level != target:
            out.pop()
            break
    return out


def leaf_value(kvm: Any, root: int, gfn: int, gfn_bits: int = 0) -> tuple[int, int]:
    """(level, value) of the last entry a hardware-style walk for `gfn` reaches under `root` (walk_spte)."""
    from tdxdbg.engine.tdp_iter import walk_spte

    level, _table, _idx, v = walk_spte(kvm.world.peek, root, kvm.root_level, gfn | gfn_bits)
    return level, v
