"""Run Tool in-process: the real app, Graph faked at the transport; asserts the exact bytes sent."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import httpx2
import pytest
from starlette.testclient import TestClient

from server.delivery.transport import Answer
from server.storage.credentials import open_credentials
from tests.support import (
    NOW,
    PIXEL,
    PROJECT,
    Step,
    funnel_parameters,
    graph_error,
)

URL = f"/projects/{PROJECT}/tools"


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def call(client: TestClient, sign: Callable[..., str], parameters: object, *, path: str = URL,
         key: str = "tool", tool: str = "FACEBOOK_ADS_SEND_FUNNEL_EVENT") -> httpx2.Response:  # fmt: skip
    return client.post(
        path,
        json={key: tool, "parameters": parameters},
        headers={"Authorization": f"Bearer {sign()}"},
    )


def test_success_sends_exactly_the_mapped_event_and_unwraps_metas_answer(client, graph, sign):
    response = call(client, sign, funnel_parameters())

    assert response.status_code == 200
    assert response.json() == {"events_received": 1, "messages": [], "fbtrace_id": "AbC123"}
    [request] = graph.received
    assert request.url == f"https://graph.example.test/v24.0/{PIXEL}/events"
    assert request.query == ""  # the token never travels in the URL
    assert request.headers["content-type"] == "application/json"
    assert graph.bodies()[0] == {
        "data": [
            {
                "event_name": "Purchase",
                "event_time": 1_794_981_600,  # 2026-11-18T06:00:00Z
                "action_source": "website",
                "event_id": "order-1001",
                "event_source_url": "https://shop.example.com/thanks",
                "user_data": {
                    "em": [sha("joe.smith@example.com")],
                    "fn": [sha("joe")],
                    "ln": [sha("smith")],
                    "ct": [sha("sanfrancisco")],
                    "st": [sha("ca")],
                    "country": [sha("us")],
                    "external_id": [sha("crm-42")],
                    "client_ip_address": "203.0.113.7",
                    "client_user_agent": "Mozilla/5.0 (Macintosh)",
                    "fbc": "fb.1.1554763741205.AbCdEfGhIjKlMnOp",
                    "fbp": "fb.1.1558571054389.1098115397",
                },
                "custom_data": {
                    "content_ids": ["ABC123", "XYZ789"],
                    "content_name": "Lettuce",
                    "content_category": "Grocery",
                },
            }
        ],
        "partner_agent": "funnelgate",
        "access_token": "EAAB-project-token",
    }


def test_legacy_actions_path_behaves_identically(client, graph, sign):
    response = call(
        client, sign, funnel_parameters(), path=f"/projects/{PROJECT}/actions", key="action"
    )
    assert response.status_code == 200
    assert response.json()["events_received"] == 1
    assert graph.bodies()[0]["data"][0]["event_id"] == "order-1001"


def test_minimal_event_gets_the_current_time_and_a_generated_event_id(client, graph, sign):
    parameters = {"pixel": PIXEL, "eventName": "Lead", "actionSource": "email",
                  "customerEmail": "a@b.co", "eventTime": "", "eventId": ""}  # fmt: skip
    assert call(client, sign, parameters).status_code == 200
    event = graph.bodies()[0]["data"][0]
    assert event["event_time"] == int(NOW)
    assert len(event["event_id"]) == 32
    assert event["user_data"] == {"em": [sha("a@b.co")]}
    assert "custom_data" not in event and "event_source_url" not in event


def test_already_hashed_values_pass_through_and_empty_strings_are_dropped(client, graph, sign):
    hashed = sha("joe@example.com").upper()
    parameters = funnel_parameters(customerEmail=hashed, customerFirstName="  ", customerCity="")
    assert call(client, sign, parameters).status_code == 200
    user_data = graph.bodies()[0]["data"][0]["user_data"]
    assert user_data["em"] == [hashed.lower()]
    assert "fn" not in user_data and "ct" not in user_data


def violations(response: httpx2.Response) -> dict[str, str]:
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["code"] == "INVALID_PARAMETERS" and body["retryable"] is False
    return {e["path"]: e["message"] for e in body["errors"]}


def test_schema_violations_are_all_reported_and_nothing_is_sent(client, graph, sign):
    response = call(client, sign, {"actionSource": "web", "eventTime": 5, "customerEmial": "x"})
    assert violations(response) == {
        "parameters.actionSource": "must be one of: website, chat, app, email, phone_call, "
        "system_generated, other",
        "parameters.eventName": "is required",
        "parameters.pixel": "is required",
        "parameters.eventTime": "must be of type string",
        "parameters.customerEmial": "is not a parameter of FACEBOOK_ADS_SEND_FUNNEL_EVENT",
    }
    assert graph.received == []


def test_parameters_must_be_an_object(client, graph, sign):
    assert violations(call(client, sign, ["x"])) == {"parameters": "must be of type object"}


@pytest.mark.parametrize(
    ("overrides", "path", "fragment"),
    [
        (
            {"eventSourceUrl": None},
            "parameters.eventSourceUrl",
            "required for website events",
        ),
        (
            {"customerClientUserAgent": ""},
            "parameters.customerClientUserAgent",
            "required for website",
        ),
        ({"eventSourceUrl": "shop.example.com"}, "parameters.eventSourceUrl", "http"),
        ({"eventTime": "2026-11-10T00:00:00Z"}, "parameters.eventTime", "more than 7 days"),
        ({"eventTime": "2026-11-18T11:10:00Z"}, "parameters.eventTime", "in the future"),
        ({"eventTime": "yesterday"}, "parameters.eventTime", "ISO 8601"),
        ({"pixel": "../../me"}, "parameters.pixel", "numeric"),
        ({"eventName": "  "}, "parameters.eventName", "must not be empty"),
        ({"customerEmail": "joe-at-example"}, "parameters.customerEmail", "not an email"),
        ({"customerCountryCode": "Atlantis"}, "parameters.customerCountryCode", "ISO 3166-1"),
        ({"customerClientIpAddress": "999.1.1.1"}, "parameters.customerClientIpAddress", "IP"),
        ({"customerClientIpAddress": "1.2.3.4\x00"}, "parameters.customerClientIpAddress", "NUL"),
        ({"contentId": "['ABC"}, "parameters.contentId", "unbalanced"),
    ],
)
def test_what_meta_would_reject_is_refused_with_the_field_path(
    client, graph, sign, overrides, path, fragment
):
    found = violations(call(client, sign, funnel_parameters(**overrides)))
    assert fragment in found[path]
    assert graph.received == []


def test_event_needs_a_customer_identifier(client, graph, sign):
    parameters = {"pixel": PIXEL, "eventName": "Lead", "actionSource": "chat"}
    assert (
        "at least one customer identifier"
        in violations(call(client, sign, parameters))["parameters"]
    )
    assert graph.received == []


def test_baseline_matching_rule_refuses_location_only_customers(client, graph, sign):
    parameters = {"pixel": PIXEL, "eventName": "Lead", "actionSource": "chat",
                  "customerCity": "Paris", "customerCountryCode": "FR"}  # fmt: skip
    assert "baseline matching" in violations(call(client, sign, parameters))["parameters"]
    assert graph.received == []


# Raw values the mapping refuses though the schema takes them (strings, right names).
REFUSED = {"customerEmail": "secretperson-at-nowhere", "customerPhone": "secretphone-42",
           "customerCountryCode": "secretlandia", "customerClientIpAddress": "secretaddress-1",
           "customerGender": "secretgender", "customerDateOfBirth": "secretbirthday"}  # fmt: skip
# Every other customer field, with raw values just as recognisable, that the mapping takes.
ACCEPTED = {"customerFirstName": "secretfirstname", "customerLastName": "secretlastname",
            "customerCity": "secretcity", "customerState": "secretstate", "customerZip": "secretzip",
            "customerExternalId": "secretexternalid", "customerClientUserAgent": "secretuseragent",
            "clickId": "fb.1.1.secretclickid", "browserId": "fb.1.1.secretbrowserid"}  # fmt: skip


def test_errors_never_echo_customer_data(client, graph, sign):
    """The mapping refuses each bad customer value by its path, and no raw value of any
    customer field comes back in the answer."""
    response = call(client, sign, funnel_parameters(**REFUSED, **ACCEPTED))
    assert set(violations(response)) == {f"parameters.{name}" for name in REFUSED}
    for value in [*REFUSED.values(), *ACCEPTED.values()]:
        assert value not in response.text.lower()
    assert graph.received == []


def test_snake_case_errors_never_echo_customer_data(client, graph, sign):
    raw = {"em": "secretperson-at-nowhere", "ph": "secretphone-42", "country": "secretlandia",
           "client_ip_address": "secretaddress-1", "ge": "secretgender", "db": "secretbirthday",
           "fn": "secretfirstname", "ln": "secretlastname", "ct": "secretcity", "st": "secretstate",
           "zp": "secretzip", "external_id": "secretexternalid", "client_user_agent": "secretuseragent",
           "fbc": "fb.1.1.secretclickid", "fbp": "fb.1.1.secretbrowserid"}  # fmt: skip
    parameters = {"pixel_id": PIXEL, "event_name": "Lead", "event_time": int(NOW),
                  "action_source": "chat", "user_data": {**raw, "ph": [raw["ph"]]}}  # fmt: skip
    response = call(client, sign, parameters, tool="meta_send_conversion_event")
    refused = {"em", "ph[0]", "country", "client_ip_address", "ge", "db"}  # list items by index
    assert set(violations(response)) == {f"parameters.user_data.{key}" for key in refused}
    for value in raw.values():
        assert value not in response.text.lower()
    assert graph.received == []


def test_unconnected_user_gets_integration_not_enabled(make_client, graph, sign, tmp_path: Path):
    client = make_client(facebook_access_token=None)
    response = call(client, sign, funnel_parameters())
    assert response.status_code == 400
    assert response.json()["code"] == "INTEGRATION_NOT_ENABLED"
    assert response.json()["message"] == "Integration not enabled for user."
    assert graph.received == []

    with closing(open_credentials(client.app.state.config.storage)) as store:  # as the CLI does
        store.set(PROJECT, "user-1", "EAAB-user-token")
    assert call(client, sign, funnel_parameters()).status_code == 200
    assert graph.bodies()[0]["access_token"] == "EAAB-user-token"


def test_users_own_credential_wins_and_app_secret_adds_proof(
    make_client, graph, sign, tmp_path: Path
):
    client = make_client(facebook_access_token="EAAB-project", facebook_app_secret="s3cret")
    with closing(open_credentials(client.app.state.config.storage)) as store:
        store.set(PROJECT, "user-1", "EAAB-user")
    assert call(client, sign, funnel_parameters()).status_code == 200
    body = graph.bodies()[0]
    assert body["access_token"] == "EAAB-user"
    assert body["appsecret_proof"] == hmac.new(b"s3cret", b"EAAB-user", hashlib.sha256).hexdigest()


def test_transient_error_is_retried_with_the_same_event_id(client, graph, sign):
    graph.script.append(graph_error(500, 2, is_transient=True))
    response = call(client, sign, funnel_parameters(eventId=None))
    assert response.status_code == 200
    first, second = graph.received
    assert first.body == second.body  # same bytes, so the same generated event_id


@pytest.mark.parametrize("code", [1, 2, 341, 368])
def test_transient_codes_are_retried(client, graph, sign, code):
    graph.script.append(graph_error(400, code))
    assert call(client, sign, funnel_parameters()).status_code == 200
    assert len(graph.received) == 2


@pytest.mark.parametrize("code", [4, 17, 613, 80004])
def test_throttling_queues_the_event_at_once(client, graph, sign, code):
    """Meta asks to slow down: no second request; the event is queued for the dispatcher,
    behind the pixel's breaker (server/delivery/throttle.py)."""
    graph.script.append(graph_error(400, code))
    response = call(client, sign, funnel_parameters())
    assert response.status_code == 202, response.text
    body = response.json()
    assert (body["reason"], body["upstream"]["upstream"]["code"]) == ("meta_unavailable", code)
    assert len(graph.received) == 1


def test_permanent_rejection_is_not_retried_and_carries_metas_details(client, graph, sign):
    graph.script.append(
        graph_error(400, 100, error_subcode=2804050, error_user_msg="Insufficient info")
    )
    response = call(client, sign, funnel_parameters())
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "UPSTREAM_REJECTED" and body["retryable"] is False
    assert body["event_ids"] == ["order-1001"]
    assert body["upstream"] == {
        "message": "(#100) test error", "type": "OAuthException", "code": 100,
        "error_subcode": 2804050, "error_user_msg": "Insufficient info",
        "fbtrace_id": "ErrTrace", "http_status": 400, "attempts": 1,
    }  # fmt: skip
    assert len(graph.received) == 1


@pytest.mark.parametrize("code", [190, 102, 10, 200, 294, 3])
def test_token_and_permission_errors_are_upstream_auth(client, graph, sign, code):
    graph.script.append(graph_error(400, code))
    response = call(client, sign, funnel_parameters())
    assert (response.status_code, response.json()["code"]) == (502, "UPSTREAM_AUTH")
    assert len(graph.received) == 1


def test_giving_up_on_5xx_queues_the_event_with_metas_last_answer(make_client, graph, sign):
    client = make_client(delivery_settings={"sync_budget_seconds": 0.8})
    graph.script.extend([Step(503, content=b"<html>busy</html>")] * 100)
    response = call(client, sign, funnel_parameters())
    body = response.json()
    assert (response.status_code, body["status"], body["reason"]) == (
        202, "queued", "meta_unavailable",
    )  # fmt: skip
    assert body["upstream"]["code"] == "UPSTREAM_UNAVAILABLE"
    assert body["upstream"]["upstream"]["http_status"] == 503
    assert len(graph.received) >= 2
    assert len({r.body for r in graph.received}) == 1


def test_timeouts_queue_the_event_within_the_budget(make_client, graph, sign):
    settings = {"timeout_seconds": 0.05}
    client = make_client(graph_settings=settings, delivery_settings={"sync_budget_seconds": 0.4})
    graph.script.extend([Step(delay=1.0)] * 20)
    started = time.monotonic()
    response = call(client, sign, funnel_parameters())
    assert time.monotonic() - started < 3.0  # the 0.4 s budget, not the default 5 s
    assert (response.status_code, response.json()["reason"]) == (202, "meta_unavailable")


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "INVALID_JSON"),
        ({"content": b"[1]", "headers": {"content-type": "application/json"}}, 400, "INVALID_REQUEST"),
        ({"json": {"parameters": {}}}, 400, "INVALID_REQUEST"),
        ({"json": {"tool": "FACEBOOK_ADS_SEND_FUNNEL_EVENT"}}, 400, "INVALID_REQUEST"),
        ({"json": {"tool": "NOPE", "parameters": {}}}, 404, "UNKNOWN_TOOL"),
        ({"content": b"tool=x", "headers": {"content-type": "text/plain"}}, 415, "UNSUPPORTED_MEDIA_TYPE"),
        ({"content": b"[" + b"1," * 600_000 + b"1]", "headers": {"content-type": "application/json"}},
         413, "PAYLOAD_TOO_LARGE"),
    ],
)  # fmt: skip
def test_bad_requests_get_json_errors_with_stable_codes(client, graph, sign, kwargs, status, code):
    headers = {"Authorization": f"Bearer {sign()}", **kwargs.pop("headers", {})}
    response = client.post(URL, headers=headers, **kwargs)
    assert (response.status_code, response.json()["code"]) == (status, code)
    assert response.json()["message"]
    assert graph.received == []


def test_body_over_1_mib_without_content_length_is_refused(client, sign):
    def chunks() -> Iterator[bytes]:
        for _ in range(20):
            yield b" " * 65536

    response = client.post(
        URL,
        content=chunks(),
        headers={"Authorization": f"Bearer {sign()}", "content-type": "application/json"},
    )
    assert (response.status_code, response.json()["code"]) == (413, "PAYLOAD_TOO_LARGE")


def test_unknown_project_route_and_method_are_json_errors(client, sign):
    assert client.post("/projects/nope/tools", json={}).json()["code"] == "UNKNOWN_PROJECT"
    assert client.get("/nowhere").json()["code"] == "NOT_FOUND"
    assert client.put(URL).json()["code"] == "METHOD_NOT_ALLOWED"


def test_healthz(client):
    assert client.get("/healthz").json() == {"status": "ok"}


@pytest.mark.parametrize("path", [URL + "/", f"/projects/{PROJECT}/actions/"])
def test_a_trailing_slash_is_served_without_a_redirect(client, graph, sign, path):
    response = client.post(
        path,
        json={
            "tool": "FACEBOOK_ADS_SEND_FUNNEL_EVENT",
            "action": "FACEBOOK_ADS_SEND_FUNNEL_EVENT",
            "parameters": funnel_parameters(),
        },
        headers={"Authorization": f"Bearer {sign()}"},
        follow_redirects=False,
    )
    assert response.status_code == 200
    assert len(graph.received) == 1


def test_list_tools_and_health_answer_with_a_trailing_slash(client, sign):
    headers = {"Authorization": f"Bearer {sign()}"}
    assert client.get(URL + "/", headers=headers, follow_redirects=False).status_code == 200
    assert client.get("/healthz/", follow_redirects=False).status_code == 200


# Graph answers decided by their HTTP status alone (policy.py's table, README's Delivery)


def test_http_429_without_a_known_code_is_throttling(client, graph, sign):
    graph.script.append(Step(429, error={"message": "Too many calls", "type": "OAuthException"}))
    response = call(client, sign, funnel_parameters())
    assert response.status_code == 202
    assert len(graph.received) == 1


@pytest.mark.parametrize("status", [401, 403])
def test_http_401_and_403_without_a_known_code_are_upstream_auth(client, graph, sign, status):
    graph.script.append(Step(status, error={"message": "Not allowed", "type": "OAuthException"}))
    response = call(client, sign, funnel_parameters())
    body = response.json()
    assert (response.status_code, body["code"], body["retryable"]) == (502, "UPSTREAM_AUTH", False)
    assert body["upstream"]["http_status"] == status
    assert len(graph.received) == 1


class BrokenTransport:
    """A Graph transport with a bug: what reaches the caller is a JSON 500, nothing more."""

    async def post(self, url: str, content: bytes) -> Answer:
        raise RuntimeError(f"bug while sending {content!r}")

    async def aclose(self) -> None:
        return None


def test_a_bug_is_a_json_500_that_says_nothing_else(make_client, sign, log_capture):
    client = make_client(transport=BrokenTransport())
    response = call(client, sign, funnel_parameters())
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"message": "Internal error.", "code": "INTERNAL_ERROR",
                               "retryable": False}  # fmt: skip
    [line] = [x for x in log_capture.lines(client) if x["event"] == "request"]
    assert (line["status"], line["code"], line["level"]) == (500, "INTERNAL_ERROR", "error")
    assert "bug while sending" not in log_capture.stream.getvalue()


# Mapping details the README promises


def test_ipv6_addresses_are_accepted_in_their_compressed_form(client, graph, sign):
    parameters = funnel_parameters(
        customerClientIpAddress=" 2001:0DB8:0000:0000:0000:0000:0000:0001 "
    )
    assert call(client, sign, parameters).status_code == 200
    assert graph.bodies()[0]["data"][0]["user_data"]["client_ip_address"] == "2001:db8::1"
    refused = funnel_parameters(customerClientIpAddress="2001:db8::g1")
    assert "IP" in violations(call(client, sign, refused))["parameters.customerClientIpAddress"]


def test_a_calls_test_event_code_wins_over_the_projects(make_client, graph, sign):
    client = make_client(test_event_code="PROJECT1")
    assert call(client, sign, funnel_parameters(testEventCode="CALL1")).status_code == 200
    assert graph.bodies()[0]["test_event_code"] == "CALL1"


def test_custom_data_text_is_trimmed_and_empty_text_dropped(client, graph, sign):
    parameters = funnel_parameters(contentName="  Lettuce ", contentCategory="", orderId=" o-7 ")
    assert call(client, sign, parameters).status_code == 200
    assert graph.bodies()[0]["data"][0]["custom_data"] == {
        "content_ids": ["ABC123", "XYZ789"], "content_name": "Lettuce", "order_id": "o-7"}  # fmt: skip
