"""Scenario files: TOML loading with precise errors, the program operations, building a VmSetup, expectations,
the JSON trace and the readable summary."""
