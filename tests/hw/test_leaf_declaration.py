"""A SEAMCALL leaf is declared once, on its handler (tdxdbg/hw/tdx/seamcall.py `handler`): its operands (names,
registers, how a scenario gives them and whether the log shows them) and what it returns. The scenario's
`seamcall` op, breakpoints, the log line and the JSON trace are derived from that declaration.

The test registers a leaf the shipped module does not implement (TDH.MNG.RD, leaf 11: RCX = TDR, RDX = field
identifier, R8 = the field's value) through the same `handler` decorator the shipped leaves use."""

from __future__ import annotations

import pytest

from tdxdbg.hw.tdx.leaves import Seamcall
from tdxdbg.hw.tdx.seamcall import (
    HANDLERS,
    LEAVES,
    TDR_RCX,
    Arg,
    Operand,
    Output,
    Reg,
    handler,
    parse_leaf,
    success,
    unregister,
)
from tdxdbg.hw.tdx.status import TdxStatus
from tdxdbg.scenario.builder import build_setup
from tdxdbg.scenario.loader import loads
from tdxdbg.scenario.model import ScenarioError
from tdxdbg.scenario.ops import parse_host_op
from tdxdbg.scenario.run import run_scenario
from tdxdbg.session import Session, StopReason
from tdxdbg.session.log import EventIndex

FIELD_BASE = 0x1000     # the test leaf returns FIELD_BASE + the field identifier

SCENARIO = """
[td]
gpaw = 48

[[memslot]]
id = 0
gpa = 0x0
size = "4M"
guest_memfd = true

[[vcpu]]
program = ["read 0x1000"]

[[host]]
program = ["seamcall TDH.MNG.RD 0x2a", "seamcall TDH.MEM.TRACK"]

[schedule]
policy = "sequential"
order = ["host0*10"]
"""


@pytest.fixture
def mng_rd():
    assert Seamcall.TDH_MNG_RD not in HANDLERS

    @handler(Seamcall.TDH_MNG_RD, (TDR_RCX, Operand("field", Reg.RDX, Arg.VALUE)),
             returns=(Output("value", Reg.R8),))
    class MngRd:
        @staticmethod
        def prepare(m, c):
            return None

        @staticmethod
        def execute(m, c):
            return success(c, r8=FIELD_BASE + c.rdx)

    yield MngRd
    unregister(Seamcall.TDH_MNG_RD)


def test_a_declared_leaf_is_a_scenario_op_with_its_operands(mng_rd) -> None:
    op = parse_host_op("seamcall TDH.MNG.RD 0x2a")
    assert (op.kind, op.leaf, op.args) == ("seamcall", "TDH_MNG_RD", (0x2A,))
    assert LEAVES[Seamcall.TDH_MNG_RD].syntax == "seamcall TDH.MNG.RD [FIELD]"


def test_a_declared_leaf_runs_stops_at_its_breakpoint_and_has_its_log_line(mng_rd) -> None:
    scenario = loads(SCENARIO)
    s = Session.open(build_setup(scenario))
    bp = s.breakpoints.add_seamcall("TDH.MNG.RD")
    assert bp.leaf is Seamcall.TDH_MNG_RD
    assert s.continue_().reason is StopReason.BREAKPOINT
    entry = s.frame.step.payload
    tdr_pa = s.context.tdr << 12
    assert (s.frame.task, entry.leaf, entry.rcx, entry.rdx) == ("host0", Seamcall.TDH_MNG_RD, tdr_pa, 0x2A)
    s.run_to_end()
    log = EventIndex()
    log.update(s.frames)
    texts = [e.text for e in log.entries if e.task == "host0" and e.text.startswith("TDH.")]
    # Only the operands each leaf has: TDR and field for MNG.RD (and its declared output), the TDR for TRACK.
    assert texts == [f"TDH.MNG.RD(tdr={tdr_pa:#x}, field=0x2a) = TDX_SUCCESS -> value=0x102a",
                     f"TDH.MEM.TRACK(tdr={tdr_pa:#x}) = TDX_SUCCESS"]


def test_a_declared_leaf_reaches_the_json_trace(mng_rd) -> None:
    report = run_scenario(loads(SCENARIO))
    rd = [x for x in report.json_obj()["seamcalls"] if x["leaf"] == "TDH.MNG.RD"]
    # No page_info, GPA or page operand: gpa, level and hpa are null; the registers show the field and the value.
    assert rd == [{"frame": rd[0]["frame"], "task": "host0", "leaf": "TDH.MNG.RD", "gpa": None, "level": None,
                   "hpa": None, "status": f"0x{TdxStatus.TDX_SUCCESS:016x}", "status_name": "TDX_SUCCESS",
                   "injected": False, "in": {"rcx": rd[0]["in"]["rcx"], "rdx": "0x2a", "r8": "0x0", "r9": "0x0"},
                   "out": {"rcx": "0x0", "rdx": "0x0", "r8": f"{FIELD_BASE + 0x2A:#x}"}}]


def test_an_undeclared_leaf_is_refused_everywhere() -> None:
    assert Seamcall.TDH_MNG_RD not in LEAVES
    with pytest.raises(ValueError, match=r"unknown SEAMCALL leaf 'TDH\.MNG\.RD'"):
        parse_leaf("TDH.MNG.RD")
    with pytest.raises(ScenarioError, match=r"unknown SEAMCALL leaf 'TDH\.MNG\.RD'"):
        loads(SCENARIO)


def test_every_implemented_leaf_is_declared() -> None:
    """The module dispatches exactly the declared leaves (plus TDH.VP.ENTER, declared for the vCPU's entry)."""
    assert set(HANDLERS) == set(LEAVES) - {Seamcall.TDH_VP_ENTER}
