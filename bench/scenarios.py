"""Validate and run every shipped scenario; prints `library-seconds: N s` (target < 10)."""

from __future__ import annotations

import time

from tdxdbg.scenario.loader import load, shipped
from tdxdbg.scenario.run import run_scenario


def main() -> None:
    start = time.perf_counter()
    failed = []
    for path in shipped():
        report = run_scenario(load(path))
        if not report.ok:
            failed.append(path.stem)
    elapsed = time.perf_counter() - start
    print(f"scenarios: {len(shipped())}")
    if failed:
        print(f"failed: {' '.join(failed)}")
    print(f"library-seconds: {elapsed:.2f} s")


if __name__ == "__main__":
    main()
