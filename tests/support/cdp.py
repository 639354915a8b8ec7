"""Headless Chromium driven over the DevTools protocol, for tests that need a real browser.

Chromium starts with `--remote-debugging-port=0` and writes the port it chose into
`DevToolsActivePort` in its profile; the test talks to the page target over a websocket (the
`websockets` package uvicorn installs). What the page logs is collected as it comes: console
errors, uncaught exceptions and the browser's own log entries, where a Content-Security-Policy
violation shows up ("Refused to ..."), so a test can assert there were none.

The browser runs in a process group of its own, killed (the group) on exit, and under
`setpriv --pdeathsig` + `timeout` so it never outlives the test process (as
tests/e2e/test_stream_browser.py starts it).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import ClientConnection, connect

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_CAP = 300
OUTLIVES_NOTHING = f"setpriv --pdeathsig TERM -- timeout -s KILL {BROWSER_CAP}".split()
START_TIMEOUT = 30.0


class Page:
    """One page target: send commands, wait for events, read what it logged."""

    def __init__(self, socket: ClientConnection) -> None:
        self.socket = socket
        self.next_id = 0
        self.events: list[dict[str, Any]] = []
        self.problems: list[str] = []  # console errors, exceptions, error log entries

    def _note(self, message: dict[str, Any]) -> None:
        self.events.append(message)
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.exceptionThrown":
            self.problems.append(f"exception: {json.dumps(params)[:500]}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.problems.append(f"console.{params['type']}: {json.dumps(params['args'])[:500]}")
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            entry = params["entry"]
            self.problems.append(f"log ({entry.get('source')}): {entry.get('text')}")

    def send(self, method: str, timeout: float = 30, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.socket.recv(timeout=max(deadline - time.monotonic(), 0.01)))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result
            self._note(message)

    def wait_event(
        self, method: str, timeout: float = 30, since: int | None = None
    ) -> dict[str, Any]:
        """The next `method` event; with `since`, one already received after that index of
        `events` counts (an event can arrive before the reply of the command that caused it)."""
        if since is not None:
            for message in self.events[since:]:
                if message.get("method") == method:
                    params: dict[str, Any] = message.get("params", {})
                    return params
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.socket.recv(timeout=max(deadline - time.monotonic(), 0.01)))
            self._note(message)
            if message.get("method") == method:
                found: dict[str, Any] = message.get("params", {})
                return found

    def navigate(self, url: str) -> None:
        """Open `url` and wait for its load event (redirects followed)."""
        since = len(self.events)
        self.send("Page.navigate", url=url)
        self.wait_event("Page.loadEventFired", since=since)

    def evaluate(self, expression: str) -> Any:
        reply = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in reply:
            raise RuntimeError(f"{expression}: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def click_and_load(self, selector: str) -> None:
        """Click an element (a form's button) and wait for the page it leads to."""
        since = len(self.events)
        self.evaluate(f"document.querySelector({json.dumps(selector)}).click()")
        self.wait_event("Page.loadEventFired", since=since)

    def dom(self) -> str:
        html: str = self.evaluate("document.documentElement.outerHTML")
        return html

    def url(self) -> str:
        href: str = self.evaluate("location.href")
        return href

    def screenshot(self, path: Path) -> None:
        shot = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))


@contextmanager
def chromium_page(profile: Path, log: Path, width: int = 1360, height: int = 900) -> Iterator[Page]:
    """A headless Chromium with one blank page, its console and log collected."""
    assert CHROMIUM is not None
    profile.mkdir(parents=True, exist_ok=True)
    argv = [
        *OUTLIVES_NOTHING,
        CHROMIUM,
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
        f"--window-size={width},{height}",
        "about:blank",
    ]  # fmt: skip
    with log.open("wb") as output:
        browser = subprocess.Popen(
            argv, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        port = _debugging_port(profile, browser)
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        socket_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        with connect(socket_url, max_size=64 * 1024 * 1024, open_timeout=10) as socket:
            page = Page(socket)
            for domain in ("Page", "Runtime", "Log"):
                page.send(f"{domain}.enable")
            page.send(
                "Emulation.setDeviceMetricsOverride",
                width=width,
                height=height,
                deviceScaleFactor=1,
                mobile=False,
            )
            yield page
    finally:
        os.killpg(browser.pid, signal.SIGKILL)
        browser.wait(10)


def _debugging_port(profile: Path, browser: subprocess.Popen[bytes]) -> int:
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if browser.poll() is not None:
            raise RuntimeError(f"chromium exited with {browser.returncode}")
        if marker.exists():
            first = marker.read_text().split("\n", 1)[0].strip()
            if first.isdigit():
                return int(first)
        time.sleep(0.05)  # polling for a file the browser writes, not a synchronisation sleep
    raise RuntimeError(f"chromium wrote no {marker} in {START_TIMEOUT} s")
