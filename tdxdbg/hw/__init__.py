"""The emulated TDX machine: EPT formats, host memory, TD vCPUs and the TDX module. Knows nothing of KVM."""
