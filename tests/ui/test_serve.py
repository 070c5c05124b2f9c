"""`tdxdbg serve` in a real headless Chromium (Debian's package, started by the test, 127.0.0.1 only): the page
loads the debugger, a key typed in the page steps the frame counter, and a screenshot shows the three trees
(mirror root, direct root, S-EPT); the screenshot is kept under the pytest tmp dir for a look."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from cdp import browser, chromium, open_page

pytestmark = pytest.mark.skipif(chromium() is None, reason="needs Chromium (.ci/run installs it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"tdxdbg serve exited {proc.returncode}: {proc.stdout.read()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(url)


def test_serve_in_a_headless_browser(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tdxdbg.cli", "serve", "demo", "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_http(url, proc)

        async def go() -> None:
            async with browser(tmp_path / "profile") as (http, devtools), open_page(http, devtools, url) as page:
                await page.wait_for_text("frame -/")
                await page.wait_for_text("2 source")
                await page.call("Runtime.evaluate",
                                expression="document.querySelector('.xterm-helper-textarea').focus()")
                before = len(page.received)
                await page.key("s")
                await page.wait_for_text("frame 0/", since=before)
                await asyncio.sleep(1)
                text = page.text()
                for tree in ("mirror root (private)", "direct root (shared)", "S-EPT (TDX module)"):
                    assert tree in text
                png = await page.screenshot(tmp_path / "serve.png")
                assert png.startswith(b"\x89PNG") and len(png) > 20_000

        asyncio.run(go())
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_serve_refuses_a_bad_scenario_and_port(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[td]\nbogus = 1\n")
    r = subprocess.run([sys.executable, "-m", "tdxdbg.cli", "serve", str(bad), "--port", str(free_port())],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and f"{bad}:" in r.stderr
    r = subprocess.run([sys.executable, "-m", "tdxdbg.cli", "serve", "demo", "--port", "99999"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "expected a TCP port 1..65535" in r.stderr
