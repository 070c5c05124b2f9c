"""What a run produced, derived from its frames and final state, and the JSON trace (format tdxdbg-trace/2).

Byte-identical for the same scenario and schedule: sorted keys, no floats, lowercase 0x hex, statuses as 16
hex digits.
"""

from __future__ import annotations

import enum
import errno
import json
from collections.abc import Sequence
from typing import Any

import attrs

from tdxdbg.engine.kvm import K_VM_DEAD
from tdxdbg.engine.mmu_page import K_ROOTS, sp_key
from tdxdbg.engine.spte import is_last_spte, is_shadow_present_pte, spte_to_pfn
from tdxdbg.engine.steps import EngineStep
from tdxdbg.engine.tdp_iter import walk_spte
from tdxdbg.hw.memory import fill_key, pte_key
from tdxdbg.hw.tdx.leaves import Seamcall
from tdxdbg.hw.tdx.seamcall import PAGE_INFO_LEVEL_MASK, Arg, Reg, SeamcallEntry, SeamcallReturn, TdxStep, leaf_info
from tdxdbg.hw.tdx.sept import SeptState, sept_entry
from tdxdbg.hw.tdx.status import is_error, status_name
from tdxdbg.hw.tdx.td import KEYID_SHIFT, td_key
from tdxdbg.runtime.frame import Frame
from tdxdbg.runtime.step import StepKind

FORMAT = "tdxdbg-trace/2"


# page_info_api_input_t's GPA (bits 51:12); a host PA without its key-id bits (a keyed PA of WBINVD), page aligned.
PAGE_INFO_GPA_MASK = ((1 << 52) - 1) & ~0xFFF
HOST_PA_MASK = ((1 << KEYID_SHIFT) - 1) & ~0xFFF


def hx(n: int) -> str:
    return f"{n:#x}"


def status_hex(n: int) -> str:
    return f"0x{n:016x}"


def ret_text(ret: Any) -> str:
    """A RET_PF_* name as is; a negative errno as -ENAME."""
    if isinstance(ret, int) and not isinstance(ret, bool):
        name = errno.errorcode.get(-ret)
        return f"-{name}" if ret < 0 and name else str(ret)
    return str(ret)


@attrs.frozen
class SeamcallRec:
    """One SEAMCALL: its input and output registers, and what the leaf's declaration says they are about (the
    GPA and level of a page_info / GPA operand, the host page handed over, given back or named)."""

    frame: int
    task: str
    leaf: str
    gpa: int | None
    level: int | None
    hpa: int | None
    status: int
    injected: bool
    regs_in: tuple[int, int, int, int] = (0, 0, 0, 0)     # RCX, RDX, R8, R9
    regs_out: tuple[int, int, int] = (0, 0, 0)           # RCX, RDX, R8


@attrs.frozen
class FaultRec:
    frame: int
    task: str
    gpa: int
    private: bool
    ret: str
    retries: int


@attrs.frozen
class ReadRec:
    frame: int
    task: str
    gpa: int
    value: int


@attrs.frozen
class ViolationRec:
    frame: int
    invariant: str
    message: str


@attrs.frozen
class PanicRec:
    frame: int
    task: str
    message: str


@attrs.frozen
class Facts:
    """Everything the summary, the expectations and the JSON are made from."""

    frames: int
    stop: str
    seamcalls: tuple[SeamcallRec, ...]
    faults: tuple[FaultRec, ...]
    reads: tuple[ReadRec, ...]
    violations: tuple[ViolationRec, ...]
    panics: tuple[PanicRec, ...]
    errors: tuple[PanicRec, ...]        # engine errors (a task raised something other than GuestPanic)
    kvm_bugs: tuple[str, ...]
    mirror: tuple[tuple[int, int, int], ...]     # (gfn, KVM level, spte)
    direct: tuple[tuple[int, int, int], ...]
    sept: tuple[tuple[int, int, str], ...]       # (gpa, TDX level, state)
    vm_dead: bool
    tasks: tuple[Any, ...]
    events: tuple[dict[str, Any], ...] | None = None   # every frame's event, when asked for (--events)


def collect(frames: Sequence[Frame], final: Any, kvm: Any, stop: str, events: bool = False) -> Facts:
    seamcalls, faults, reads, violations, panics, errors, bugs = [], [], [], [], [], [], []
    event_list: list[dict[str, Any]] | None = [] if events else None
    pending: dict[str, SeamcallEntry] = {}
    for f in frames:
        step = f.step
        kind = step.kind
        if event_list is not None:
            event_list.append(frame_event(f))
        if kind is TdxStep.SEAMCALL:
            if isinstance(step.payload, SeamcallEntry):
                pending[f.task] = step.payload
        elif kind is TdxStep.SEAMCALL_RETURN:
            p = step.payload
            if isinstance(p, SeamcallReturn) and p.leaf is not Seamcall.TDH_VP_ENTER:
                seamcalls.append(seamcall_rec(f.index, f.task, pending.pop(f.task, None), p))
        elif kind is EngineStep.EXIT:
            if step.get("what") == "EPT violation handled":
                faults.append(FaultRec(f.index, f.task, step.get("gpa"), bool(step.get("private")),
                                       ret_text(step.get("ret")), int(step.get("retries") or 0)))
        elif kind is TdxStep.GUEST_ACCESS:
            if step.get("access") == "read" and step.get("exit") is None and not step.get("ve") \
                    and step.get("value") is not None:
                reads.append(ReadRec(f.index, f.task, step.get("gpa"), step.get("value")))
        elif kind is StepKind.TASK_ERROR:
            err = str(step.get("error"))
            if err.startswith("GuestPanic:"):
                panics.append(PanicRec(f.index, f.task, err.removeprefix("GuestPanic:").strip()))
            else:
                errors.append(PanicRec(f.index, f.task, err))
        elif kind is EngineStep.KVM_BUG:
            bugs.append(str(step.get("message")))
        for v in f.violations:
            violations.append(ViolationRec(f.index, v.invariant, v.message))
    w = final.world
    mirror, direct = spte_leaves(kvm, w)
    return Facts(len(frames), stop, tuple(seamcalls), tuple(faults), tuple(reads), tuple(violations),
                 tuple(panics), tuple(errors), tuple(bugs), mirror, direct, sept_entries(kvm, w),
                 bool(w.peek(K_VM_DEAD)), final.tasks, None if event_list is None else tuple(event_list))


# Operand kinds that name a host page: handed over (NEW_PAGE...), or named by its PA (RECLAIM, WBINVD).
_PAGE_ARGS = (Arg.NEW_PAGE, Arg.NEW_PAGE_AT_LEVEL, Arg.PA)


def seamcall_rec(frame: int, task: str, entry: SeamcallEntry | None, ret: SeamcallReturn) -> SeamcallRec:
    """A SEAMCALL as the JSON shows it, decoded from its registers by the leaf's declaration (never from what the
    module decoded, which an injected status skips): `gpa`/`level` only for a leaf with a page_info or GPA
    operand; `hpa` the page it hands over or names (key bits cleared), or else the page it returns (an `hpa`
    output, PAGE.REMOVE)."""
    regs_in = (entry.rcx, entry.rdx, entry.r8, entry.r9) if entry is not None else (0, 0, 0, 0)
    regs_out = (ret.rcx, ret.rdx, ret.r8)
    info = leaf_info(ret.leaf)
    gpa = level = hpa = None
    if info is not None:
        by_reg = dict(zip((Reg.RCX, Reg.RDX, Reg.R8, Reg.R9), regs_in, strict=True))
        for o in info.operands:
            v = by_reg[o.reg]
            if o.arg in (Arg.PAGE_INFO, Arg.PAGE_RANGE) and gpa is None:
                gpa, level = v & PAGE_INFO_GPA_MASK, v & PAGE_INFO_LEVEL_MASK
            elif o.arg is Arg.GPA and gpa is None:
                gpa = v
            elif o.arg in _PAGE_ARGS and hpa is None:
                hpa = v & HOST_PA_MASK
        if hpa is None and not is_error(ret.rax):
            out = dict(zip((Reg.RCX, Reg.RDX, Reg.R8), regs_out, strict=True))
            hpa = next((out[r.reg] & HOST_PA_MASK for r in info.returns if r.name == "hpa"), None)
    return SeamcallRec(frame, task, ret.leaf.dotted, gpa, level, hpa, ret.rax, bool(ret.injected), regs_in,
                       regs_out)


# -- every frame's event (--events) ----------------------------------------------------------------------------
# Payload fields that are counts or small numbers, kept as JSON integers; every other integer is a hex string.
_PLAIN_INT_FIELDS = frozenset({"vcpu", "level", "index", "retries", "retry", "refcount", "epoch", "rip", "value",
                               "occurrence", "slot", "in_progress", "seq", "npages", "size_level"})


def frame_event(f: Frame) -> dict[str, Any]:
    """One frame as an event: `frame`, `task`, `kind` and the step's payload fields, as plain JSON values (enum
    members by name, integers in hex except counts). SPTE changes carry `what` (freeze, unfreeze, restore,
    zap, ...), `old`, `new` and `ok`; lock events `lock`, `mode` and `action`."""
    ev: dict[str, Any] = {"frame": f.index, "task": f.task, "kind": getattr(f.step.kind, "value", str(f.step.kind))}
    for name, value in f.step.fields().items():
        if name in ev:
            name = f"payload_{name}"
        ev[name] = _plain(name, value)
    return ev


def _plain(name: str, value: Any) -> Any:
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, int):
        return value if name in _PLAIN_INT_FIELDS else hx(value)
    as_dict = getattr(value, "_asdict", None)
    if as_dict is not None:
        return {k: _plain(k, v) for k, v in as_dict().items()}
    if isinstance(value, dict):
        return {str(k): _plain(str(k), v) for k, v in value.items()}
    if isinstance(value, tuple | list | frozenset | set):
        items = sorted(value, key=repr) if isinstance(value, frozenset | set) else value
        return [_plain(name, v) for v in items]
    return str(value)


# -- final state views -------------------------------------------------------------------------------------------
def _root_list(kvm: Any, w: Any, mirror: bool) -> list[int]:
    out = []
    for root in w.peek(K_ROOTS, ()):
        sp = w.peek(sp_key(root))
        if sp is not None and sp.role.is_mirror == mirror:
            out.append((sp.role.invalid, root))
    return [r for _inv, r in sorted(out)]


def spte_leaves(kvm: Any, w: Any) -> tuple[tuple[tuple[int, int, int], ...], tuple[tuple[int, int, int], ...]]:
    """Present leaf SPTEs of the valid (else any) mirror and direct roots: (gfn without shared bit, level, spte)."""
    strip = ~kvm.gfn_direct_bits
    out = []
    for mirror in (True, False):
        leaves: dict[tuple[int, int], int] = {}
        roots = _root_list(kvm, w, mirror)
        for root in roots[:1]:
            sp = w.peek(sp_key(root))
            _walk(w, root, sp.role.level, 0, leaves, strip)
        out.append(tuple(sorted((g, lvl, s) for (g, lvl), s in leaves.items())))
    return out[0], out[1]


def _walk(w: Any, table: int, level: int, base_gfn: int, out: dict[tuple[int, int], int], strip: int) -> None:
    shift = 9 * (level - 1)
    data = w.peek(fill_key(table), 0)
    # Only entries written differ from the fill value: scan them.
    for idx in range(512):
        spte = w.peek(pte_key(table, idx))
        if spte is None:
            if not is_shadow_present_pte(data):
                continue
            spte = data
        if not is_shadow_present_pte(spte):
            continue
        gfn = base_gfn | (idx << shift)
        if is_last_spte(spte, level):
            out[(gfn & strip, level)] = spte
        else:
            _walk(w, spte_to_pfn(spte), level - 1, gfn, out, strip)


def sept_entries(kvm: Any, w: Any) -> tuple[tuple[int, int, str], ...]:
    cfg = w.peek(td_key(kvm.tdr))
    if cfg is None:
        return ()
    out: list[tuple[int, int, str]] = []

    def walk(table: int, level: int, base: int) -> None:
        for idx in range(512):
            e = sept_entry(w.peek, table, idx)
            if e.state is SeptState.FREE:
                continue
            gpa = base | (idx << (12 + 9 * level))
            out.append((gpa, level, e.state.name))
            if not e.state.is_leaf and level > 0:
                walk(e.pfn, level - 1, gpa)

    walk(cfg.sept_root, cfg.root_level, 0)
    return tuple(sorted(out))


def sept_lookup(kvm: Any, w: Any, gpa: int, level: int) -> str:
    """The state of the S-EPT entry for gpa at level, "FREE" when the walk ends above it on a FREE entry."""
    cfg = w.peek(td_key(kvm.tdr))
    if cfg is None:
        return "FREE (no TD)"
    from tdxdbg.hw.tdx.module import walk_sept
    reached, _t, _i, e = walk_sept(w.peek, cfg, gpa, level)
    if reached == level:
        return e.state.name
    if e.state is SeptState.FREE:
        return "FREE"
    return f"not reached (walk stopped at level {reached}: {e.state.name})"


def spte_lookup(kvm: Any, w: Any, root_kind: str, gfn: int, level: int) -> int | None:
    """The leaf SPTE mapping gfn at exactly `level` in the valid root of that kind, or None."""
    roots = _root_list(kvm, w, root_kind == "mirror")
    if not roots:
        return None
    root = roots[0]
    gfn &= ~kvm.gfn_direct_bits
    if root_kind == "direct":
        gfn |= kvm.gfn_direct_bits
    reached, _table, _idx, spte = walk_spte(w.peek, root, w.peek(sp_key(root)).role.level, gfn, level)
    if reached != level or not is_shadow_present_pte(spte) or not is_last_spte(spte, level):
        return None
    return spte


# -- JSON ------------------------------------------------------------------------------------------------------
def to_json_obj(scenario: Any, variant: str, schedule: Any, facts: Facts, results: Sequence[Any],
                ok: bool, stop_report: str = "") -> dict[str, Any]:
    return {
        "format": FORMAT,
        "scenario": scenario.name,
        "title": scenario.title,
        "variant": variant,
        "schedule": {"policy": schedule.policy.value, "seed": schedule.seed, "order": list(schedule.order)},
        "ok": ok,
        "frames": facts.frames,
        "stop": facts.stop,
        "stop_report": stop_report or None,
        "tasks": [{"name": t.name, "state": t.state, "result": t.result, "error": t.error} for t in facts.tasks],
        "seamcalls": [{"frame": s.frame, "task": s.task, "leaf": s.leaf,
                       "gpa": None if s.gpa is None else hx(s.gpa), "level": s.level,
                       "hpa": None if s.hpa is None else hx(s.hpa), "status": status_hex(s.status),
                       "status_name": status_name(s.status), "injected": s.injected,
                       "in": dict(zip(("rcx", "rdx", "r8", "r9"), map(hx, s.regs_in), strict=True)),
                       "out": dict(zip(("rcx", "rdx", "r8"), map(hx, s.regs_out), strict=True))}
                      for s in facts.seamcalls],
        "faults": [{"frame": x.frame, "task": x.task, "gpa": hx(x.gpa), "private": x.private, "ret": x.ret,
                    "retries": x.retries} for x in facts.faults],
        "final": {
            "mirror": [{"gfn": hx(g), "level": lvl, "spte": hx(s)} for g, lvl, s in facts.mirror],
            "direct": [{"gfn": hx(g), "level": lvl, "spte": hx(s)} for g, lvl, s in facts.direct],
            "sept": [{"gpa": hx(g), "level": lvl, "state": st} for g, lvl, st in facts.sept],
            "vm_dead": facts.vm_dead,
        },
        "reads": [{"frame": r.frame, "task": r.task, "gpa": hx(r.gpa), "value": hx(r.value)} for r in facts.reads],
        "violations": [{"frame": v.frame, "invariant": v.invariant, "message": v.message} for v in facts.violations],
        "panics": [{"frame": p.frame, "task": p.task, "message": p.message} for p in facts.panics],
        "errors": [{"frame": p.frame, "task": p.task, "message": p.message} for p in facts.errors],
        "expectations": [{"text": r.text, "ok": r.ok, "detail": r.detail} for r in results],
        **({} if facts.events is None else {"events": list(facts.events)}),
    }


def dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=True) + "\n"
