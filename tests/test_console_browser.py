"""funnelgate in a real browser: headless Chromium (tests/browser.py) against the app served on
loopback, with Meta faked (tests/support.py's FakeGraph)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from playwright.sync_api import Browser, Page

from server.app import create_app
from tests.browser import chromium, new_page, screenshot, screenshot_dir
from tests.live import serving
from tests.support import PROJECT_TOKEN, WallClockGraph, make_config


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as started:
        yield started


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    with new_page(browser) as opened:
        yield opened


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    """Where a test's screenshots go ($FUNNELGATE_SCREENSHOTS keeps them)."""
    return screenshot_dir(tmp_path / "screenshots")


@pytest.fixture(scope="module")
def plain_server(
    tmp_path_factory: pytest.TempPathFactory, rsa_key: rsa.RSAPrivateKey
) -> Iterator[str]:
    """funnelgate with nothing sent yet: its base URL."""
    config = make_config(
        tmp_path_factory.mktemp("plain"), rsa_key, facebook_access_token=PROJECT_TOKEN
    )
    app = create_app(config, graph_transport=WallClockGraph().transport(), clock=time.time)
    with serving(app) as base_url:
        yield base_url


def test_chromium_shows_what_funnelgate_serves(page, plain_server, shots):
    """The toolchain end to end: Debian's chromium, started by Playwright, loads pages from a
    funnelgate on loopback, reads what they show and takes a screenshot."""
    response = page.goto(f"{plain_server}/healthz")
    assert response is not None and response.status == 200
    assert json.loads(page.locator("body").inner_text()) == {"status": "ok"}

    response = page.goto(f"{plain_server}/openapi.json")
    assert response is not None and response.status == 200
    spec = json.loads(page.locator("pre").first.inner_text())
    assert spec["info"]["title"] == "funnelgate"
    assert "/projects/{project_id}/tools" in spec["paths"]
    picture = screenshot(page, shots / "openapi.png", full_page=False)
    assert picture.stat().st_size > 1000  # text drawn, not a blank page
