"""A real headless Chromium (Debian's `chromium`) driven over the DevTools protocol (CDP).

    async with HeadlessChromium(tmp_path) as browser:
        await browser.open(url)                   # returns after the page's load event
        rows = await browser.evaluate("...js...")  # a JSON value from the page
        png = await browser.screenshot()

The browser starts with its own profile directory, `--remote-debugging-port=0` on 127.0.0.1
(it writes the port it took to DevToolsActivePort in the profile), and its own session; the
test talks to the page target's websocket with aiohttp. Stopped by pid (SIGTERM, then SIGKILL
of the session it leads, which holds only its own helper processes).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

CHROMIUM = os.environ.get("CHROMIUM", "chromium")
START_TIMEOUT_S = 30.0


class HeadlessChromium:
    def __init__(self, workdir: Path, width: int = 1200, height: int = 1500) -> None:
        self.profile = workdir / "chromium-profile"
        self.width, self.height = width, height
        self.process: subprocess.Popen[bytes] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._next_id = 0
        self._events: list[dict[str, Any]] = []

    async def __aenter__(self) -> HeadlessChromium:
        binary = shutil.which(CHROMIUM)
        if binary is None:
            pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (`make setup` does)")
        self.profile.mkdir()
        log = (self.profile.parent / "chromium.log").open("wb")
        self.process = subprocess.Popen(
            [
                binary,
                "--headless=new",
                "--no-sandbox",  # root in CI; the page is our own
                "--disable-gpu",
                "--no-first-run",
                "--no-default-browser-check",
                "--hide-scrollbars",
                f"--user-data-dir={self.profile}",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                f"--window-size={self.width},{self.height}",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
        log.close()  # the browser holds its own copy
        try:
            await self._connect()
        except BaseException:
            self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):  # an orderly exit reaps its helpers
                await self._ws.send_json({"id": 0, "method": "Browser.close"})
                if self.process is not None:
                    await asyncio.to_thread(self.process.wait, 10)
            await self._ws.close()
        if self._session is not None:
            await self._session.close()
        self.stop()

    async def _connect(self) -> None:
        assert self.process is not None
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT_S
        while not port_file.exists() or not port_file.read_text().strip():
            if self.process.poll() is not None:
                log = (self.profile.parent / "chromium.log").read_text(errors="replace")
                pytest.fail(f"chromium exited with {self.process.returncode}:\n{log[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"chromium wrote no DevToolsActivePort in {START_TIMEOUT_S} s")
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        self._session = aiohttp.ClientSession()
        async with self._session.get(f"http://127.0.0.1:{port}/json/list") as answer:
            targets = await answer.json()
        page = next(t for t in targets if t["type"] == "page")
        self._ws = await self._session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        await self.call("Page.enable")
        await self.call(
            "Emulation.setDeviceMetricsOverride",
            width=self.width,
            height=self.height,
            deviceScaleFactor=1,
            mobile=False,
        )

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one CDP command; its result (events that arrive meanwhile are kept)."""
        assert self._ws is not None
        self._next_id += 1
        await self._ws.send_json({"id": self._next_id, "method": method, "params": params})
        while True:
            message = json.loads((await self._ws.receive(timeout=30)).data)
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise AssertionError(f"CDP {method} failed: {message['error']}")
                return dict(message["result"])
            self._events.append(message)

    async def _event(self, method: str, timeout_s: float = 30.0) -> dict[str, Any]:
        assert self._ws is not None
        for event in self._events:
            if event.get("method") == method:
                self._events.remove(event)
                return event
        while True:
            message = json.loads((await self._ws.receive(timeout=timeout_s)).data)
            if message.get("method") == method:
                return message
            self._events.append(message)

    async def open(self, url: str) -> None:
        self._events.clear()
        answer = await self.call("Page.navigate", url=url)
        assert "errorText" not in answer, f"cannot open {url}: {answer['errorText']}"
        await self._event("Page.loadEventFired")

    async def evaluate(self, expression: str) -> Any:
        answer = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in answer:
            raise AssertionError(f"the page threw: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    async def screenshot(self) -> bytes:
        answer = await self.call("Page.captureScreenshot", format="png")
        return base64.b64decode(answer["data"])

    def stop(self) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)  # the session this test started
                process.wait()
        # Helpers (zygote, GPU process) of the session this test started, if any outlived it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        self.process = None
