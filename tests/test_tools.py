"""List Tools, the catalog's other tools, extension parameters, test events and dry run:
in-process, Graph faked at the transport."""

from __future__ import annotations

import hashlib
from typing import Any

import httpx2
import pytest
from starlette.testclient import TestClient

from tests.support import NOW, PIXEL, PROJECT, funnel_parameters

TOOLS = ["FACEBOOK_ADS_SEND_FUNNEL_EVENT", "FACEBOOK_ADS_SEND_LEAD_EVENT", "meta_send_conversion_event",
         "FACEBOOK_ADS_SEND_EVENTS"]  # fmt: skip


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def run(
    client: TestClient, sign, tool: str, parameters: dict[str, Any], query: str = ""
) -> httpx2.Response:
    return client.post(f"/projects/{PROJECT}/tools{query}", json={"tool": tool, "parameters": parameters},
                       headers={"Authorization": f"Bearer {sign()}"})  # fmt: skip


def listing(client: TestClient, sign, path: str = "tools", query: str = "") -> dict[str, Any]:
    response = client.get(
        f"/projects/{PROJECT}/{path}{query}", headers={"Authorization": f"Bearer {sign()}"}
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def raw_event(**overrides: Any) -> dict[str, Any]:
    event = {"event_name": "Purchase", "event_time": int(NOW) - 60, "action_source": "website",
             "event_source_url": "https://shop.example.com/thanks",
             "user_data": {"em": "Joe@Example.com", "client_user_agent": "UA/1.0", "fbc": "fb.1.1.AbC"},
             "custom_data": {"value": 12.5, "currency": "EUR", "content_ids": ["A1"], "brand": "acme"}}  # fmt: skip
    event.update(overrides)
    return event


# List Tools


def test_list_tools_answers_functions_under_both_keys_with_the_validated_schemas(client, sign):
    body = listing(client, sign)
    assert body["errors"] == [] and body["tools"] == body["actions"]
    functions = body["tools"]["facebookAds"]
    assert [f["function"]["name"] for f in functions] == TOOLS
    runner_schemas = {name: tool.schema for name, tool in client.app.state.runner.catalog.items()}
    for function in functions:
        assert function["type"] == "function" and function["function"]["description"]
        assert function["function"]["parameters"] == runner_schemas[function["function"]["name"]]


def test_legacy_list_actions_answers_under_actions_only(client, sign):
    body = listing(client, sign, "actions")
    assert (
        "tools" not in body
        and [f["function"]["name"] for f in body["actions"]["facebookAds"]] == TOOLS
    )


def test_published_schema_is_kept_and_every_parameter_is_described(client):
    schema = client.app.state.runner.catalog["FACEBOOK_ADS_SEND_FUNNEL_EVENT"].schema
    assert schema["required"] == ["eventName", "actionSource", "pixel"]
    assert schema["properties"]["actionSource"]["enum"] == [
        "website", "chat", "app", "email", "phone_call", "system_generated", "other"]  # fmt: skip
    assert schema["x-integration"] == "facebookAds"
    for tool in client.app.state.runner.catalog.values():
        for name, prop in tool.schema["properties"].items():
            assert len(prop.get("description", "")) > 5, (tool.name, name)


def test_paragon_format_describes_form_inputs(client, sign):
    [funnel, *_] = listing(client, sign, query="?format=paragon")["tools"]["facebookAds"]
    inputs = {i["id"]: i for i in funnel["inputs"]}
    assert inputs["actionSource"]["type"] == "ENUM" and inputs["actionSource"]["required"] is True
    assert [v["value"] for v in inputs["actionSource"]["values"]][:2] == ["website", "chat"]
    assert inputs["eventTime"] == {
        "id": "eventTime", "title": "Event Time", "required": False, "type": "TEXT",
        "subtitle": inputs["eventTime"]["subtitle"]}  # fmt: skip
    assert inputs["eventTime"]["subtitle"].startswith("Time when the event occurred")
    assert inputs["optOut"]["type"] == "BOOLEAN_INPUT"
    assert inputs["contents"]["type"] == "CODE"
    assert inputs["value"]["dataType"] == "number"


@pytest.mark.parametrize(
    ("query", "expected"),
    [("?integrations=facebookAds", 4), ("?integrations=salesforce", 0), ("?categories=advertising", 4),
     ("?categories=crm", 0), ("?integrations=slack,facebookAds&categories=advertising", 4)],
)  # fmt: skip
def test_list_tools_filters(client, sign, query, expected):
    assert len(listing(client, sign, query=query)["tools"].get("facebookAds", [])) == expected


def test_list_tools_limits_to_available_integrations_by_default(make_client, sign):
    client = make_client(facebook_access_token=None)
    assert listing(client, sign)["tools"] == {}
    assert (
        len(listing(client, sign, query="?limit_to_available=false")["tools"]["facebookAds"]) == 4
    )


def test_list_tools_refuses_unknown_format_and_bad_tokens(client, sign):
    response = client.get(
        f"/projects/{PROJECT}/tools?format=xml", headers={"Authorization": f"Bearer {sign()}"}
    )
    assert (response.status_code, response.json()["code"]) == (400, "INVALID_REQUEST")
    assert client.get(f"/projects/{PROJECT}/tools").status_code == 401


# FACEBOOK_ADS_SEND_LEAD_EVENT and extension parameters


def test_lead_event_is_always_lead_and_has_no_event_name(client, graph, sign):
    parameters = funnel_parameters(eventName=None)
    assert run(client, sign, "FACEBOOK_ADS_SEND_LEAD_EVENT", parameters).status_code == 200
    assert graph.bodies()[0]["data"][0]["event_name"] == "Lead"
    response = run(client, sign, "FACEBOOK_ADS_SEND_LEAD_EVENT", funnel_parameters())
    assert response.json()["errors"] == [
        {"path": "parameters.eventName", "message": "is not a parameter of FACEBOOK_ADS_SEND_LEAD_EVENT"}]  # fmt: skip


def test_extension_parameters_map_into_the_event(make_client, graph, sign):
    client = make_client(default_phone_region="us")
    parameters = funnel_parameters(
        value=49.9, currency="USD", orderId="o-7", numItems=2, optOut=False, dataProcessingOptions=[],
        contents=[{"id": "ABC123", "quantity": 2, "item_price": 24.95}], customerPhone="(650) 555-1234",
        customerZip="94107-1234", customerGender="Female", customerDateOfBirth="1990-02-03",
        testEventCode="TEST123",
    )  # fmt: skip
    assert run(client, sign, "FACEBOOK_ADS_SEND_FUNNEL_EVENT", parameters).status_code == 200
    body = graph.bodies()[0]
    event = body["data"][0]
    assert body["test_event_code"] == "TEST123"
    assert event["custom_data"] == {
        "content_ids": ["ABC123", "XYZ789"], "content_name": "Lettuce", "content_category": "Grocery",
        "value": 49.9, "currency": "USD", "order_id": "o-7", "num_items": 2,
        "contents": [{"id": "ABC123", "quantity": 2, "item_price": 24.95}]}  # fmt: skip
    assert event["opt_out"] is False and event["data_processing_options"] == []
    user_data = event["user_data"]
    assert user_data["ph"] == [sha("16505551234")]  # national number + the project's region
    assert user_data["zp"] == [sha("94107")]
    assert user_data["ge"] == [sha("f")]
    assert user_data["db"] == [sha("19900203")]


def test_extension_parameters_are_validated_by_their_own_schema(client, graph, sign):
    parameters = funnel_parameters(
        value="a lot", currency="dollars", contents=[{"id": "A"}], numItems=-1
    )
    errors = {
        e["path"]
        for e in run(client, sign, "FACEBOOK_ADS_SEND_FUNNEL_EVENT", parameters).json()["errors"]
    }
    assert errors == {"parameters.value", "parameters.currency", "parameters.contents[0].quantity",
                      "parameters.numItems"}  # fmt: skip
    assert graph.received == []


def test_project_default_test_event_code_is_forwarded(make_client, graph, sign):
    client = make_client(test_event_code="TEST999")
    assert (
        run(client, sign, "FACEBOOK_ADS_SEND_FUNNEL_EVENT", funnel_parameters()).status_code == 200
    )
    assert graph.bodies()[0]["test_event_code"] == "TEST999"


# meta_send_conversion_event


def test_conversion_event_hashes_raw_user_data_and_answers_markdown(client, graph, sign):
    hashed_phone = sha("16505551234")
    parameters = {"pixel_id": PIXEL, **raw_event(), "test_event_code": "TEST1",
                  "response_format": "markdown"}  # fmt: skip
    parameters["user_data"] = {**parameters["user_data"], "ph": [hashed_phone, "+1 650 555 9999"]}
    response = run(client, sign, "meta_send_conversion_event", parameters)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/markdown")
    assert "**Meta received 1 event(s)**" in response.text and "`AbC123`" in response.text
    assert "TEST1" in response.text
    body = graph.bodies()[0]
    assert body["test_event_code"] == "TEST1"
    event = body["data"][0]
    assert event["user_data"] == {"em": [sha("joe@example.com")], "ph": [hashed_phone, sha("16505559999")],
                                  "client_user_agent": "UA/1.0", "fbc": "fb.1.1.AbC"}  # fmt: skip
    assert event["custom_data"]["brand"] == "acme"  # extra custom_data keys pass through
    assert len(event["event_id"]) == 32


def test_conversion_event_answers_json_when_asked(client, sign):
    response = run(client, sign, "meta_send_conversion_event",
                   {"pixel_id": PIXEL, **raw_event(), "response_format": "json"})  # fmt: skip
    assert response.json() == {"events_received": 1, "messages": [], "fbtrace_id": "AbC123"}


def test_conversion_event_markdown_warns_about_a_purchase_without_value(client, sign):
    response = run(
        client,
        sign,
        "meta_send_conversion_event",
        {"pixel_id": PIXEL, **raw_event(custom_data={}), "response_format": "markdown"},
    )
    assert "warning: Purchase events should carry custom_data.value" in response.text


@pytest.mark.parametrize(
    ("source", "age_days", "accepted"),
    [("physical_store", 30, True), ("physical_store", 63, False), ("website", 8, False),
     ("business_messaging", 1, True), ("system_generated", 6, True)],
)  # fmt: skip
def test_conversion_event_time_windows_follow_the_action_source(
    client, graph, sign, source, age_days, accepted
):
    event = raw_event(action_source=source, event_time=int(NOW) - age_days * 86400)
    response = run(client, sign, "meta_send_conversion_event", {"pixel_id": PIXEL, **event})
    assert (response.status_code == 200) is accepted, response.text
    if not accepted:
        assert response.json()["errors"][0]["path"] == "parameters.event_time"


def test_conversion_event_reports_bad_user_data_by_path(client, graph, sign):
    event = raw_event(user_data={"em": "nope", "client_user_agent": "UA", "zz": "x"})
    errors = run(client, sign, "meta_send_conversion_event", {"pixel_id": PIXEL, **event}).json()[
        "errors"
    ]
    assert {e["path"] for e in errors} == {"parameters.user_data.zz"}  # schema first
    event = raw_event(user_data={"em": "nope", "client_user_agent": "UA"})
    errors = run(client, sign, "meta_send_conversion_event", {"pixel_id": PIXEL, **event}).json()[
        "errors"
    ]
    found = {e["path"]: e["message"] for e in errors}
    assert found["parameters.user_data.em"] == "is not an email address"
    assert "baseline matching" in found["parameters.user_data"]  # only the user agent is left
    assert len(found) == 2
    assert graph.received == []


# FACEBOOK_ADS_SEND_EVENTS


def test_batch_sends_every_event_in_one_request(client, graph, sign):
    events = [raw_event(event_id=f"e{i}") for i in range(3)]
    response = run(client, sign, "FACEBOOK_ADS_SEND_EVENTS", {"pixel_id": PIXEL, "events": events})
    assert response.json()["events_received"] == 3
    [body] = graph.bodies()
    assert [e["event_id"] for e in body["data"]] == ["e0", "e1", "e2"]


def test_batch_with_one_bad_event_is_refused_by_index_before_sending(client, graph, sign):
    events = [raw_event(), raw_event(), raw_event(), raw_event(user_data={"ct": "Paris"})]
    del events[1]["event_source_url"]
    response = run(client, sign, "FACEBOOK_ADS_SEND_EVENTS", {"pixel_id": PIXEL, "events": events})
    assert {e["path"] for e in response.json()["errors"]} == {
        "parameters.events[1].event_source_url",
        "parameters.events[3].user_data.client_user_agent",
        "parameters.events[3].user_data",  # baseline matching: a city alone cannot match
    }
    assert graph.received == []


def test_batch_size_is_1_to_1000(client, graph, sign):
    too_many = run(
        client,
        sign,
        "FACEBOOK_ADS_SEND_EVENTS",
        {"pixel_id": PIXEL, "events": [raw_event()] * 1001},
    )
    assert too_many.json()["errors"] == [
        {"path": "parameters.events", "message": "must have at most 1000 items"}
    ]
    empty = run(client, sign, "FACEBOOK_ADS_SEND_EVENTS", {"pixel_id": PIXEL, "events": []})
    assert empty.json()["errors"] == [
        {"path": "parameters.events", "message": "must have at least 1 item(s)"}
    ]
    assert graph.received == []


# Dry run


def test_dry_run_shows_the_exact_request_and_match_keys_and_sends_nothing(make_client, graph, sign):
    client = make_client(facebook_access_token=None)
    response = run(
        client, sign, "FACEBOOK_ADS_SEND_FUNNEL_EVENT", funnel_parameters(), query="?dry_run=true"
    )
    body = response.json()
    assert response.status_code == 200 and body["dry_run"] is True
    assert body["integration_enabled"] is False  # no credential: a real call would be refused
    assert body["request"]["url"] == f"https://graph.example.test/v24.0/{PIXEL}/events"
    assert body["request"]["body"]["data"][0]["user_data"]["em"] == [sha("joe.smith@example.com")]
    assert "access_token" not in body["request"]["body"]
    assert body["match_keys"] == [["client_ip_address", "client_user_agent", "country", "ct", "em",
                                   "external_id", "fbc", "fbp", "fn", "ln", "st"]]  # fmt: skip
    assert graph.received == []


def test_dry_run_still_validates(client, graph, sign):
    response = run(
        client, sign, "FACEBOOK_ADS_SEND_FUNNEL_EVENT", {"pixel": PIXEL}, query="?dry_run=true"
    )
    assert response.json()["code"] == "INVALID_PARAMETERS"
    assert (
        run(client, sign, "FACEBOOK_ADS_SEND_FUNNEL_EVENT", {}, query="?dry_run=maybe").status_code
        == 400
    )


# Rules every snake_case tool shares


def test_actionkit_app_events_are_refused_for_their_action_source(client, graph, sign):
    """The published enum offers `app`, but these tools cannot carry app_data."""
    refused = run(client, sign, "FACEBOOK_ADS_SEND_FUNNEL_EVENT",
                  funnel_parameters(actionSource="app", eventSourceUrl=None))  # fmt: skip
    assert refused.json()["errors"] == [
        {
            "path": "parameters.actionSource",
            "message": "app events need app_data (Meta requires it)",
        }
    ]
    assert graph.received == []


def test_app_events_need_app_data(client, graph, sign):
    event = raw_event(action_source="app")
    del event["event_source_url"]
    refused = run(client, sign, "meta_send_conversion_event", {"pixel_id": PIXEL, **event})
    assert refused.json()["errors"] == [
        {"path": "parameters.app_data", "message": "app events need app_data (Meta requires it)"}
    ]
    assert graph.received == []
    app_data = {"advertiser_tracking_enabled": 1, "extinfo": ["a2", "com.example.app"]}
    accepted = run(client, sign, "meta_send_conversion_event",
                   {"pixel_id": PIXEL, **event, "app_data": app_data})  # fmt: skip
    assert accepted.status_code == 200, accepted.text
    assert graph.bodies()[0]["data"][0]["app_data"] == app_data


@pytest.mark.parametrize(
    ("tool", "parameters"),
    [("meta_send_conversion_event", {"pixel_id": PIXEL, **raw_event()}),
     ("FACEBOOK_ADS_SEND_EVENTS", {"pixel_id": PIXEL, "events": [raw_event()]})],
)  # fmt: skip
def test_a_calls_test_event_code_wins_over_the_projects(make_client, graph, sign, tool, parameters):
    client = make_client(test_event_code="PROJECT1")
    assert run(client, sign, tool, parameters).status_code == 200
    assert run(client, sign, tool, {**parameters, "test_event_code": "CALL1"}).status_code == 200
    assert [body["test_event_code"] for body in graph.bodies()] == ["PROJECT1", "CALL1"]
