"""Queued delivery over HTTP: the 202, `Prefer`, the status route (queued, retried, delivered:
on each backend), the sync fallback, and what the outbox keeps on disk (README, Delivery)."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

import pytest
from starlette.testclient import TestClient

from tests.support import (
    PIXEL,
    PROJECT,
    PROJECT_TOKEN,
    MakeClient,
    Step,
    funnel_parameters,
    graph_error,
    make_config,
)

URL = f"/projects/{PROJECT}/tools"
TOOL = "FACEBOOK_ADS_SEND_FUNNEL_EVENT"


def post(client: TestClient, sign: Any, parameters: dict[str, Any], **headers: str) -> Any:
    return client.post(URL, json={"tool": TOOL, "parameters": parameters},
                       headers={"Authorization": f"Bearer {sign()}", **headers})  # fmt: skip


def status_of(client: TestClient, sign: Any, location: str, *, until: str = "",
              user: str | None = None) -> Any:  # fmt: skip
    """The status route's answer, polled (≤ 5 s) until its status is `until`."""
    token = sign(sub=user) if user else sign()
    deadline = time.monotonic() + 5
    while True:
        response = client.get(location, headers={"Authorization": f"Bearer {token}"})
        if not until or response.json().get("status") == until or time.monotonic() > deadline:
            return response
        time.sleep(0.02)


@pytest.fixture
def queued_client(
    backend: str | None, make_client: MakeClient, tmp_path: Any, rsa_key: Any
) -> TestClient:
    """The app in queued mode on each backend (`backend` first: its database outlives the app)."""
    config = make_config(tmp_path, rsa_key, delivery_settings={"mode": "queued"},
                         database_url=backend, facebook_access_token=PROJECT_TOKEN)  # fmt: skip
    return make_client(config)


def test_queued_mode_answers_202_once_on_disk_then_delivers(queued_client, graph, sign):
    client = queued_client
    response = post(client, sign, funnel_parameters())
    assert response.status_code == 202
    body = response.json()
    assert body == {
        "status": "queued", "event_ids": ["order-1001"], "events_received": 1,
        "reason": "queued_mode", "status_url": f"/projects/{PROJECT}/events/order-1001",
    }  # fmt: skip
    assert response.headers["location"] == body["status_url"]
    delivered = status_of(client, sign, body["status_url"], until="delivered").json()
    assert delivered["status"] == "delivered"
    assert (delivered["event_id"], delivered["pixel_id"], delivered["attempts"]) == (
        "order-1001", PIXEL, 1,
    )  # fmt: skip
    assert delivered["fbtrace_id"] == "AbC123"
    [sent] = graph.bodies()
    assert sent["data"][0]["event_id"] == "order-1001"
    assert sent["access_token"] == PROJECT_TOKEN  # resolved when sending


def test_a_project_can_queue_while_the_default_is_sync(make_client, graph, sign):
    client = make_client(delivery_mode="queued")
    assert post(client, sign, funnel_parameters()).status_code == 202


def test_prefer_respond_async_queues_one_call(client, graph, sign):
    response = post(client, sign, funnel_parameters(), Prefer="respond-async")
    assert response.status_code == 202
    assert response.headers["preference-applied"] == "respond-async"
    assert response.json()["reason"] == "requested"
    assert (
        status_of(client, sign, response.headers["location"], until="delivered").json()["status"]
        == "delivered"
    )


def test_prefer_wait_caps_the_budget_and_says_so(client, graph, sign):
    response = post(client, sign, funnel_parameters(), Prefer="wait=3, foo=bar")
    assert response.status_code == 200
    assert response.headers["preference-applied"] == "wait=3"


@pytest.mark.parametrize("prefer", ["", "wait=", "wait=-1", "wait=x", "respond-sync", ";;,"])
def test_preferences_not_understood_are_ignored(client, graph, sign, prefer):
    """RFC 7240 §2: a server ignores preferences it does not understand."""
    response = post(client, sign, funnel_parameters(), Prefer=prefer)
    assert response.status_code == 200
    assert "preference-applied" not in response.headers


def test_an_attempt_outliving_the_budget_is_settled_by_its_own_answer(make_client, graph, sign):
    """Meta answers after 1 s, the budget is 0.3 s: the call answers 202 at once, and Meta's
    late answer marks the event delivered; nothing is sent twice."""
    client = make_client(graph_settings={"timeout_seconds": 5},
                         delivery_settings={"sync_budget_seconds": 0.3})  # fmt: skip
    graph.script.append(Step(delay=1.0))
    response = post(client, sign, funnel_parameters())
    assert response.status_code == 202
    assert response.json()["reason"] == "meta_unavailable"
    delivered = status_of(client, sign, response.headers["location"], until="delivered").json()
    assert (delivered["status"], delivered["attempts"]) == ("delivered", 1)
    assert len(graph.received) == 1


def test_metas_verdicts_on_the_event_are_still_answered_in_sync_mode(client, graph, sign):
    graph.script.append(graph_error(400, 100, error_user_msg="Invalid parameter"))
    response = post(client, sign, funnel_parameters())
    assert (response.status_code, response.json()["code"]) == (400, "UPSTREAM_REJECTED")


def test_the_status_of_a_retrying_event_carries_metas_error(queued_client, graph, sign):
    client = queued_client
    graph.script.extend([graph_error(500, 2, is_transient=True)] * 5)
    response = post(client, sign, funnel_parameters())
    deadline = time.monotonic() + 5
    status = status_of(client, sign, response.headers["location"]).json()
    while status["attempts"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
        status = status_of(client, sign, response.headers["location"]).json()
    assert (status["status"], status["attempts"]) == ("queued", 1)
    assert status["error"]["code"] == "UPSTREAM_UNAVAILABLE"
    assert status["error"]["upstream"]["code"] == 2
    assert "next_attempt_at" in status


def test_a_user_sees_only_its_own_events(queued_client, graph, sign):
    client = queued_client
    location = post(client, sign, funnel_parameters()).headers["location"]
    assert status_of(client, sign, location).status_code == 200
    other = status_of(client, sign, location, user="someone-else")
    assert (other.status_code, other.json()["code"]) == (404, "NOT_FOUND")
    unknown = status_of(client, sign, f"/projects/{PROJECT}/events/nope")
    assert unknown.status_code == 404
    assert client.get(location).status_code == 401
    assert client.get(f"/projects/{PROJECT}/events/{'x' * 20_000}",
                      headers={"Authorization": f"Bearer {sign()}"}).status_code == 404  # fmt: skip


def test_the_outbox_holds_no_raw_customer_data_and_no_token(make_client, graph, sign, tmp_path):
    """Events are kept as Meta receives them: hashed; credentials are resolved when sending."""
    graph.script.extend([graph_error(500, 2, is_transient=True)] * 5)  # keep them queued
    client = make_client(delivery_settings={"mode": "queued"})
    raw = funnel_parameters(customerEmail="Raw.Person@Example.com", customerPhone="+1 650 555 0123",
                            customerFirstName="Rawfirstname")  # fmt: skip
    assert post(client, sign, raw).status_code == 202
    db = sqlite3.connect(tmp_path / "funnelgate.db")
    dump = "\n".join(db.iterdump())
    db.close()
    assert 'INSERT INTO "outbox"' in dump
    for secret in ("raw.person@example.com", "Raw.Person", "650 555", "6505550123",
                   "Rawfirstname", "rawfirstname", PROJECT_TOKEN):  # fmt: skip
        assert secret not in dump


def test_dry_run_says_which_mode_would_apply(make_client, graph, sign):
    client = make_client(delivery_settings={"mode": "queued"})
    response = client.post(f"{URL}?dry_run=true", json={"tool": TOOL, "parameters": funnel_parameters()},
                           headers={"Authorization": f"Bearer {sign()}"})  # fmt: skip
    assert response.json()["delivery_mode"] == "queued"
    assert graph.received == []
