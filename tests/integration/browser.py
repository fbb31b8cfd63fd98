"""A real headless Chromium for the pages' tests: Debian's ``chromium`` driven through its ``chromedriver``
by Selenium (never a downloaded browser or driver).

Without chromium the browser tests skip, saying how to install it, unless ``CALLBRIDGE_REQUIRE_BROWSER``
is set (``.ci/run`` sets it): then they fail, so CI can never skip them silently.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REQUIRED = os.environ.get("CALLBRIDGE_REQUIRE_BROWSER", "") not in ("", "0")
CHROMIUM = shutil.which("chromium") or ""
CHROMEDRIVER = shutil.which("chromedriver") or ""
WAIT = 60.0  # seconds for a page condition; generous for a busy two-core machine

# The flags this machine's closed network needs (no background connections at all), plus a fixed size.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-default-apps", "--disable-extensions", "--mute-audio",
                  "--autoplay-policy=no-user-gesture-required", "--window-size=1280,1000")


def _unavailable() -> str:
    missing = [name for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if not path]
    if missing:
        return (f"{' and '.join(missing)} not installed (apt-get install --no-install-recommends chromium "
                "chromium-driver)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return ""


class Page:
    """One Chromium window with helpers that wait on page conditions, and numbered screenshots."""

    def __init__(self, driver: Any, shots: Path) -> None:
        self.driver = driver
        self.shots = shots
        self.count = 0
        self.base = ""

    def open(self, path: str) -> None:
        self.driver.get(self.base + path)

    def shot(self, name: str) -> Path:
        self.count += 1
        path = self.shots / f"{self.count:02d}-{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def wait(self, condition: Callable[[Any], Any], what: str, timeout: float = WAIT) -> Any:
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.1).until(condition)
        except TimeoutException:
            self.shot("timeout")
            raise AssertionError(f"waited {timeout} s for {what}; page {self.driver.current_url}:\n"
                                 f"{self.text('main')[:2000]}") from None

    def find(self, css: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def finds(self, css: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(self.driver.find_elements(By.CSS_SELECTOR, css))

    def text(self, css: str = "body") -> str:
        """The visible text of the first match, read in one step (a live region may be swapped any time)."""
        return str(self.script("var e = document.querySelector(arguments[0]); return e ? e.innerText.trim() : '';",
                               css))

    def at(self, path: str) -> None:
        """Wait until the browser shows ``path`` (after a form's redirect)."""
        self.wait(lambda d: d.current_url.split("?")[0] == self.base + path, f"the page {path}")

    def fill(self, values: dict[str, str]) -> None:
        from selenium.webdriver.support.ui import Select

        for name, value in values.items():
            element = self.find(f'[name="{name}"]')
            if element.tag_name == "select":
                Select(element).select_by_value(value)
            elif element.get_attribute("type") == "checkbox":
                if element.is_selected() != (value == "on"):
                    element.click()
            else:
                element.clear()
                element.send_keys(value)

    def script(self, code: str, *args: Any) -> Any:
        return self.driver.execute_script(code, *args)


@pytest.fixture(name="chromium")
def chromium_fixture(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A fresh headless Chromium (its own profile) whose screenshots go to ``<tmp>/screenshots``."""
    reason = _unavailable()
    if reason:
        if REQUIRED:
            pytest.fail(f"CALLBRIDGE_REQUIRE_BROWSER is set but {reason}")
        pytest.skip(reason)
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never try to download anything
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    shots = tmp_path / "screenshots"
    shots.mkdir()
    print(f"\nscreenshots of {request.node.name}: {shots}")
    request.node.user_properties.append(("screenshots", str(shots)))
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=DriverService(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT)
    driver.set_script_timeout(WAIT)
    try:
        yield Page(driver, shots)
    finally:
        driver.quit()
