"""The debugger's responsiveness, driven headless (Textual's Pilot) over a scenario of 100,000+ frames.

Figures:
  cold-start-ms             from creating the app to its first painted screen
  step-latency-median-ms    key press (s) to the updated screen, in the middle of the recorded timeline
  step-latency-p95-ms
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tdxdbg.ui.app import TdxdbgApp  # noqa: E402

PAGES = 4700          # about 22 frames a page: more than 100,000 frames
STEPS = 200


def scenario_text() -> str:
    ops = ",\n".join(f'  "accept {0x100000 + i * 0x1000:#x}"' for i in range(PAGES))
    return f"""title = "Many private faults (UI benchmark)"
description = "One vCPU accepts {PAGES} fresh private pages, one EPT violation each."
[td]
gpaw = 48
[[memslot]]
id = 0
gpa = 0x0
size = "64M"
guest_memfd = true
[attributes]
private = [[0x0, "64M"]]
[[vcpu]]
program = [
{ops}
]
"""


async def measure(path: str) -> None:
    t0 = time.perf_counter()
    app = TdxdbgApp(path)
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.pause()
        cold = (time.perf_counter() - t0) * 1000
        # Let the background recording finish, then stand in the middle of the run.
        while app._run_label:
            await pilot.pause(0.1)
        await app.workers.wait_for_complete()
        total = len(app.session.frames)
        app.goto_frame(total // 2)
        while app._run_label:
            await pilot.pause(0.05)
        await pilot.pause()
        latencies = []
        for _ in range(STEPS):
            t = time.perf_counter()
            await pilot.press("s")
            await pilot.pause()
            latencies.append((time.perf_counter() - t) * 1000)
    latencies.sort()
    print(f"cold-start-ms: {cold:.0f} ms")
    print(f"step-latency-median-ms: {statistics.median(latencies):.1f} ms")
    print(f"step-latency-p95-ms: {latencies[int(len(latencies) * 0.95) - 1]:.1f} ms")
    print(f"timeline-frames: {total} frames")


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "many_faults.toml"
        path.write_text(scenario_text())
        asyncio.run(measure(str(path)))


if __name__ == "__main__":
    main()
