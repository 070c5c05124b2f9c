"""A patch under review, as a variant: tdx_track() issues TDH.MEM.TRACK but no longer kicks the vCPUs.

Load it with `tdxdbg --variant docs/examples/track_without_kick.py:TrackWithoutKick SCENARIO`.
"""

from tdxdbg.engine.kvm import TdState
from tdxdbg.engine.variants.upstream import Upstream
from tdxdbg.hw.tdx.leaves import Seamcall
from tdxdbg.hw.tdx.status import is_error


class TrackWithoutKick(Upstream):
    name = "track-without-kick"
    description = "tdx_track without kvm_make_all_cpus_request(KVM_REQ_OUTSIDE_GUEST_MODE)."

    def tdx_track(self):
        if self.td_state() is not TdState.TD_STATE_RUNNABLE:
            return
        r = yield from self.tdh_do_no_vcpus(Seamcall.TDH_MEM_TRACK, self.tdr_pa, 0)
        yield from self.kvm_bug_on(is_error(r.rax), f"TDH.MEM.TRACK failed: {r}")
        # The patch drops: yield from self.kvm_make_all_cpus_request_outside_guest_mode()
