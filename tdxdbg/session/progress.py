"""Runs that cannot end: livelock (tasks run, nothing progresses) and deadlock (no task can run, some wait).

Progress is what a run exists for: a guest instruction retired (the vCPU's RIP moved: a read, a write, an
ACCEPT or a TDVMCALL completed), a leaf SPTE made present or zapped at a (root, gfn, level) for the first time
in the run, a page table freed, a host operation completed, a task finished. A run with no progress for
`bound` frames is a livelock: a RET_PF_RETRY loop that nothing ends, a BUSY retry that never succeeds, a
map/zap ping-pong. It is reported with the loop that repeats (the sequence of functions, task by task) and the
tasks that could have ended it: those that wrote, earlier, what the loop keeps reading.

A deadlock is the end of a run where tasks remain and none can run. It is reported as a wait-for graph: each
waiting task, what it waits for and the tasks holding it (tdxdbg.runtime.waits), with the cycle when there is
one (vcpu0 waits for mmu_lock (read) held by host0 -> host0 waits for a kvm->srcu grace period held by vcpu0).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from tdxdbg.engine.spte import is_last_spte, is_shadow_present_pte
from tdxdbg.engine.steps import EngineStep
from tdxdbg.runtime.scheduler import DEFAULT_LIVELOCK_FRAMES
from tdxdbg.runtime.step import StepKind
from tdxdbg.runtime.task import Task, TaskState
from tdxdbg.runtime.timeline import Timeline
from tdxdbg.runtime.waits import wait_description

_SPTE_KINDS = (EngineStep.SPTE_CMPXCHG, EngineStep.SPTE_WRITE)
_LONGEST_PERIOD = 2000        # the longest loop looked for, in frames
_LOOP_STEPS_SHOWN = 12        # functions of the loop named in the report
_KEYS_SHOWN = 3               # keys named per task that could have ended the loop
_TASKS_SHOWN = 8              # tasks named when listing those that run in the loop
# With many tasks round robin, each gets a turn in every len(tasks) frames: a vCPU needs a few dozen of its own
# frames from its thread's start to its first retired instruction, so the default bound is at least this many
# frames per task (3000 vCPUs starting together are not a livelock). A bound the scenario sets is kept as is.
FRAMES_PER_TASK = 200


class ProgressWatch:
    """Counts the frames since the last progress; says when they reach `bound` (0: never; None: the default
    for that many tasks)."""

    def __init__(self, timeline: Timeline, rip_keys: Mapping[str, Hashable], bound: int | None,
                 tasks: int = 1) -> None:
        self._frames = timeline.frames
        self._rip_keys = dict(rip_keys)
        self.bound = max(DEFAULT_LIVELOCK_FRAMES, FRAMES_PER_TASK * tasks) if bound is None else bound
        self.since = 0
        self._seen: set[tuple[str, int, int, bool]] = set()   # (root, gfn, level, present) of leaf changes
        # tdp_iter positions (root, level, gfn) visited since the last progress: a walk over new entries is
        # progress (a teardown walks thousands of entries between two changes), the same walk again is not.
        self._walked: set[tuple[str, int, int]] = set()

    def observe(self, index: int) -> bool:
        """Frame `index` was recorded. True when it is the `bound`-th frame in a row without progress (the
        count then starts again)."""
        if self._progress(index):
            self.since = 0
            return False
        self.since += 1
        if self.bound and self.since >= self.bound:
            self.since = 0
            return True
        return False

    def _progress(self, index: int) -> bool:
        frames = self._frames
        kind = frames.kind_of(index)
        if kind is EngineStep.ITER:
            pos = frames.payloads[index]
            where = (pos.root, pos.level, pos.gfn)
            if where in self._walked:
                return False
            self._walked.add(where)
            return True
        if self._done(frames, kind, index):
            self._walked.clear()
            return True
        return False

    def _done(self, frames: Any, kind: Any, index: int) -> bool:
        """Progress proper: a new mapping or zap, an instruction retired, an operation or a task done."""
        if kind in _SPTE_KINDS:
            c = frames.payloads[index]
            if c.ok and is_shadow_present_pte(c.old) != is_shadow_present_pte(c.new):
                leaf = c.new if is_shadow_present_pte(c.new) else c.old
                if is_last_spte(leaf, c.level):
                    where = (c.root, c.gfn, c.level, is_shadow_present_pte(c.new))
                    if where not in self._seen:
                        self._seen.add(where)
                        return True
            return False
        if kind is StepKind.TASK_DONE or kind is StepKind.TASK_ERROR:
            return True
        if kind is EngineStep.SP_FREE:
            # A page table unlinked and freed: tdp_mmu_zap_root's later passes (2M, 1G, root level) walk the
            # entries its 4K pass walked, and remove tables, not leaves.
            return True
        if kind is EngineStep.HOST_OP:
            payload = frames.payloads[index]
            return isinstance(payload, Mapping) and "ret" in payload
        rip = self._rip_keys.get(frames.task_of(index))
        return rip is not None and frames.wrote(index, rip)


def livelock_message(timeline: Timeline, index: int, bound: int, tasks: Sequence[Task], world: Any) -> str:
    """The report of a livelock found at frame `index` after `bound` frames without progress."""
    frames = timeline.frames
    start = index + 1 - bound
    labels = [_label(frames, i) for i in range(start, index + 1)]
    period = _period(labels)
    head = (f"livelock: no progress for {bound} frames (frames {start}-{index}: no guest instruction retired, "
            "no new mapping, no host operation completed)")
    if period is None:
        loop_frames = range(start, index + 1)
        text = f"; no loop repeats exactly; the last frames run {_sequence(labels[-_LOOP_STEPS_SHOWN:])}"
    else:
        loop_frames = range(index + 1 - period, index + 1)
        text = f"; the loop repeats every {period} frames: {_sequence(labels[-period:])}"
    in_loop = {frames.task_of(i) for i in loop_frames}
    return head + text + "; " + _enders(timeline, loop_frames, in_loop, tasks, world)


def _label(frames: Any, i: int) -> tuple[str, str]:
    stack = frames.stack_of(i)
    function = stack[-1].function.rpartition(".")[2] if stack else "-"
    kind = frames.kind_of(i)
    return frames.task_of(i), f"{function} ({kind.value})" if hasattr(kind, "value") else function


def _period(labels: list[tuple[str, str]]) -> int | None:
    """The shortest p such that the labels of the last 2p frames are the same p labels twice."""
    n = len(labels)
    for p in range(1, min(_LONGEST_PERIOD, n // 2) + 1):
        if labels[n - p:] == labels[n - 2 * p:n - p]:
            return p
    return None


def _sequence(labels: Sequence[tuple[str, str]]) -> str:
    """`vcpu0 f (kind) -> g (kind); vcpu1 h (kind)`: consecutive frames of one task joined, repeats collapsed."""
    parts: list[str] = []
    last_task = None
    last_label = None
    shown = 0
    for task, label in labels:
        if (task, label) == last_label:
            continue
        last_label = (task, label)
        if shown == _LOOP_STEPS_SHOWN:
            parts.append(" -> ...")
            break
        shown += 1
        if task != last_task:
            parts.append(("; " if parts else "") + f"{task} {label}")
            last_task = task
        else:
            parts.append(f" -> {label}")
    return "".join(parts)


def _enders(timeline: Timeline, loop_frames: range, in_loop: set[str], tasks: Sequence[Task], world: Any) -> str:
    """The tasks outside the loop that wrote, before it, keys the loop reads: running, they could end it."""
    frames = timeline.frames
    read: dict[Hashable, None] = {}
    for i in loop_frames:
        read.update(dict.fromkeys(frames.reads_of(i)))
    first = loop_frames.start
    wrote: dict[str, list[tuple[int, Hashable]]] = {}
    for key in read:
        j = timeline.last_write(key, first)
        if j is not None and (task := frames.task_of(j)) not in in_loop:
            wrote.setdefault(task, []).append((j, key))
    if not wrote:
        names = sorted(in_loop)
        shown = ", ".join(names[:_TASKS_SHOWN]) + (f" and {len(names) - _TASKS_SHOWN} more" if len(names) >
                                                   _TASKS_SHOWN else "")
        return f"only {shown} run in the loop and no other task ever wrote what it reads: no task could end it"
    by_name = {t.name: t for t in tasks}
    out = []
    for task, hits in sorted(wrote.items(), key=lambda kv: -max(j for j, _k in kv[1])):
        hits.sort(key=lambda h: -h[0])
        keys = ", ".join(_key_text(k) for _j, k in hits[:_KEYS_SHOWN])
        more = f" and {len(hits) - _KEYS_SHOWN} more" if len(hits) > _KEYS_SHOWN else ""
        out.append(f"{task} could have ended it (it wrote {keys}{more}, which the loop reads, last at frame "
                   f"{hits[0][0]}; {_state(by_name.get(task), world)})")
    return "; ".join(out)


def _state(task: Task | None, world: Any) -> str:
    if task is None:
        return "gone"
    if task.state is TaskState.WAITING:
        return "now " + _waiting(task, world)
    if task.state in (TaskState.DONE, TaskState.FAILED):
        return "now finished" if task.state is TaskState.DONE else "now failed"
    return "now runnable but not scheduled"


def _waiting(task: Task, world: Any) -> str:
    what, holders = wait_description(task.wait, world)
    text = f"waits for {what or 'a condition that does not say what it is'}"
    return text + (f" held by {', '.join(holders)}" if holders else "")


def _key_text(key: Hashable) -> str:
    if isinstance(key, tuple) and len(key) == 1:
        return str(key[0])
    if isinstance(key, tuple):
        return "(" + ", ".join(hex(p) if isinstance(p, int) and p > 9 else str(p) for p in key) + ")"
    return str(key)


def deadlock_message(tasks: Sequence[Task], world: Any, timeline: Timeline | None = None) -> str:
    """No task can run and some wait: each waiting task, what it waits for and who holds it, the cycle first
    when the waits form one. A wait that does not describe itself is named by the task's last frame (its
    function and what its step says), found in `timeline`."""
    waiting = [t for t in tasks if t.state is TaskState.WAITING]
    edges = {}
    for t in waiting:
        what, holders = wait_description(t.wait, world)
        edges[t.name] = (what or _last_step(timeline, t.name), holders)
    cycle = _cycle({name: holders for name, (_what, holders) in edges.items()})
    if cycle:
        links = []
        for k, name in enumerate(cycle):
            what, _holders = edges[name]
            links.append(f"{name} waits for {what} held by {cycle[(k + 1) % len(cycle)]}")
        return "deadlock: " + " -> ".join(links) + " (a cycle: none of them can run again)"
    finished = {t.name for t in tasks if t.finished}
    parts = []
    for t in waiting:
        what, holders = edges[t.name]
        text = f"{t.name} waits for {what}"
        if holders:
            text += " held by " + ", ".join(h + (" (finished)" if h in finished else "") for h in holders)
        parts.append(text)
    return "deadlock: no task can run; " + "; ".join(parts)


def _last_step(timeline: Timeline | None, task: str) -> str:
    """`what the step says (in function)` for the task's last frame."""
    frames = timeline.frames if timeline is not None else None
    if frames is not None:
        for i in range(len(frames) - 1, -1, -1):
            if frames.task_of(i) != task:
                continue
            payload = frames.payloads[i]
            get = getattr(payload, "get", None)
            said = get("what", None) or get("op", None) if get is not None else None
            stack = frames.stack_of(i)
            where = f"in {stack[-1].function.rpartition('.')[2]}" if stack else ""
            return " ".join(x for x in (str(said) if said else "a condition its wait does not name", where) if x)
    return "a condition its wait does not name"


def _cycle(graph: Mapping[str, Sequence[str]]) -> list[str]:
    """A cycle of the wait-for graph (task -> tasks holding what it waits for), or []."""
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                return path[path.index(nxt):]
            if nxt in graph and state.get(nxt) is None and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return []

    for node in graph:
        if state.get(node) is None and (found := visit(node)):
            return found
    return []
