"""The step runtime: determinism, time travel, call stacks, blocking, scheduling, errors, forks and footprints.

Every test drives small hand-written generator tasks over a World and asserts exact frames.
"""

from __future__ import annotations

import enum
import inspect
import random

import attrs
import pytest

import tdxdbg.runtime.timeline as timeline_mod
from tdxdbg.runtime import MISSING, Policy, Runtime, Step, StepKind, StopReason, Task, TaskState, World
from tdxdbg.runtime.frame import plain_locals
from tdxdbg.runtime.replay import TaskReplay
from tdxdbg.runtime.runtime import replay
from tdxdbg.runtime.scheduler import ScheduleSpec


class K(enum.Enum):
    READ = "read"
    WRITE = "write"
    ACQUIRE = "acquire"
    WORK = "work"
    RELEASE = "release"
    WAIT = "wait"
    MARK = "mark"


@attrs.frozen
class Cfg:
    level: int


def line_of(func, marker: str) -> int:
    """Absolute line number of the first source line of `func` containing `marker`."""
    src, start = inspect.getsourcelines(func)
    hits = [start + i for i, text in enumerate(src) if marker in text]
    assert len(hits) == 1, (marker, hits)
    return hits[0]


def sig(frame):
    """Everything a frame records, as comparable plain data."""
    return (frame.index, frame.task, frame.kind, dict(frame.step.payload),
            tuple((s.function, s.filename, s.line) for s in frame.stack),
            frame.effects, frame.reads)


# -- workloads ------------------------------------------------------------------------------------------------
def counter(world: World, name: str, n: int):
    """Read-then-write increments of a shared counter: two preemption points per increment."""
    for i in range(n):
        v = world.get(("counter",))
        yield Step(K.READ, {"value": v, "i": i})
        world.set(("counter",), v + 1)
        world.set((name, "last"), v)
        yield Step(K.WRITE, {"new": v + 1})
    return name


def build_counters(names=("a", "b", "c"), n=3):
    world = World({("counter",): 0})
    return world, [Task(x, counter(world, x, n)) for x in names]


def run_all(spec: ScheduleSpec, build=build_counters, **kw) -> Runtime:
    world, tasks = build(**kw)
    rt = Runtime(world, tasks, spec)
    assert rt.run() is StopReason.DONE
    return rt


# -- determinism ------------------------------------------------------------------------------------------------
SPECS = {
    "sequential": ScheduleSpec(Policy.SEQUENTIAL),
    "round_robin": ScheduleSpec(Policy.ROUND_ROBIN),
    "random7": ScheduleSpec(Policy.RANDOM, seed=7),
    "order_prefix": ScheduleSpec(Policy.ROUND_ROBIN, order=("c", "c", "b", "a", "c", "b")),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_same_tasks_and_schedule_give_identical_frames(name):
    """Same scenario + same schedule => identical frames (task, step, stack, effects, reads, locals)."""
    spec = SPECS[name]
    one = run_all(spec)
    two = run_all(spec)
    assert len(one.timeline) == len(two.timeline) == 21  # 3 tasks x (6 steps + TASK_DONE)
    assert [sig(f) for f in one.timeline] == [sig(f) for f in two.timeline]
    assert one.schedule == two.schedule
    assert one.world.snapshot() == two.world.snapshot()


def test_sequential_policy_runs_first_runnable_task_to_completion():
    """SEQUENTIAL always picks the first runnable task, so each task runs to completion in turn."""
    rt = run_all(SPECS["sequential"])
    assert rt.schedule == ["a"] * 7 + ["b"] * 7 + ["c"] * 7
    assert rt.world.peek(("counter",)) == 9


def test_round_robin_policy_rotates_over_runnable_tasks_in_order():
    """ROUND_ROBIN picks the next runnable task after the last pick, wrapping around."""
    rt = run_all(SPECS["round_robin"])
    assert rt.schedule == ["a", "b", "c"] * 7
    # Interleaved read-then-write loses updates: every task reads before any writes.
    assert rt.world.peek(("counter",)) == 3


def test_order_prefix_is_followed_then_policy_continues():
    """An explicit order is consumed one name per step; after it the policy (round robin) continues."""
    rt = run_all(SPECS["order_prefix"])
    assert rt.schedule[:6] == ["c", "c", "b", "a", "c", "b"]
    # Round robin resumes after the last pick ("b", index 1).
    assert rt.schedule[6:9] == ["c", "a", "b"]
    assert rt.scheduler.skipped == []


def _expected_random_schedule(seed: int, names=("a", "b", "c"), n=3) -> list[str]:
    """The documented RANDOM rule: one seeded draw over the runnable tasks per pick."""
    rng = random.Random(seed)
    remaining = {x: 2 * n + 1 for x in names}
    out = []
    while any(remaining.values()):
        runnable = [x for x in names if remaining[x]]
        pick = runnable[rng.randrange(len(runnable))]
        remaining[pick] -= 1
        out.append(pick)
    return out


def test_random_policy_draws_once_per_pick_from_its_seed():
    """RANDOM with seed 7 picks runnable[rng.randrange(len(runnable))] with random.Random(7), once per step."""
    rt = run_all(SPECS["random7"])
    assert rt.schedule == _expected_random_schedule(7)


def test_different_seeds_give_different_schedules():
    """Different seeds give a different schedule (4 tasks x 21 steps: the fixed streams differ)."""
    def build():
        return build_counters(names=("a", "b", "c", "d"), n=10)

    schedules = {seed: run_all(ScheduleSpec(Policy.RANDOM, seed=seed), build=build).schedule
                 for seed in (7, 8, 9, 1234)}
    assert schedules[7] == _expected_random_schedule(7, ("a", "b", "c", "d"), 10)
    assert len({tuple(s) for s in schedules.values()}) == 4


# -- time travel -----------------------------------------------------------------------------------------------
def churn(world: World, name: str, n: int):
    """Writes, overwrites, creates and deletes keys, several per frame."""
    for i in range(n):
        world.set((name, "i"), i)
        world.set(("shared",), (name, i))
        if i % 3 == 0:
            world.set((name, "tmp", i), i * 10)
        if i % 3 == 2:
            world.delete((name, "tmp", i - 2))
        yield Step(K.WRITE, {"i": i})
        world.set(("shared",), world.get(("shared",)))  # same object: no effect
        world.set((name, "n"), world.get((name, "n"), 0) + 1)
        world.set((name, "n"), world.get((name, "n")) + 1)  # two writes to one key in one frame
        yield Step(K.WRITE, {"i": i, "second": True})


def build_churn():
    world = World({("shared",): None, ("base",): 1})
    return world, [Task(x, churn(world, x, 12)) for x in ("p", "q", "r")]


@pytest.mark.parametrize("min_writes", [1, 4096])
def test_state_at_every_position_equals_live_snapshot(monkeypatch, min_writes):
    """timeline.state_at(p) equals the world snapshot recorded live after p steps, visiting positions forwards,
    backwards and in a shuffled order; with a low keyframe threshold keyframes are taken and used."""
    monkeypatch.setattr(timeline_mod, "KEYFRAME_MIN_WRITES", min_writes)
    world, tasks = build_churn()
    rt = Runtime(world, tasks, ScheduleSpec(Policy.RANDOM, seed=3))
    snaps = [world.snapshot()]
    while rt.step() is not None:
        snaps.append(world.snapshot())
    assert rt.finished
    n = len(rt.timeline)
    assert n == 3 * (2 * 12 + 1) == len(snaps) - 1
    tl = rt.timeline
    if min_writes == 1:
        assert tl.keyframe_count > 5
    else:
        assert tl.keyframe_count == 1
    order_fwd = list(range(n + 1))
    order_rev = order_fwd[::-1]
    order_shuf = order_fwd[:]
    random.Random(11).shuffle(order_shuf)
    for order in (order_fwd, order_rev, order_shuf, order_fwd[::7] + order_rev[::5]):
        for p in order:
            assert tl.state_at(p) == snaps[p], p
    with pytest.raises(IndexError):
        tl.state_at(n + 1)
    with pytest.raises(IndexError):
        tl.state_at(-1)


def test_keyframe_is_taken_when_writes_reach_state_size(monkeypatch):
    """A keyframe is due once the writes since the last one reach
    max(KEYFRAME_MIN_WRITES, KEYFRAME_STATE_FACTOR * len(world))."""
    monkeypatch.setattr(timeline_mod, "KEYFRAME_MIN_WRITES", 1)

    def writer(world):
        for i in range(6):
            world.set(("x",), i + 1)
            yield Step(K.WRITE, {"i": i})

    world = World({("a",): 0, ("b",): 0})
    rt = Runtime(world, [Task("w", writer(world))])
    counts = []
    for _ in range(6):
        rt.step()
        counts.append(rt.timeline.keyframe_count)
    # The world holds 3 keys and each frame writes one: with factor 2, a keyframe after every sixth write
    # (the first frame also creates the key, so the state has 3 keys from then on).
    assert timeline_mod.KEYFRAME_STATE_FACTOR == 2
    assert counts == [1, 1, 1, 1, 1, 2]


def test_last_write_finds_the_latest_frame_writing_a_key():
    """last_write(key, before) is the index of the last frame before `before` that wrote key, else None."""
    world, tasks = build_counters(n=1)
    rt = Runtime(world, tasks, ScheduleSpec(Policy.SEQUENTIAL))
    rt.run()
    tl = rt.timeline
    writes = [f.index for f in tl if f.wrote(("counter",))]
    assert writes == [1, 4, 7]
    assert tl.last_write(("counter",), len(tl)) == 7
    assert tl.last_write(("counter",), 7) == 4
    assert tl.last_write(("counter",), 1) is None
    assert tl.last_write(("nope",), len(tl)) is None


# -- call stacks and locals ----------------------------------------------------------------------------------
def leaf_fn(world: World, depth: int):
    items = [depth, depth + 1]
    table = {"k": 1}
    cfg = Cfg(level=depth)
    pair = (depth, "x")
    world.set(("leaf",), depth)
    yield Step(K.MARK, {"where": "leaf1"})  # <leaf-yield-1>
    world.set(("leaf",), depth + 1)
    got = world.get(("leaf",))
    yield Step(K.MARK, {"where": "leaf2", "got": got})  # <leaf-yield-2>
    return len(items) + len(table) + cfg.level + len(pair)


def middle_fn(world: World):
    depth = 7
    result = yield from leaf_fn(world, depth)  # <middle-call>
    yield Step(K.MARK, {"where": "middle", "result": result})  # <middle-yield>
    return result


def outer_fn(world: World):
    total = yield from middle_fn(world)  # <outer-call>
    return total


def test_stack_is_outermost_first_with_function_names_and_lines():
    """A frame's stack follows the yield-from chain outermost first: qualified name and current line of each."""
    world = World()
    rt = Runtime(world, [Task("t", outer_fn(world))])
    f0 = rt.step()
    assert [(s.function, s.line) for s in f0.stack] == [
        ("outer_fn", line_of(outer_fn, "<outer-call>")),
        ("middle_fn", line_of(middle_fn, "<middle-call>")),
        ("leaf_fn", line_of(leaf_fn, "<leaf-yield-1>")),
    ]
    assert {s.filename for s in f0.stack} == {__file__}
    f1 = rt.step()
    assert [(s.function, s.line) for s in f1.stack][-1] == ("leaf_fn", line_of(leaf_fn, "<leaf-yield-2>"))
    assert f1.step.payload == {"where": "leaf2", "got": 8}
    f2 = rt.step()
    assert [(s.function, s.line) for s in f2.stack] == [
        ("outer_fn", line_of(outer_fn, "<outer-call>")),
        ("middle_fn", line_of(middle_fn, "<middle-yield>")),
    ]
    assert f2.step.payload == {"where": "middle", "result": 2 + 1 + 7 + 2}
    f3 = rt.step()
    assert f3.kind is StepKind.TASK_DONE
    assert f3.step.payload == {"result": 12}
    assert f3.stack == ()
    assert rt.task("t").result == 12


def test_rebuilt_locals_keep_immutable_values_and_show_mutable_ones_by_type_name():
    """Frames record no locals; a replay from the task's first frame rebuilds them per activation outermost
    first, and plain_locals renders them: ints, strs, small tuples and frozen attrs kept; lists, dicts and other
    mutable objects shown as <TypeName>."""
    world = World()
    rt = Runtime(world, [Task("t", outer_fn(world))])
    frame = rt.step()
    assert len(frame.stack) == 3
    assert rt.timeline.frames.rest_before("t", 0) == 0
    r = TaskReplay(rt.timeline, "t", 0, [0], outer_fn)
    r.advance_to(0)
    outer, middle, leaf = (dict(plain_locals(scope)) for scope in r.locals())
    assert {k: repr(v) for k, v in outer.items()} == {"world": "<World>"}
    assert middle["depth"] == 7
    assert repr(middle["world"]) == "<World>"
    assert set(middle) == {"world", "depth"}
    assert leaf["depth"] == 7
    assert repr(leaf["items"]) == "<list>"
    assert repr(leaf["table"]) == "<dict>"
    assert leaf["pair"] == (7, "x")
    assert leaf["cfg"] == Cfg(level=7)
    assert set(leaf) == {"world", "depth", "items", "table", "cfg", "pair"}


# -- blocking -------------------------------------------------------------------------------------------------
def holder(world: World, release: bool = True):
    world.set(("lock",), "holder")
    yield Step(K.ACQUIRE)
    yield Step(K.WORK)
    if release:
        world.delete(("lock",))
        yield Step(K.RELEASE)


def waiter(world: World, name: str):
    while world.get(("lock",)) is not None:
        yield Step(K.WAIT, {"who": name}, wait=lambda w: w.peek(("lock",)) is None)
    world.set(("lock",), name)
    yield Step(K.ACQUIRE, {"who": name})
    world.delete(("lock",))
    yield Step(K.RELEASE, {"who": name})


def test_waiting_task_is_not_runnable_until_the_key_is_cleared():
    """A task that yields Step(wait=pred) is WAITING and not runnable until pred holds in the World."""
    world = World()
    rt = Runtime(world, [Task("h", holder(world)), Task("w", waiter(world, "w"))])
    assert rt.step().kind is K.ACQUIRE          # h takes the lock
    f = rt.step()                               # w sees it held and waits
    assert (f.task, f.kind) == ("w", K.WAIT)
    assert rt.task("w").state is TaskState.WAITING
    assert rt.runnable() == [0]
    assert rt.step().task == "h"                # WORK: only h can run
    assert rt.runnable() == [0]
    f = rt.step()                               # RELEASE
    assert (f.task, f.kind) == ("h", K.RELEASE)
    assert rt.runnable() == [0, 1]
    assert rt.run() is StopReason.DONE
    assert rt.schedule == ["h", "w", "h", "h", "w", "h", "w", "w"]
    assert [f.kind for f in rt.timeline if f.task == "w"] == [
        K.WAIT, K.ACQUIRE, K.RELEASE, StepKind.TASK_DONE]
    assert rt.task("w").state is TaskState.DONE


def test_run_returns_stuck_when_every_remaining_task_waits():
    """When tasks remain but all of them wait, run() stops with STUCK and step() returns None."""
    world = World()
    rt = Runtime(world, [Task("h", holder(world, release=False)), Task("w1", waiter(world, "w1")),
                         Task("w2", waiter(world, "w2"))])
    assert rt.run() is StopReason.STUCK
    assert rt.task("h").state is TaskState.DONE
    assert rt.task("w1").state is TaskState.WAITING
    assert rt.task("w2").state is TaskState.WAITING
    assert rt.step() is None
    assert rt.schedule == ["h", "w1", "w2", "h", "h"]
    assert not rt.finished


def test_run_returns_done_and_max_frames_and_break():
    """run() returns MAX_FRAMES after exactly max_frames more frames, BREAK when stop matches, DONE at the end."""
    world, tasks = build_counters()
    rt = Runtime(world, tasks)
    assert rt.run(max_frames=4) is StopReason.MAX_FRAMES
    assert len(rt.timeline) == 4
    assert rt.run(max_frames=0) is StopReason.MAX_FRAMES
    assert len(rt.timeline) == 4
    assert rt.run(stop=lambda f: f.kind is StepKind.TASK_DONE) is StopReason.BREAK
    assert len(rt.timeline) == 19 and rt.timeline[-1].task == "a"
    assert rt.run() is StopReason.DONE
    assert len(rt.timeline) == 21
    assert rt.run() is StopReason.DONE
    assert len(rt.timeline) == 21


# -- scheduler details ---------------------------------------------------------------------------------------
def test_round_robin_skips_waiting_tasks_and_keeps_rotating():
    """Round robin rotates over the runnable tasks only: a waiting task is passed over."""
    world = World()
    rt = Runtime(world, [Task("h", holder(world)), Task("w", waiter(world, "w")),
                         Task("c", counter(World({("counter",): 0}), "c", 1))])
    picks = [rt.step().task for _ in range(6)]
    # h ACQUIRE, w WAIT, c READ, h WORK, (w waits) c WRITE, h RELEASE
    assert picks == ["h", "w", "c", "h", "c", "h"]


def test_order_prefix_entry_naming_a_finished_task_is_skipped_and_recorded():
    """An order entry naming a task that is not runnable is skipped, recorded as (step, name), and the
    policy's choice runs instead."""
    def one(world):
        yield Step(K.MARK)

    world = World()
    spec = ScheduleSpec(Policy.SEQUENTIAL, order=("b", "b", "b", "a", "b"))
    rt = Runtime(world, [Task("a", one(world)), Task("b", one(world))], spec)
    assert rt.run() is StopReason.DONE
    assert rt.schedule == ["b", "b", "a", "a"]
    assert rt.scheduler.skipped == [(2, "b")]


def test_forcing_a_task_that_is_not_runnable_raises():
    """step(forced=name) for a finished, waiting or unknown task raises ValueError and records nothing."""
    world = World()
    rt = Runtime(world, [Task("h", holder(world)), Task("w", waiter(world, "w"))])
    rt.step(forced="h")
    rt.step(forced="w")   # now waiting
    with pytest.raises(ValueError, match="'w' is not runnable"):
        rt.step(forced="w")
    with pytest.raises(ValueError, match="'zzz' is not runnable"):
        rt.step(forced="zzz")
    assert len(rt.timeline) == 2
    rt.run()
    with pytest.raises(ValueError):
        Runtime(World(), [Task("x", holder(World())), Task("x", holder(World()))])


def test_forced_pick_keeps_the_random_stream_aligned():
    """With RANDOM, a forced pick still draws once, so later picks are those of the unforced run."""
    spec = ScheduleSpec(Policy.RANDOM, seed=5)
    base = run_all(spec)
    world, tasks = build_counters()
    rt = Runtime(world, tasks, spec)
    first = base.schedule[0]
    other = next(x for x in ("a", "b", "c") if x != first)
    rt.step(forced=other)
    rng = random.Random(5)
    rng.randrange(3)  # the forced step's draw
    assert rt.step().task == "abc"[rng.randrange(3)]


# -- errors ---------------------------------------------------------------------------------------------------
def test_task_exception_becomes_task_error_frame_and_others_continue():
    """A task raising becomes a TASK_ERROR frame with the error text, is FAILED, and other tasks continue."""
    def boom(world):
        world.set(("before",), 1)
        yield Step(K.MARK)
        world.set(("during",), 2)
        raise ValueError("bad thing")

    world = World({("counter",): 0})
    rt = Runtime(world, [Task("x", boom(world)), Task("c", counter(world, "c", 1))])
    assert rt.run() is StopReason.DONE
    errs = [f for f in rt.timeline if f.kind is StepKind.TASK_ERROR]
    assert len(errs) == 1
    f = errs[0]
    assert (f.index, f.task) == (2, "x")
    assert f.step.payload["error"] == "ValueError: bad thing"
    assert "raise ValueError(\"bad thing\")" in f.step.payload["traceback"]
    assert f.effects == ((("during",), MISSING, 2),)
    assert f.stack == ()
    t = rt.task("x")
    assert t.state is TaskState.FAILED
    assert t.error == "ValueError: bad thing"
    assert rt.task("c").state is TaskState.DONE
    assert rt.schedule == ["x", "c", "x", "c", "c"]
    assert world.peek(("counter",)) == 1


# -- replay and forks -------------------------------------------------------------------------------------------
def test_replay_of_the_whole_schedule_reproduces_every_frame():
    """replay(build, spec, rt.schedule) rebuilds and forces the same picks: identical frames."""
    spec = ScheduleSpec(Policy.RANDOM, seed=7)
    orig = run_all(spec)
    again = replay(build_counters, spec, orig.schedule)
    assert [sig(f) for f in again.timeline] == [sig(f) for f in orig.timeline]


@pytest.mark.parametrize("k", [0, 3, 10])
def test_replay_prefix_then_a_different_task_forks_the_timeline(k):
    """Replaying picks[:k] then forcing another task gives identical frames before k and that task at k."""
    spec = ScheduleSpec(Policy.ROUND_ROBIN)
    orig = run_all(spec)
    picks = orig.schedule
    other = next(x for x in ("a", "b", "c") if x != picks[k])
    fork = replay(build_counters, spec, picks[:k], then=other)
    assert len(fork.timeline) == k + 1
    assert [sig(f) for f in fork.timeline][:k] == [sig(f) for f in orig.timeline][:k]
    assert fork.timeline[k].task == other != orig.timeline[k].task
    assert fork.run() is StopReason.DONE
    assert fork.schedule != picks


def test_replay_of_an_impossible_pick_raises():
    """A pick that cannot run (the task finished) makes replay raise ValueError."""
    world_tasks = build_counters(n=1)
    with pytest.raises(ValueError):
        replay(lambda: world_tasks, ScheduleSpec(), ["a", "a", "a", "a"])


# -- footprint ------------------------------------------------------------------------------------------------
def test_footprint_records_distinct_reads_and_ordered_writes():
    """Reads appear once each in first-read order; writes appear in order with old/new, MISSING for
    created and deleted keys; a delete of an absent key or a set of the same object records nothing."""
    def t(world):
        world.get(("a",))
        world.get(("b",))
        world.get(("a",))
        world.get(("absent",), 5)
        world.set(("c",), 1)
        world.set(("a",), 2)
        world.set(("a",), 3)
        world.delete(("d",))
        world.delete(("nope",))
        world.set(("e",), world.peek(("e",)))
        yield Step(K.MARK)

    world = World({("a",): 1, ("b",): 0, ("d",): 9, ("e",): (1, 2)})
    rt = Runtime(world, [Task("t", t(world))])
    f = rt.step()
    assert f.reads == (("a",), ("b",), ("absent",))
    assert f.effects == ((("c",), MISSING, 1), (("a",), 1, 2), (("a",), 2, 3), (("d",), 9, MISSING))
    assert f.wrote(("a",)) and f.wrote(("d",)) and not f.wrote(("b",))
    assert f.touched(("b",)) and f.touched(("c",)) and not f.touched(("e",))
    assert rt.timeline.state_at(0) == {("a",): 1, ("b",): 0, ("d",): 9, ("e",): (1, 2)}
    assert rt.timeline.state_at(1) == {("a",): 3, ("b",): 0, ("c",): 1, ("e",): (1, 2)}


def test_wait_predicate_reads_and_checks_stay_out_of_the_footprint():
    """Reads made by wait predicates (even via world.get) and by checks are not part of any frame's footprint."""
    def w_task(world):
        yield Step(K.WAIT, wait=lambda w: w.get(("flag",)) is not None)
        yield Step(K.MARK)

    def setter(world):
        yield Step(K.MARK)
        world.set(("flag",), 1)
        yield Step(K.MARK)

    def check(world, step, effects):
        world.get(("checked",))
        return ()

    world = World()
    rt = Runtime(world, [Task("w", w_task(world)), Task("s", setter(world))], checks=[check])
    rt.run()
    for f in rt.timeline:
        assert ("checked",) not in f.reads
        assert ("flag",) not in f.reads
    assert [f.effects for f in rt.timeline if f.task == "s"] == [(), ((("flag",), MISSING, 1),), ()]


def test_check_violations_are_attached_to_the_frame():
    """A check's violations are recorded on the frame that produced them."""
    from tdxdbg.runtime.frame import Violation

    def check(world, step, effects):
        it = iter(effects)  # flat: key, old, new, key, old, new, ...
        if any(k == ("counter",) and new == 2 for k, _o, new in zip(it, it, it, strict=True)):
            yield Violation("counter-two", "counter reached 2")

    world, tasks = build_counters(n=1)
    rt = Runtime(world, tasks, ScheduleSpec(Policy.SEQUENTIAL), checks=[check])
    rt.run()
    hits = [(f.index, f.violations) for f in rt.timeline if f.violations]
    assert hits == [(4, (Violation("counter-two", "counter reached 2"),))]


def test_a_check_with_step_kinds_sees_only_frames_that_wrote_or_have_those_kinds():
    """The runtime's pre-filter: a check declaring `step_kinds` is skipped on frames that wrote nothing and whose
    kind it does not declare; it gets the writes flat (key, old, new, ...)."""
    def prog(world):
        yield Step(K.READ)
        world.set(("x",), 1)
        yield Step(K.WORK)
        yield Step(K.MARK)
        yield Step(K.WORK)

    seen = []

    class Watcher:
        step_kinds = frozenset({K.MARK})

        def __call__(self, world, step, effects):
            seen.append((step.kind, effects))
            return ()

    world = World()
    rt = Runtime(world, [Task("t", prog(world))], checks=[Watcher()])
    rt.run()
    assert seen == [(K.WORK, (("x",), MISSING, 1)), (K.MARK, ())]
