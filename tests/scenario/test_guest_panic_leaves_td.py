"""A guest that panics leaves the TD: the model ends the vCPU's thread at the panic (where Linux's panic() would
spin in the guest, taking each IPI as a TD exit), so the vCPU must be out of guest mode and out of its TD epoch.
kvm_make_all_cpus_request(KVM_REQ_OUTSIDE_GUEST_MODE) waits only for vCPUs in guest mode, and TDH.MEM.TRACK
counts only vCPUs still in an epoch."""

from __future__ import annotations

from tdxdbg.runtime.scheduler import Policy, ScheduleSpec
from tdxdbg.scenario.loader import loads
from tdxdbg.scenario.run import run_scenario

# vcpu0 writes 0x201000: EPT violation, TDH.MEM.PAGE.AUG (PENDING), re-entry, and the write meets the PENDING
# page: with SEPT_VE_DISABLE clear, a #VE the guest does not expect (frame 51). host0 punches the hole:
# RANGE.BLOCK, TDH.MEM.TRACK and the kick of vcpu0, still in guest mode (frame 68); then vcpu0 panics.
PANIC_WHILE_KICKED = """
[td]
sept_ve_disable = false
[[memslot]]
id = 0
gpa = 0
size = "4M"
guest_memfd = true
[attributes]
private = [[0, "4M"]]
[[vcpu]]
program = ["write 0x201000 0x7"]
[[host]]
program = ["punch_hole 0x200000 2M", "seamcall TDH.MEM.TRACK"]
[[expect]]
panic = "vcpu0"
"""
KICK_FRAME = 68


def test_tdx_track_kick_is_satisfied_by_a_vcpu_whose_guest_panicked() -> None:
    """tdx_track -> kvm_make_all_cpus_request: the kick of frame 68 finds vcpu0 in guest mode; vcpu0's guest
    then panics on the #VE and its thread ends. The wait ends (the fuzzer's "deadlock: host0 waits for the kicked
    vCPUs to leave guest mode held by vcpu0 (finished)" is gone), and the raw TDH.MEM.TRACK after it (epoch 2 ->
    3, which needs no vCPU left in epoch 1) succeeds: the panicked vCPU left the epoch it entered in."""
    scenario = loads(PANIC_WHILE_KICKED, "t.toml")
    order = ("vcpu0",) * 52 + ("host0",) * 17
    report = run_scenario(scenario, ScheduleSpec(Policy.SEQUENTIAL, 0, order, None))
    f = report.facts
    assert (f.stop, report.stop_message, report.ok) == ("done", "", True)
    assert [(p.frame, p.task) for p in f.panics] == [(KICK_FRAME + 1, "vcpu0")]
    assert [(s.task, s.leaf, s.status) for s in f.seamcalls] == [
        ("vcpu0", "TDH.MEM.SEPT.ADD", 0), ("vcpu0", "TDH.MEM.SEPT.ADD", 0), ("vcpu0", "TDH.MEM.SEPT.ADD", 0),
        ("vcpu0", "TDH.MEM.PAGE.AUG", 0),
        ("host0", "TDH.MEM.RANGE.BLOCK", 0), ("host0", "TDH.MEM.TRACK", 0), ("host0", "TDH.MEM.PAGE.REMOVE", 0),
        ("host0", "TDH.PHYMEM.PAGE.WBINVD", 0), ("host0", "TDH.MEM.TRACK", 0)]
    assert f.seamcalls[5].frame < KICK_FRAME < f.seamcalls[6].frame
