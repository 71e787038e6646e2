"""Open a page in Debian's headless Chromium through Selenium and its chromedriver.

``make test`` installs both when it can (``apt-get install chromium chromium-driver``). A missing
browser fails the test with the command that installs it; ``CMN_ALLOW_NO_BROWSER=1`` turns that
into a skip that says so, for machines where it cannot be installed.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

INSTALL = "apt-get install -y chromium chromium-driver"


def _find(*names: str):
    return next((p for p in map(shutil.which, names) if p), None)


@contextmanager
def chromium(width: int = 1300, height: int = 900):
    """A headless Chromium WebDriver (console messages kept)."""
    browser, driver_path = _find("chromium", "chromium-browser"), _find("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        browser = None
    if browser is None or driver_path is None:
        message = f"headless browser test needs chromium, chromedriver and selenium ({INSTALL}; pip install selenium)"
        if os.environ.get("CMN_ALLOW_NO_BROWSER") == "1":
            pytest.skip(message + "; skipped because CMN_ALLOW_NO_BROWSER=1")
        pytest.fail(message + " (or set CMN_ALLOW_NO_BROWSER=1 to skip the page tests)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
        "--hide-scrollbars",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit chromedriver path: selenium never tries to download a driver.
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def open_page(driver, path: Path) -> None:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(Path(path).resolve().as_uri())
    try:
        WebDriverWait(driver, 20).until(
            lambda d: d.execute_script(
                "return document.readyState === 'complete' && document.body.dataset.ready === '1'"
            )
        )
    except TimeoutException:
        raise AssertionError(f"{path}: the page's script never finished; console: {console_errors(driver)}") from None


def console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


def all_images_decoded(driver) -> bool:
    return driver.execute_script(
        "return Array.from(document.images).every(i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0)"
    )
