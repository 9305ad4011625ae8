"""A real headless browser for integration tests: Debian's chromium driven by selenium.

- ``chromium()``: a context manager yielding a ``Browser`` (a fresh profile under the test's tmp
  dir; always quit, its processes reaped by chromedriver).
- ``Browser``: the few things the dashboard tests do, each an ``await`` that runs selenium's
  blocking call in a thread, so the test's event loop (traffic generators, the CLI) keeps going.

Chromium runs as root here, hence ``--no-sandbox``; the closed network refuses Google's hosts,
hence every flag that stops it from calling home (sync, component updates, QUIC, background
networking). Chromium and chromedriver come from Debian (``.ci/run`` installs them when
missing); a machine without them fails the test with the command to run, never skips it.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

T = TypeVar("T")

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--force-device-scale-factor=1", "--window-size=1360,900")


def _binaries() -> tuple[str, str]:
    chrome = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    assert chrome and driver, ("the browser tests need Debian's chromium and chromedriver: "
                               "apt-get install -y chromium chromium-driver (.ci/run does)")
    return chrome, driver


class Browser:
    def __init__(self, driver: webdriver.Chrome) -> None:
        self.driver = driver

    async def run(self, fn: Callable[[], T]) -> T:
        return await asyncio.to_thread(fn)

    async def get(self, url: str) -> None:
        await self.run(lambda: self.driver.get(url))

    async def js(self, script: str, *args: Any) -> Any:
        return await self.run(lambda: self.driver.execute_script(script, *args))

    async def text(self, css: str) -> str:
        return str(await self.js(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : '';", css))

    async def attr(self, css: str, name: str) -> str:
        return str(await self.js(
            "const e = document.querySelector(arguments[0]);"
            "return e ? (e.getAttribute(arguments[1]) || '') : '';", css, name))

    async def click(self, css: str) -> None:
        await self.run(lambda: self.driver.find_element(By.CSS_SELECTOR, css).click())

    async def type(self, css: str, text: str) -> None:
        def typing() -> None:
            field = self.driver.find_element(By.CSS_SELECTOR, css)
            field.clear()
            field.send_keys(text)
        await self.run(typing)

    async def console(self) -> list[dict[str, Any]]:
        """The browser console's entries since the last call (chromedriver hands each once)."""
        return list(await self.run(lambda: self.driver.get_log("browser")))

    async def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        ok = await self.run(lambda: self.driver.save_screenshot(str(path)))
        assert ok, f"chromium did not write a screenshot to {path}"
        print(f"\nscreenshot: {path}")
        return path

    async def wait_for(self, probe: Callable[[], Any], ok: Callable[[Any], bool], *,
                       timeout: float, what: str) -> Any:
        """Poll ``probe`` (an async callable) until ``ok``; AssertionError naming ``what``."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            last = await probe()
            if ok(last):
                return last
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:g}s waiting for {what} in the "
                                     f"page; last: {last!r}")
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def chromium(profile: Path) -> AsyncIterator[Browser]:
    chrome, driver_path = _binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = chrome
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = await asyncio.to_thread(
            webdriver.Chrome, options=options, service=Service(executable_path=driver_path))
    except WebDriverException as exc:
        raise AssertionError(f"chromium did not start: {exc.msg}") from None
    try:
        yield Browser(driver)
    finally:
        await asyncio.to_thread(driver.quit)
