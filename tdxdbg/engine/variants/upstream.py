"""The merged code: TDX in kvm/next (~v6.14-6.15), with the later local-retry and RET_PF changes."""

from __future__ import annotations

from tdxdbg.engine.ioctls import IoctlOps
from tdxdbg.engine.vcpu import VcpuOps


class Upstream(VcpuOps, IoctlOps):
    """KVM as merged: mirror and direct roots, FROZEN_SPTE, external-SPT hooks, guest_memfd."""

    name = "upstream"
