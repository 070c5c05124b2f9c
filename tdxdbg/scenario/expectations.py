"""Expectations, checked at the end of a run from the final state and the frames."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from tdxdbg.hw.tdx.leaves import Seamcall
from tdxdbg.hw.tdx.status import OPERAND_MASK, STATUS_MASK, describe
from tdxdbg.scenario.model import Expect, Scenario
from tdxdbg.scenario.trace import Facts, hx, sept_lookup, spte_lookup


@attrs.frozen
class Result:
    text: str
    ok: bool
    detail: str = ""


# How a run ended (Facts.stop) in the words of `[[expect]] stop`: a stuck run is a deadlock.
STOP_OF_FACTS = {"stuck": "deadlock"}


def status_matches(expected: int, actual: int) -> bool:
    """A status without operand details matches any operand; with details it must match exactly."""
    if expected & OPERAND_MASK:
        return expected == actual
    return expected == actual & STATUS_MASK


def evaluate(scenario: Scenario, facts: Facts, kvm: Any, world: Any) -> list[Result]:
    out = [_inline_read(scenario, facts, i, k, op) for i, ops in enumerate(scenario.vcpus)
           for k, op in enumerate(o for o in ops if o.kind == "read") if op.value is not None]
    out = [r for r in out if r is not None]
    for e in scenario.expect:
        try:
            out.append(_one(e, facts, kvm, world))
        except Exception as exc:  # a view that cannot be computed fails the expectation, never the run
            out.append(Result(e.text, False, f"cannot evaluate: {type(exc).__name__}: {exc}"))
    return out


def _inline_read(scenario: Scenario, facts: Facts, vcpu: int, k: int, op: Any) -> Result:
    task = f"vcpu{vcpu}"
    text = f"{task}: {op.text}"
    reads = [r for r in facts.reads if r.task == task]
    # The k-th `read` operation of this vCPU is its k-th completed read.
    if k >= len(reads):
        return Result(text, False, "the read never completed")
    r = reads[k]
    if r.value != op.value:
        return Result(text, False, f"read {hx(r.value)}, expected {hx(op.value)}")
    return Result(text, True, f"read {hx(r.value)}")


def _one(e: Expect, facts: Facts, kvm: Any, world: Any) -> Result:
    k = e.kind
    g = e.get
    if k == "sept":
        st = sept_lookup(kvm, world, g("gpa"), g("level"))
        return Result(e.text, st == g("state"), f"found {st}")
    if k == "spte":
        spte = spte_lookup(kvm, world, g("root"), g("gfn"), g("level"))
        if not g("present"):
            return Result(e.text, spte is None, "not present" if spte is None else f"found {hx(spte)}")
        if spte is None:
            return Result(e.text, False, "no present leaf SPTE at that level")
        if g("value") is not None and spte != g("value"):
            return Result(e.text, False, f"found {hx(spte)}")
        return Result(e.text, True, f"found {hx(spte)}")
    if k == "read":
        vals = [r.value for r in facts.reads if r.task == g("task") and r.gpa == g("gpa")]
        if not vals:
            return Result(e.text, False, "no completed read of that GPA")
        return Result(e.text, vals[-1] == g("value"), f"last read {hx(vals[-1])}")
    if k == "seamcalls":
        return _seamcalls(e, facts)
    if k == "fault":
        cands = [f for f in facts.faults if f.task == g("task") and f.gpa == g("gpa")]
        if not cands:
            return Result(e.text, False, "no EPT violation handled at that GPA")
        for f in cands:
            if (g("ret") is None or f.ret == g("ret")) and (g("retries") is None or f.retries == g("retries")) \
                    and (g("private") is None or f.private == g("private")):
                return Result(e.text, True, f"{f.ret} after {f.retries} retries (frame {f.frame})")
        got = ", ".join(f"{f.ret}/{f.retries} retries" for f in cands)
        return Result(e.text, False, f"found {got}")
    if k == "violation":
        hits = [v for v in facts.violations if v.invariant == g("name")]
        seen = ", ".join(sorted({v.invariant for v in facts.violations})) or "none"
        return Result(e.text, bool(hits), f"first at frame {hits[0].frame}: {hits[0].message}" if hits
                      else f"not raised (violations: {seen})")
    if k == "no_violations":
        return Result(e.text, not facts.violations,
                      "none" if not facts.violations else f"{len(facts.violations)}, first: "
                      f"{facts.violations[0].invariant} at frame {facts.violations[0].frame}")
    if k == "vm_dead":
        return Result(e.text, facts.vm_dead == g("value"), f"vm_dead is {str(facts.vm_dead).lower()}")
    if k == "panic":
        hits = [p for p in facts.panics if p.task == g("task")]
        return Result(e.text, bool(hits), hits[0].message if hits else "the guest did not panic")
    if k == "stuck":
        stuck = facts.stop == "stuck"
        return Result(e.text, stuck == g("value"), f"the run ended {facts.stop}")
    if k == "stop":
        ended = STOP_OF_FACTS.get(facts.stop, facts.stop)
        return Result(e.text, ended == g("value"), f"the run ended {ended}")
    raise AssertionError(k)


def _seamcalls(e: Expect, facts: Facts) -> Result:
    leaves = [Seamcall[x].dotted for x in e.get("leaves")]
    statuses = e.get("statuses")
    calls = list(facts.seamcalls)

    def match(i: int, s: Any) -> bool:
        return s.leaf == leaves[i] and (statuses is None or status_matches(statuses[i], s.status))

    if e.get("match") == "exact":
        ok = len(calls) == len(leaves) and all(match(i, s) for i, s in enumerate(calls))
        return Result(e.text, ok, "" if ok else "found " + _show(calls))
    i = 0
    for s in calls:
        if i < len(leaves) and match(i, s):
            i += 1
    ok = i == len(leaves)
    if ok:
        return Result(e.text, True, "")
    want = leaves[i] + (f"={describe(statuses[i])}" if statuses is not None else "")
    return Result(e.text, False, f"matched {i} of {len(leaves)}; no {want} after that in " + _show(calls))


def _show(calls: Sequence[Any], limit: int = 12) -> str:
    parts = [f"{s.leaf}={describe(s.status)}" for s in calls[:limit]]
    if len(calls) > limit:
        parts.append(f"... {len(calls) - limit} more")
    return "[" + ", ".join(parts) + "]"
