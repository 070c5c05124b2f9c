"""The TDX module: SEAMCALL and TDCALL leaves, the Secure EPT and its state machine, TLB epochs and locks."""
