"""The readable report of a run (rich): faults, SEAMCALLs, violations, expectations, verdict."""

from __future__ import annotations

from typing import IO

from rich.console import Console
from rich.table import Table
from rich.text import Text

from tdxdbg.hw.tdx.status import describe, is_error
from tdxdbg.scenario.run import Report

MAX_ROWS = 40


def compress(order: tuple[str, ...]) -> str:
    """vcpu0 vcpu0 vcpu0 host0 -> vcpu0*3 host0."""
    out: list[str] = []
    i = 0
    while i < len(order):
        j = i
        while j < len(order) and order[j] == order[i]:
            j += 1
        out.append(order[i] if j - i == 1 else f"{order[i]}*{j - i}")
        i = j
    return " ".join(out)


def _cells(*values: str) -> list[Text]:
    """Table cells as plain Text: user text (task names, leaves, messages) is never read as rich markup."""
    return [Text(v) for v in values]


def print_summary(report: Report, file: IO[str], color: bool | None = None) -> None:
    """Every line goes out as a rich Text, never a markup string: a title or a variant path holding `[` or
    `[/]` prints as written."""
    console = Console(file=file, width=110, no_color=color is False, force_terminal=color or None,
                      highlight=False, soft_wrap=False)
    sc, f = report.scenario, report.facts
    console.print(Text(f"{sc.name}: {sc.title}", style="bold"))
    sched = report.schedule
    console.print(Text(f"variant {sc.td.variant} · schedule {sched.policy.value}"
                       + (f" seed {sched.seed}" if sched.policy.value == "random" else "")
                       + (f" order {compress(sched.order)}" if sched.order else "")
                       + f" · {f.frames} frames · ended {f.stop}"))
    for t in f.tasks:
        if t.state not in ("done",):
            console.print(Text(f"  task {t.name}: {t.state}" + (f" ({t.error})" if t.error else ""), style="yellow"))

    if f.faults:
        table = Table(title="EPT violations handled by KVM", title_justify="left", show_edge=False)
        for col in ("frame", "task", "gpa", "kind", "ret", "retries"):
            table.add_column(col)
        for x in f.faults[:MAX_ROWS]:
            table.add_row(*_cells(str(x.frame), x.task, f"{x.gpa:#x}", "private" if x.private else "shared",
                                  str(x.ret), str(x.retries)))
        console.print(table)
        if len(f.faults) > MAX_ROWS:
            console.print(Text(f"  ... {len(f.faults) - MAX_ROWS} more"))
    if f.seamcalls:
        table = Table(title="SEAMCALLs (TDH.VP.ENTER left out)", title_justify="left", show_edge=False)
        for col in ("frame", "task", "leaf", "gpa", "level", "status"):
            table.add_column(col)
        for s in f.seamcalls[:MAX_ROWS]:
            status = describe(s.status) + (" (injected)" if s.injected else "")
            table.add_row(*_cells(str(s.frame), s.task, s.leaf, "" if s.gpa is None else f"{s.gpa:#x}",
                                  "" if s.level is None else str(s.level)),
                          Text(status, style="red" if is_error(s.status) else "green"))
        console.print(table)
        if len(f.seamcalls) > MAX_ROWS:
            console.print(Text(f"  ... {len(f.seamcalls) - MAX_ROWS} more"))
    for msg in f.kvm_bugs:
        console.print(Text(f"KVM_BUG_ON / VM dead: {msg}", style="red"))
    for p in f.panics:
        console.print(Text(f"guest panic on {p.task} (frame {p.frame}): {p.message}", style="red"))
    for p in f.errors:
        console.print(Text(f"engine error on {p.task} (frame {p.frame}): {p.message}", style="bold red"))
    if f.violations:
        console.print(Text(f"violations: {len(f.violations)}", style="bold red"))
        for v in f.violations[:MAX_ROWS]:
            expected = "" if v in report.unexpected else " (expected)"
            console.print(Text(f"  frame {v.frame}: {v.invariant}: {v.message}{expected}", style="red"))
    else:
        console.print(Text("violations: none"))
    console.print(Text("expectations:", style="bold"))
    if not report.results:
        console.print(Text("  (none)"))
    for r in report.results:
        mark = Text("  PASS " if r.ok else "  FAIL ", style="green" if r.ok else "bold red")
        mark.append(r.text)
        if r.detail:
            mark.append(f"  ({r.detail})", style="dim")
        console.print(mark)
    if f.vm_dead and not any(e.kind == "vm_dead" and e.get("value") for e in sc.expect):
        console.print(Text("the VM died and the scenario does not expect it (`vm_dead = true`)", style="red"))
    if report.stop_message:
        console.print(Text(report.stop_message, style="red"))
    if f.stop == "max_frames":
        console.print(Text("the run was cut short by --max-frames", style="red"))
    console.print(Text("OK" if report.ok else "FAILED", style="bold green" if report.ok else "bold red"))
