"""Comparing two points of the debugger's timelines (two frames, or the same position of two branches): the
SPTEs of every root, the S-EPT entries, mmu_lock and the TDX locks, and where each task is. Plain values; the
UI lays them side by side."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from tdxdbg.session import views
from tdxdbg.session.tdx_state import tdx_state


@attrs.frozen(slots=True)
class Snapshot:
    """What a comparison looks at, at one position of one timeline."""

    label: str
    sptes: Mapping[tuple[str, int, int], int]                 # (root kind, gfn, KVM level) -> SPTE value
    sept: Mapping[tuple[int, int], str]                       # (gpa, TDX level) -> "STATE page 0x…"
    locks: Mapping[str, str]                                  # lock -> holders
    tasks: Mapping[str, str]                                  # task -> "frame N: function (step)"


@attrs.frozen(slots=True)
class DiffRow:
    category: str          # "SPTE" / "S-EPT" / "lock" (and TLB epoch, vCPUs) / "task"
    what: str
    left: str
    right: str


def snapshot(label: str, state: Mapping[Any, Any], ctx: views.VmContext, tasks: Mapping[str, str]) -> Snapshot:
    sptes: dict[tuple[str, int, int], int] = {}
    for root in views.roots(state, ctx):
        stack = [root.tree]
        while stack:
            t = stack.pop()
            for e in t.entries:
                sptes[(root.kind, e.gfn, e.level)] = e.value
                if e.child is not None:
                    stack.append(e.child)
    sept: dict[tuple[int, int], str] = {}
    tree = views.sept_tree(state, ctx)
    stack_s = [tree] if tree is not None else []
    while stack_s:
        t = stack_s.pop()
        for node in t.entries:
            e = node.entry
            sept[(e.gpa, e.level)] = f"{e.state.name} {e.pfn:#x}"
            if node.child is not None:
                stack_s.append(node.child)
    st = tdx_state(state, ctx.tdr)
    locks = {"mmu_lock": (f"write {st.mmu_lock_writer}" if st.mmu_lock_writer else
                          f"read {', '.join(sorted(st.mmu_lock_readers))}" if st.mmu_lock_readers else "free")}
    for x in st.locks:
        locks[x.name] = x.holders
    locks["TLB epoch"] = str(st.td_epoch)
    for v in st.vcpus:
        locks[f"vCPU{v.index}"] = f"in guest, epoch {v.epoch}" if v.in_guest else "outside the guest"
    return Snapshot(label, sptes, sept, locks, dict(tasks))


def diff(a: Snapshot, b: Snapshot) -> tuple[DiffRow, ...]:
    """Every SPTE, S-EPT entry, lock and task position that differs between `a` and `b` ("-" where absent)."""
    rows: list[DiffRow] = []
    for key in sorted(set(a.sptes) | set(b.sptes)):
        va, vb = a.sptes.get(key), b.sptes.get(key)
        if va != vb:
            kind, gfn, level = key
            rows.append(DiffRow("SPTE", f"{kind} gfn {gfn:#x} L{level}", "-" if va is None else f"{va:#018x}",
                                "-" if vb is None else f"{vb:#018x}"))
    for key in sorted(set(a.sept) | set(b.sept)):
        va_s, vb_s = a.sept.get(key, "FREE"), b.sept.get(key, "FREE")
        if va_s != vb_s:
            rows.append(DiffRow("S-EPT", f"gpa {key[0]:#x} L{key[1]}", va_s, vb_s))
    for name in sorted(set(a.locks) | set(b.locks)):
        la, lb = a.locks.get(name, "free"), b.locks.get(name, "free")
        if la != lb:
            rows.append(DiffRow("lock", name, la, lb))
    for name in sorted(set(a.tasks) | set(b.tasks)):
        ta, tb = a.tasks.get(name, "-"), b.tasks.get(name, "-")
        if ta != tb:
            rows.append(DiffRow("task", name, ta, tb))
    return tuple(rows)
