"""Headless Chromium for tests: Debian's `chromium` package (`make browser` installs it), driven
by Playwright for Python from its path. Playwright's wheel carries its own driver, and its own
browser download is never used, so nothing is fetched when the tests run.

Where the browser is not installed or does not start, the tests that need it skip and say why
(`pytest -ra` lists the reason); the rest of the suite never needs it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, ViewportSize, sync_playwright
from playwright.sync_api import Error as PlaywrightError

CHROMIUM = Path("/usr/bin/chromium")
INSTALL = "install Debian's chromium (make browser)"
# Without the background-networking flags Chromium keeps dialling Google's hosts, which a closed
# network refuses; --no-sandbox because CI runs as root, where Chromium's sandbox will not start.
# Playwright adds --headless and a fresh, temporary --user-data-dir of its own.
FLAGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
# Screenshots the README can show at full width.
VIEWPORT: ViewportSize = {"width": 1280, "height": 800}
TIMEOUT_MS = 10_000  # each wait for a page or an element; the server is on loopback
# Set to a folder (e.g. docs/screenshots) to keep the screenshots; by default they go to a
# temporary folder and only prove that one can be taken.
SCREENSHOTS_ENV = "FUNNELGATE_SCREENSHOTS"


@contextmanager
def chromium() -> Iterator[Browser]:
    """A headless Chromium for the `with` block; skips the test, saying why, when Chromium is
    not installed or Playwright cannot start it. Never downloads a browser."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"chromium not installed: {INSTALL}")
    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=FLAGS, timeout=30_000
            )
        except PlaywrightError as exc:
            reason = str(exc).strip().splitlines()[0]
            pytest.skip(f"chromium did not start ({reason}): {INSTALL}")
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def new_page(browser: Browser) -> Iterator[Page]:
    """A page in a context of its own (no cookies or storage shared with other tests)."""
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(TIMEOUT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()


def screenshot_dir(default: Path) -> Path:
    """Where screenshots go: $FUNNELGATE_SCREENSHOTS if set, else `default`."""
    chosen = os.environ.get(SCREENSHOTS_ENV)
    path = Path(chosen) if chosen else default
    path.mkdir(parents=True, exist_ok=True)
    return path


def screenshot(page: Page, path: Path, *, full_page: bool = True) -> Path:
    """The page as a PNG at `path` (folders made as needed), whole or (`full_page=False`) the
    viewport; checks that a picture came out. A page tens of thousands of pixels tall (a big
    JSON document) takes longer than TIMEOUT_MS whole: take its viewport."""
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=path, full_page=full_page)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"no PNG written to {path}"
    return path
