"""Open a page in headless Chromium and report what a person would see go wrong.

    from humpback_testing.browser import find_chromium, inspect_page
    result = inspect_page(find_chromium(), "/path/to/index.html", screenshot="/tmp/report.png")
    assert not result.console_errors and not result.broken_images

Talks the DevTools protocol over a websocket (aiohttp, already a dependency of the runtime) to
Debian's `chromium` (`apt-get install chromium`; `scripts/browser_env.sh` does it on CI). Collects
console errors, uncaught exceptions and failed loads (`Log.entryAdded` at level error), checks
every `<img>` decoded (`complete` and `naturalWidth > 0`), and saves a full-page PNG screenshot.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PageResult", "find_chromium", "inspect_page"]

_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
_LISTENING = re.compile(r"DevTools listening on (ws://\S+)")


def find_chromium() -> str | None:
    """Path of a Chromium binary: $HUMPBACK_CHROMIUM, else the first of the usual names on PATH."""
    explicit = os.environ.get("HUMPBACK_CHROMIUM")
    if explicit:
        return explicit if shutil.which(explicit) else None
    return next((p for name in _CANDIDATES if (p := shutil.which(name))), None)


@dataclass
class PageResult:
    title: str = ""
    console_errors: list[str] = field(default_factory=list)
    broken_images: list[str] = field(default_factory=list)
    images: int = 0
    screenshot: Path | None = None
    text: str = ""


def inspect_page(chromium: str, path: str | os.PathLike, *, screenshot: str | os.PathLike | None = None,
                 width: int = 1280, timeout: float = 60.0) -> PageResult:
    """Load a local HTML file; return its console errors, broken images and (optionally) a screenshot."""
    return asyncio.run(asyncio.wait_for(_inspect(chromium, Path(path).resolve(), screenshot, width), timeout))


async def _inspect(chromium: str, path: Path, screenshot, width: int) -> PageResult:
    import aiohttp

    with tempfile.TemporaryDirectory(prefix="humpback-chromium-") as profile:
        # --no-sandbox: CI containers run as root, where Chromium's sandbox refuses to start.
        proc = await asyncio.create_subprocess_exec(
            chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--no-default-browser-check", "--remote-debugging-port=0",
            f"--user-data-dir={profile}", f"--window-size={width},900", "about:blank",
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            browser_ws = await _devtools_url(proc)
            port = re.search(r":(\d+)/", browser_ws).group(1)
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{port}/json/list") as resp:
                    targets = await resp.json(content_type=None)
                page_ws = next(t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page")
                async with http.ws_connect(page_ws, max_msg_size=0) as ws:
                    return await _drive(_Cdp(ws), path, screenshot, width)
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


async def _devtools_url(proc) -> str:
    seen = []
    while True:
        line = await proc.stderr.readline()
        if not line:
            raise RuntimeError("Chromium exited before its DevTools endpoint came up:\n" + "".join(seen[-20:]))
        text = line.decode("utf-8", "replace")
        seen.append(text)
        if m := _LISTENING.search(text):
            # Keep reading stderr in the background, so a chatty browser never blocks on a full pipe.
            asyncio.get_running_loop().create_task(_drain(proc.stderr))
            return m.group(1)


async def _drain(stream) -> None:
    while await stream.readline():
        pass


class _Cdp:
    """Minimal DevTools session: commands by id, events kept in a list."""

    def __init__(self, ws):
        self.ws, self.next_id, self.events = ws, 0, []

    async def send(self, method: str, **params) -> dict:
        self.next_id += 1
        my_id = self.next_id
        await self.ws.send_str(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            msg = json.loads((await self.ws.receive()).data)
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    async def wait_event(self, method: str) -> dict:
        for event in self.events:
            if event["method"] == method:
                return event
        while True:
            msg = json.loads((await self.ws.receive()).data)
            if "method" in msg:
                self.events.append(msg)
                if msg["method"] == method:
                    return msg


_IMAGES_JS = """JSON.stringify({
  title: document.title,
  total: document.images.length,
  broken: Array.from(document.images)
    .filter(i => !i.complete || i.naturalWidth === 0)
    .map(i => (i.alt || '(no alt)') + ' <' + i.src.slice(0, 60) + '>'),
  text: document.body ? document.body.innerText : ''
})"""


async def _drive(cdp: _Cdp, path: Path, screenshot, width: int) -> PageResult:
    for domain in ("Page", "Runtime", "Log"):
        await cdp.send(f"{domain}.enable")
    await cdp.send("Page.navigate", url=path.as_uri())
    await cdp.wait_event("Page.loadEventFired")
    state = json.loads((await cdp.send("Runtime.evaluate", expression=_IMAGES_JS, returnByValue=True))["result"]["value"])
    result = PageResult(title=state["title"], images=state["total"], broken_images=state["broken"], text=state["text"])
    for event in cdp.events:
        params = event.get("params", {})
        if event["method"] == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            result.console_errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
        elif event["method"] == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            result.console_errors.append(details.get("exception", {}).get("description") or details.get("text", "exception"))
        elif event["method"] == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            result.console_errors.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}".strip())
    if screenshot is not None:
        metrics = await cdp.send("Page.getLayoutMetrics")
        height = int(metrics.get("cssContentSize", metrics.get("contentSize", {})).get("height", 900))
        await cdp.send("Emulation.setDeviceMetricsOverride", width=width, height=min(max(height, 600), 16000),
                       deviceScaleFactor=1, mobile=False)
        shot = await cdp.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        out = Path(screenshot)
        out.write_bytes(base64.b64decode(shot["data"]))
        result.screenshot = out
    return result
