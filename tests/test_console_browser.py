"""funnelgate in a real browser: headless Chromium (tests/browser.py) against the app served on
loopback, with Meta faked (tests/support.py's FakeGraph).

`console_server` is funnelgate after a known history (SCENARIO): events delivered, failed and
still queued on three pixels, with known match keys, so that what the console shows can be
checked against figures worked out from what was sent (ConsoleServer's methods).
"""

from __future__ import annotations

import json
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
from playwright.sync_api import Browser, Page

from server.app import create_app
from server.storage import outbox
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


@contextmanager
def scenario_server(root: Path, key: rsa.RSAPrivateKey) -> Iterator[ConsoleServer]:
    """funnelgate (files under `root`, user tokens verified by `key`), its Graph faked by
    ConsoleGraph, once SCENARIO has been sent and has settled: delivered calls answered,
    refused events failed, queued ones attempted."""
    graph = ConsoleGraph()
    graph.down.add(PIXEL_DOWN)
    config = make_config(root, key, facebook_access_token=PROJECT_TOKEN)
    app = create_app(config, graph_transport=graph.transport(), clock=time.time)
    token = sign_token(key)
    with serving(app) as base_url, httpx.Client(base_url=base_url, timeout=10) as http:
        http.headers["Authorization"] = f"Bearer {token}"
        events = _send_scenario(http, graph)
        _settle(http, events)
        _check_keys(graph, events)
        yield ConsoleServer(base_url, graph, config.storage.database_path, token, events)


@pytest.fixture(scope="module")
def console_server(
    tmp_path_factory: pytest.TempPathFactory, rsa_key: rsa.RSAPrivateKey
) -> Iterator[ConsoleServer]:
    """The scenario's server, shared by the module's tests: a test that replays events or
    changes `graph` changes them for the tests after it."""
    with scenario_server(tmp_path_factory.mktemp("console"), rsa_key) as server:
        yield server


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
