"""Session: the debugger the UI and CLI drive. A cursor over a recorded timeline, commands that move it (running
the engine past the recorded end), breakpoints, forks, and read-only views of any position.

Cursor: `position` p in 0 .. len(frames) is the state after frames[0:p]; the frame at the cursor is frames[p - 1]
(None at p = 0). Inside the recorded range commands only move the cursor; past its end they run the engine.
Commands never raise for user-level misuse: they return a StopEvent with reason ERROR and a message.
Not thread-safe, except `interrupt()`, which a UI may call from another thread while a command runs.
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from types import MappingProxyType
from typing import Any

import attrs

from tdxdbg.engine.checks import make_checks
from tdxdbg.engine.steps import EngineStep
from tdxdbg.engine.vm import BuiltVm, VmSetup, build_vm, clone_vm
from tdxdbg.hw.ept import level_size
from tdxdbg.hw.tdx.seamcall import TdxStep
from tdxdbg.runtime.frame import Frame, Violation, plain_locals
from tdxdbg.runtime.replay import ReplayMismatch, TaskReplay
from tdxdbg.runtime.runtime import Check, Runtime
from tdxdbg.runtime.scheduler import ScheduleSpec
from tdxdbg.runtime.step import StepKind
from tdxdbg.runtime.task import TaskState
from tdxdbg.runtime.timeline import FrameStore
from tdxdbg.session import compare, views
from tdxdbg.session.breakpoints import Breakpoint, BreakpointError, Breakpoints, stack_names
from tdxdbg.session.decode import SeptEntryView
from tdxdbg.session.events import StopEvent, StopReason
from tdxdbg.session.progress import ProgressWatch, deadlock_message, livelock_message
from tdxdbg.session.seamcall_view import SeamcallView, seamcall_view
from tdxdbg.session.tdx_state import TdxStateView, tdx_state

ChecksFactory = Callable[[Any], Sequence[Check]]

# How often (in frames) a running command looks at the interrupt flag.
INTERRUPT_EVERY = 256
_DONE_KINDS = (StepKind.TASK_DONE, StepKind.TASK_ERROR)


@attrs.frozen(slots=True)
class TaskInfo:
    name: str
    kind: str          # "vcpu" / "host"


@attrs.frozen(slots=True)
class Branch:
    """A timeline the session keeps: its schedule (`picks`, replaying them rebuilds it exactly) and the position
    where it forked from the timeline it was made from (0 for the first one)."""

    id: int
    name: str
    picks: tuple[str, ...]
    fork_position: int
    parent: int | None


@attrs.frozen(slots=True)
class ForkRecord:
    """A timeline abandoned by `choose_task`: where it forked, what ran there before and what runs now, how long
    it was, and its picks (replaying them rebuilds it)."""

    position: int
    replaced: str
    chosen: str
    length: int
    picks: tuple[str, ...]


class FramesView(Sequence[Frame]):
    """The recorded frames, read-only, without copying them. Indexing builds a Frame; the `*_of` accessors read
    one column of a frame without building it (for loops over many frames)."""

    __slots__ = ("_frames",)

    def __init__(self, frames: FrameStore) -> None:
        self._frames = frames

    def __len__(self) -> int:
        return len(self._frames)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return tuple(self._frames[i])
        return self._frames[i]

    def __iter__(self) -> Iterator[Frame]:
        return iter(self._frames)

    def task_of(self, i: int) -> str:
        return self._frames.task_of(i)

    def kind_of(self, i: int) -> Any:
        """The kind of frame i's step."""
        return self._frames.kind_of(i)

    def payload_of(self, i: int) -> Any:
        """The payload of frame i's step."""
        return self._frames.payloads[i]

    def violations_of(self, i: int) -> tuple[Violation, ...]:
        return self._frames.violations.get(i, ())


# Keys whose change invalidates the cached view of the table page named by their second element.
_TABLE_KEYS = frozenset({"pte", "sept", "kvm.sp", "mem.fill"})
# Moving further than this many frames rebuilds the trees from scratch instead of replaying changes.
TREE_CACHE_SPAN = 5000
# Live replays kept (runtime/replay.py): stepping forward from a shown frame continues one of them, so showing
# the next frame's locals costs the frames in between, not a replay from the task's last quiescent point.
REPLAY_CACHE = 8
# Rebuilt locals kept, per (task, frame).
LOCALS_CACHE = 64


class Session:
    """One TD under the debugger: a setup, a schedule, the timeline recorded so far and a cursor on it."""

    def __init__(self, setup: VmSetup, schedule: ScheduleSpec | None = None,
                 checks_factory: ChecksFactory | None = None) -> None:
        self.setup = setup
        self.schedule = schedule or ScheduleSpec()
        self._checks_factory = checks_factory
        self._interrupt = threading.Event()
        # Called every INTERRUPT_EVERY frames of a long command with the number of frames recorded so far, from
        # the thread running it (the UI posts it as a message; it must not read the session).
        self.progress: Callable[[int], None] | None = None
        self._pos = 0
        self._selected: str | None = None
        self.forks: list[ForkRecord] = []
        # Branches: the current timeline is self.branch; the others are kept by their picks (the current one's
        # picks are the live recording's, so its entry is refreshed whenever it is read or left).
        self._branches: dict[int, Branch] = {1: Branch(1, "main", (), 0, None)}
        self.branch = 1
        self._use(self._build())
        kvm = self._vm.kvm
        self.context = views.VmContext(kvm.tdr, kvm.gfn_direct_bits, kvm.root_level, getattr(kvm, "name", ""))
        self.tasks: tuple[TaskInfo, ...] = tuple(TaskInfo(t.name, t.kind) for t in self._rt.tasks)
        self._task_names = frozenset(t.name for t in self.tasks)
        self.breakpoints = Breakpoints(gfn_mask=~kvm.gfn_direct_bits)

    @classmethod
    def open(cls, setup: VmSetup, schedule: ScheduleSpec | None = None,
             checks_factory: ChecksFactory | None = None) -> Session:
        """Build the VM (nothing runs yet: position 0). `checks_factory(kvm)` gives the runtime checks; by
        default `tdxdbg.engine.checks.make_checks`."""
        return cls(setup, schedule, checks_factory if checks_factory is not None else make_checks)

    # -- building and replaying ---------------------------------------------------------------------------------
    def _build(self, picks: Sequence[str] = ()) -> _Recording:
        vm = build_vm(self.setup)
        checks = list(self._checks_factory(vm.kvm)) if self._checks_factory is not None else []
        rt = Runtime(vm.machine.world, vm.tasks, self.schedule, checks)
        rec = _Recording(vm, rt, self.schedule.livelock_frames)
        for name in picks:
            if rec.step(name) is None:
                raise RuntimeError(f"replay diverged: {name!r} not runnable at frame {len(rt.timeline)}")
        return rec

    def _use(self, rec: _Recording) -> None:
        self._rec = rec
        self._vm = rec.vm
        self._rt = rec.rt
        self._task_frames = rec.task_frames
        self._prev = rec.prev
        self._waits = rec.waits
        self._tree_cache = views.TreeCache()   # cached trees belong to the timeline they were built from
        # Live replays and rebuilt locals belong to it too.
        self._replays: OrderedDict[int, TaskReplay] = OrderedDict()
        self._locals: OrderedDict[tuple[str, int, Any], views.TaskLocals] = OrderedDict()

    # -- read-only state --------------------------------------------------------------------------------------
    @property
    def position(self) -> int:
        return self._pos

    @property
    def frames(self) -> FramesView:
        return FramesView(self._rt.timeline.frames)

    def __len__(self) -> int:
        return len(self._rt.timeline.frames)

    @property
    def frame(self) -> Frame | None:
        """The frame at the cursor: the last one executed before it (None at position 0)."""
        return self._rt.timeline.frames[self._pos - 1] if self._pos else None

    @property
    def finished(self) -> bool:
        """Every task has finished (nothing more will ever be recorded)."""
        return self._rt.finished

    @property
    def current_task(self) -> str | None:
        """The task stepping follows: the selected one, else the task of the frame at the cursor."""
        if self._selected is not None:
            return self._selected
        f = self.frame
        return f.task if f is not None else None

    @property
    def variant(self) -> str:
        return self.context.variant

    @property
    def picks(self) -> tuple[str, ...]:
        """The schedule recorded so far (task of each frame)."""
        return tuple(self._rt.schedule)

    def state_at(self, position: int | None = None) -> MappingProxyType:
        """The raw world state at `position` (default: the cursor), read-only. Valid only until the next call
        that reads state: copy what you keep."""
        pos = self._pos if position is None else position
        return MappingProxyType(self._rt.timeline.state_at(pos))

    def _state(self, position: int | None) -> Any:
        pos = self._pos if position is None else position
        if not 0 <= pos <= len(self._rt.timeline.frames):
            raise IndexError(f"position {pos} outside 0..{len(self._rt.timeline.frames)}")
        return self._rt.timeline.state_at(pos)

    def last_write(self, key: Hashable, before: int | None = None) -> int | None:
        """Index of the last frame before position `before` (default: the cursor) that wrote `key`."""
        return self._rt.timeline.last_write(key, self._pos if before is None else before)

    def _latest_of(self, task: str, position: int) -> int | None:
        """Index of the latest frame of `task` at or before frame position - 1."""
        idx = self._task_frames.get(task)
        if not idx:
            return None
        k = bisect.bisect_left(idx, position) - 1
        return idx[k] if k >= 0 else None

    def walk_path(self, task: str, position: int | None = None, limit: int = 400) -> tuple[Any, ...]:
        """The task's tdp_iter path as of `position`: for each level from the root down to where the iterator
        is, the latest position it read there (IterPos), since the walk last started at the root."""
        pos = self._pos if position is None else position
        idx = self._task_frames.get(task)
        if not idx:
            return ()
        frames = self._rt.timeline.frames
        k = bisect.bisect_left(idx, pos) - 1
        by_level: dict[int, Any] = {}
        current = None
        seen = 0
        while k >= 0 and seen < limit:
            f = frames[idx[k]]
            k -= 1
            seen += 1
            kind = f.step.kind
            if kind is EngineStep.ITER:
                p = f.step.payload
                if current is None:
                    current = p.level
                if p.level >= current and p.level not in by_level:
                    by_level[p.level] = p
                if p.level == self.context.kvm_root_level:
                    break
            elif kind in (EngineStep.RET_PF, EngineStep.FAULT) and current is None:
                break  # the task is not walking: no path to show
            elif kind is EngineStep.LOCK and current is not None and f.step.get("action") == "acquire":
                break  # the walk started after this lock was taken
        return tuple(by_level[lv] for lv in sorted(by_level, reverse=True))

    # -- views --------------------------------------------------------------------------------------------------
    def view(self, position: int | None = None) -> views.StateView:
        """Everything at `position` (default: the cursor) as frozen values."""
        pos = self._pos if position is None else position
        tasks = self.task_views(pos)
        state = self._state(pos)
        self._invalidate_trees(pos)
        cache = self._tree_cache
        roots = views.roots(state, self.context, cache)
        sept = views.sept_tree(state, self.context, cache)
        cache.position = pos
        mirror_pfn = views.root_pfn(state, "mirror")
        direct_pfn = views.root_pfn(state, "direct")
        return views.StateView(
            pos,
            next((r for r in roots if r.pfn == mirror_pfn), None),
            next((r for r in roots if r.pfn == direct_pfn), None),
            roots, sept, views.private_ranges(state), views.memslots(state),
            views.td_view(state, self.context), views.kvm_view(state), tasks)

    def _invalidate_trees(self, pos: int) -> None:
        """Forget cached views of page-table pages (KVM's and the S-EPT's) written between the cached trees'
        position and `pos`, and of their ancestors; when that span is long, drop the whole cache."""
        cache = self._tree_cache
        frames = self._rt.timeline.frames
        if cache.position is None or cache.position > len(frames) or abs(pos - cache.position) > TREE_CACHE_SPAN:
            cache.clear()
            return
        lo, hi = sorted((cache.position, pos))
        dirty: set[int] = set()
        effects = frames.effects
        for i in range(lo, hi):
            flat = effects[i]
            for j in range(0, len(flat), 3):
                k = flat[j]
                if type(k) is tuple and k[0] in _TABLE_KEYS:
                    dirty.add(k[1])
        cache.invalidate(dirty)

    def mirror_tree(self, position: int | None = None) -> views.RootView | None:
        return views.root_view(self._state(position), self.context, "mirror")

    def direct_tree(self, position: int | None = None) -> views.RootView | None:
        return views.root_view(self._state(position), self.context, "direct")

    def roots(self, position: int | None = None) -> tuple[views.RootView, ...]:
        return views.roots(self._state(position), self.context)

    def sept_tree(self, position: int | None = None) -> views.SeptTableView | None:
        return views.sept_tree(self._state(position), self.context)

    def spte_at(self, kind: str, gfn: int, level: int = 1, position: int | None = None) -> views.SpteLocation | None:
        """The `kind` ("mirror" / "direct") SPTE for `gfn` at KVM `level` (or where the walk stops above it)."""
        return views.spte_at(self._state(position), self.context, kind, gfn, level)

    def sept_entry_at(self, gpa: int, level: int = 0, position: int | None = None) -> SeptEntryView | None:
        """The S-EPT entry for `gpa` at TDX `level` (or where the walk stops above it)."""
        return views.sept_entry_at(self._state(position), self.context, gpa, level)

    def private_ranges(self, position: int | None = None) -> tuple[tuple[int, int], ...]:
        return views.private_ranges(self._state(position))

    def memslots(self, position: int | None = None) -> tuple:
        return views.memslots(self._state(position))

    def td(self, position: int | None = None) -> views.TdView:
        return views.td_view(self._state(position), self.context)

    def kvm(self, position: int | None = None) -> views.KvmView:
        return views.kvm_view(self._state(position))

    def task_view(self, name: str, position: int | None = None) -> views.TaskView | None:
        for t in self.task_views(position):
            if t.name == name:
                return t
        return None

    # -- locals (rebuilt by replay) -------------------------------------------------------------------------------
    def task_locals(self, task: str, index: int | None = None,
                    render: Callable[[dict[str, Any]], Any] = plain_locals) -> views.TaskLocals:
        """`task`'s local variables, per activation of its call stack (outermost first), after its latest frame
        at or before frame `index` (default: the frame at the cursor), as they were then.

        They are not recorded: the task is recreated at its last quiescent point before that frame and
        re-executed over the World as it was (runtime/replay.py), each frame checked against the record; a
        difference is reported in `error` ("replay mismatch at frame K: ..."). `render` turns each activation's
        live locals into the values returned (default: for display, rendered as they are then)."""
        if task not in self._task_names:
            raise KeyError(task)
        frames = self._rt.timeline.frames
        pos = self._pos if index is None else index + 1
        j = self._latest_of(task, min(pos, len(frames)))
        if j is None or frames.kind_of(j) in _DONE_KINDS:
            return views.TaskLocals(task, j)
        memo_key = (task, j, render)
        hit = self._locals.get(memo_key)
        if hit is not None:
            self._locals.move_to_end(memo_key)
            return hit
        try:
            replay = self._replay_for(task, j)
            replay.advance_to(j)
            live = replay.locals()
            if len(live) != len(frames.stack_of(j)):
                raise ReplayMismatch(f"replay mismatch at frame {j}: {task} has {len(live)} activations, "
                                     f"recorded {len(frames.stack_of(j))}")
            out = views.TaskLocals(task, j, tuple(render(scope) for scope in live))
        except ReplayMismatch as exc:
            self._drop_replays(task)
            out = views.TaskLocals(task, j, (), str(exc))
        except Exception as exc:  # an engine bug while re-executing: reported, never a traceback
            self._drop_replays(task)
            out = views.TaskLocals(task, j, (), f"replay mismatch at frame {j}: {type(exc).__name__}: {exc}")
        self._locals[memo_key] = out
        if len(self._locals) > LOCALS_CACHE:
            self._locals.popitem(last=False)
        return out

    def _replay_for(self, task: str, index: int) -> TaskReplay:
        """A live replay of `task` that can reach its frame `index`: a cached one already between the task's
        last quiescent frame before `index` and `index`, else a new one started there."""
        timeline = self._rt.timeline
        start = timeline.frames.rest_before(task, index)
        if start is None:
            raise ReplayMismatch(f"replay mismatch at frame {index}: {task} has no frame to start from")
        best = None
        for key, r in self._replays.items():
            if (r.task == task and not r.finished and r.frame is not None and start <= r.frame <= index
                    and (best is None or r.frame > best[1].frame)):
                best = (key, r)
        if best is not None:
            self._replays.move_to_end(best[0])
            return best[1]
        kvm = self._vm.kvm
        entry = self._vm.entries[task]
        replay = TaskReplay(timeline, task, start, self._task_frames[task],
                            lambda world: entry(clone_vm(kvm, world)))
        self._replays[id(replay)] = replay
        if len(self._replays) > REPLAY_CACHE:
            self._replays.popitem(last=False)
        return replay

    def _drop_replays(self, task: str) -> None:
        for key in [k for k, r in self._replays.items() if r.task == task]:
            del self._replays[key]

    def task_views(self, position: int | None = None, with_locals: bool = True) -> tuple[views.TaskView, ...]:
        """Each task's state and call stack (with its locals, unless `with_locals` is false) as of its latest
        frame at or before `position`."""
        pos = self._pos if position is None else position
        frames = self._rt.timeline.frames
        out = []
        peek = None
        for info in self.tasks:
            j = self._latest_of(info.name, pos)
            if j is None:
                out.append(views.TaskView(info.name, info.kind, "not started", None, ()))
                continue
            f = frames[j]
            kind = f.step.kind
            if kind is StepKind.TASK_DONE:
                state = "done"
            elif kind is StepKind.TASK_ERROR:
                state = "failed"
            elif j in self._waits:
                if peek is None:
                    peek = views.PeekState(self._state(pos))
                try:
                    state = "runnable" if self._waits[j](peek) else "waiting"
                except Exception:
                    state = "waiting"
            else:
                state = "ready"
            stack = []
            names = stack_names(f.stack)
            loc = self.task_locals(info.name, j) if with_locals and f.stack else None
            scopes = loc.scopes if loc is not None else ()
            for k, entry in enumerate(f.stack):
                scope = scopes[k] if k < len(scopes) else ()
                stack.append(views.ActivationView(names[k], entry.function, entry.filename, entry.line, scope))
            out.append(views.TaskView(info.name, info.kind, state, j, tuple(stack),
                                      getattr(kind, "value", str(kind)), loc.error if loc is not None else ""))
        return tuple(out)

    def runnable_tasks(self, position: int | None = None) -> tuple[str, ...]:
        """Tasks that could run next at `position` (default: the cursor)."""
        pos = self._pos if position is None else position
        if pos == len(self._rt.timeline.frames):
            return tuple(self._rt.tasks[i].name for i in self._rt.runnable())
        return tuple(t.name for t in self.task_views(pos) if t.state in ("not started", "ready", "runnable"))

    def tdx_state(self, position: int | None = None) -> TdxStateView:
        """TLB epoch, vCPUs in/out of the guest, BLOCKED entries with their BLOCK epoch, mmu_lock and TDX locks."""
        return tdx_state(self._state(position), self.context.tdr)

    def seamcall_at(self, frame_index: int, position: int | None = None) -> SeamcallView | None:
        """The SEAMCALL frame `frame_index` is part of, as far as the cursor (`position`) has seen it."""
        pos = self._pos if position is None else position
        frames = self._rt.timeline.frames
        if not 0 <= frame_index < min(pos, len(frames)):
            return None
        task = frames.task_of(frame_index)
        tf = self._task_frames[task]
        seen = tf[:bisect.bisect_left(tf, pos)]
        tables: dict[int, tuple[int, int]] = {}
        for p in (pos, frames[frame_index].index):
            tree = self.sept_tree(p)
            stack = [tree] if tree is not None else []
            while stack:
                t = stack.pop()
                tables.setdefault(t.pfn, (t.gpa_start, level_size(t.level)))
                stack.extend(n.child for n in t.entries if n.child is not None)
        return seamcall_view(self.frames, seen, frame_index, tables.get)

    def last_seamcall(self, task: str, position: int | None = None, limit: int = 4096) -> SeamcallView | None:
        """The SEAMCALL `task` is in at `position`, else the last one it made (looking back `limit` frames)."""
        pos = self._pos if position is None else position
        frames = self._rt.timeline.frames
        tf = self._task_frames.get(task, [])
        k = bisect.bisect_left(tf, pos) - 1
        for j in range(k, max(-1, k - limit), -1):
            kind = frames.kind_of(tf[j])
            if kind is TdxStep.SEAMCALL or kind is TdxStep.SEAMCALL_RETURN:
                return self.seamcall_at(tf[j], pos)
        return None

    # -- branches -------------------------------------------------------------------------------------------------
    def branches(self) -> tuple[Branch, ...]:
        """Every kept timeline, the current one with its picks as recorded so far."""
        self._branches[self.branch] = attrs.evolve(self._branches[self.branch], picks=self.picks)
        return tuple(self._branches.values())

    def fork_points(self) -> tuple[int, ...]:
        """Positions where another branch leaves the current timeline (the common prefix of their picks)."""
        others = [b for b in self._branches.values() if b.id != self.branch]
        if not others:
            return ()  # the UI asks at every refresh: don't list a long timeline's picks for nothing
        mine = self.picks
        out = set()
        for b in others:
            n = 0
            for x, y in zip(mine, b.picks, strict=False):
                if x != y:
                    break
                n += 1
            out.add(n)
        return tuple(sorted(out))

    def switch_branch(self, branch_id: int) -> StopEvent:
        """Make branch `branch_id` the current timeline (rebuilt by replaying its picks); the cursor keeps its
        position when the branch is that long, else goes to its end."""
        if branch_id not in self._branches:
            return self._error(f"no branch {branch_id}")
        if branch_id == self.branch:
            return StopEvent(StopReason.STEP, self._pos, f"already on branch {branch_id}")
        self.branches()
        target = self._branches[branch_id]
        try:
            rec = self._build(target.picks)
        except Exception as exc:  # an engine bug: report it, keep the current timeline
            return self._error(f"cannot rebuild branch {branch_id}: {type(exc).__name__}: {exc}")
        self._use(rec)
        self.branch = branch_id
        self._pos = min(self._pos, len(self._rt.timeline.frames))
        return StopEvent(StopReason.STEP, self._pos, f"on branch {branch_id} ({target.name})")

    def delete_branch(self, branch_id: int) -> StopEvent:
        if branch_id not in self._branches:
            return self._error(f"no branch {branch_id}")
        if branch_id == self.branch:
            return self._error("cannot delete the current branch: switch to another first")
        del self._branches[branch_id]
        return StopEvent(StopReason.STEP, self._pos, f"branch {branch_id} deleted")

    def _task_positions(self, rec: _Recording, position: int) -> dict[str, str]:
        frames = rec.rt.timeline.frames
        out = {}
        for name, idx in rec.task_frames.items():
            k = bisect.bisect_left(idx, position) - 1
            if k < 0:
                out[name] = "not started"
                continue
            f = frames[idx[k]]
            where = f.stack[-1].function.rsplit(".", 1)[-1] if f.stack else "-"
            out[name] = f"frame {f.index}: {where} ({getattr(f.step.kind, 'value', f.step.kind)})"
        return out

    def compare(self, left: int, right: int, right_branch: int | None = None) -> tuple[compare.DiffRow, ...]:
        """What differs between position `left` of the current timeline and position `right` of branch
        `right_branch` (the current one when None): SPTEs, S-EPT entries, locks, task positions."""
        n = len(self._rt.timeline.frames)
        if not 0 <= left <= n:
            raise IndexError(f"position {left} outside 0..{n}")
        a = compare.snapshot("left", self._state(left), self.context, self._task_positions(self._rec, left))
        if right_branch is None or right_branch == self.branch:
            if not 0 <= right <= n:
                raise IndexError(f"position {right} outside 0..{n}")
            b = compare.snapshot("right", self._state(right), self.context,
                                 self._task_positions(self._rec, right))
        else:
            if right_branch not in self._branches:
                raise KeyError(f"no branch {right_branch}")
            picks = self._branches[right_branch].picks
            right = min(right, len(picks))
            rec = self._build(picks[:right])
            b = compare.snapshot("right", rec.rt.timeline.state_at(right), self.context,
                                 self._task_positions(rec, right))
        return compare.diff(a, b)

    # -- breakpoints helpers ----------------------------------------------------------------------------------
    def watch_spte(self, kind: str, gfn: int, level: int = 1) -> Breakpoint | StopEvent:
        """An SPTE watch by position in a root, resolved to its (table, index) at the cursor when the walk gets
        there; also matches SPTE steps at that position (for tables created later)."""
        try:
            loc = views.spte_at(self._state(None), self.context, kind, gfn, level)
            key = loc.key if loc is not None and loc.level == level else None
            return self.breakpoints.add_spte_watch_at(kind, gfn, level, key)
        except BreakpointError as exc:
            return self._error(str(exc))

    # -- commands -----------------------------------------------------------------------------------------------
    def interrupt(self) -> None:
        """Ask the running command to stop at the next frame boundary it checks (thread-safe)."""
        self._interrupt.set()

    def select_task(self, name: str | None) -> StopEvent:
        """Follow `name` when stepping (None: follow the task of the frame at the cursor)."""
        if name is not None and name not in self._task_names:
            return self._error(f"no task {name!r}; tasks: {', '.join(sorted(self._task_names))}")
        self._selected = name
        return StopEvent(StopReason.STEP, self._pos, f"following {name}" if name else "following the cursor")

    def step_frame(self) -> StopEvent:
        """Exactly one frame forward, whichever task runs it."""
        return self._forward(lambda f: True, None)

    def reverse_step_frame(self) -> StopEvent:
        """Exactly one frame back."""
        if self._pos == 0:
            return StopEvent(StopReason.START, 0, "at the beginning")
        self._pos -= 1
        return StopEvent(StopReason.STEP if self._pos else StopReason.START, self._pos)

    def step_into(self) -> StopEvent:
        """The next frame of the current task (frames of other tasks in between are passed, but their
        breakpoints and violations still stop). Without a current task, or once it finished: one frame."""
        task = self._following()
        if task is None:
            return self._forward(lambda f: True, None)
        return self._forward(lambda f: f.task == task, None)

    def step_over(self) -> StopEvent:
        """Run until the current task's stack is not deeper than now."""
        task = self._following()
        if task is None:
            return self._forward(lambda f: True, None)
        if self._latest_of(task, self._pos) is None:   # not started yet: its first frame
            return self._forward(lambda f: f.task == task, None)
        depth = self._depth(task)
        return self._forward(lambda f: f.task == task and len(f.stack) <= depth, None)

    def step_out(self) -> StopEvent:
        """Run until the current task's stack is shallower than now."""
        task = self._following()
        if task is None:
            return self._forward(lambda f: True, None)
        depth = self._depth(task)
        if depth == 0:
            return self._forward(lambda f: f.task == task, None)
        return self._forward(lambda f: f.task == task and len(f.stack) < depth, None)

    def continue_(self, max_frames: int | None = None) -> StopEvent:
        """Run until a breakpoint hit, a violation, the end (or stuck), or `max_frames` frames."""
        return self._forward(None, max_frames)

    def reverse_step(self) -> StopEvent:
        """Back to the previous frame of the current task (position 0 when it has none)."""
        task = self.current_task
        if self._pos == 0:
            return StopEvent(StopReason.START, 0, "at the beginning")
        if task is None:
            return self.reverse_step_frame()
        cur = self._latest_of(task, self._pos)
        prev = self._latest_of(task, cur) if cur is not None else None
        self._pos = prev + 1 if prev is not None else 0
        return StopEvent(StopReason.STEP if self._pos else StopReason.START, self._pos)

    def reverse_continue(self) -> StopEvent:
        """Back to the previous frame with a breakpoint hit or a violation, else position 0."""
        self._interrupt.clear()
        frames = self._rt.timeline.frames
        bps = self.breakpoints
        prev = self._prev
        for n, j in enumerate(range(self._pos - 2, -1, -1)):
            if n % INTERRUPT_EVERY == 0 and self._interrupt.is_set():
                self._pos = j + 1
                return StopEvent(StopReason.INTERRUPTED, self._pos)
            f = frames[j]
            p = prev[j]
            hits = bps.hits(f, frames[p] if p >= 0 else None)
            if hits or f.violations:
                self._pos = j + 1
                return self._stop_at(f, hits, 0)
        self._pos = 0
        return StopEvent(StopReason.START, 0, "at the beginning")

    def goto(self, position: int) -> StopEvent:
        """Put the cursor at `position` (0 .. ); beyond the recorded end the engine runs (breakpoints are not
        checked) until the timeline is that long or nothing can run."""
        if not isinstance(position, int) or position < 0:
            return self._error(f"bad position {position!r}")
        n = len(self._rt.timeline.frames)
        if position <= n:
            self._pos = position
            return StopEvent(StopReason.STEP, position)
        return self._run_engine(position - n, StopReason.STEP)

    def goto_frame(self, index: int) -> StopEvent:
        """Make frame `index` the frame at the cursor (position index + 1)."""
        if not isinstance(index, int) or index < 0:
            return self._error(f"bad frame index {index!r}")
        return self.goto(index + 1)

    def run_to_end(self, max_frames: int | None = None) -> StopEvent:
        """Record until every task finished (or nothing can run, or `max_frames` more frames); the cursor goes
        to the end. Breakpoints are not checked."""
        return self._run_engine(max_frames, StopReason.MAX_FRAMES)

    def choose_task(self, name: str) -> StopEvent:
        """Run `name` as the next frame instead of the schedule's pick. Before the recorded end this forks:
        the picks before the cursor are replayed from a fresh build, `name` is forced, and the old future is
        dropped (recorded in `forks`)."""
        if name not in self._task_names:
            return self._error(f"no task {name!r}; tasks: {', '.join(sorted(self._task_names))}")
        frames = self._rt.timeline.frames
        pos = self._pos
        if pos < len(frames) and frames[pos].task == name:
            self._pos += 1
            return StopEvent(StopReason.STEP, self._pos, f"{name} already runs here")
        if pos == len(frames):
            runnable = self.runnable_tasks(pos)
            if name not in runnable:
                return self._not_runnable(name, runnable)
            return self._forced_step(name, forked=False)
        runnable = self.runnable_tasks(pos)
        if name not in runnable:
            return self._not_runnable(name, runnable)
        old_picks = self.picks
        try:
            rec = self._build(old_picks[:pos])
        except Exception as exc:  # an engine bug: report it, keep the old timeline
            return self._error(f"cannot fork: {type(exc).__name__}: {exc}")
        rt = rec.rt
        if name not in (rt.tasks[i].name for i in rt.runnable()):
            return self._not_runnable(name, tuple(rt.tasks[i].name for i in rt.runnable()))
        self.forks.append(ForkRecord(pos, frames[pos].task, name, len(frames), old_picks))
        # The old future is kept as a branch; the fork is a new branch, made current.
        self._branches[self.branch] = attrs.evolve(self._branches[self.branch], picks=old_picks)
        new_id = max(self._branches) + 1
        self._branches[new_id] = Branch(new_id, f"{name} at position {pos}", (), pos, self.branch)
        self.branch = new_id
        self._use(rec)
        return self._forced_step(name, forked=True)

    # -- internals ------------------------------------------------------------------------------------------------
    def _error(self, message: str) -> StopEvent:
        return StopEvent(StopReason.ERROR, self._pos, message)

    def _not_runnable(self, name: str, runnable: Sequence[str]) -> StopEvent:
        return self._error(f"{name} cannot run at position {self._pos}; runnable: "
                           f"{', '.join(runnable) if runnable else 'none'}")

    def _forced_step(self, name: str, forked: bool) -> StopEvent:
        try:
            frame = self._rec.step(name)
        except ValueError as exc:
            return self._error(str(exc))
        if frame is None:
            return self._error("nothing can run")
        self._pos = len(self._rt.timeline.frames)
        p = self._prev[frame.index]
        hits = self.breakpoints.hits(frame, self._rt.timeline.frames[p] if p >= 0 else None)
        ev = self._stop_at(frame, hits, 1, StopReason.STEP)
        return attrs.evolve(ev, forked=forked, message=f"forked at position {frame.index}" if forked else "")

    def _following(self) -> str | None:
        """The task step commands follow, or None when any frame will do (no task yet, or it finished)."""
        task = self.current_task
        if task is None:
            return None
        j = self._latest_of(task, self._pos)
        if j is not None and self._rt.timeline.frames[j].step.kind in _DONE_KINDS:
            return None
        return task

    def _depth(self, task: str) -> int:
        j = self._latest_of(task, self._pos)
        return len(self._rt.timeline.frames[j].stack) if j is not None else 0

    def _stop_at(self, frame: Frame, hits: tuple[int, ...], ran: int,
                 reason: StopReason | None = None) -> StopEvent:
        if hits:
            self.breakpoints.count_hits(hits)
        if frame.violations:
            why = StopReason.VIOLATION
            msg = "; ".join(f"{v.invariant}: {v.message}" for v in frame.violations)
        elif hits:
            why = StopReason.BREAKPOINT
            msg = ", ".join(bp.description for i in hits if (bp := self.breakpoints.get(i)) is not None)
        else:
            why = reason or StopReason.STEP
            msg = ""
        return StopEvent(why, self._pos, msg, hits, ran)

    def _forward(self, target: Callable[[Frame], bool] | None, max_frames: int | None) -> StopEvent:
        """Move forward frame by frame (recorded ones first, then new ones) until `target` matches, a breakpoint
        hits or a violation shows, the end, or `max_frames` frames."""
        self._interrupt.clear()
        timeline = self._rt.timeline
        frames = timeline.frames
        bps = self.breakpoints
        prev = self._prev
        rec = self._rec
        i = self._pos
        count = ran = 0
        while True:
            if max_frames is not None and count >= max_frames:
                self._pos = i
                return StopEvent(StopReason.MAX_FRAMES, i, f"{count} frames", (), ran)
            if count % INTERRUPT_EVERY == 0 and count:
                if self._interrupt.is_set():
                    self._pos = i
                    return StopEvent(StopReason.INTERRUPTED, i, "", (), ran)
                if self.progress is not None:
                    self.progress(len(frames))
            if i < len(frames):
                f = frames[i]
            else:
                f = rec.step()
                if f is None:
                    self._pos = i
                    return self._end_event(ran)
                ran += 1
            i += 1
            count += 1
            p = prev[f.index]
            hits = bps.hits(f, frames[p] if p >= 0 else None) if bps.active else ()
            if hits or f.violations or (target is not None and target(f)):
                self._pos = i
                return self._stop_at(f, hits, ran)
            if f.index in rec.livelocks:
                self._pos = i
                return StopEvent(StopReason.LIVELOCK, i, rec.livelocks[f.index], (), ran)

    def _run_engine(self, max_frames: int | None, reached: StopReason) -> StopEvent:
        """Record new frames from the end of the timeline; the cursor goes to the end. `reached` is the reason
        reported when `max_frames` frames ran."""
        self._interrupt.clear()
        rec = self._rec
        frames = rec.rt.timeline.frames
        count = 0
        while True:
            if max_frames is not None and count >= max_frames:
                self._pos = len(frames)
                return StopEvent(reached, self._pos, "", (), count)
            if count % INTERRUPT_EVERY == 0 and count:
                if self._interrupt.is_set():
                    self._pos = len(frames)
                    return StopEvent(StopReason.INTERRUPTED, self._pos, "", (), count)
                if self.progress is not None:
                    self.progress(len(frames))
            index = rec.advance()
            if index is None:
                self._pos = len(frames)
                return self._end_event(count)
            count += 1
            if index in rec.livelocks:
                self._pos = len(frames)
                return StopEvent(StopReason.LIVELOCK, self._pos, rec.livelocks[index], (), count)

    def _end_event(self, ran: int) -> StopEvent:
        if self._rt.finished:
            failed = [t.name for t in self._rt.tasks if t.state is TaskState.FAILED]
            msg = f"all tasks done; failed: {', '.join(failed)}" if failed else "all tasks done"
            return StopEvent(StopReason.END, self._pos, msg, (), ran)
        message = deadlock_message(self._rt.tasks, self._rt.world, self._rt.timeline)
        return StopEvent(StopReason.STUCK, self._pos, message, (), ran)


class _Recording:
    """One built VM and its runtime, with the indexes a Session keeps over its frames: frame indices per task,
    the previous frame of the same task, and the wait predicate a task was blocked on after a frame (recorded
    frames do not keep it; views use it to say whether a task is waiting)."""

    def __init__(self, vm: BuiltVm, rt: Runtime, livelock_frames: int | None) -> None:
        self.vm = vm
        self.rt = rt
        self.watch = ProgressWatch(rt.timeline, {v.name: v.hw.rip_key for v in vm.kvm.vcpus}, livelock_frames,
                                   len(rt.tasks))
        # Frames at which the watch found a livelock, with its report: commands stop there, recorded or not.
        self.livelocks: dict[int, str] = {}
        self.task_frames: dict[str, list[int]] = {t.name: [] for t in rt.tasks}
        self.prev: list[int] = []
        self.waits: dict[int, Callable[[Any], bool]] = {}
        self._last_of: dict[str, int] = {}
        self._tasks = {t.name: t for t in rt.tasks}

    def _note(self, index: int, task: str) -> None:
        self.prev.append(self._last_of.get(task, -1))
        self._last_of[task] = index
        self.task_frames[task].append(index)
        t = self._tasks[task]
        if t.state is TaskState.WAITING and t.wait is not None:
            self.waits[index] = t.wait
        if self.watch.observe(index):
            self.livelocks[index] = livelock_message(self.rt.timeline, index, self.watch.bound, self.rt.tasks,
                                                     self.rt.world)

    def step(self, forced: str | None = None) -> Frame | None:
        frame = self.rt.step(forced=forced)
        if frame is not None:
            self._note(frame.index, frame.task)
        return frame

    def advance(self) -> int | None:
        """One step without building the Frame value."""
        index = self.rt._advance()
        if index is not None:
            self._note(index, self.rt.timeline.frames.task_of(index))
        return index
