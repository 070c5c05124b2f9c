"""tdxdbg: a step-through debugger for how KVM resolves page faults of Intel TDX guests."""

__version__ = "0.1.0"
