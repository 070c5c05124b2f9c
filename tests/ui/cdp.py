"""A small Chrome DevTools Protocol client for the browser test of `tdxdbg serve`: starts Chromium headless
(only on 127.0.0.1, no network services of its own), opens a page, sends keys, records what the page received
over its websockets and takes screenshots. Uses aiohttp (a dependency of textual-serve)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0")
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(\x07|\x1b\\)|\x1b[()][0-9A-Za-z]|\x1b[=>]")


def chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        if path := shutil.which(name):
            return path
    return None


def plain(ansi: str) -> str:
    """Terminal output without escape sequences (what a search for screen text needs)."""
    return ANSI.sub("", ansi)


class Page:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.received = bytearray()        # binary websocket frames the page received (the app's output)
        self.pending: dict[int, asyncio.Future] = {}
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self.pending:
                self.pending.pop(data["id"]).set_result(data)
            elif data.get("method") == "Network.webSocketFrameReceived":
                r = data["params"]["response"]
                if r.get("opcode") == 2:
                    self.received += base64.b64decode(r["payloadData"])

    async def call(self, method: str, **params: Any) -> dict:
        i = next(self.ids)
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self.pending[i] = fut
        await self.ws.send_str(json.dumps({"id": i, "method": method, "params": params}))
        reply = await asyncio.wait_for(fut, 30)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def text(self) -> str:
        return plain(self.received.decode("utf-8", "replace"))

    async def wait_for_text(self, needle: str, since: int = 0, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while needle not in plain(self.received[since:].decode("utf-8", "replace")):
            if time.monotonic() > end:
                raise TimeoutError(f"{needle!r} never appeared on the page")
            await asyncio.sleep(0.1)

    async def key(self, char: str) -> None:
        code = f"Key{char.upper()}" if char.isalpha() else ""
        for kind in ("keyDown", "keyUp"):
            params: dict[str, Any] = {"type": kind, "key": char, "code": code,
                                      "windowsVirtualKeyCode": ord(char.upper())}
            if kind == "keyDown":
                params["text"] = char
            await self.call("Input.dispatchKeyEvent", **params)

    async def screenshot(self, path: Path) -> bytes:
        png = base64.b64decode((await self.call("Page.captureScreenshot", format="png"))["data"])
        path.write_bytes(png)
        return png


@contextlib.asynccontextmanager
async def browser(profile: Path, width: int = 1700, height: int = 1000) -> AsyncIterator[Any]:
    """Chromium, headless, with its DevTools endpoint on 127.0.0.1 (port chosen by Chromium)."""
    exe = chromium()
    assert exe is not None
    proc = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        for _ in range(300):
            if port_file.exists() and port_file.read_text().strip():
                break
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as http:
            yield http, port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.asynccontextmanager
async def open_page(http: aiohttp.ClientSession, port: int, url: str) -> AsyncIterator[Page]:
    async with http.put(f"http://127.0.0.1:{port}/json/new?about:blank") as r:
        target = await r.json()
    async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
        page = Page(ws)
        await page.call("Network.enable")
        await page.call("Page.enable")
        await page.call("Page.navigate", url=url)
        try:
            yield page
        finally:
            page.reader.cancel()
