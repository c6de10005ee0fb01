"""funnelgate in a real browser: headless Chromium (tests/browser.py) against the app served on
loopback, with Meta faked (tests/support.py's FakeGraph).

`console_server` is funnelgate after a known history (SCENARIO): events delivered, failed and
still queued on three pixels, with known match keys, so that what the console shows can be
checked against figures worked out from what was sent (ConsoleServer's methods).

The console's tests log in through its form, open every page by clicking through it, replay a
refused event until it is delivered, and check what each page shows against those figures;
no page may show the customer data sent or a token. `FUNNELGATE_SCREENSHOTS=docs/screenshots`
keeps the screenshots the README shows (tests/browser.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from playwright.sync_api import Browser, Page, expect

from server.app import create_app
from server.config import ConsoleSettings
from server.storage import minutes, outbox
from tests.browser import chromium, new_page, screenshot, screenshot_dir
from tests.live import serving
from tests.support import (
    PROJECT,
    PROJECT_TOKEN,
    Received,
    WallClockGraph,
    make_config,
    sign_token,
)
from tools.actionkit import USER_DATA_FIELDS

TOOL = "FACEBOOK_ADS_SEND_FUNNEL_EVENT"
CONSOLE_TOKEN = "console-browser-admin-token-4d1c9e"  # the scenario's admin token


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


def test_chromium_shows_what_funnelgate_serves(page, plain_server, tmp_path):
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
    picture = screenshot(page, tmp_path / "openapi.png", full_page=False)  # not one to keep
    assert picture.stat().st_size > 1000  # text drawn, not a blank page


# The console's scenario: funnelgate after a known history, on three pixels. Meta takes every
# event of the first; refuses some of the second's (sent queued, so the dispatcher fails them:
# the failed events a console lists and replays); and cannot be reached for the third's, whose
# events stay queued. What the console should show is worked out from the table, never read
# back from funnelgate (ConsoleServer's methods).

PIXEL_DELIVERED = "111111111111111"
PIXEL_REFUSED = "222222222222222"
PIXEL_DOWN = "333333333333333"

# The raw customer data sent: no page may show one of these (the dispatcher hashes em, ph,
# names and external_id; Meta wants IP, user agent, fbc and fbp raw, so only their presence
# may be shown).
EMAIL, PHONE, IP = "ada.buyer@example.com", "+44 20 7946 0958", "198.51.100.23"
USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64) ScenarioBrowser/1.0"
FBC, FBP = "fb.1.1554763741205.ScenarioClickId", "fb.1.1558571054389.1098115397"
EXTERNAL_ID, FIRST_NAME, LAST_NAME = "crm-scenario-7", "Zebedee", "Quellington"
# As sent and as normalised before hashing (a page may show neither).
PERSONAL_DATA = (EMAIL, PHONE, "442079460958", IP, USER_AGENT, FBC, FBP, EXTERNAL_ID,
                 FIRST_NAME, LAST_NAME, FIRST_NAME.lower(), LAST_NAME.lower())  # fmt: skip

# Customer data as the tool's parameters; the user_data keys Meta gets follow from
# tools/actionkit.py's USER_DATA_FIELDS (and are checked against what Meta received).
IP_UA = {"customerClientIpAddress": IP, "customerClientUserAgent": USER_AGENT}
PROFILES: dict[str, dict[str, str]] = {
    "ip_ua": IP_UA,
    "em_ph": {"customerEmail": EMAIL, "customerPhone": PHONE},
    "em_ph_ip_ua": {"customerEmail": EMAIL, "customerPhone": PHONE, **IP_UA},
    "ids": {"customerExternalId": EXTERNAL_ID, "clickId": FBC, "browserId": FBP, **IP_UA},
    "names": {"customerFirstName": FIRST_NAME, "customerLastName": LAST_NAME,
              "customerCountryCode": "GB", **IP_UA},
}  # fmt: skip

# (pixel, event name, action source, profile, fate, how many), sent in this order. Fates:
# delivered: a sync call that Meta takes; failed: queued (Prefer: respond-async), Meta refuses
# it; queued: queued, Meta unavailable for its pixel (attempted at least once, retried later).
SCENARIO = (
    (PIXEL_DELIVERED, "Purchase", "website", "ip_ua", "delivered", 3),
    (PIXEL_DELIVERED, "Purchase", "website", "em_ph_ip_ua", "delivered", 1),
    (PIXEL_DELIVERED, "Lead", "system_generated", "em_ph", "delivered", 2),
    (PIXEL_DELIVERED, "ViewContent", "website", "names", "delivered", 1),
    (PIXEL_REFUSED, "Purchase", "website", "ip_ua", "failed", 1),
    (PIXEL_REFUSED, "Purchase", "website", "em_ph_ip_ua", "failed", 1),
    (PIXEL_REFUSED, "AddToCart", "website", "ids", "delivered", 1),
    (PIXEL_DOWN, "InitiateCheckout", "website", "ip_ua", "queued", 2),
    (PIXEL_DOWN, "InitiateCheckout", "website", "em_ph_ip_ua", "queued", 1),
)

# Meta's refusal of an event (Graph's error object; the fbtrace_id is added per request).
REFUSAL = {
    "message": "Invalid parameter", "type": "OAuthException", "code": 100,
    "error_user_title": "Event refused", "error_user_msg": "This test's Meta refuses the event.",
}  # fmt: skip
UNAVAILABLE = {"message": "Service temporarily unavailable", "type": "OAuthException",
               "code": 2, "is_transient": True, "fbtrace_id": "trace-unavailable"}  # fmt: skip


def refusal_trace(event_id: str) -> str:
    """The fbtrace_id of Meta's refusal of `event_id` sent alone, as its failed row keeps it."""
    return f"trace-refused-{event_id}"


class ConsoleGraph(WallClockGraph):
    """Meta as the scenario needs it. A request carrying an event in `refused` is refused
    whole (400, REFUSAL); the dispatcher then sends each event alone, so each refused event
    fails with its own fbtrace_id (refusal_trace). Requests for a pixel in `down` answer 503
    (transient), so its events stay queued. The rest by Meta's rules. Emptying `refused` is Meta
    taking those events after all: a replay of them is then delivered."""

    def __init__(self) -> None:
        super().__init__()
        self.refused: set[str] = set()
        self.down: set[str] = set()

    async def answer(self, received: Received) -> tuple[int, bytes]:
        parts = received.path.strip("/").split("/")
        if len(parts) == 3 and parts[1] in self.down:
            self.received.append(received)
            return 503, orjson.dumps({"error": UNAVAILABLE})
        refused = [e["event_id"] for e in _events(received) if e.get("event_id") in self.refused]
        if refused:
            self.received.append(received)
            return 400, orjson.dumps(
                {"error": {**REFUSAL, "fbtrace_id": refusal_trace(refused[0])}}
            )
        return await super().answer(received)


def _events(received: Received) -> list[dict[str, Any]]:
    try:
        data = received.json().get("data")
    except (orjson.JSONDecodeError, AttributeError):
        return []
    return [e for e in data if isinstance(e, dict)] if isinstance(data, list) else []


@dataclass(frozen=True)
class Sent:
    """One scenario event as sent."""

    event_id: str
    pixel: str
    event_name: str
    action_source: str
    keys: frozenset[str]  # the user_data keys Meta gets
    fate: str  # delivered, failed or queued


# The coverage columns of the console's counters (server/storage/minutes.py): how many
# accepted events carry each key; ip_ua is both IP and user agent, only_ip_ua nothing else,
# other_keys any other key (fn, ln, country, ...), none no key at all.
COVERAGE = ("em", "ph", "external_id", "fbc", "fbp", "ip_ua", "only_ip_ua", "other_keys", "none")
_IP_UA = frozenset({"client_ip_address", "client_user_agent"})
_NAMED = frozenset({"em", "ph", "external_id", "fbc", "fbp"}) | _IP_UA


def coverage_of(keys: frozenset[str]) -> dict[str, bool]:
    """Which coverage columns an event with these user_data keys counts in."""
    return {
        **{key: key in keys for key in ("em", "ph", "external_id", "fbc", "fbp")},
        "ip_ua": keys >= _IP_UA,
        "only_ip_ua": keys == _IP_UA,
        "other_keys": bool(keys - _NAMED),
        "none": not keys,
    }


@dataclass(frozen=True)
class ConsoleServer:
    """funnelgate on loopback after SCENARIO: where it is, as whom the events were sent, and
    what was sent. Every event counts as accepted (queued and refused ones too)."""

    base_url: str
    graph: ConsoleGraph
    database: Path  # the SQLite file: the outbox and the console's counters
    user_token: str = field(repr=False)  # the caller's Bearer token (user "user-1" of PROJECT)
    events: tuple[Sent, ...] = field(repr=False)
    # From the first call to the last event settled: the minutes the counts fall in.
    started: float
    settled: float

    def sent(self, *, pixel: str | None = None, event_name: str | None = None,
             fate: str | None = None) -> list[Sent]:  # fmt: skip
        """The events sent, in order, narrowed to a pixel, an event name and a fate."""
        return [e for e in self.events if (pixel is None or e.pixel == pixel)
                and (event_name is None or e.event_name == event_name)
                and (fate is None or e.fate == fate)]  # fmt: skip

    def counts(self, pixel: str | None = None) -> Counter[str]:
        """accepted, delivered, failed and queued, for a pixel or all."""
        sent = self.sent(pixel=pixel)
        return Counter(accepted=len(sent)) + Counter(e.fate for e in sent)

    def coverage(self, pixel: str, event_name: str | None = None) -> dict[str, int]:
        """`total` and each COVERAGE column, for one event name on `pixel` or (None) all."""
        sent = self.sent(pixel=pixel, event_name=event_name)
        columns = Counter(key for e in sent for key, has in coverage_of(e.keys).items() if has)
        return {"total": len(sent), **{key: columns[key] for key in COVERAGE}}

    def sources(self, pixel: str) -> Counter[tuple[str, str]]:
        """(event name, action source) -> accepted events, on `pixel`."""
        return Counter((e.event_name, e.action_source) for e in self.sent(pixel=pixel))

    def minutes(self) -> set[int]:
        """The minutes (unix seconds at their start) the scenario's events were counted in."""
        return set(range(int(self.started) // 60 * 60, int(self.settled) // 60 * 60 + 1, 60))

    def secrets(self) -> tuple[str, ...]:
        """What no page may show: the customer data sent, Meta's access token, the caller's
        token and the console's own."""
        return (*PERSONAL_DATA, PROJECT_TOKEN, self.user_token, CONSOLE_TOKEN)


@contextmanager
def scenario_server(root: Path, key: rsa.RSAPrivateKey) -> Iterator[ConsoleServer]:
    """funnelgate (files under `root`, user tokens verified by `key`), its Graph faked by
    ConsoleGraph, once SCENARIO has been sent and has settled: delivered calls answered,
    refused events failed, queued ones attempted."""
    graph = ConsoleGraph()
    graph.down.add(PIXEL_DOWN)
    config = make_config(root, key, facebook_access_token=PROJECT_TOKEN)
    console = ConsoleSettings(token_sha256=hashlib.sha256(CONSOLE_TOKEN.encode()).hexdigest())
    config = dataclasses.replace(config, console=console)
    app = create_app(config, graph_transport=graph.transport(), clock=time.time)
    token = sign_token(key)
    with serving(app) as base_url, httpx.Client(base_url=base_url, timeout=10) as http:
        http.headers["Authorization"] = f"Bearer {token}"
        started = time.time()
        events = _send_scenario(http, graph)
        _settle(http, events)
        settled = time.time()
        _check_keys(graph, events)
        yield ConsoleServer(
            base_url, graph, config.storage.database_path, token, events, started, settled
        )


@pytest.fixture(scope="module")
def console_server(
    tmp_path_factory: pytest.TempPathFactory, rsa_key: rsa.RSAPrivateKey
) -> Iterator[ConsoleServer]:
    """The scenario's server, shared by the module's tests: a test that replays events or
    changes `graph` changes them for the tests after it."""
    with scenario_server(tmp_path_factory.mktemp("console"), rsa_key) as server:
        _counted(server)
        yield server


def _counted(server: ConsoleServer) -> None:
    """Until the per-minute counters hold every event's fate (the app adds its counts to them
    every 5 s; 15 s at most)."""
    expected = server.counts()
    wanted = (expected["accepted"], expected["delivered"], expected["failed"])
    deadline = time.monotonic() + 15
    while True:
        with closing(sqlite3.connect(server.database)) as db:
            rows = minutes.series(db, 0, time.time() + 60)
        found = tuple(sum(getattr(row, name) for row in rows)
                      for name in ("accepted", "delivered", "failed"))  # fmt: skip
        if found == wanted:
            return
        assert time.monotonic() < deadline, f"counted {found}, sent {wanted}"
        time.sleep(0.1)


def _send_scenario(http: httpx.Client, graph: ConsoleGraph) -> tuple[Sent, ...]:
    events: list[Sent] = []
    for pixel, name, source, profile, fate, times in SCENARIO:
        for _ in range(times):
            event_id = f"{name.lower()}-{fate}-{len(events) + 1}"
            if fate == "failed":
                graph.refused.add(event_id)
            parameters = {
                "pixel": pixel, "eventName": name, "actionSource": source, "eventId": event_id,
                **({"eventSourceUrl": "https://shop.example.com/"} if source == "website" else {}),
                **PROFILES[profile],
            }  # fmt: skip
            headers = {} if fate == "delivered" else {"Prefer": "respond-async"}
            response = http.post(
                f"/projects/{PROJECT}/tools", json={"tool": TOOL, "parameters": parameters},
                headers=headers,
            )  # fmt: skip
            assert response.status_code == (200 if fate == "delivered" else 202), response.text
            keys = frozenset(USER_DATA_FIELDS[p] for p in PROFILES[profile])
            events.append(Sent(event_id, pixel, name, source, keys, fate))
    return tuple(events)


def _settle(http: httpx.Client, events: tuple[Sent, ...]) -> None:
    """Until each refused event has failed and each queued one was attempted (10 s at most)."""
    waiting = {e.event_id: e.fate for e in events if e.fate != "delivered"}
    deadline = time.monotonic() + 10
    while waiting:
        for event_id, fate in list(waiting.items()):
            status = _status(http, event_id)
            if status["status"] == fate and status["attempts"] >= 1:
                del waiting[event_id]
        if waiting:
            assert time.monotonic() < deadline, f"not settled: {waiting}"
            time.sleep(0.05)


def _status(http: httpx.Client, event_id: str) -> dict[str, Any]:
    """The status route's answer for the scenario's user."""
    answer: dict[str, Any] = http.get(f"/projects/{PROJECT}/events/{event_id}").json()
    return answer


def _check_keys(graph: ConsoleGraph, events: tuple[Sent, ...]) -> None:
    """Meta got exactly the user_data keys the figures assume (else they would be wrong)."""
    received = {e["event_id"]: frozenset(e["user_data"]) for r in graph.received
                for e in _events(r)}  # fmt: skip
    assert {e.event_id: received.get(e.event_id) for e in events} == {
        e.event_id: e.keys for e in events
    }


def test_the_console_scenario_leaves_events_in_every_state(console_server):
    """The fixture's history as funnelgate keeps it: refused events failed with Meta's words,
    queued ones waiting, and the figures the console's pages are checked against."""
    with closing(sqlite3.connect(console_server.database)) as db:
        rows = outbox.list_events(db, project_id=PROJECT)
    assert Counter((r.pixel_id, r.status) for r in rows) == {
        (PIXEL_REFUSED, "failed"): 2, (PIXEL_DOWN, "queued"): 3,
    }  # fmt: skip
    for row in rows:
        if row.status == "failed":
            error = orjson.loads(row.error or b"{}")
            assert error["code"] == "UPSTREAM_REJECTED"
            assert error["message"] == f"Meta rejected the event: {REFUSAL['error_user_msg']}"
            assert error["upstream"]["fbtrace_id"] == refusal_trace(row.event_id)
    assert console_server.counts() == {"accepted": 13, "delivered": 8, "failed": 2, "queued": 3}
    assert console_server.coverage(PIXEL_DELIVERED, "Purchase")["only_ip_ua"] == 3
    assert console_server.coverage(PIXEL_DELIVERED, "Purchase")["total"] == 4
    assert console_server.coverage(PIXEL_DELIVERED) == {
        "total": 7, "em": 3, "ph": 3, "external_id": 0, "fbc": 0, "fbp": 0, "ip_ua": 5,
        "only_ip_ua": 3, "other_keys": 1, "none": 0,
    }  # fmt: skip
    assert console_server.sources(PIXEL_DELIVERED) == {
        ("Purchase", "website"): 4, ("Lead", "system_generated"): 2, ("ViewContent", "website"): 1,
    }  # fmt: skip


def test_a_refused_event_replayed_once_meta_takes_it_is_delivered(tmp_path, rsa_key):
    """What the console's replay relies on, shown without it: once `refused` is emptied the
    scenario's Meta takes a refused event, and the replayed event (same event_id) is
    delivered. Replayed as `funnelgate events replay` does, through the database."""
    with scenario_server(tmp_path, rsa_key) as server:
        [first, second] = server.sent(fate="failed")
        sent_before = _requests_with(server.graph, first.event_id)
        server.graph.refused.clear()
        with closing(sqlite3.connect(server.database)) as db, db:
            assert outbox.replay(
                db, now=time.time(), project_id=PROJECT, event_ids=[first.event_id]
            )
        auth = {"Authorization": f"Bearer {server.user_token}"}
        with httpx.Client(base_url=server.base_url, headers=auth, timeout=10) as http:
            deadline = time.monotonic() + 10
            while (status := _status(http, first.event_id))["status"] != "delivered":
                assert time.monotonic() < deadline, status
                time.sleep(0.05)
            assert _status(http, second.event_id)["status"] == "failed"
        assert _requests_with(server.graph, first.event_id) == sent_before + 1


def _requests_with(graph: ConsoleGraph, event_id: str) -> int:
    return sum(any(e.get("event_id") == event_id for e in _events(r)) for r in graph.received)


# The console in the browser, against console_server: logged in through the form, every page
# opened by clicking through it as an operator would. The tests share the server and run in
# this order: the replay test changes what the pages after it show.


@pytest.fixture
def console(page: Page, console_server: ConsoleServer) -> Page:
    """`page` logged in to the console through its form, on the overview."""
    page.goto(f"{console_server.base_url}/console")
    expect(page.locator("body")).to_have_attribute("data-page", "login")
    page.fill("#token", CONSOLE_TOKEN)
    assert follow(page, "#login") == 200
    expect(page.locator("body")).to_have_attribute("data-page", "overview")
    return page


def follow(page: Page, selector: str) -> int:
    """Clicks `selector` (a link or a form's button) and waits for the page it leads to: the
    HTTP status of that page (after redirects). Waiting for the navigation itself, since a
    form often answers with a page of the same kind as the one it is on."""
    with page.expect_navigation() as navigation:
        page.click(selector)
    response = navigation.value
    assert response is not None
    return response.status


def shown(page: Page, server: ConsoleServer, name: str) -> str:
    """The page's HTML once the browser shows the console's `name` page (body[data-page]),
    checked to carry none of the scenario's customer data or tokens, in any case."""
    expect(page.locator("body")).to_have_attribute("data-page", name)
    html = page.content().casefold()
    leaked = [i for i, secret in enumerate(server.secrets()) if secret.casefold() in html]
    assert leaked == [], f"the {name} page shows server.secrets()[{leaked}]"
    return html


def share(count: int, total: int) -> str:
    """A coverage cell as the console writes it: the share in whole percent (no share in the
    scenario falls on a half, where rounding rules would differ)."""
    return f"{round(100 * count / total)} %"


def attribute(page: Page, selector: str, name: str) -> str:
    value = page.locator(selector).get_attribute(name)
    assert value is not None, f"{selector} has no {name}"
    return value


def bars(page: Page, chart: str) -> list[tuple[int, float]]:
    """(data-minute, data-value) of each bar of `chart`, left to right."""
    found: list[list[str]] = page.locator(f"svg.chart#chart-{chart} rect.bar").evaluate_all(
        "bars => bars.map(b => [b.getAttribute('data-minute'), b.getAttribute('data-value')])"
    )
    return [(int(minute), float(value)) for minute, value in found]


def table(page: Page, rows: str, *cells: str) -> list[tuple[str, ...]]:
    """Each row's text in the given cells (CSS selectors within the row)."""
    found: list[list[str]] = page.locator(rows).evaluate_all(
        "(rows, cells) => rows.map(r => cells.map(c => r.querySelector(c).textContent.trim()))",
        list(cells),
    )
    return [tuple(row) for row in found]


def test_logging_in_through_the_form(page, console_server, shots):
    """A page of the console asks for the token first; a wrong token is refused on the form
    (and not written back into it), the right one opens the page that was asked for, with a
    session cookie scripts cannot read."""
    page.goto(f"{console_server.base_url}/console/failed")
    shown(page, console_server, "login")
    screenshot(page, shots / "console-login.png")
    page.fill("#token", "not-the-console-token")
    assert follow(page, "#login") == 401
    expect(page.locator("#login-message")).to_have_text("That is not the console's token.")
    assert "not-the-console-token" not in shown(page, console_server, "login")

    page.fill("#token", CONSOLE_TOKEN)
    assert follow(page, "#login") == 200
    shown(page, console_server, "failed")
    assert page.url == f"{console_server.base_url}/console/failed"
    [cookie] = [c for c in page.context.cookies() if c["name"] == "funnelgate_console"]
    assert (cookie["httpOnly"], cookie["sameSite"], cookie["path"]) == (True, "Strict", "/console")


def test_the_overview_shows_what_was_sent(console, console_server, shots):
    """The last hour's tiles, the charts' bars (with the counts on the minutes they were sent
    in), the queue, each pixel's counts and the failure code, as the scenario makes them."""
    shown(console, console_server, "overview")
    counts = console_server.counts()
    for name in ("accepted", "delivered", "failed"):
        expect(console.locator(f"#{name}-hour")).to_have_attribute("data-value", str(counts[name]))
    # Meta unavailable: each queued event retried at least once, and still waiting.
    assert int(attribute(console, "#retried-hour", "data-value")) >= counts["queued"]
    expect(console.locator("#queue-depth")).to_have_attribute("data-value", str(counts["queued"]))
    waited = time.time() - console_server.started
    assert 0 <= int(attribute(console, "#oldest-pending", "data-seconds")) <= waited + 1
    for tile in ("#latency-p50", "#latency-p99"):
        expect(console.locator(tile)).to_have_text(re.compile(r"^\d+ ms$"))

    sent_in = console_server.minutes()
    for name in ("accepted", "delivered", "failed"):
        for chart, slots, step in ((f"{name}-hour", 60, 60), (f"{name}-day", 96, 900)):
            drawn = bars(console, chart)
            assert len(drawn) == slots, chart
            assert [m for m, _ in drawn] == [drawn[0][0] + i * step for i in range(slots)]
            assert drawn[-1][0] >= max(sent_in) // step * step  # the last bar is now
            with_data = {minute: value for minute, value in drawn if value}
            assert set(with_data) <= {m // step * step for m in sent_in}, chart
            assert sum(with_data.values()) == counts[name], chart
            svg = console.locator(f"svg.chart[role=img]#chart-{chart}")
            assert svg.get_attribute("data-total") == str(counts[name])
            expect(console.locator(f"#chart-{chart}-title")).to_contain_text(name.capitalize())
            heights = svg.locator("rect.bar").evaluate_all(
                "bars => bars.map(b => b.getBBox().height)"
            )
            assert sum(1 for h in heights if h > 0) == len(with_data), chart  # drawn, visibly

    # Meta unavailable for PIXEL_DOWN: its breaker opens after a few failed sends in a row
    # (delivery/throttle.py) and stays open between probes, so the overview names it soon.
    throttled = "#throttled tr.throttled-pixel"
    deadline = time.monotonic() + 15
    while console.locator(throttled).count() == 0:
        assert time.monotonic() < deadline, "PIXEL_DOWN never shown as throttled"
        time.sleep(0.2)
        console.reload()
    assert console.locator(throttled).evaluate_all("rows => rows.map(r => r.dataset.pixel)") == [
        PIXEL_DOWN
    ]
    pixels = table(console, "#pixels tr.pixel", "a.pixel-link", "td.accepted", "td.delivered",
                   "td.failed")  # fmt: skip
    assert {p: tuple(map(int, numbers)) for p, *numbers in pixels} == {
        pixel: (c["accepted"], c["delivered"], c["failed"])
        for pixel in (PIXEL_DELIVERED, PIXEL_REFUSED, PIXEL_DOWN)
        for c in [console_server.counts(pixel)]
    }
    projects = console.locator("#pixels tr.pixel").evaluate_all(
        "rows => rows.map(r => r.dataset.project)"
    )
    assert projects == [PROJECT] * 3
    assert table(console, "#failure-codes tr.failure-code", "td:nth-child(1)",
                 "td:nth-child(2)") == [("UPSTREAM_REJECTED", str(counts["failed"]))]  # fmt: skip
    screenshot(console, shots / "console-overview.png", full_page=False)  # a long page


@pytest.mark.parametrize("pixel", [PIXEL_DELIVERED, PIXEL_REFUSED, PIXEL_DOWN])
def test_a_pixel_page_shows_its_match_keys_sources_and_failures(
    console, console_server, shots, pixel
):
    """Reached from the overview's pixel table: the pixel's counts, each event name's match-key
    shares (the figures worked out from what was sent), the plain readings, the coverage
    chart, event names by action source, and its failures with Meta's words and fbtrace_id."""
    assert follow(console, f"#pixels tr.pixel[data-pixel='{pixel}'] a.pixel-link") == 200
    shown(console, console_server, "pixel")
    expect(console.locator("#pixel-title")).to_have_attribute("data-pixel", pixel)
    expect(console.locator("#pixel-title")).to_have_attribute("data-project", PROJECT)
    counts = console_server.counts(pixel)
    for name in ("accepted", "delivered", "failed"):
        expect(console.locator(f"#{name}")).to_have_attribute("data-value", str(counts[name]))
    retried = int(attribute(console, "#retried", "data-value"))
    assert (retried >= counts["queued"]) if counts["queued"] else retried == 0

    names = sorted({e.event_name for e in console_server.sent(pixel=pixel)})
    expected = {}
    for name in [*names, "*"]:
        figures = console_server.coverage(pixel, None if name == "*" else name)
        total = figures.pop("total")
        expected[name] = {"total": str(total)} | {k: share(v, total) for k, v in figures.items()}
    shown_rows = console.locator("#coverage tr.coverage-row").evaluate_all(
        """rows => Object.fromEntries(rows.map(r => [r.dataset.eventName, Object.fromEntries(
            [["total", r.dataset.total], ...[...r.querySelectorAll("td.share")].map(
                c => [c.dataset.key, c.textContent.trim()])])]))"""
    )
    assert shown_rows == expected
    if pixel == PIXEL_DELIVERED:  # one figure spelled out: 3 of its 4 Purchase events
        assert shown_rows["Purchase"]["only_ip_ua"] == "75 %"

    readings = console.locator("#readings li.reading").all_text_contents()
    for name in names:
        figures = console_server.coverage(pixel, name)
        if figures["only_ip_ua"]:
            said = (f"{share(figures['only_ip_ua'], figures['total'])} of {name} events carry "
                    "only an IP address and a user agent")  # fmt: skip
            assert any(reading.startswith(said) for reading in readings), (said, readings)
    if pixel == PIXEL_DELIVERED:
        assert readings[0].startswith(
            "75 % of Purchase events carry only an IP address and a user agent"
        )

    everyone = console_server.coverage(pixel)
    buckets = {m // 900 * 900 for m in console_server.minutes()}
    points = console.locator("svg.chart[role=img]#chart-coverage circle.point").evaluate_all(
        "points => points.map(p => [p.dataset.key, +p.dataset.minute, p.dataset.value])"
    )
    assert {key for key, _, _ in points} == {"em", "ph", "external_id", "fbc", "fbp", "ip_ua"}
    if len(buckets) == 1:  # the scenario within one 15-minute bucket: one point per key
        [bucket] = buckets
        assert sorted(points) == sorted(
            [key, bucket, f"{100 * everyone[key] / everyone['total']:.1f}"]
            for key in ("em", "ph", "external_id", "fbc", "fbp", "ip_ua")
        )

    sources = table(console, "#sources tr.source", "td:nth-child(1)", "td:nth-child(2)",
                    "td:nth-child(3)")  # fmt: skip
    assert {(n, s): int(c) for n, s, c in sources} == console_server.sources(pixel)

    failed = console_server.sent(pixel=pixel, fate="failed")
    if failed:
        rows = table(console, "#recent-failures tr.failure", "td:nth-child(3)", "td.code",
                     "td.meta-message", "td.fbtrace")  # fmt: skip
        assert sorted(rows) == sorted(
            (e.event_id, "UPSTREAM_REJECTED", REFUSAL["error_user_msg"], refusal_trace(e.event_id))
            for e in failed
        )
        expect(console.locator("#pixel-codes li.failure-code")).to_have_text(
            [f"UPSTREAM_REJECTED: {len(failed)}"]
        )
    else:
        expect(console.locator("#no-recent-failures")).to_be_visible()
    if pixel == PIXEL_DELIVERED:  # the README's: the issue's own example of a reading
        screenshot(console, shots / "console-pixel.png", full_page=False)


def test_failed_events_are_listed_filtered_and_inspected(console, console_server, shots):
    """The failed events page lists the events Meta refused, with Meta's words; its filter
    narrows them; an event's page shows its status and the event as Meta receives it, the
    customer data as digests and every value Meta takes raw as "present"."""
    failed = console_server.sent(fate="failed")
    assert follow(console, "#nav-failed") == 200
    shown(console, console_server, "failed")
    rows = table(console, "#failed tr.failed-event", "td.event-id", "td.code", "td.meta-message",
                 "td.fbtrace")  # fmt: skip
    assert sorted(rows) == sorted(
        (e.event_id, "UPSTREAM_REJECTED", REFUSAL["error_user_msg"], refusal_trace(e.event_id))
        for e in failed
    )
    seqs = console.locator("#failed tr.failed-event").evaluate_all(
        "rows => rows.map(r => r.dataset.seq)"
    )
    for seq in seqs:
        expect(console.locator(f"input#pick-{seq}[name=seq]")).to_have_value(seq)
    screenshot(console, shots / "console-failed.png")

    console.fill("#filters input[name=code]", "EVENT_EXPIRED")
    assert follow(console, "#filter") == 200
    shown(console, console_server, "failed")
    expect(console.locator("#no-failed")).to_be_visible()
    console.fill("#filters input[name=code]", "UPSTREAM_REJECTED")
    console.fill("#filters input[name=pixel]", PIXEL_REFUSED)
    assert follow(console, "#filter") == 200
    shown(console, console_server, "failed")
    expect(console.locator("#failed tr.failed-event")).to_have_count(len(failed))

    # The refused event that carried an e-mail, a phone, an IP and a user agent.
    [inspected] = [e for e in failed if "em" in e.keys]
    assert (
        follow(console, f"tr.failed-event[data-event-id='{inspected.event_id}'] td.event-id a")
        == 200
    )
    shown(console, console_server, "event")
    expect(console.locator("#event-title")).to_have_attribute("data-event-id", inspected.event_id)
    expect(console.locator("#event-status")).to_have_attribute("data-status", "failed")
    expect(console.locator("#event-error")).to_have_attribute("data-code", "UPSTREAM_REJECTED")
    expect(console.locator("#event-meta-message")).to_have_text(REFUSAL["error_user_msg"])
    expect(console.locator("#event-fbtrace")).to_have_text(refusal_trace(inspected.event_id))
    expect(console.locator("#replay-this")).to_be_visible()
    body = json.loads(console.locator("#event-body").inner_text())
    assert (body["event_id"], body["event_name"]) == (inspected.event_id, inspected.event_name)
    assert body["event_source_url"] == "https://shop.example.com/"
    assert body["user_data"] == {
        "em": [sha256(EMAIL)],
        "ph": [sha256("442079460958")],  # the phone as Meta normalises it, then hashed
        "client_ip_address": "present",
        "client_user_agent": "present",
    }
    screenshot(console, shots / "console-event.png")


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_a_failed_event_replayed_from_the_console_is_delivered(console, console_server, shots):
    """Once Meta takes the refused events, one ticked on the failed events page and replayed is
    queued again with its event_id, and its page turns to delivered; the other stays failed."""
    replayed, other = console_server.sent(fate="failed")
    sent_before = _requests_with(console_server.graph, replayed.event_id)
    console_server.graph.refused.clear()
    assert follow(console, "#nav-failed") == 200
    shown(console, console_server, "failed")
    seq = attribute(console, f"tr.failed-event[data-event-id='{replayed.event_id}']", "data-seq")
    console.check(f"input#pick-{seq}")
    assert follow(console, "#replay-selected") == 200
    shown(console, console_server, "replay")
    expect(console.locator("#replay-summary")).to_have_attribute("data-count", "1")
    expect(console.locator("#replayed tr.replayed")).to_have_count(1)
    expect(console.locator("#replayed tr.replayed")).to_have_attribute(
        "data-event-id", replayed.event_id
    )
    outcome = console.url

    assert follow(console, "#replayed tr.replayed td.event-id a") == 200
    deadline = time.monotonic() + 10
    while attribute(console, "#event-status", "data-status") != "delivered":
        assert time.monotonic() < deadline, attribute(console, "#event-status", "data-status")
        time.sleep(0.1)
        console.reload()
    shown(console, console_server, "event")
    expect(console.locator("#event-error")).to_have_count(0)
    expect(console.locator("#replay-this")).to_have_count(0)
    assert _requests_with(console_server.graph, replayed.event_id) == sent_before + 1

    console.goto(outcome)  # the replay page again: the dispatcher's outcome
    shown(console, console_server, "replay")
    expect(console.locator("#replayed tr.replayed")).to_have_attribute("data-status", "delivered")
    screenshot(console, shots / "console-replay.png")

    # Replayed in place: the lookup finds the one row, delivered.
    assert follow(console, "#nav-lookup") == 200
    console.fill("#lookup-form input[name=event_id]", replayed.event_id)
    assert follow(console, "#lookup-form button#lookup") == 200
    shown(console, console_server, "lookup")
    expect(console.locator("#lookup-results tr.lookup-row")).to_have_count(1)
    expect(console.locator("#lookup-results tr.lookup-row")).to_have_attribute(
        "data-status", "delivered"
    )

    assert follow(console, "#nav-failed") == 200
    shown(console, console_server, "failed")
    expect(console.locator("#failed tr.failed-event")).to_have_count(1)
    expect(console.locator("#failed tr.failed-event")).to_have_attribute(
        "data-event-id", other.event_id
    )


def test_an_event_is_looked_up_by_its_event_id(console, console_server, shots):
    """Event lookup finds a kept event's row (a refused one with Meta's words, a queued one),
    and says so when an event_id is not kept: a sync call's delivered event, an unknown id."""
    [*_, refused] = console_server.sent(fate="failed")
    [queued, *_] = console_server.sent(fate="queued")
    [delivered, *_] = console_server.sent(fate="delivered")
    assert follow(console, "#nav-lookup") == 200
    shown(console, console_server, "lookup")
    for event, status in ((queued, "queued"), (refused, "failed")):
        console.fill("#lookup-form input[name=event_id]", event.event_id)
        assert follow(console, "#lookup-form button#lookup") == 200
        shown(console, console_server, "lookup")
        found = console.locator("#lookup-results tr.lookup-row")
        expect(found).to_have_count(1)
        expect(found).to_have_attribute("data-event-id", event.event_id)
        expect(found).to_have_attribute("data-status", status)
    rows = table(console, "#lookup-results tr.lookup-row", "td.code", "td.meta-message",
                 "td.fbtrace")  # fmt: skip
    assert rows == [
        ("UPSTREAM_REJECTED", REFUSAL["error_user_msg"], refusal_trace(refused.event_id))
    ]
    screenshot(console, shots / "console-lookup.png")
    for event_id in (delivered.event_id, "never-sent-event"):
        console.fill("#lookup-form input[name=event_id]", event_id)
        assert follow(console, "#lookup-form button#lookup") == 200
        shown(console, console_server, "lookup")
        expect(console.locator("#lookup-none")).to_be_visible()


def test_logging_out_ends_the_session(console, console_server):
    """Log out ends the session on the server: the console asks for the token again, even
    when the old cookie is sent back."""
    [cookie] = [c for c in console.context.cookies() if c["name"] == "funnelgate_console"]
    assert follow(console, "#logout") == 200
    shown(console, console_server, "login")
    expect(console.locator("#logout")).to_have_count(0)
    assert not [c for c in console.context.cookies() if c["name"] == "funnelgate_console"]
    console.context.add_cookies([cookie])
    console.goto(f"{console_server.base_url}/console")
    shown(console, console_server, "login")
    assert console.url == f"{console_server.base_url}/console/login?next=%2Fconsole"
