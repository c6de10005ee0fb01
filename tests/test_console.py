"""The console (/console) over HTTP: the login and its cookie, CSRF, the pages and their numbers,
inspecting and replaying failed events, lookup, bad input; and that no page ever shows raw
customer data or a secret. The app is real, Graph is the fake one; events are made by calling
the tool endpoint, in queued mode so the dispatcher delivers or fails them."""

from __future__ import annotations

import dataclasses
import hashlib
import html
import re
import stat
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.testclient import TestClient

from server.app import create_app
from server.cli import main
from server.config import Config, ConsoleSettings, parse_config
from server.console import auth, charts
from server.console.readings import readings
from server.console.redact import PRESENT, shown_event
from server.delivery.throttle import Breakers
from server.errors import ConfigError
from server.storage.minutes import Coverage
from server.tally import Tally
from tests.live import serving
from tests.support import (
    NOW,
    PIXEL,
    PROJECT,
    PROJECT_TOKEN,
    FakeGraph,
    LogCapture,
    MakeClient,
    fixed_clock,
    funnel_parameters,
    graph_error,
    make_config,
    public_pem,
)

ADMIN_TOKEN = "console-admin-token-0123456789"
URL = f"/projects/{PROJECT}/tools"
TOOL = "FACEBOOK_ADS_SEND_FUNNEL_EVENT"
# What a call carries raw: none of it may appear on any page.
EMAIL, PHONE = "Raw.Person@Example.com", "+1 650 555 0123"
IP, AGENT = "203.0.113.7", "Mozilla/5.0 (Macintosh)"
FBC, FBP = "fb.1.1554763741205.AbCdEfGhIjKlMnOp", "fb.1.1558571054389.1098115397"
RAW = (EMAIL, EMAIL.lower(), "650 555", "6505550123", IP, AGENT, FBC, FBP, "Rawfirstname")
EMAIL_DIGEST = hashlib.sha256(EMAIL.lower().encode()).hexdigest()
PAGES = ("/console", f"/console/pixels/{PROJECT}/{PIXEL}", "/console/failed", "/console/lookup")


def console_config(config: Config, **settings: Any) -> Config:
    console = ConsoleSettings(token_sha256=hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest())
    return dataclasses.replace(config, console=dataclasses.replace(console, **settings))


@pytest.fixture
def queued_config(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> Config:
    base = make_config(tmp_path, rsa_key, facebook_access_token=PROJECT_TOKEN,
                       delivery_settings={"mode": "queued"})  # fmt: skip
    return console_config(base)


@pytest.fixture
def console(make_client: MakeClient, queued_config: Config) -> TestClient:
    """The app in queued mode with a console token, not logged in."""
    return make_client(queued_config)


def send(client: TestClient | httpx.Client, sign: Any, user: str = "user-1", **overrides: Any):
    """The tool called (queued: 202) by `user` with `funnel_parameters(**overrides)`."""
    parameters = funnel_parameters(**overrides)
    response = client.post(URL, json={"tool": TOOL, "parameters": parameters},
                           headers={"Authorization": f"Bearer {sign(sub=user)}"})  # fmt: skip
    assert response.status_code == 202, response.text
    return response


def login(client: TestClient | httpx.Client, token: str = ADMIN_TOKEN) -> Any:
    return client.post("/console/login", data={"token": token, "next": "/console"},
                       follow_redirects=False)  # fmt: skip


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, "no CSRF field on the page"
    return match[1]


def statuses(client: TestClient | httpx.Client, event_id: str) -> list[str]:
    page = client.get("/console/lookup", params={"event_id": event_id}).text
    return re.findall(r'class="lookup-row" data-seq="\d+" data-event-id="[^"]*" '
                      r'data-status="(\w+)"', page)  # fmt: skip


def until_status(client: TestClient | httpx.Client, event_id: str, status: str) -> list[str]:
    """The event's rows' statuses once the newest is `status` (≤ 10 s), through the console."""
    deadline = time.monotonic() + 10
    found = statuses(client, event_id)
    while (not found or found[0] != status) and time.monotonic() < deadline:
        time.sleep(0.05)
        found = statuses(client, event_id)
    return found


def flush_counters(client: TestClient) -> None:
    """The per-minute counters written now (the tally writes every few seconds)."""
    assert client.portal is not None
    tally: Tally = client.app.state.tally  # type: ignore[attr-defined]
    client.portal.call(tally.flush)


def seqs_on(page: str, css: str) -> list[str]:
    return re.findall(rf'class="{css}" data-seq="(\d+)"', page)


def a_failed_event(client: TestClient, graph: FakeGraph, sign: Any, **overrides: Any) -> str:
    """An event Meta refused (400, code 100), failed for good; its seq."""
    graph.script.append(graph_error(400, 100, error_user_msg="Invalid parameter",
                                    fbtrace_id="TraceOfTheRefusal"))  # fmt: skip
    send(client, sign, **overrides)
    event_id = overrides.get("eventId", "order-1001")
    assert until_status(client, event_id, "failed")[0] == "failed"
    [seq] = seqs_on(client.get("/console/failed").text, "failed-event")
    return seq


# --- served or not -------------------------------------------------------------------------


def test_the_console_is_served_only_when_a_token_is_set_up(make_client, config, tmp_path):
    assert make_client(config).get("/console").status_code == 404  # no token: no console
    off = console_config(config, enabled=False)
    assert make_client(off).get("/console").status_code == 404
    auth.write_token_file(auth.token_path(config.storage), auth.token_digest(ADMIN_TOKEN))
    served = make_client(config)
    assert served.get("/console", follow_redirects=False).status_code == 303
    assert login(served).status_code == 303


def test_the_console_section_is_checked(tmp_path, rsa_key):
    def parse(console: dict[str, Any]) -> Config:
        raw = {"console": console,
               "projects": [{"id": "p1", "jwt_public_key": public_pem(rsa_key)}]}  # fmt: skip
        return parse_config(raw, base_dir=tmp_path, env={})

    digest = hashlib.sha256(b"x").hexdigest()
    settings = parse({"token_sha256": digest.upper(), "session_hours": 2,
                      "origin": "https://Admin.Example.com/"}).console  # fmt: skip
    assert settings == ConsoleSettings(True, digest, 2.0, "https://admin.example.com")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"token_sha256": "my-plain-secret"}, "token_sha256 must be the 64 hex digits"),
        ({"origin": "admin.example.com"}, "origin must be a scheme and host"),
        ({"origin": "https://a.example/path"}, "origin must be a scheme and host"),
        ({"session_hours": 0}, "session_hours must be a positive number"),
        ({"enabled": "yes"}, "enabled must be true or false"),
        ({"tokn_sha256": digest}, "unknown key 'tokn_sha256' (did you mean 'token_sha256'?)"),
    ]
    for console, expected in cases:
        with pytest.raises(ConfigError) as error:
            parse(console)
        assert expected in str(error.value)
        assert "my-plain-secret" not in str(error.value)


def test_the_readmes_console_table_is_a_valid_config(tmp_path, rsa_key):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("\n## Console\n") : readme.index("\n## Logs\n")]
    block = re.search(r"```toml\n(.*?)```", section, re.S)
    assert block is not None
    digest = auth.token_digest(ADMIN_TOKEN)
    raw = tomllib.loads(block[1].replace('"..."', f'"{digest}"'))
    raw["projects"] = [{"id": "p1", "jwt_public_key": public_pem(rsa_key)}]
    settings = parse_config(raw, base_dir=tmp_path, env={}).console
    assert settings == ConsoleSettings(True, digest, 12.0, "https://funnelgate.example.com")
    assert settings.session_hours == ConsoleSettings().session_hours


# --- login, cookie, logout -----------------------------------------------------------------


def test_every_page_wants_a_login(console):
    for path in (*PAGES, "/console/events/1", "/console/replay?seq=1"):
        response = console.get(path, follow_redirects=False)
        assert response.status_code == 303, path
        assert response.headers["location"].startswith("/console/login?next=%2Fconsole")
    page = console.get(f"/console/pixels/{PROJECT}/{PIXEL}?window=1h")
    assert page.url.path == "/console/login"
    assert 'name="next" value="/console/pixels/' in page.text  # back there once logged in
    assert console.post("/console/replay", data={"seq": "1"}).status_code == 403
    assert console.post("/console/logout").status_code == 403


def test_a_wrong_token_is_refused_and_the_right_one_opens_a_session(console, log_capture):
    wrong = login(console, "not-the-token")
    assert wrong.status_code == 401
    assert "set-cookie" not in wrong.headers
    assert "That is not the console's token." in html.unescape(wrong.text)
    assert console.get("/console", follow_redirects=False).status_code == 303
    right = login(console)
    assert (right.status_code, right.headers["location"]) == (303, "/console")
    overview = console.get("/console")
    assert overview.status_code == 200
    assert 'data-page="overview"' in overview.text
    lines = log_capture.lines(console)
    outcomes = [line["outcome"] for line in lines if line.get("event") == "console_login"]
    assert outcomes == ["refused", "ok"]
    logged = "\n".join(map(str, lines))
    assert ADMIN_TOKEN not in logged and "not-the-token" not in logged


def cookie_attributes(response: Any) -> dict[str, str]:
    [header] = response.headers.get_list("set-cookie")
    name_value, *attributes = (part.strip() for part in header.split(";"))
    assert name_value.startswith(f"{auth.COOKIE}=")
    return {k.lower(): v for k, _, v in (a.partition("=") for a in attributes)}


def test_the_session_cookie_is_httponly_strict_and_secure_only_over_https(queued_config):
    app = create_app(queued_config, graph_transport=FakeGraph().transport(),
                     clock=fixed_clock(NOW))  # fmt: skip
    with TestClient(app) as plain:
        attributes = cookie_attributes(login(plain))
    assert attributes["path"] == "/console"
    assert attributes["samesite"].lower() == "strict"
    assert "httponly" in attributes
    assert "secure" not in attributes
    assert attributes["max-age"] == str(12 * 3600)
    with TestClient(app, base_url="https://console.example") as tls:  # the scope says https
        response = login(tls)
        assert "secure" in cookie_attributes(response)
        assert tls.get("/console").status_code == 200  # the cookie comes back over https


def test_pages_are_never_cached_framed_or_allowed_scripts(console):
    login(console)
    for path in (*PAGES, "/console/login"):
        headers = console.get(path).headers
        assert headers["cache-control"] == "no-store", path
        assert headers["x-frame-options"] == "DENY"
        assert "script-src" not in headers["content-security-policy"]
        assert "default-src 'none'" in headers["content-security-policy"]


def test_logging_out_ends_the_session(console):
    login(console)
    cookie = console.cookies[auth.COOKIE]
    page = console.get("/console").text
    response = console.post("/console/logout", data={"csrf": csrf_of(page)},
                            follow_redirects=False)  # fmt: skip
    assert (response.status_code, response.headers["location"]) == (303, "/console/login")
    assert "Max-Age=0" in response.headers["set-cookie"]
    console.cookies.set(auth.COOKIE, cookie, path="/console")  # the old cookie, replayed
    assert console.get("/console", follow_redirects=False).status_code == 303


def test_failed_logins_are_bounded_even_for_the_right_token(console):
    for _ in range(auth.CLIENT_FAILURES):
        assert login(console, "guess").status_code == 401
    refused = login(console)
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) > 0
    assert "set-cookie" not in refused.headers


def test_a_new_token_ends_the_sessions_of_the_old_one(make_client, config, tmp_path, rsa_key,
                                                      capsys):  # fmt: skip
    """`funnelgate console-token` on the config beside the server's database."""
    path = tmp_path / "funnelgate.toml"
    path.write_text(f'[[projects]]\nid = "p1"\njwt_public_key = """{public_pem(rsa_key)}"""\n')
    assert main(["console-token", "--config", str(path)]) == 0
    first = capsys.readouterr().out.strip()
    token_file = tmp_path / auth.TOKEN_FILE
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert token_file.read_text().strip() == hashlib.sha256(first.encode()).hexdigest()
    assert first not in token_file.read_text()
    client = make_client(config)
    assert login(client, first).status_code == 303
    assert client.get("/console", follow_redirects=False).status_code == 200
    assert main(["console-token", "--config", str(path)]) == 0
    second = capsys.readouterr().out.strip()
    assert second != first
    assert client.get("/console", follow_redirects=False).status_code == 303  # logged out
    assert login(client, first).status_code == 401
    assert login(client, second).status_code == 303


def test_console_token_refuses_a_config_that_sets_the_hash(tmp_path, rsa_key, capsys):
    path = tmp_path / "funnelgate.toml"
    digest = hashlib.sha256(b"x").hexdigest()
    path.write_text(f'[console]\ntoken_sha256 = "{digest}"\n[[projects]]\nid = "p1"\n'
                    f'jwt_public_key = """{public_pem(rsa_key)}"""\n')  # fmt: skip
    assert main(["console-token", "--config", str(path)]) == 2
    assert "token_sha256" in capsys.readouterr().err
    assert not (tmp_path / auth.TOKEN_FILE).exists()


# --- CSRF ----------------------------------------------------------------------------------


def test_a_post_without_the_forms_token_is_refused_and_replays_nothing(console, graph, sign):
    login(console)
    seq = a_failed_event(console, graph, sign)
    csrf = csrf_of(console.get("/console/failed").text)
    for data, headers in [
        ({"seq": seq}, {}),  # no token
        ({"seq": seq, "csrf": "x" * len(csrf)}, {}),  # a wrong one
        ({"seq": seq, "csrf": [csrf, csrf]}, {}),  # twice
        ({"seq": seq, "csrf": csrf}, {"Origin": "https://evil.example"}),  # right, from elsewhere
        ({"seq": seq, "csrf": csrf}, {"Referer": "https://evil.example/page"}),
        ({"seq": seq, "csrf": csrf}, {"Origin": "null"}),
    ]:
        response = console.post("/console/replay", data=data, headers=headers)
        assert response.status_code == 403, (data, headers)
        assert "nothing was done" in response.text
    time.sleep(0.3)
    assert statuses(console, "order-1001") == ["failed"]
    assert len(graph.received) == 1  # sent once, never replayed
    # The same form from this very host goes through.
    same = console.post("/console/replay", data={"seq": seq, "csrf": csrf},
                        headers={"Origin": "http://testserver"}, follow_redirects=False)  # fmt: skip
    assert same.status_code == 303


def test_the_configured_origin_is_the_one_forms_must_come_from(make_client, queued_config):
    client = make_client(console_config(queued_config, origin="https://admin.example.com"))
    assert login(client).status_code == 303  # no Origin header: the token decides
    csrf = csrf_of(client.get("/console").text)
    own_host = client.post("/console/logout", data={"csrf": csrf},
                           headers={"Origin": "http://testserver"})  # fmt: skip
    assert own_host.status_code == 403  # the proxy's public origin is the one that counts
    public = client.post("/console/logout", data={"csrf": csrf}, follow_redirects=False,
                         headers={"Origin": "https://admin.example.com"})  # fmt: skip
    assert public.status_code == 303


# --- failed events, inspect, replay --------------------------------------------------------


def test_a_failed_event_is_listed_inspected_and_replayed_with_its_event_id(console, graph, sign):
    login(console)
    seq = a_failed_event(console, graph, sign)
    failed = console.get("/console/failed", params={"code": "UPSTREAM_REJECTED"}).text
    row = re.search(rf'<tr class="failed-event" data-seq="{seq}".*?</tr>', failed, re.S)
    assert row is not None
    assert "Invalid parameter" in row[0] and "TraceOfTheRefusal" in row[0]
    assert seqs_on(console.get("/console/failed?code=EVENT_EXPIRED").text, "failed-event") == []
    event = console.get(f"/console/events/{seq}").text
    assert 'id="event-status" data-status="failed"' in event
    assert 'id="replay-this"' in event
    replay = console.post("/console/replay", data={"seq": seq, "csrf": csrf_of(event)},
                          follow_redirects=False)  # fmt: skip
    assert replay.status_code == 303
    outcome = console.get(replay.headers["location"])
    assert seqs_on(outcome.text, "replayed") == [seq]
    # The fake Graph accepts the second try: the dispatcher delivers it, same event_id.
    assert until_status(console, "order-1001", "delivered") == ["delivered"]
    assert [body["data"][0]["event_id"] for body in graph.bodies()] == ["order-1001"] * 2
    again = console.get(replay.headers["location"]).text
    assert re.search(rf'class="replayed" data-seq="{seq}" data-event-id="order-1001" '
                     r'data-status="delivered"', again)  # fmt: skip
    # Replaying it again does nothing: it is not failed any more.
    twice = console.post("/console/replay", data={"seq": seq, "csrf": csrf_of(again)})
    assert seqs_on(twice.text, "skipped") == [seq]
    assert 'id="replay-summary" data-count="0"' in twice.text


def test_several_chosen_events_are_replayed_at_once(console, graph, sign):
    login(console)
    for event_id in ("a-1", "a-2"):  # one by one: sent together, Meta's 400 would refuse both
        graph.script.append(graph_error(400, 100))
        send(console, sign, eventId=event_id)
        assert until_status(console, event_id, "failed") == ["failed"]
    page = console.get("/console/failed").text
    chosen = seqs_on(page, "failed-event")
    assert len(chosen) == 2
    response = console.post("/console/replay", data={"seq": chosen, "csrf": csrf_of(page)})
    assert sorted(seqs_on(response.text, "replayed")) == sorted(chosen)
    assert until_status(console, "a-1", "delivered") == ["delivered"]
    assert until_status(console, "a-2", "delivered") == ["delivered"]


def test_no_page_shows_raw_customer_data_or_a_secret(console, graph, sign):
    """Every value a call carried raw (e-mail, phone, name, IP, user agent, fbc, fbp) and every
    secret (Meta's token, the user's JWT, the console's token) is absent from every page; the
    e-mail's SHA-256 is what the event page shows."""
    login(console)
    seq = a_failed_event(console, graph, sign, customerEmail=EMAIL, customerPhone=PHONE,
                         customerFirstName="Rawfirstname",
                         eventSourceUrl=f"https://shop.example.com/thanks?email={EMAIL}")  # fmt: skip
    flush_counters(console)
    event = console.get(f"/console/events/{seq}").text
    assert EMAIL_DIGEST in event
    pre = re.search(r'<pre id="event-body">(.*?)</pre>', event, re.S)
    assert pre is not None
    body = html.unescape(pre[1])
    for key in ("client_ip_address", "client_user_agent", "fbc", "fbp"):
        assert f'"{key}": "{PRESENT}"' in body
    assert '"event_source_url": "https://shop.example.com/…"' in body
    replayed = console.post("/console/replay", data={"seq": seq, "csrf": csrf_of(event)})
    pages = [event, replayed.text] + [
        console.get(path, params={"event_id": "order-1001"}).text for path in PAGES
    ]
    secrets = (PROJECT_TOKEN, sign(), ADMIN_TOKEN, console.cookies[auth.COOKIE])
    for page in pages:
        text = html.unescape(page)
        for value in (*RAW, *secrets):
            assert value not in text


# --- lookup, overview, pixel ---------------------------------------------------------------


def test_lookup_finds_an_event_whoever_sent_it(console, graph, sign):
    login(console)
    send(console, sign, user="user-1", eventId="shared-1")
    send(console, sign, user="user-2", eventId="shared-1")
    assert until_status(console, "shared-1", "delivered")
    page = console.get("/console/lookup", params={"event_id": "shared-1", "project": PROJECT})
    users = re.findall(r"<td>(user-\d)</td>", page.text)
    assert sorted(users) == ["user-1", "user-2"]
    assert len(seqs_on(page.text, "lookup-row")) == 2
    missing = console.get("/console/lookup", params={"event_id": "never-sent"}).text
    assert 'id="lookup-none"' in missing
    assert 'id="lookup-none"' not in console.get("/console/lookup").text  # no search yet


def chart_values(page: str, chart: str) -> list[int]:
    svg = re.search(rf'<svg[^>]* id="chart-{chart}".*?</svg>', page, re.S)
    assert svg is not None, chart
    return [int(v) for v in re.findall(r'class="bar"[^>]*data-value="(\d+)"', svg[0])]


def test_the_overview_charts_the_counters_and_shows_queue_latency_and_throttling(
    console, graph, sign
):
    login(console)
    a_failed_event(console, graph, sign, eventId="bad-1")
    send(console, sign, eventId="good-1")
    send(console, sign, eventId="good-2")
    until_status(console, "good-2", "delivered")
    until_status(console, "good-1", "delivered")
    flush_counters(console)
    breakers: Breakers = console.app.state.breakers
    breakers.failed((PROJECT_TOKEN, "999999999999999"), throttled=True)
    page = console.get("/console").text
    hour = chart_values(page, "accepted-hour")
    assert len(hour) == 60 and sum(hour) == 3
    assert sum(chart_values(page, "delivered-hour")) == 2
    assert sum(chart_values(page, "failed-hour")) == 1
    assert len(chart_values(page, "accepted-day")) == 96
    assert sum(chart_values(page, "accepted-day")) == 3
    assert re.search(r'id="accepted-hour" data-value="3"', page)
    assert re.search(r'id="queue-depth" data-value="0"', page)
    assert re.search(r'id="latency-p50">\d+ ms<', page)
    assert re.search(r'class="throttled-pixel" data-pixel="999999999999999"', page)
    assert PROJECT_TOKEN not in page
    assert re.search(rf'class="pixel" data-project="{PROJECT}" data-pixel="{PIXEL}"', page)
    assert re.search(r'class="failure-code" data-code="UPSTREAM_REJECTED"', page)


def test_the_overview_shows_a_held_back_queue(make_client, queued_config, graph, sign):
    graph.script.extend([graph_error(500, 2, is_transient=True)] * 5)  # Meta is down
    client = make_client(queued_config)
    login(client)
    send(client, sign)
    assert until_status(client, "order-1001", "queued")
    page = client.get("/console").text
    assert re.search(r'id="queue-depth" data-value="1"', page)
    assert re.search(r'id="oldest-pending" data-seconds="0"', page)


def test_the_pixel_page_reads_the_coverage_of_the_events_sent(console, graph, sign):
    login(console)
    only_ip_ua: dict[str, Any] = dict.fromkeys(
        ("customerEmail", "customerFirstName", "customerLastName", "customerCity",
         "customerState", "customerCountryCode", "customerExternalId", "clickId", "browserId")
    )  # fmt: skip
    send(console, sign, eventId="p-1", **only_ip_ua)
    send(console, sign, eventId="p-2", **only_ip_ua)
    send(console, sign, eventId="p-3")
    until_status(console, "p-3", "delivered")
    flush_counters(console)
    page = console.get(f"/console/pixels/{PROJECT}/{PIXEL}").text
    row = re.search(r'class="coverage-row" data-event-name="Purchase" data-total="3">.*?</tr>',
                    page, re.S)  # fmt: skip
    assert row is not None
    shares = dict(re.findall(r'data-key="(\w+)">([^<]+)</td>', row[0]))
    assert shares["em"] == "33 %"
    assert shares["only_ip_ua"] == "67 %"
    assert shares["ip_ua"] == "100 %"
    readings_found = re.findall(r'<li class="reading">([^<]+)</li>', page)
    assert ("67 % of Purchase events carry only an IP address and a user agent: add an "
            "e-mail (em), a phone number (ph) or your customer id (external_id).") in readings_found  # fmt: skip
    assert re.search(r'class="source" data-event-name="Purchase" data-action-source="website"',
                     page)  # fmt: skip
    points = re.findall(r'data-key="em" data-minute="\d+" data-value="([\d.]+)"', page)
    assert points == ["33.3"]


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/console/failed?limit=0", 400),
        ("/console/failed?limit=abc", 400),
        ("/console/failed?limit=1&limit=2", 400),
        ("/console/failed?pixel=abc", 400),
        ("/console/failed?project=nope", 400),
        ("/console/failed?code=lower", 400),
        (f"/console/pixels/{PROJECT}/{PIXEL}?window=2h", 400),
        (f"/console/pixels/{PROJECT}/abc", 404),
        (f"/console/pixels/nope/{PIXEL}", 404),
        ("/console/events/abc", 404),
        ("/console/events/0", 404),
        ("/console/events/99999", 404),
        (f"/console/events/{'9' * 40}", 404),
        ("/console/lookup?event_id=" + "x" * 1025, 400),
        ("/console/lookup?event_id=%00", 400),
        ("/console/replay?seq=x", 400),
        ("/console/replay?" + "&".join(["seq=1"] * 201), 400),
        ("/console/nope", 404),
    ],
)
def test_bad_input_is_a_clear_page_never_a_500(console, path, status):
    login(console)
    response = console.get(path)
    assert response.status_code == status
    assert response.headers["content-type"].startswith("text/html")
    assert 'id="error-message"' in response.text


def test_bad_forms_are_refused_before_anything_is_done(console):
    login(console)
    csrf = csrf_of(console.get("/console").text)
    cases: list[tuple[dict[str, Any], int]] = [
        ({"data": {"csrf": csrf}}, 400),  # nothing chosen
        ({"data": {"csrf": csrf, "seq": "x"}}, 400),
        ({"data": {"csrf": csrf, "seq": [str(n) for n in range(1, 202)]}}, 400),
        ({"json": {"csrf": csrf, "seq": "1"}}, 400),  # not a form
        ({"content": b"csrf=" + b"x" * 20_000,
          "headers": {"content-type": "application/x-www-form-urlencoded"}}, 413),
        ({"content": b"csrf=%ff%fe",
          "headers": {"content-type": "application/x-www-form-urlencoded"}}, 400),
    ]  # fmt: skip
    for kwargs, status in cases:
        response = console.post("/console/replay", **kwargs)
        assert response.status_code == status, kwargs
        assert 'id="error-message"' in response.text
    assert console.put("/console/replay").status_code == 405
    assert login(console, "x" * 300).status_code == 401


def test_a_page_whose_database_is_gone_says_so(console, queued_config, log_capture):
    login(console)
    path = queued_config.storage.database_path
    path.rename(path.with_name("moved.db"))  # the server's own connections keep the old file
    path.mkdir()  # and nothing can open this one
    response = console.get("/console/failed")
    assert response.status_code == 503
    assert 'id="error-message"' in response.text
    codes = [line.get("error") for line in log_capture.lines(console)
             if line.get("event") == "console_storage_error"]  # fmt: skip
    assert codes == ["OperationalError"]


def test_a_login_only_returns_to_a_console_page(console):
    for target, expected in [("/console/failed", "/console/failed"),
                             ("https://evil.example/", "/console"),
                             ("//evil.example/console", "/console"),
                             ("/console/../projects", "/console/../projects")]:  # fmt: skip
        response = console.post("/console/login", data={"token": ADMIN_TOKEN, "next": target},
                                follow_redirects=False)  # fmt: skip
        assert response.headers["location"] == expected
    assert console.get("/console/login?next=https://evil.example", follow_redirects=False
                       ).headers["location"] == "/console"  # fmt: skip
    onwards = console.get("/console/login?next=%ff", follow_redirects=False)
    assert onwards.headers["location"] == "/console"  # logged in: on to the overview


# --- over real HTTP ------------------------------------------------------------------------


@pytest.fixture
def served(queued_config: Config, graph: FakeGraph) -> Iterator[str]:
    app = create_app(queued_config, graph_transport=graph.transport(), clock=fixed_clock(NOW))
    with serving(app) as base_url:
        yield base_url


def test_log_in_and_replay_over_loopback(served, graph, sign):
    with httpx.Client(base_url=served, timeout=10) as browser:
        page = browser.get("/console/failed", follow_redirects=True)
        assert page.url.path == "/console/login"
        assert login(browser).status_code == 303
        graph.script.append(graph_error(400, 100, error_user_msg="Invalid parameter"))
        send(browser, sign)
        assert until_status(browser, "order-1001", "failed") == ["failed"]
        page = browser.get("/console/failed")
        [seq] = seqs_on(page.text, "failed-event")
        replayed = browser.post("/console/replay", data={"seq": seq, "csrf": csrf_of(page.text)},
                                headers={"Origin": served}, follow_redirects=True)  # fmt: skip
        assert seqs_on(replayed.text, "replayed") == [seq]
        assert until_status(browser, "order-1001", "delivered") == ["delivered"]


# --- the pure parts ------------------------------------------------------------------------


def test_bars_draw_one_element_per_minute_with_its_value():
    svg = charts.bars([(NOW_MINUTE + 60, 3), (NOW_MINUTE + 180, 5), (NOW_MINUTE - 60, 9)],
                      name="x", label="<Accepted>", since=NOW_MINUTE, until=NOW_MINUTE + 300)  # fmt: skip
    values = re.findall(r'data-minute="(\d+)" data-value="(\d+)"', svg)
    assert values == [(str(NOW_MINUTE + 60 * i), v) for i, v in enumerate("03050")]
    assert 'role="img"' in svg and '<title id="chart-x-title">&lt;Accepted&gt;' in svg
    assert 'data-total="8"' in svg


def test_bars_sum_minutes_into_buckets():
    assert charts.buckets([(60, 1), (120, 2), (900, 4)], since=0, until=1800, step=900) == [
        (0, 3.0), (900, 4.0)]  # fmt: skip


def test_lines_leave_a_gap_where_no_event_came():
    svg = charts.lines({"em": [(0, 50.0), (60, None), (120, 100.0)]}, name="c", label="C",
                       since=0, until=180, step=60)  # fmt: skip
    assert re.findall(r'data-minute="(\d+)" data-value="([\d.]+)"', svg) == [
        ("0", "50.0"), ("120", "100.0")]  # fmt: skip
    assert "<polyline" not in svg  # two lone points: no line between them


NOW_MINUTE = int(NOW) // 60 * 60


def coverage_row(name: str, total: int, **counts: int) -> Coverage:
    fields = dict.fromkeys(Coverage._fields[2:], 0)
    return Coverage(name, total, **{**fields, **counts})


def test_readings_speak_of_the_events_that_matter_most():
    rows = [
        coverage_row("Purchase", 100, em=62, ph=90, external_id=90, fbc=40, fbp=90, ip_ua=100,
                     only_ip_ua=38),
        coverage_row("Lead", 10, em=10, ph=10, external_id=10, none=1),
        coverage_row("*", 110),
    ]  # fmt: skip
    found = readings(rows, websites={"Purchase"})
    assert found[0].startswith("10 % of Lead events carry no customer information")
    assert found[1] == ("38 % of Purchase events carry only an IP address and a user agent: "
                        "add an e-mail (em), a phone number (ph) or your customer id "
                        "(external_id).")  # fmt: skip
    assert any(s.startswith("60 % of Purchase website events carry no click id (fbc)")
               for s in found)  # fmt: skip
    assert not any("Lead website" in s for s in found)  # Lead has no website source
    assert readings([coverage_row("Lead", 5, em=5, ph=5, external_id=5)], ()) == []


def test_an_event_is_shown_with_digests_and_present_only():
    digest = "a" * 64
    event = {"event_name": "Purchase", "event_id": "e1", "event_time": 1,
             "user_data": {"em": [digest], "ph": ["not-a-digest"], "client_ip_address": IP,
                           "madid": "raw-id", "fbc": FBC},
             "custom_data": {"value": 9.5, "currency": "EUR", "search_string": "joe smith",
                             "contents": [{"id": "sku", "quantity": 1, "note": "gift for Ann"}]},
             "app_data": {"extinfo": ["a"]},
             "event_source_url": "https://user:pw@shop.example/p?email=x#y"}  # fmt: skip
    assert shown_event(event) == {
        "event_name": "Purchase", "event_id": "e1", "event_time": 1,
        "user_data": {"em": [digest], "ph": PRESENT, "client_ip_address": PRESENT,
                      "madid": PRESENT, "fbc": PRESENT},
        "custom_data": {"value": 9.5, "currency": "EUR", "search_string": PRESENT,
                        "contents": [{"id": "sku", "quantity": 1, "note": PRESENT}]},
        "app_data": PRESENT,
        "event_source_url": "https://shop.example/…",
    }  # fmt: skip


def test_the_token_digest_alone_makes_no_session_where_a_secret_key_is_set(tmp_path):
    """Whoever reads `token_sha256` in a config cannot sign a cookie the server takes: the key
    also takes the storage's secret key, which instances share to open stored tokens."""
    clock: Callable[[], float] = lambda: NOW  # noqa: E731
    digest = auth.token_digest("one")

    def sessions(secret: bytes) -> auth.Sessions:
        revocations = auth.Revocations(tmp_path / auth.REVOKED_FILE, clock)
        return auth.Sessions(3600, clock, revocations, secret=secret)

    cookie, session = sessions(b"k" * 32).create(digest)
    assert sessions(b"k" * 32).get(cookie, digest) == session  # another instance, same key
    assert sessions(b"x" * 32).get(cookie, digest) is None
    forged, _ = sessions(b"").create(digest)  # made from the digest alone
    assert sessions(b"k" * 32).get(forged, digest) is None


def test_sessions_are_signed_expire_and_end_at_logout_for_every_worker(tmp_path):
    now = [NOW]
    clock: Callable[[], float] = lambda: now[0]  # noqa: E731
    digest, other = auth.token_digest("one"), auth.token_digest("two")
    revoked = tmp_path / auth.REVOKED_FILE

    def worker() -> auth.Sessions:  # what each process (or host) builds: nothing shared
        return auth.Sessions(3600, clock, auth.Revocations(revoked, clock))

    first, second = worker(), worker()
    cookie, session = first.create(digest)
    assert second.get(cookie, digest) == session  # made by one, opened by another
    assert second.get(cookie, other) is None  # a new token ends it
    session_id, expiry, mac = cookie.split(".")
    flipped = mac[:-2] + ("A" if mac[-2] != "A" else "B") + mac[-1]
    for forged in (
        f"{session_id}.{expiry}.{flipped}",
        f"{session_id}.{int(expiry) + 3600}.{mac}",  # a longer life
        f"x{session_id}.{expiry}.{mac}",
        f"{session_id}.{expiry}",
        "",
        cookie + "." * 200,
    ):
        assert first.get(forged, digest) is None, forged
    assert session.csrf not in cookie and len(session.csrf) == 43  # derived, not sent
    assert first.create(digest)[1].csrf != session.csrf
    now[0] += 3599
    assert first.get(cookie, digest) is not None
    now[0] += 1
    assert first.get(cookie, digest) is None  # expired
    now[0] = NOW
    kept, _ = first.create(digest)
    first.end(session)  # logged out on one worker: the other refuses the cookie at once
    assert second.get(cookie, digest) is None
    assert second.get(kept, digest) is not None
    assert stat.S_IMODE(revoked.stat().st_mode) == 0o600
    assert session.id not in revoked.read_text()  # its SHA-256 only
    now[0] += 7200  # expired revocations go with the next write
    second.end(second.create(digest)[1])
    assert len(revoked.read_text().splitlines()) == 1


def test_a_login_holds_on_another_server_configured_alike(queued_config, tmp_path):
    """Several workers or hosts with one token: a session made on one opens pages on the
    other, and logging out on one ends it on the other (the workers of a host share the
    revocations beside the database)."""
    apps = [create_app(queued_config, graph_transport=FakeGraph().transport()) for _ in "ab"]
    with TestClient(apps[0]) as first, TestClient(apps[1]) as second:
        assert login(first).status_code == 303
        cookie = first.cookies[auth.COOKIE]
        second.cookies.set(auth.COOKIE, cookie, path="/console")
        page = second.get("/console", follow_redirects=False)
        assert page.status_code == 200
        assert csrf_of(page.text) == csrf_of(first.get("/console").text)  # one session
        out = second.post("/console/logout", data={"csrf": csrf_of(page.text)},
                          follow_redirects=False)  # fmt: skip
        assert out.status_code == 303
        assert first.get("/console", follow_redirects=False).status_code == 303


def test_the_log_holds_no_console_secret(console, graph, sign, log_capture: LogCapture):
    login(console, "wrong-guess-token")
    login(console)
    a_failed_event(console, graph, sign)
    text = "\n".join(map(str, log_capture.lines(console)))
    for secret in (ADMIN_TOKEN, "wrong-guess-token", console.cookies[auth.COOKIE]):
        assert secret not in text


def test_a_replay_replays_the_rows_ticked_not_other_users_events_with_the_same_id(
    console, graph, sign
):
    login(console)
    for user in ("alice", "bob"):  # event ids are the callers': two customers, one id
        graph.script.append(graph_error(400, 100, error_user_msg="Invalid parameter"))
        send(console, sign, user=user, eventId="order-1")
        deadline = time.monotonic() + 10
        while statuses(console, "order-1").count("failed") < (1 if user == "alice" else 2):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    page = console.get("/console/failed").text
    bobs, alices = seqs_on(page, "failed-event")  # newest first
    sent = len(graph.received)
    replay = console.post("/console/replay", data={"seq": alices, "csrf": csrf_of(page)},
                          follow_redirects=False)  # fmt: skip
    assert replay.status_code == 303
    assert replay.headers["location"] == f"/console/replay?seq={alices}"
    assert until_status(console, "order-1", "failed")  # bob's, newest, stays failed
    deadline = time.monotonic() + 10
    while "delivered" not in statuses(console, "order-1"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert sorted(statuses(console, "order-1")) == ["delivered", "failed"]
    assert seqs_on(console.get("/console/failed").text, "failed-event") == [bobs]
    assert len(graph.received) == sent + 1
