"""The simulated KVM: TDP MMU with mirror and direct roots, the fault path, TDX hooks and guest_memfd.

Functions carry the kernel's names so a kernel engineer finds their way by name.
"""
