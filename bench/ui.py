"""The debugger's responsiveness, driven headless (Textual's Pilot) over a scenario of 100,000+ frames.

Figures:
  cold-start-ms             from launching a fresh Python process (interpreter start, imports, opening the
                            scenario) to the debugger's first painted screen
  step-latency-median-ms    from the app handling the key (s, step into) to the screen being repainted with the
                            new frame, in the middle of the recorded timeline. Measured inside the app (the
                            Pilot's own idle waits add tens of milliseconds that a user does not see).
  step-latency-p95-ms
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tdxdbg.ui.app import TdxdbgApp

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


class TimedApp(TdxdbgApp):
    """The debugger, timing each step from the key's action to the repaint that follows it."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.latencies: list[float] = []
        self.first_paint: float | None = None

    def on_mount(self) -> None:
        # Textual runs TdxdbgApp.on_mount itself (handlers are called along the MRO): calling super() here
        # opened the scenario twice, and the second session replaced the one being recorded.
        self.call_after_refresh(self._painted)

    def _painted(self) -> None:
        self.first_paint = time.perf_counter()

    def action_step_into(self) -> None:
        t0 = time.perf_counter()
        super().action_step_into()
        self.call_after_refresh(lambda: self.latencies.append((time.perf_counter() - t0) * 1000))


async def measure(path: str) -> None:
    t0 = time.perf_counter()
    app = TimedApp(path)
    async with app.run_test(size=(160, 48)) as pilot:
        while app.first_paint is None:
            await pilot.pause(0.001)
        cold = (app.first_paint - t0) * 1000
        # Let the background recording start (it is handed to a worker after the first paint) and finish, then
        # stand in the middle of the run.
        while not app._run_label and not len(app.session.frames):
            await pilot.pause(0.01)
        while app._run_label:
            await pilot.pause(0.1)
        await app.workers.wait_for_complete()
        total = len(app.session.frames)
        app.goto_frame(total // 2)
        while app._run_label:
            await pilot.pause(0.05)
        await pilot.pause()
        for _ in range(STEPS):
            await pilot.press("s")
            await pilot.pause()
        latencies = sorted(app.latencies)
    print(f"first-paint-in-process-ms: {cold:.0f} ms")
    print(f"step-latency-median-ms: {statistics.median(latencies):.1f} ms")
    print(f"step-latency-p95-ms: {latencies[int(len(latencies) * 0.95) - 1]:.1f} ms")
    print(f"timeline-frames: {total} frames")


COLD_START_CHILD = """
import asyncio, sys, time
sys.path.insert(0, {root!r})
from tdxdbg.ui.app import TdxdbgApp

class App(TdxdbgApp):
    def on_mount(self):  # TdxdbgApp.on_mount runs too: Textual calls handlers along the MRO
        self.call_after_refresh(lambda: print(time.time(), flush=True) or self.exit())

async def main():
    app = App({path!r})
    async with app.run_test(size=(160, 48)) as pilot:
        while app.is_running:
            await pilot.pause(0.001)

asyncio.run(main())
"""


def cold_start_ms(path: str) -> float:
    """Wall time from spawning a new interpreter to the first painted screen (median of 3)."""
    root = str(Path(__file__).resolve().parent.parent)
    times = []
    for _ in range(3):
        start = time.time()
        out = subprocess.run([sys.executable, "-c", COLD_START_CHILD.format(root=root, path=path)],
                             capture_output=True, text=True, check=True).stdout.split()
        times.append((float(out[0]) - start) * 1000)
    return statistics.median(times)


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "many_faults.toml"
        path.write_text(scenario_text())
        print(f"cold-start-ms: {cold_start_ms(str(path)):.0f} ms")
        asyncio.run(measure(str(path)))


if __name__ == "__main__":
    main()
