"""HTTP conventions (RFC 9110, RFC 6750, RFC 7519): Allow on 405, WWW-Authenticate on 401,
Retry-After on retryable answers, content negotiation for text answers, NumericDate claims."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support import NOW, PIXEL, PROJECT, funnel_parameters, graph_error

URL = f"/projects/{PROJECT}/tools"


def snake_event() -> dict[str, object]:
    return {"pixel_id": PIXEL, "event_name": "Purchase", "event_time": int(NOW) - 60,
            "action_source": "website", "event_source_url": "https://shop.example.com/",
            "user_data": {"em": "joe@example.com", "client_user_agent": "UA/1.0"}}  # fmt: skip


def test_405_names_the_allowed_methods(client):
    response = client.delete(URL)
    assert response.status_code == 405
    assert set(response.headers["allow"].replace(" ", "").split(",")) >= {"GET", "POST"}
    assert response.json()["code"] == "METHOD_NOT_ALLOWED"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer not-a-jwt"}])
def test_401_asks_for_a_bearer_token(client, headers):
    response = client.post(URL, json={"tool": "x", "parameters": {}}, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_401_on_mcp_asks_for_a_bearer_token(client):
    response = client.post(f"/projects/{PROJECT}/mcp", json={})
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_a_full_queue_answers_503_with_retry_after(make_client, graph, sign):
    client = make_client(delivery_settings={"mode": "queued", "max_queued_events": 1})
    graph.script.extend([graph_error(500, 2, is_transient=True)] * 200)  # nothing drains

    def post() -> Any:
        return client.post(URL, json={"tool": "FACEBOOK_ADS_SEND_FUNNEL_EVENT",
                                      "parameters": funnel_parameters(eventId=None)},
                           headers={"Authorization": f"Bearer {sign()}"})  # fmt: skip

    assert post().status_code == 202
    response = post()
    assert (response.status_code, response.json()["code"]) == (503, "QUEUE_FULL")
    assert response.json()["retryable"] is True
    assert int(response.headers["retry-after"]) > 0


@pytest.mark.parametrize(
    ("accept", "media_type"),
    [(None, "application/json"), ("application/json", "application/json"),
     ("*/*", "application/json"), ("text/markdown", "text/markdown"),
     ("application/json;q=0.5, text/markdown", "text/markdown"),
     ("text/markdown;q=0.2, application/json", "application/json")],
)  # fmt: skip
def test_a_text_answer_follows_accept_over_http(client, sign, accept, media_type):
    headers = {"Authorization": f"Bearer {sign()}"}
    if accept is not None:
        headers["Accept"] = accept
    response = client.post(URL, json={"tool": "meta_send_conversion_event",
                                      "parameters": snake_event()}, headers=headers)  # fmt: skip
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(media_type)
    if media_type == "application/json":
        assert response.json()["events_received"] == 1


@pytest.mark.parametrize(
    ("claims", "message"),
    [({"exp": 10**400}, "out of range"), ({"exp": str(int(NOW) + 3600)}, "NumericDate"),
     ({"exp": True}, "NumericDate"), ({"iat": "1"}, "NumericDate"),
     ({"nbf": int(NOW) + 3600}, "not valid yet")],
)  # fmt: skip
def test_token_times_must_be_numeric_dates(client, sign, claims, message):
    response = client.post(URL, json={"tool": "FACEBOOK_ADS_SEND_FUNNEL_EVENT", "parameters": {}},
                           headers={"Authorization": f"Bearer {sign(now=NOW, **claims)}"})  # fmt: skip
    assert response.status_code == 401
    assert message in response.json()["message"]
